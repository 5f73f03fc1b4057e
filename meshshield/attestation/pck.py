"""PCK certificates: the chain to the pinned Intel SGX Root CA, and their SGX extensions.

Chain: PCK leaf ("Intel SGX PCK Certificate") <- "Intel SGX PCK Platform CA" or
"... Processor CA" (both carried in the quote) <- the Intel SGX Root CA pinned here by
its SHA-256 (``certs/intel_sgx_root_ca.pem``); a root carried in the quote is never
trusted by itself. Every certificate must be valid at the verification time, and a
failure names the certificate and its window.

SGX extensions (OID 1.2.840.113741.1.13.1) say which platform and which TCB the PCK was
issued for; the TCB status is found by comparing them with Intel's TCB info
(`meshshield.attestation.collateral`)::

    SGX Extensions ::= SEQUENCE OF SEQUENCE { id OBJECT IDENTIFIER, value ANY }
      .1 PPID  OCTET STRING (16)
      .2 TCB   SEQUENCE OF SEQUENCE { id, value }:
               .2.1 - .2.16 SGX TCB component SVNs  INTEGER
               .2.17 PCESVN INTEGER, .2.18 CPUSVN OCTET STRING (16)
      .3 PCE-ID OCTET STRING (2)
      .4 FMSPC  OCTET STRING (6)
      .5 SGX type ENUMERATED (0 standard, 1 scalable, 2 scalable with integrity)
      .6, .7 (platform instance id, configuration; not used here)

`cryptography` does not know the extension, so its DER is read with a small, bounded
reader of our own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from meshshield.attestation.roots import load_pinned_root
from meshshield.errors import EvidenceError, Reason

INTEL_SGX_ROOT_CA = "intel_sgx_root_ca.pem"
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_TAG_INTEGER, _TAG_OCTETS, _TAG_OID, _TAG_ENUM, _TAG_SEQ = 0x02, 0x04, 0x06, 0x0A, 0x30


# What `cryptography` raises for malformed certificates and CRLs, at load or when a
# lazily parsed field is first read.
PARSE_ERRORS = (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm)


def check_readable(cert: x509.Certificate) -> None:
    """Parse now the fields `cryptography` reads lazily; one of PARSE_ERRORS if malformed."""
    _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
    _ = cert.serial_number, len(cert.extensions)


def _chain_invalid(message: str) -> EvidenceError:
    return EvidenceError(Reason.CHAIN_INVALID, message)


@lru_cache(maxsize=1)
def _pinned_intel_root() -> x509.Certificate:
    return load_pinned_root(INTEL_SGX_ROOT_CA, INTEL_SGX_ROOT_CA_SHA256)


def trusted_intel_roots(roots: Sequence[x509.Certificate] | None) -> tuple[x509.Certificate, ...]:
    """`roots` if given (tests inject their own), else the pinned Intel SGX Root CA."""
    if roots is not None:
        return tuple(roots)
    # A missing or replaced root file raises VendorRootError, an EvidenceError
    # (chain_invalid): nothing can be verified without the root.
    return (_pinned_intel_root(),)


def require_aware(at: datetime) -> datetime:
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise ValueError("`at` must be a timezone-aware datetime")
    return at.astimezone(UTC)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cert_label(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else cert.subject.rfc4514_string()
    # Names come from untrusted input: keep messages and logs to one printable line.
    cn = "".join(c if c.isprintable() else "?" for c in cn[:80])
    return f'"{cn}" (serial {cert.serial_number:x})'


def check_validity(cert: x509.Certificate, at: datetime, role: str) -> None:
    """CHAIN_INVALID unless `at` lies in the certificate's validity window."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= at <= end:
        state = "not yet valid" if at < start else "expired"
        raise _chain_invalid(
            f"{role} {cert_label(cert)} is {state}: valid {rfc3339(start)} to {rfc3339(end)}, "
            f"verification time {rfc3339(at)}"
        )


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (*PARSE_ERRORS, InvalidSignature):
        return False
    return True


def find_anchor(
    cert: x509.Certificate, anchors: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for anchor in anchors:
        if issued_by(cert, anchor):
            return anchor
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, *PARSE_ERRORS):
        return False
    return bc.ca


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class PckChain:
    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate  # the trusted anchor, not the quote's copy


def verify_pck_chain(
    certs: Sequence[x509.Certificate], at: datetime, roots: Sequence[x509.Certificate]
) -> PckChain:
    """PCK leaf <- PCK CA (from the quote) <- one of `roots`, all valid at `at`."""
    if len(certs) < 2:
        raise _chain_invalid(
            f"PCK certificate chain holds {len(certs)} certificate(s); expected the PCK "
            "leaf and its Platform or Processor CA (then the root)"
        )
    leaf, rest = certs[0], certs[1:]
    if _is_ca(leaf):
        raise _chain_invalid(f"PCK leaf {cert_label(leaf)} is a CA certificate, not a PCK")
    intermediate = next((c for c in rest if issued_by(leaf, c)), None)
    if intermediate is None:
        raise _chain_invalid(
            f"PCK leaf {cert_label(leaf)} is not signed by any CA certificate in the quote's chain"
        )
    if not _is_ca(intermediate):
        raise _chain_invalid(f"PCK issuer {cert_label(intermediate)} is not a CA certificate")
    anchor = find_anchor(intermediate, roots)
    if anchor is None:
        carried = [fingerprint(c) for c in rest if c is not intermediate]
        raise _chain_invalid(
            f"PCK CA {cert_label(intermediate)} is not signed by the trusted Intel SGX Root CA "
            f"(SHA-256 {', '.join(fingerprint(r) for r in roots) or 'none'}); the quote "
            f"carries root(s) {', '.join(carried) or 'none'}. The quote was not made by "
            "genuine Intel hardware, or its chain was altered"
        )
    check_validity(anchor, at, "Intel SGX Root CA")
    check_validity(intermediate, at, "PCK CA certificate")
    check_validity(leaf, at, "PCK leaf certificate")
    return PckChain(leaf, intermediate, anchor)


