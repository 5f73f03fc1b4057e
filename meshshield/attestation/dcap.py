"""Intel DCAP ECDSA quotes: the parts SGX (v3) and TDX (v4, v5) quotes share.

A quote is ``header (48 B) | [v5: u16 body type, u32 body size] | body | u32 signature
data length | signature data | (trailing bytes, allowed and ignored)``. All integers
are little-endian; ECDSA signatures are ``r || s`` and public keys ``x || y``, 32-byte
big-endian each, on P-256.

Signature data::

    v3:    sig[64] | attest_key[64] | QE report[384] | QE report sig[64]
           | u16 auth_len | auth | u16 cert type 5 | u32 size | PEM chain
    v4/v5: sig[64] | attest_key[64] | u16 cert type 6 | u32 size
           | { QE report[384] | QE report sig[64] | u16 auth_len | auth
               | u16 cert type 5 | u32 size | PEM chain }

What makes a quote genuine (`verify_quote_signatures`), in the order checked:

1. the PCK chain inside the quote: PCK leaf <- PCK Platform/Processor CA <- the pinned
   Intel SGX Root CA (never the root the quote carries), each valid at ``at``;
2. the QE report is signed by the PCK leaf's key and comes from Intel's quoting enclave
   (its MRSIGNER);
3. QE report_data[0:32] == SHA-256(attest_key || auth), report_data[32:64] == 0: the
   quoting enclave vouches for the attestation key;
4. the attestation key signs header + (body descriptor) + body.

Parsing is strict: a wrong version, key type, TEE type or vendor, a length field that
points past the data, or nested structures that do not exactly fill the space their
length declares is `evidence_malformed`. Only bytes after the declared signature data
are ignored (real quotes carry them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.attestation.pck import (
    PARSE_ERRORS,
    PckChain,
    cert_label,
    check_readable,
    verify_p256,
    verify_pck_chain,
)
from meshshield.errors import EvidenceError, Reason

HEADER_SIZE = 48
ENCLAVE_REPORT_SIZE = 384
TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
ATT_KEY_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
BODY_TYPE_SGX = 1
BODY_TYPE_TDX10 = 2
BODY_TYPE_TDX15 = 3
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
# Intel's quoting enclaves: SGX QE3 signs SGX quotes, the TD QE signs TDX quotes.
SGX_QE3_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
TDX_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")

# Real quotes are 5-8 KiB; refuse anything absurd before touching it.
MAX_QUOTE_SIZE = 1 << 20
_MAX_CHAIN_CERTS = 8
_BODY_SIZES = {
    BODY_TYPE_SGX: ENCLAVE_REPORT_SIZE,
    BODY_TYPE_TDX10: TD_REPORT10_SIZE,
    BODY_TYPE_TDX15: TD_REPORT15_SIZE,
}
_HEADER = struct.Struct("<HHIHH16s20s")
_SNP_REPORT_SIZE = 1184


def _malformed(message: str) -> EvidenceError:
    return EvidenceError(Reason.EVIDENCE_MALFORMED, message)


def _bad_signature(message: str) -> EvidenceError:
    return EvidenceError(Reason.SIGNATURE_INVALID, message)


def _bad_chain(message: str) -> EvidenceError:
    return EvidenceError(Reason.CHAIN_INVALID, message)


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX report body (384 B): the SGX quote's body, and every quote's QE report."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes

    @property
    def debug(self) -> bool:
        # ATTRIBUTES.FLAGS bit 1 is DEBUG.
        return bool(self.attributes[0] & 0x02)


def parse_enclave_report(raw: bytes) -> EnclaveReport:
    if len(raw) != ENCLAVE_REPORT_SIZE:
        raise _malformed(f"SGX report body must be {ENCLAVE_REPORT_SIZE} bytes, got {len(raw)}")
    (misc_select,) = struct.unpack_from("<I", raw, 16)
    isv_prod_id, isv_svn, config_svn = struct.unpack_from("<HHH", raw, 256)
    return EnclaveReport(
        raw=bytes(raw),
        cpu_svn=raw[0:16],
        misc_select=misc_select,
        isv_ext_prod_id=raw[32:48],
        attributes=raw[48:64],
        mr_enclave=raw[64:96],
        mr_signer=raw[128:160],
        config_id=raw[192:256],
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        config_svn=config_svn,
        isv_family_id=raw[304:320],
        report_data=raw[320:384],
    )


@dataclass(frozen=True)
class SignatureData:
    signature: bytes
    attest_key: bytes
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class Quote:
    """A parsed, not yet verified, DCAP quote."""

    header: QuoteHeader
    body_type: int
    body: bytes
    signed: bytes  # what the attestation key signs
    sig: SignatureData
    trailing: int  # bytes after the declared signature data

    @property
    def version(self) -> int:
        return self.header.version


class _Reader:
    """Bounded cursor over untrusted bytes; running off the end is evidence_malformed."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise _malformed(
                f"{self.what} ends inside {field}: {field} needs {n} bytes at offset "
                f"{self.pos}, only {len(self.data) - self.pos} remain"
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise _malformed(
                f"{self.what} declares {len(self.data)} bytes but its contents end after "
                f"{self.pos}; {len(self.data) - self.pos} unexplained bytes"
            )


