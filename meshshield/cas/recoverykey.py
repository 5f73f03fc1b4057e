"""Recovery keys: an administrator's P-256 key pair the CAS's KEK is also wrapped to
(`meshshield cas recovery-key --out DIR`; `cas serve --recovery-key DIR/recovery.pub.pem`;
`cas recover --recovery-key-private DIR`). Keep the private key offline: whoever holds
it and can reach the database can recover the KEK."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.cas.kekwrap import key_fingerprint

PRIVATE_FILE = "recovery.key"
PUBLIC_FILE = "recovery.pub.pem"
MAX_KEY_FILE = 16 * 1024


def write_recovery_key(out_dir: Path) -> tuple[Path, Path, str]:
    """A fresh key pair in out_dir (private key 0600, never overwritten)."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = out_dir / PRIVATE_FILE, out_dir / PUBLIC_FILE
    if pub.exists():
        raise FileExistsError(f"{pub} exists; a recovery key is never overwritten")
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub, key_fingerprint(key.public_key())


def _read(path: Path, what: str) -> bytes:
    from meshshield.inputs import InputFileError, read_bounded

    try:
        return read_bounded(str(path), what=what, limit=MAX_KEY_FILE)
    except InputFileError as e:
        raise ValueError(str(e)) from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def load_recovery_public(path: str) -> ec.EllipticCurvePublicKey:
    data = _read(Path(path), "--recovery-key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"--recovery-key {path}: not a PEM public key (expected the "
                         f"{PUBLIC_FILE} `meshshield cas recovery-key` wrote)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        raise ValueError(f"--recovery-key {path}: must be a P-256 public key")
    return key


def load_recovery_private(path: str) -> list[ec.EllipticCurvePrivateKey]:
    """The private key FILE, or every recovery.key / *.key in DIR (one level)."""
    p = Path(path)
    files = sorted([*p.glob("*.key")]) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"--recovery-key-private {path}: the folder holds no *.key file")
    out = []
    for f in files:
        data = _read(f, "--recovery-key-private")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"--recovery-key-private {f}: not an unencrypted PEM private "
                             f"key (expected the {PRIVATE_FILE} `meshshield cas "
                             "recovery-key` wrote)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                              ec.SECP256R1):
            raise ValueError(f"--recovery-key-private {f}: must be a P-256 private key")
        out.append(key)
    return out
