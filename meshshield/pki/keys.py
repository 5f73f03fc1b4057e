"""Key material helpers: P-256 generation and SPKI fingerprints.

The fingerprint of a key is the SHA-256 of its SubjectPublicKeyInfo DER, written as
64 lowercase hex digits (SPEC §3 admin fingerprints, SPEC §4 report_data binding).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


def generate_p256() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 (secp256r1) private key."""
    return ec.generate_private_key(ec.SECP256R1())


def spki_der(public_key: PublicKeyTypes) -> bytes:
    """The DER encoding of the key's SubjectPublicKeyInfo."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_fingerprint(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the SPKI DER as 64 lowercase hex digits."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()