def _parse_header(data: bytes) -> QuoteHeader:
    if len(data) < HEADER_SIZE:
        raise _malformed(f"quote is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header")
    version, akt, tee, qe_svn, pce_svn, vendor, user = _HEADER.unpack_from(data, 0)
    if version not in (3, 4, 5):
        hint = ""
        if len(data) == _SNP_REPORT_SIZE:
            hint = " (1184 bytes is the size of an SEV-SNP report: check the platform)"
        raise _malformed(
            f"quote version is {version}; expected 3 (SGX), 4 or 5 (TDX) DCAP ECDSA quote{hint}"
        )
    if akt != ATT_KEY_ECDSA_P256:
        raise _malformed(
            f"quote attestation key type is {akt}; only {ATT_KEY_ECDSA_P256} (ECDSA P-256) "
            "is supported"
        )
    if tee not in (TEE_TYPE_SGX, TEE_TYPE_TDX) or (version == 3 and tee != TEE_TYPE_SGX):
        raise _malformed(
            f"quote version {version} has TEE type 0x{tee:08x}; expected 0x00 (SGX) or "
            "0x81 (TDX, versions 4 and 5 only)"
        )
    if vendor != INTEL_QE_VENDOR_ID:
        raise _malformed(
            f"quote QE vendor ID is {vendor.hex()}, expected Intel's {INTEL_QE_VENDOR_ID.hex()}"
        )
    return QuoteHeader(version, akt, tee, qe_svn, pce_svn, vendor, user)


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP quote (any supported version) strictly; see the module docstring."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _malformed(f"quote must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_QUOTE_SIZE:
        raise _malformed(f"quote is {len(data)} bytes, more than the {MAX_QUOTE_SIZE} accepted")
    header = _parse_header(data)
    r = _Reader(data, "quote")
    r.take(HEADER_SIZE, "header")
    if header.version == 5:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        if body_type not in _BODY_SIZES:
            raise _malformed(f"quote v5 body type is {body_type}; expected 1 (SGX), 2 or 3 (TDX)")
        want_tee = TEE_TYPE_SGX if body_type == BODY_TYPE_SGX else TEE_TYPE_TDX
        if header.tee_type != want_tee:
            raise _malformed(
                f"quote v5 body type {body_type} does not match TEE type 0x{header.tee_type:02x}"
            )
        if body_size != _BODY_SIZES[body_type]:
            raise _malformed(
                f"quote v5 body type {body_type} must be {_BODY_SIZES[body_type]} bytes, "
                f"the quote declares {body_size}"
            )
    elif header.tee_type == TEE_TYPE_TDX:
        body_type = BODY_TYPE_TDX10
    else:
        body_type = BODY_TYPE_SGX
    body = r.take(_BODY_SIZES[body_type], "body")
    signed = data[: r.pos]
    sig_len = r.u32("signature data length")
    sig_raw = r.take(sig_len, "signature data")
    sig = _parse_signature_data(sig_raw, header.version)
    return Quote(header, body_type, body, signed, sig, len(data) - r.pos)


def _parse_signature_data(raw: bytes, version: int) -> SignatureData:
    r = _Reader(raw, "quote signature data")
    signature = r.take(64, "quote signature")
    attest_key = r.take(64, "attestation key")
    if version == 3:
        inner = r
    else:
        cert_type = r.u16("certification data type")
        if cert_type != CERT_TYPE_QE_REPORT:
            raise _malformed(
                f"quote v{version} certification data type is {cert_type}; expected "
                f"{CERT_TYPE_QE_REPORT} (QE report certification data)"
            )
        size = r.u32("certification data size")
        inner = _Reader(r.take(size, "QE report certification data"), "QE certification data")
        r.finish()
    qe_report = parse_enclave_report(inner.take(ENCLAVE_REPORT_SIZE, "QE report"))
    qe_sig = inner.take(64, "QE report signature")
    auth = inner.take(inner.u16("QE auth data length"), "QE auth data")
    cert_type = inner.u16("PCK certification data type")
    if cert_type != CERT_TYPE_PCK_CHAIN:
        raise _malformed(
            f"PCK certification data type is {cert_type}; meshshield needs type "
            f"{CERT_TYPE_PCK_CHAIN} (the PCK certificate chain inside the quote). Configure "
            "the quote provider (e.g. the DCAP QPL) to embed the PCK chain"
        )
    pem = inner.take(inner.u32("PCK chain size"), "PCK certificate chain")
    inner.finish()
    return SignatureData(signature, attest_key, qe_report, qe_sig, auth, _parse_pem_chain(pem))


