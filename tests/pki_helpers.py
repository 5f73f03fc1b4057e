"""Builders shared by the pki tests (import as `from pki_helpers import ...`)."""

from __future__ import annotations

import base64
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID


def valid_claims(**overrides: Any) -> dict[str, Any]:
    """A complete, valid certificate claims object, with `overrides` applied."""
    c: dict[str, Any] = {
        "platform": "sev-snp",
        "measurement": "ab" * 48,
        "signer": None,
        "product_id": None,
        "svn": None,
        "debug": False,
        "tcb_status": "up_to_date",
        "session": "shop",
        "service": "backend",
        "policy_hash": "cd" * 32,
        "evidence_sha256": "ef" * 32,
        "attested_at": "2024-05-01T12:00:00Z",
        "simulated": False,
    }
    c.update(overrides)
    return c


def make_csr(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """A PEM CSR for `key`, signed by it."""
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def pem(label: str, der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN {label}-----\n".encode() + lines + f"\n-----END {label}-----\n".encode()


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


_ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


def csr_signed_by_other_key(
    subject_key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey
) -> bytes:
    """A PEM CSR carrying `subject_key`'s public key but signed by `signer`.

    Re-signs the CertificationRequestInfo of a genuine CSR and splices the signature
    into a new CertificationRequest SEQUENCE.
    """
    genuine = x509.load_pem_x509_csr(make_csr(subject_key))
    tbs = genuine.tbs_certrequest_bytes
    signature = signer.sign(tbs, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, tbs + _ECDSA_WITH_SHA256 + _tlv(0x03, b"\x00" + signature))
    return pem("CERTIFICATE REQUEST", der)
