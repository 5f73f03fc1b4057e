"""Synthetic Intel DCAP evidence and collateral, for what no public vector covers.

A test chain shaped like Intel's (P-256, ecdsa-with-SHA256): a self-signed "Intel SGX
Root CA" signs "Intel SGX PCK Platform CA" (which signs a PCK leaf carrying the SGX
extensions) and "Intel SGX TCB Signing" (which signs TCB info and QE identity JSON).
Tests inject `SynthIntel.roots` in place of the pinned root. Quotes are built field by
field following FORMATS.md, so v5 TDX 1.0 bodies, revoked PCKs and every TCB status
can be exercised.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from meshshield.attestation import dcap

AT = datetime(2025, 6, 1, tzinfo=UTC)
NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2040, 1, 1, tzinfo=UTC)
SGX_EXT = "1.2.840.113741.1.13.1"
FMSPC = bytes.fromhex("90c06f000000")
PCE_ID = bytes(2)
AUTH = bytes(range(32))
QE_ATTRIBUTES = bytes.fromhex("1500000000000000e700000000000000")


@functools.cache
def key(slot: str) -> ec.EllipticCurvePrivateKey:
    del slot  # one cached key per role
    return ec.generate_private_key(ec.SECP256R1())


def name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def raw_sig(k: ec.EllipticCurvePrivateKey, msg: bytes) -> bytes:
    r, s = decode_dss_signature(k.sign(msg, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_pub(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]


# --- DER for the SGX extensions --------------------------------------------------------


def der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(ln)]) + ln + body


def der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for a in arcs[2:]:
        chunk = [a & 0x7F]
        a >>= 7
        while a:
            chunk.append(0x80 | (a & 0x7F))
            a >>= 7
        out += bytes(reversed(chunk))
    return der(0x06, bytes(out))


def der_int(v: int, tag: int = 0x02) -> bytes:
    return der(tag, v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big"))


def pair(oid: str, value: bytes) -> bytes:
    return der(0x30, der_oid(oid) + value)


def sgx_extension(comps: tuple[int, ...], pce_svn: int, fmspc: bytes = FMSPC) -> bytes:
    tcb = b"".join(pair(f"{SGX_EXT}.2.{i + 1}", der_int(c)) for i, c in enumerate(comps))
    tcb += pair(f"{SGX_EXT}.2.17", der_int(pce_svn))
    tcb += pair(f"{SGX_EXT}.2.18", der(0x04, bytes(comps)))
    return der(
        0x30,
        pair(f"{SGX_EXT}.1", der(0x04, bytes(16)))
        + pair(f"{SGX_EXT}.2", der(0x30, tcb))
        + pair(f"{SGX_EXT}.3", der(0x04, PCE_ID))
        + pair(f"{SGX_EXT}.4", der(0x04, fmspc))
        + pair(f"{SGX_EXT}.5", der_int(1, 0x0A)),
    )


# --- the chain -------------------------------------------------------------------------


def cert(
    subject: str,
    issuer: str,
    pub_slot: str,
    sign_slot: str,
    *,
    ca: bool,
    extra: x509.UnrecognizedExtension | None = None,
    not_after: datetime = NOT_AFTER,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(key(pub_slot).public_key())
        .serial_number(int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "big"))
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
    )
    if extra is not None:
        b = b.add_extension(extra, critical=False)
    return b.sign(key(sign_slot), hashes.SHA256())


ROOT_CN, CA_CN = "Intel SGX Root CA", "Intel SGX PCK Platform CA"
ROOT = cert(ROOT_CN, ROOT_CN, "root", "root", ca=True)
CA = cert(CA_CN, ROOT_CN, "ca", "root", ca=True)
TCB_SIGNER = cert("Intel SGX TCB Signing", ROOT_CN, "tcb", "root", ca=False)
OTHER_ROOT = cert(ROOT_CN, ROOT_CN, "other-root", "other-root", ca=True)
ROOTS = [ROOT]
DEFAULT_COMPS = (3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0)


@functools.cache
def pck_leaf(comps: tuple[int, ...] = DEFAULT_COMPS, pce_svn: int = 13) -> x509.Certificate:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXT), sgx_extension(comps, pce_svn))
    return cert("Intel SGX PCK Certificate", CA_CN, "pck", "ca", ca=False, extra=ext)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# --- quotes ----------------------------------------------------------------------------


@dataclass
class QuoteSpec:
    version: int = 4
    body_type: int | None = None  # v5 only: 2 (TDX 1.0) or 3 (TDX 1.5); SGX v3: None
    tee_tcb_svn: bytes = bytes([5, 0, 2]) + bytes(13)
    mr_signer_seam: bytes = bytes(48)
    td_attributes: bytes = bytes(8)
    mrtd: bytes = bytes(range(48))
    report_data: bytes = bytes(range(64, 128))
    sgx_attributes: bytes = bytes.fromhex("0500000000000000e700000000000000")
    mrenclave: bytes = bytes(range(32))
    mrsigner: bytes = bytes(range(32, 64))
    isv_prod_id: int = 7
    isv_svn: int = 3
    qe_mrsigner: bytes | None = None
    qe_isv_svn: int = 8
    qe_attributes: bytes = QE_ATTRIBUTES
    qe_binding: bytes | None = None  # override QE report_data
    chain: bytes | None = None  # override the PEM chain
    pck: x509.Certificate | None = None
    cert_type: int = 5
    extra: dict[str, Any] = field(default_factory=dict)


def td_body(s: QuoteSpec, v15: bool) -> bytes:
    body = (
        s.tee_tcb_svn
        + bytes(48)  # MRSEAM
        + s.mr_signer_seam
        + bytes(8)  # SEAMATTRIBUTES
        + s.td_attributes
        + bytes.fromhex("e702060000000000")  # XFAM
        + s.mrtd
        + bytes([1]) * 48  # MRCONFIGID
        + bytes([2]) * 48
        + bytes([3]) * 48
        + b"".join(bytes([0x10 + i]) * 48 for i in range(4))
        + s.report_data
    )
    if v15:
        body += bytes([9]) * 16 + bytes([0xAA]) * 48
    return body


def sgx_body(s: QuoteSpec) -> bytes:
    b = bytearray(384)
    b[48:64] = s.sgx_attributes
    b[64:96] = s.mrenclave
    b[128:160] = s.mrsigner
    struct.pack_into("<HH", b, 256, s.isv_prod_id, s.isv_svn)
    b[320:384] = s.report_data
    return bytes(b)


def make_quote(s: QuoteSpec) -> bytes:
    tdx = s.version != 3
    header = struct.pack(
        "<HHIHH16s20s",
        s.version,
        2,
        dcap.TEE_TYPE_TDX if tdx else dcap.TEE_TYPE_SGX,
        8,
        13,
        dcap.INTEL_QE_VENDOR_ID,
        bytes(20),
    )
    if not tdx:
        signed = header + sgx_body(s)
    elif s.version == 5:
        body = td_body(s, s.body_type == 3)
        signed = header + struct.pack("<HI", s.body_type or 3, len(body)) + body
    else:
        signed = header + td_body(s, False)
    attest = key("attest")
    pub = raw_pub(attest)
    qe = bytearray(384)
    qe[48:64] = s.qe_attributes
    qe[128:160] = s.qe_mrsigner or (dcap.TDX_QE_MRSIGNER if tdx else dcap.SGX_QE3_MRSIGNER)
    struct.pack_into("<HH", qe, 256, 2 if tdx else 1, s.qe_isv_svn)
    qe[320:384] = s.qe_binding or hashlib.sha256(pub + AUTH).digest() + bytes(32)
    qe_sig = raw_sig(key("pck"), bytes(qe))
    chain = s.chain if s.chain is not None else pem(s.pck or pck_leaf(), CA, ROOT) + b"\0\0"
    cert_data = struct.pack("<HI", s.cert_type, len(chain)) + chain
    qe_part = bytes(qe) + qe_sig + struct.pack("<H", len(AUTH)) + AUTH + cert_data
    if tdx:
        sig_data = raw_sig(attest, signed) + pub + struct.pack("<HI", 6, len(qe_part)) + qe_part
    else:
        sig_data = raw_sig(attest, signed) + pub + qe_part
    return signed + struct.pack("<I", len(sig_data)) + sig_data


# --- collateral ------------------------------------------------------------------------

ISSUE, NEXT = AT - timedelta(days=20), AT + timedelta(days=10)


def svns(values: tuple[int, ...] | list[int]) -> list[dict[str, int]]:
    return [{"svn": v} for v in values]


def tdx_level(
    status: str,
    *,
    comps: tuple[int, ...] = DEFAULT_COMPS,
    pce_svn: int = 13,
    tdx: tuple[int, ...] = (5, 0, 2) + (0,) * 13,
    advisories: tuple[str, ...] = (),
) -> dict[str, Any]:
    level: dict[str, Any] = {
        "tcb": {"sgxtcbcomponents": svns(comps), "pcesvn": pce_svn, "tdxtcbcomponents": svns(tdx)},
        "tcbDate": "2024-03-13T00:00:00Z",
        "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def tcb_info(levels: list[dict[str, Any]], *, tdx: bool = True, **extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": "TDX" if tdx else "SGX",
        "version": 3,
        "issueDate": iso(ISSUE),
        "nextUpdate": iso(NEXT),
        "fmspc": FMSPC.hex(),
        "pceId": PCE_ID.hex(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": 17,
    }
    if tdx:
        info["tdxModule"] = {
            "mrsigner": "00" * 48,
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
        }
    info.update(extra)
    info["tcbLevels"] = levels
    return info


def qe_identity(
    levels: list[tuple[int, str]] | None = None, *, tdx: bool = True, **extra: Any
) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "id": "TD_QE" if tdx else "QE",
        "version": 2,
        "issueDate": iso(ISSUE),
        "nextUpdate": iso(NEXT),
        "tcbEvaluationDataNumber": 17,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": "11000000000000000000000000000000",
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": (dcap.TDX_QE_MRSIGNER if tdx else dcap.SGX_QE3_MRSIGNER).hex().upper(),
        "isvprodid": 2 if tdx else 1,
        "tcbLevels": [
            {"tcb": {"isvsvn": svn}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": st}
            for svn, st in (levels or [(8, "UpToDate"), (4, "OutOfDate")])
        ],
    }
    ident.update(extra)
    return ident


def signed_json(kind: str, inner: dict[str, Any], signer: str = "tcb") -> bytes:
    text = json.dumps(inner, separators=(",", ":")).encode()
    sig = raw_sig(key(signer), text)
    return b'{"' + kind.encode() + b'":' + text + b',"signature":"' + sig.hex().encode() + b'"}'


def crl(issuer: str, sign_slot: str, serials: list[int], *, next_update: datetime = NEXT) -> bytes:
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name(issuer))
        .last_update(ISSUE)
        .next_update(next_update)
    )
    for serial in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(ISSUE).build()
        )
    return b.sign(key(sign_slot), hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def issuer_chain() -> bytes:
    return pem(TCB_SIGNER, ROOT)