def verify_p256(key: ec.EllipticCurvePublicKey, sig: bytes, msg: bytes) -> bool:
    """ECDSA-SHA256 check of a raw 64-byte r || s (big-endian) signature."""
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, msg, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# --- SGX extensions -------------------------------------------------------------------


@dataclass(frozen=True)
class PckTcb:
    fmspc: bytes
    pce_id: bytes
    pce_svn: int
    cpu_svn: bytes
    comp_svns: tuple[int, ...]  # 16 SGX TCB component SVNs
    sgx_type: int | None


def _bad(message: str) -> EvidenceError:
    return EvidenceError(
        Reason.EVIDENCE_MALFORMED, f"PCK certificate SGX extensions are malformed: {message}"
    )


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the DER element at `pos`."""
    if pos + 2 > len(data):
        raise _bad("truncated element")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise _bad("bad length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise _bad("element runs past its container")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e = _tlv(data[:end], pos)
        out.append((tag, data[s:e]))
        pos = e
    return out


def _oid(raw: bytes) -> str:
    if not raw or raw[-1] & 0x80:
        raise _bad("bad object identifier")
    arcs: list[int] = []
    value = 0
    for b in raw:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _pairs(raw: bytes) -> dict[str, tuple[int, bytes]]:
    """SEQUENCE OF SEQUENCE { OID, value } -> {oid: (tag, value)}."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, item in _children(raw, 0, len(raw)):
        if tag != _TAG_SEQ:
            raise _bad("expected a SEQUENCE")
        parts = _children(item, 0, len(item))
        if len(parts) != 2 or parts[0][0] != _TAG_OID:
            raise _bad("expected SEQUENCE { OID, value }")
        oid = _oid(parts[0][1])
        if oid in out:
            raise _bad(f"{oid} appears twice")
        out[oid] = parts[1]
    return out


def _int(tag_value: tuple[int, bytes], name: str, tag: int = _TAG_INTEGER) -> int:
    t, v = tag_value
    if t != tag or not v or len(v) > 3 or v[0] & 0x80:
        raise _bad(f"{name} is not a small non-negative integer")
    return int.from_bytes(v, "big")


def _octets(tag_value: tuple[int, bytes], name: str, size: int) -> bytes:
    t, v = tag_value
    if t != _TAG_OCTETS or len(v) != size:
        raise _bad(f"{name} is not a {size}-byte OCTET STRING")
    return v


def pck_tcb(cert: x509.Certificate) -> PckTcb:
    """FMSPC, PCE-ID and TCB of a PCK certificate; evidence_malformed if unreadable."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSIONS_OID))
    except x509.ExtensionNotFound:
        raise _bad(f"the certificate has no extension {SGX_EXTENSIONS_OID}") from None
    except PARSE_ERRORS as e:
        raise _bad(f"cannot read the certificate's extensions: {e}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise _bad("unexpected extension type")
    raw = value.value
    tag, start, end = _tlv(raw, 0)
    if tag != _TAG_SEQ or end != len(raw):
        raise _bad("the extension is not one SEQUENCE")
    top = _pairs(raw[start:end])
    base = SGX_EXTENSIONS_OID

    def need(oid: str, name: str) -> tuple[int, bytes]:
        if oid not in top:
            raise _bad(f"{name} ({oid}) is missing")
        return top[oid]

    tcb_tag, tcb_raw = need(f"{base}.2", "TCB")
    if tcb_tag != _TAG_SEQ:
        raise _bad("TCB is not a SEQUENCE")
    tcb = _pairs(tcb_raw)
    comps = []
    for i in range(1, 17):
        oid = f"{base}.2.{i}"
        if oid not in tcb:
            raise _bad(f"TCB component {i} ({oid}) is missing")
        comps.append(_int(tcb[oid], f"TCB component {i}"))
    for oid, name in ((f"{base}.2.17", "PCESVN"), (f"{base}.2.18", "CPUSVN")):
        if oid not in tcb:
            raise _bad(f"{name} ({oid}) is missing")
    sgx_type = None
    if f"{base}.5" in top:
        sgx_type = _int(top[f"{base}.5"], "SGX type", _TAG_ENUM)
    return PckTcb(
        fmspc=_octets(need(f"{base}.4", "FMSPC"), "FMSPC", 6),
        pce_id=_octets(need(f"{base}.3", "PCE-ID"), "PCE-ID", 2),
        pce_svn=_int(tcb[f"{base}.2.17"], "PCESVN"),
        cpu_svn=_octets(tcb[f"{base}.2.18"], "CPUSVN", 16),
        comp_svns=tuple(comps),
        sgx_type=sgx_type,
    )