def _parse_pem_chain(pem: bytes) -> tuple[x509.Certificate, ...]:
    text = pem.rstrip(b"\x00")
    count = text.count(b"-----BEGIN CERTIFICATE-----")
    if count == 0:
        raise _malformed("PCK certificate chain holds no PEM certificate")
    if count > _MAX_CHAIN_CERTS:
        raise _malformed(f"PCK certificate chain holds {count} certificates, at most 8 expected")
    try:
        certs = x509.load_pem_x509_certificates(text)
        for cert in certs:
            check_readable(cert)
    except PARSE_ERRORS as e:
        raise _malformed(f"PCK certificate chain is not valid PEM certificates: {e}") from None
    return tuple(certs)


# --- verification ---------------------------------------------------------------------


def _p256_key(raw: bytes, what: str) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise _bad_signature(f"{what} is not a point on P-256") from None


def verify_quote_signatures(
    quote: Quote, *, at: datetime, roots: Sequence[x509.Certificate], qe_mrsigner: bytes
) -> PckChain:
    """Steps 1-4 of the module docstring; returns the verified PCK chain."""
    sig = quote.sig
    chain = verify_pck_chain(sig.pck_chain, at, roots)

    try:
        pck_key = chain.leaf.public_key()
    except PARSE_ERRORS:
        pck_key = None
    if not isinstance(pck_key, ec.EllipticCurvePublicKey) or not isinstance(
        pck_key.curve, ec.SECP256R1
    ):
        raise _bad_chain(f"PCK leaf {cert_label(chain.leaf)} does not hold a P-256 key")
    if not verify_p256(pck_key, sig.qe_report_signature, sig.qe_report.raw):
        raise _bad_signature(
            f"QE report signature does not verify with PCK leaf {cert_label(chain.leaf)}; "
            "the quote's certification data was altered"
        )
    if sig.qe_report.mr_signer != qe_mrsigner:
        raise _bad_chain(
            f"QE report MRSIGNER is {sig.qe_report.mr_signer.hex()}, expected Intel's quoting "
            f"enclave {qe_mrsigner.hex()}"
        )
    if sig.qe_report.debug:
        raise _bad_chain("the quoting enclave runs in debug mode; its keys are not protected")

    want = hashlib.sha256(sig.attest_key + sig.qe_auth_data).digest() + bytes(32)
    if sig.qe_report.report_data != want:
        raise _bad_signature(
            "QE report does not vouch for the attestation key: report_data is not "
            "SHA-256(attestation key || QE auth data) followed by 32 zero bytes"
        )

    attest_key = _p256_key(sig.attest_key, "quote attestation key")
    if not verify_p256(attest_key, sig.signature, quote.signed):
        raise _bad_signature(
            "quote signature does not verify with its attestation key: the header or body "
            "was altered after signing"
        )
    return chain


# --- evidence JSON --------------------------------------------------------------------


def quote_from_evidence(evidence: object, platform: str) -> bytes:
    """The quote bytes of ``{"quote": b64}`` evidence (standard base64, canonical)."""
    if not isinstance(evidence, Mapping):
        raise _malformed(
            f'{platform} evidence must be a JSON object {{"quote": b64}}, '
            f"got {type(evidence).__name__}"
        )
    keys = set(evidence)
    if keys != {"quote"}:
        hint = ""
        if "certs" in keys or ("report" in keys and "signature" not in keys):
            hint = " (this looks like sev-snp evidence)"
        elif {"report", "signature"} <= keys:
            hint = " (this looks like sim evidence)"
        shown = sorted(str(k)[:40] for k in keys)[:6]
        raise _malformed(
            f'{platform} evidence must have exactly the key "quote", found {shown}{hint}'
        )
    value = evidence["quote"]
    if not isinstance(value, str):
        raise _malformed(f'{platform} evidence "quote" must be a base64 string')
    max_chars = 4 * ((MAX_QUOTE_SIZE + 2) // 3)
    if len(value) > max_chars:
        raise _malformed(f'{platform} evidence "quote" is longer than {max_chars} characters')
    if not value.isascii():
        raise _malformed(f'{platform} evidence "quote" is not base64 (non-ASCII characters)')
    encoded = value.encode("ascii")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise _malformed(f'{platform} evidence "quote" is not valid standard base64') from None
    if base64.b64encode(raw) != encoded:
        raise _malformed(f'{platform} evidence "quote" is not canonical base64')
    return raw
