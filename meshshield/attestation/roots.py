"""Vendor root certificates shipped in the package's `certs/` folder, pinned by SHA-256.

The folder is found through `importlib.resources` (package `meshshield`, directory
`certs`, a symlink to the repository's `certs/` that git stores and wheels resolve),
falling back to the repository's `certs/` next to the package for unusual installs.
Every file there is listed with its provenance in `certs/README.md`; the code that uses
a root pins its fingerprint, so a replaced file is refused rather than trusted.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshshield.errors import EvidenceError, Reason

CERTS_PACKAGE = "meshshield"
CERTS_DIR = "certs"
_MAX_CERT_FILE = 64 * 1024
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class VendorRootError(EvidenceError):
    """A pinned vendor certificate is missing, unreadable or not the pinned one.

    This is an installation problem, not the peer's; it still carries `chain_invalid`
    because no chain can be verified without the root.
    """

    def __init__(self, message: str) -> None:
        super().__init__(Reason.CHAIN_INVALID, message)


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    try:
        packaged = resources.files(CERTS_PACKAGE) / CERTS_DIR
        if isinstance(packaged, Path):
            dirs.append(packaged)
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - meshshield is importable
        pass
    # meshshield/attestation/roots.py -> repository root / certs
    dirs.append(Path(__file__).resolve().parents[2] / CERTS_DIR)
    return dirs


def vendor_root_path(name: str) -> Path:
    """The path of certificate file `name` (e.g. ``amd_ark_milan.pem``) in `certs/`."""
    if not _SAFE_NAME.fullmatch(name) or name.startswith("."):
        raise VendorRootError(f"vendor certificate name {name!r} is not a plain file name")
    tried: list[str] = []
    for d in _candidate_dirs():
        p = d / name
        if p.is_file():
            return p
        tried.append(str(d))
    raise VendorRootError(
        f"vendor certificate {name} is not installed (looked in {', '.join(tried)}); "
        "the meshshield installation is incomplete: reinstall it"
    )


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_pinned_root(name: str, sha256_hex: str) -> x509.Certificate:
    """Load the single PEM certificate `certs/<name>` if its DER SHA-256 is `sha256_hex`.

    Raises VendorRootError (reason chain_invalid) when the file is missing, is not
    exactly one PEM certificate, or has another fingerprint.
    """
    expected = sha256_hex.replace(":", "").strip().lower()
    path = vendor_root_path(name)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CERT_FILE + 1)
    except OSError as e:
        raise VendorRootError(f"cannot read vendor certificate {path}: {e.strerror}") from None
    if len(data) > _MAX_CERT_FILE:
        raise VendorRootError(f"vendor certificate {path} is larger than {_MAX_CERT_FILE} bytes")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise VendorRootError(f"vendor certificate {path} is not a PEM certificate") from None
    if len(certs) != 1:
        raise VendorRootError(
            f"vendor certificate {path} holds {len(certs)} certificates, expected exactly one"
        )
    found = _fingerprint(certs[0])
    if found != expected:
        raise VendorRootError(
            f"vendor certificate {path} has SHA-256 fingerprint {found}, but {expected} is "
            "pinned; the file was replaced or damaged: restore it from the meshshield release "
            "(certs/README.md lists each file's source and fingerprint)"
        )
    return certs[0]
