"""The key-encryption key (KEK) wrapped for a holder: a TEE's sealing key, a recovery
public key, or a peer replica's attested key. These blobs live in the CAS store's
`kek_wraps` table (both engines) and travel in the peer-recovery answer, so every byte
of them is parsed as untrusted.

Wrapped-KEK blob, version 1 (all binary):

    b"MSKEKW" (6 bytes magic) | 0x01 (version) | kind (1 byte)
    kind 0x01 "sealed":    nonce (12) | AES-256-GCM(sealing key, KEK) (32 + 16 tag)
    kind 0x02 "to-key":    ephemeral P-256 public key, uncompressed (65) | nonce (12) |
                           AES-256-GCM(HKDF-SHA256(ECDH(ephemeral, recipient)), KEK)

Every blob of a kind has one exact length (77 and 142 bytes); anything else is refused
before any cryptography. The associated data is the header plus a caller's context
(which measurement or chip the sealing key belongs to, which recipient key and nonce),
so a blob moved to another row or another request does not open. For "to-key" the HKDF
input is the ECDH secret, salted with the SHA-256 of both public keys' encodings.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshshield.pki.seal import KEK_SIZE, SealedKeyError

MAGIC = b"MSKEKW"
VERSION = 1
KIND_SEALED = 1
KIND_TO_KEY = 2
_NONCE = 12
_TAG = 16
_POINT = 65  # uncompressed P-256 point
SEALED_SIZE = len(MAGIC) + 2 + _NONCE + KEK_SIZE + _TAG
TO_KEY_SIZE = len(MAGIC) + 2 + _POINT + _NONCE + KEK_SIZE + _TAG
MAX_BLOB = max(SEALED_SIZE, TO_KEY_SIZE)
_AAD = b"meshshield-kek-wrap/v1"
_HKDF_INFO = b"meshshield kek to-key/v1"


class KekWrapError(SealedKeyError):
    """A wrapped KEK could not be parsed or opened (says what and where)."""


@dataclass(frozen=True)
class ParsedWrap:
    kind: int
    nonce: bytes
    ciphertext: bytes
    ephemeral: bytes = b""  # kind "to-key": the sender's uncompressed P-256 point


def _header(kind: int) -> bytes:
    return MAGIC + bytes([VERSION, kind])


def parse_wrap(blob: bytes, where: str = "wrapped KEK") -> ParsedWrap:
    """The fields of a wrapped-KEK blob; KekWrapError naming the first thing wrong."""
    if not isinstance(blob, bytes | bytearray):
        raise KekWrapError(f"{where}: expected bytes, found {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) > MAX_BLOB:
        raise KekWrapError(f"{where}: {len(blob)} bytes, more than the {MAX_BLOB} a wrapped "
                           "KEK has: not a wrapped KEK, or corrupted")
    if len(blob) < len(MAGIC) + 2:
        raise KekWrapError(f"{where}: {len(blob)} bytes, truncated before its header")
    if blob[: len(MAGIC)] != MAGIC:
        raise KekWrapError(f"{where}: does not start with the wrapped-KEK magic: corrupted")
    version, kind = blob[len(MAGIC)], blob[len(MAGIC) + 1]
    if version != VERSION:
        raise KekWrapError(f"{where}: format version {version}; this meshshield reads "
                           f"version {VERSION} (corrupted, or written by a newer release)")
    body = blob[len(MAGIC) + 2:]
    if kind == KIND_SEALED:
        if len(blob) != SEALED_SIZE:
            raise KekWrapError(f"{where}: a sealed KEK is {SEALED_SIZE} bytes, found "
                               f"{len(blob)}: truncated or corrupted")
        return ParsedWrap(kind, body[:_NONCE], body[_NONCE:])
    if kind == KIND_TO_KEY:
        if len(blob) != TO_KEY_SIZE:
            raise KekWrapError(f"{where}: a KEK wrapped to a key is {TO_KEY_SIZE} bytes, "
                               f"found {len(blob)}: truncated or corrupted")
        point = body[:_POINT]
        if point[0] != 0x04:
            raise KekWrapError(f"{where}: the ephemeral key is not an uncompressed P-256 "
                               "point: corrupted")
        return ParsedWrap(kind, body[_POINT:_POINT + _NONCE], body[_POINT + _NONCE:], point)
    raise KekWrapError(f"{where}: unknown kind {kind} (1 sealed, 2 to-key): corrupted")


def _check(kek: bytes) -> None:
    if len(kek) != KEK_SIZE:
        raise ValueError(f"a KEK is {KEK_SIZE} bytes, got {len(kek)}")


# -- kind 1: sealed to a TEE's sealing key -------------------------------------------------

def seal_kek(kek: bytes, sealing_key: bytes, context: bytes) -> bytes:
    _check(kek)
    _check(sealing_key)
    nonce = secrets.token_bytes(_NONCE)
    header = _header(KIND_SEALED)
    return header + nonce + AESGCM(sealing_key).encrypt(nonce, kek, _AAD + header + context)


def unseal_kek(blob: bytes, sealing_key: bytes, context: bytes,
               where: str = "sealed KEK") -> bytes:
    _check(sealing_key)
    w = parse_wrap(blob, where)
    if w.kind != KIND_SEALED:
        raise KekWrapError(f"{where}: is a KEK wrapped to a key, not a sealed one")
    try:
        return AESGCM(sealing_key).decrypt(w.nonce, w.ciphertext,
                                           _AAD + _header(KIND_SEALED) + context)
    except InvalidTag:
        raise KekWrapError(f"{where}: does not open with this TEE's sealing key "
                           "(another measurement or chip sealed it, or it is corrupted)"
                           ) from None


# -- kind 2: to a P-256 public key (recovery keys, a peer replica's attested key) --------

def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def _shared_key(secret: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    salt = hashlib.sha256(ephemeral + recipient).digest()
    return HKDF(algorithm=hashes.SHA256(), length=KEK_SIZE, salt=salt,
                info=_HKDF_INFO).derive(secret)


def wrap_to_key(kek: bytes, recipient: ec.EllipticCurvePublicKey, context: bytes) -> bytes:
    """ECDH P-256 with a fresh ephemeral key + HKDF-SHA256 + AES-256-GCM."""
    _check(kek)
    if not isinstance(recipient.curve, ec.SECP256R1):
        raise ValueError("the recipient key must be P-256")
    eph = ec.generate_private_key(ec.SECP256R1())
    eph_point, rcpt_point = _point(eph.public_key()), _point(recipient)
    key = _shared_key(eph.exchange(ec.ECDH(), recipient), eph_point, rcpt_point)
    nonce = secrets.token_bytes(_NONCE)
    header = _header(KIND_TO_KEY)
    return header + eph_point + nonce + AESGCM(key).encrypt(
        nonce, kek, _AAD + header + rcpt_point + context)


def unwrap_with_key(blob: bytes, private: ec.EllipticCurvePrivateKey, context: bytes,
                    where: str = "wrapped KEK") -> bytes:
    w = parse_wrap(blob, where)
    if w.kind != KIND_TO_KEY:
        raise KekWrapError(f"{where}: is a sealed KEK, not one wrapped to a key")
    try:
        eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), w.ephemeral)
    except ValueError:
        raise KekWrapError(f"{where}: the ephemeral key is not a P-256 point: corrupted"
                           ) from None
    rcpt_point = _point(private.public_key())
    key = _shared_key(private.exchange(ec.ECDH(), eph), w.ephemeral, rcpt_point)
    try:
        return AESGCM(key).decrypt(w.nonce, w.ciphertext,
                                   _AAD + _header(KIND_TO_KEY) + rcpt_point + context)
    except InvalidTag:
        raise KekWrapError(f"{where}: does not open with this private key (wrapped to "
                           "another key or for another request, or corrupted)") from None


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the key's SPKI DER: how recovery keys are named."""
    return hashlib.sha256(key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
