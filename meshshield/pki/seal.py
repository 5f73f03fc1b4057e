"""Private keys encrypted at rest (the CA key in the CAS store, SPEC §6).

Sealed blob, version 1 (all binary):

    b"MSSEALK" (7 bytes magic) | 0x01 (version) | nonce (12 bytes) | ciphertext+tag

The plaintext is the key as unencrypted PKCS#8 DER. The cipher is AES-256-GCM with a
random 96-bit nonce; the associated data is b"meshshield-sealed-key/v1" + context, so
a blob moved to another context (say, another CA record id) does not unseal. Any
change to any byte - header, nonce, ciphertext or tag - makes unsealing fail.

The key-encryption key (KEK) is derived with HKDF-SHA256 from an operator secret. HKDF,
not scrypt, because the secret is required to be high-entropy key material (the 32
random bytes `load_or_create_kek` writes, or a secret of at least 16 random bytes from
a secret store); a password-stretching KDF would buy nothing and cost start-up time.
Do not use a human passphrase as the secret.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshshield.errors import MeshError, Reason

MAGIC = b"MSSEALK"
VERSION = 1
_HEADER = MAGIC + bytes([VERSION])
_NONCE_SIZE = 12
_TAG_SIZE = 16
_AAD_PREFIX = b"meshshield-sealed-key/v1"
_HKDF_INFO = b"meshshield key-encryption key/v1"
KEK_SIZE = 32
MIN_SECRET_SIZE = 16
SECRET_FILE_BYTES = 32
_MAX_SECRET_FILE = 4096


class SealedKeyError(MeshError):
    """A sealed key or its key-encryption key could not be used (operator-facing)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.INTERNAL, message)


def _check_kek(kek: bytes) -> None:
    if len(kek) != KEK_SIZE:
        raise ValueError(f"key-encryption key must be {KEK_SIZE} bytes, got {len(kek)}")


def derive_kek(secret: bytes) -> bytes:
    """A 32-byte AES-256 key from an operator secret of at least 16 random bytes."""
    if len(secret) < MIN_SECRET_SIZE:
        raise ValueError(
            f"KEK secret is {len(secret)} bytes; at least {MIN_SECRET_SIZE} random bytes "
            "are required"
        )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEK_SIZE, salt=None, info=_HKDF_INFO)
    return hkdf.derive(secret)


def seal_private_key(key: ec.EllipticCurvePrivateKey, kek: bytes, context: bytes) -> bytes:
    """Encrypt `key` under `kek`, bound to `context`; returns a versioned blob."""
    _check_kek(kek)
    plaintext = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    nonce = secrets.token_bytes(_NONCE_SIZE)
    ciphertext = AESGCM(kek).encrypt(nonce, plaintext, _AAD_PREFIX + context)
    return _HEADER + nonce + ciphertext


def unseal_private_key(blob: bytes, kek: bytes, context: bytes) -> ec.EllipticCurvePrivateKey:
    """Decrypt a blob made by `seal_private_key`; SealedKeyError if that fails."""
    _check_kek(kek)
    minimum = len(_HEADER) + _NONCE_SIZE + _TAG_SIZE + 1
    if len(blob) < minimum:
        raise SealedKeyError(
            f"sealed key is {len(blob)} bytes, shorter than the minimum {minimum}: the "
            "stored blob is truncated or corrupted"
        )
    if blob[: len(MAGIC)] != MAGIC:
        raise SealedKeyError("sealed key does not start with the meshshield magic: corrupted")
    version = blob[len(MAGIC)]
    if version != VERSION:
        raise SealedKeyError(
            f"sealed key has format version {version}; this meshshield reads version "
            f"{VERSION} (corrupted, or written by a newer release)"
        )
    nonce = blob[len(_HEADER) : len(_HEADER) + _NONCE_SIZE]
    ciphertext = blob[len(_HEADER) + _NONCE_SIZE :]
    try:
        plaintext = AESGCM(kek).decrypt(nonce, ciphertext, _AAD_PREFIX + context)
    except InvalidTag:
        raise SealedKeyError(
            "cannot unseal the private key: wrong key-encryption key, or the sealed blob "
            "is corrupted (authentication failed); check that the KEK secret is the one "
            "this data directory was created with"
        ) from None
    try:
        key = serialization.load_der_private_key(plaintext, password=None)
    except ValueError as e:  # authenticated, so only a bug on the sealing side gets here
        raise SealedKeyError(f"unsealed data is not a private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SealedKeyError(f"unsealed key is a {type(key).__name__}, expected an EC key")
    return key


def _read_secret(path: Path) -> bytes:
    with path.open("rb") as f:
        raw = f.read(_MAX_SECRET_FILE + 1)
    if len(raw) > _MAX_SECRET_FILE:
        raise SealedKeyError(f"KEK secret file {path} is larger than {_MAX_SECRET_FILE} bytes")
    try:
        secret = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SealedKeyError(
            f"KEK secret file {path} is not base64 text; it should hold base64 of "
            f"{SECRET_FILE_BYTES} random bytes"
        ) from None
    if len(secret) < MIN_SECRET_SIZE:
        raise SealedKeyError(
            f"KEK secret file {path} holds {len(secret)} bytes; at least {MIN_SECRET_SIZE} "
            "random bytes are required"
        )
    return secret


def load_kek(path: str | os.PathLike[str]) -> bytes:
    """The KEK derived from an existing secret file; FileNotFoundError if there is none."""
    return derive_kek(_read_secret(Path(path)))


def load_or_create_kek(path: str | os.PathLike[str]) -> bytes:
    """The KEK derived from the secret file at `path`, creating the file if absent.

    The file holds base64 text of 32 random bytes. It is created with mode 0600 from
    the start (O_CREAT|O_EXCL on a temporary name, then hard-linked into place), so it
    is never readable by others and a concurrent starter either creates it or reads a
    complete one - never a half-written file.
    """
    target = Path(path)
    try:
        return derive_kek(_read_secret(target))
    except FileNotFoundError:
        pass
    content = base64.b64encode(secrets.token_bytes(SECRET_FILE_BYTES)) + b"\n"
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # someone else won the race: use theirs
            os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return derive_kek(_read_secret(target))
