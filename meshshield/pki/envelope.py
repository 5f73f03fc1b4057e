"""Secrets sealed to one attested key: the envelope in the attest response (SPEC §6).

The CAS encrypts a service's secrets to the P-256 public key of the CSR it just
attested, so a TLS-terminating hop in front of the CAS (a load balancer, an ingress)
sees only ciphertext; only the sidecar that holds the private key opens it.

Envelope, version 1 (binary; standard base64 in JSON):

    b"MSENV" (5 bytes magic) | 0x01 (version) | ephemeral public key (65 bytes, an
    uncompressed P-256 point) | nonce (12 bytes) | ciphertext + 16-byte GCM tag

HPKE-style, from `cryptography` primitives (ephemeral-static ECDH):

    shared = ECDH(ephemeral private key, recipient public key)
    key    = HKDF-SHA256(shared, salt = ephemeral point || recipient point,
                         info = b"meshshield secrets envelope/v1" || context)   (32 bytes)
    AES-256-GCM(key, nonce, plaintext, associated data = header || context)

`context` names what the envelope is for (the CAS uses the SPIFFE ID and the serial of
the certificate issued with it), so an envelope replayed into another response or to
another identity does not open. Any change to any byte fails authentication. The
plaintext is at most MAX_PLAINTEXT bytes.

Sealing to a public key needs no secret, so the CA that signed the certificate beside
the envelope also signs `signed_message(envelope, context)`: a hop that terminates TLS
can neither read the values nor put values of its own in their place.
"""

from __future__ import annotations

import hashlib
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshshield.errors import MeshError, Reason

MAGIC = b"MSENV"
VERSION = 1
HEADER = MAGIC + bytes([VERSION])
POINT_SIZE = 65
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = len(HEADER) + POINT_SIZE + NONCE_SIZE + TAG_SIZE
MAX_PLAINTEXT = 2 * 1024 * 1024
MAX_ENVELOPE = MAX_PLAINTEXT + OVERHEAD
_INFO = b"meshshield secrets envelope/v1"
MEDIA_TYPE = "application/vnd.meshshield.secrets+json;v=1"
"""The attest response's `secrets` field: {"media_type": this, "envelope": base64}."""


def context_for(spiffe_id: str, serial: str) -> bytes:
    """What the CAS binds an envelope to: the certificate issued beside it."""
    return f"{spiffe_id}\n{serial}".encode()


def signed_message(blob: bytes, context: bytes) -> bytes:
    """What the CA that issued the certificate beside an envelope signs (ECDSA P-256,
    SHA-256): anyone can seal to a public key, so the signature says the CAS did."""
    return (b"meshshield secrets envelope signature/v1\n" + context + b"\n"
            + hashlib.sha256(blob).digest())


class EnvelopeError(MeshError):
    """An envelope that cannot be opened: malformed, truncated, oversized or tampered."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.SECRETS_ENVELOPE_INVALID, message)


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def _key(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient,
                info=_INFO + context)
    return hkdf.derive(shared)


def seal(recipient: ec.EllipticCurvePublicKey, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt `plaintext` so that only the holder of `recipient`'s private key opens it."""
    if not isinstance(recipient.curve, ec.SECP256R1):
        raise ValueError(f"envelopes are sealed to P-256 keys, not {recipient.curve.name}")
    if len(plaintext) > MAX_PLAINTEXT:
        raise ValueError(f"envelope plaintext is {len(plaintext)} bytes, at most "
                         f"{MAX_PLAINTEXT}")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    eph_point = _point(ephemeral.public_key())
    key = _key(ephemeral.exchange(ec.ECDH(), recipient), eph_point, _point(recipient), context)
    nonce = secrets.token_bytes(NONCE_SIZE)
    header = HEADER + eph_point
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header + context)


def open_envelope(private_key: ec.EllipticCurvePrivateKey, blob: bytes, context: bytes
                  ) -> bytes:
    """The plaintext of an envelope sealed to `private_key`; EnvelopeError says why not."""
    if len(blob) > MAX_ENVELOPE:
        raise EnvelopeError(f"secrets envelope is {len(blob)} bytes, at most {MAX_ENVELOPE}")
    if len(blob) < OVERHEAD:
        raise EnvelopeError(f"secrets envelope is {len(blob)} bytes, shorter than the "
                            f"{OVERHEAD} of its header, key, nonce and tag: truncated")
    if blob[: len(MAGIC)] != MAGIC:
        raise EnvelopeError("secrets envelope does not start with the meshshield magic "
                            "(MSENV): not an envelope")
    if blob[len(MAGIC)] != VERSION:
        raise EnvelopeError(f"secrets envelope has format version {blob[len(MAGIC)]}; this "
                            f"meshshield reads version {VERSION}")
    at = len(HEADER)
    eph_point = blob[at: at + POINT_SIZE]
    nonce = blob[at + POINT_SIZE: at + POINT_SIZE + NONCE_SIZE]
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), eph_point)
    except ValueError:
        raise EnvelopeError("secrets envelope's ephemeral key is not a P-256 point") from None
    recipient = private_key.public_key()
    key = _key(private_key.exchange(ec.ECDH(), ephemeral), eph_point, _point(recipient),
               context)
    try:
        return AESGCM(key).decrypt(nonce, blob[at + POINT_SIZE + NONCE_SIZE:],
                                   HEADER + eph_point + context)
    except InvalidTag:
        raise EnvelopeError("secrets envelope does not open with this key and context "
                            "(tampered, or sealed to another key or certificate)") from None
