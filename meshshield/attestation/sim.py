"""Simulated attestation: a development stand-in for a TEE.

**No hardware guarantee.** A sim report is signed by an ordinary P-256 key in a file
(the *sim platform key*); anyone holding that file can sign any measurement. A sim
report proves only that whoever holds the platform key vouched for the measurement.
It exists so that the mesh can be developed and demonstrated on any machine; claims
from it carry ``simulated: true`` and a session admits them only with
``tolerate: [simulation]``.

Evidence JSON: ``{"report": b64, "signature": b64}`` (standard base64, canonical,
with padding, no whitespace).

Report layout (144 bytes, integers little-endian, like a TEE's report)::

    offset size  field
         0    8  magic            b"MSHSIMRP"
         8    2  version          u16, = 1
        10    2  flags            u16; bit 0 = debug; bits 1-15 must be zero
        12    4  reserved         u32, must be zero
        16   32  measurement      SHA-256 workload digest (`meshshield measure`)
        48   64  report_data      SHA-512(b"meshshield/v1" || nonce || SPKI-DER), SPEC §4
       112   32  platform_key_id  SHA-256 of the platform key's SubjectPublicKeyInfo DER
       144       (end)

Signature: ECDSA P-256 with SHA-256 over the 144 report bytes, DER-encoded
(``Ecdsa-Sig-Value``).

Verification (`verify_sim_evidence`) is strict and takes untrusted input: any JSON
value gives either `Claims` or an `EvidenceError` with reason ``evidence_malformed``
(shape, base64, length, magic, version, flags, reserved) or ``signature_invalid``
(a platform key the verifier does not trust, or a signature that does not verify).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.attestation.claims import REPORT_DATA_SIZE, Claims, Platform, TcbStatus
from meshshield.errors import EvidenceError, Reason

REPORT_MAGIC = b"MSHSIMRP"
REPORT_VERSION = 1
FLAG_DEBUG = 0x0001
REPORT_SIZE = 144
MEASUREMENT_SIZE = 32
KEY_ID_SIZE = 32
# A DER ECDSA P-256 signature is at most 72 bytes; leave room, refuse anything larger
# before decoding it.
MAX_SIGNATURE_SIZE = 128

PRIVATE_KEY_FILE = "sim-platform.key"
PUBLIC_KEY_FILE = "sim-platform.pub.pem"
_MAX_KEY_FILE = 64 * 1024

_LAYOUT = struct.Struct(f"<8sHHI{MEASUREMENT_SIZE}s{REPORT_DATA_SIZE}s{KEY_ID_SIZE}s")
assert _LAYOUT.size == REPORT_SIZE

_EVIDENCE_KEYS = frozenset({"report", "signature"})


class SimKeyError(ValueError):
    """A sim platform key file is missing, unreadable, not a key, or not P-256."""


@dataclass(frozen=True)
class SimReport:
    """A parsed sim report; see the module docstring for the byte layout."""

    version: int
    flags: int
    measurement: bytes
    report_data: bytes
    platform_key_id: bytes

    @property
    def debug(self) -> bool:
        return bool(self.flags & FLAG_DEBUG)

    def to_bytes(self) -> bytes:
        return _LAYOUT.pack(
            REPORT_MAGIC,
            self.version,
            self.flags,
            0,
            self.measurement,
            self.report_data,
            self.platform_key_id,
        )


# --- platform keys -------------------------------------------------------------------


def generate_sim_platform_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 sim platform key."""
    return ec.generate_private_key(ec.SECP256R1())


def sim_platform_key_id(key: ec.EllipticCurvePublicKey) -> str:
    """The key id (lowercase hex SHA-256 of the SPKI DER) that reports carry."""
    return _key_id(key).hex()


def _key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def write_sim_platform_key(
    key: ec.EllipticCurvePrivateKey, out_dir: str | Path
) -> tuple[Path, Path]:
    """Write `sim-platform.key` (PKCS8 PEM, 0600) and `sim-platform.pub.pem` to `out_dir`.

    `out_dir` is created (0700) if missing. Existing key files are never overwritten: a
    CAS may already trust that key. Returns (private key path, public key path).
    """
    _require_p256(key)
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for p in (priv_path, pub_path):
        if os.path.lexists(p):
            raise SimKeyError(f"{p} already exists; refusing to overwrite a platform key")
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(priv_path, priv_pem, 0o600)
    try:
        _write_new(pub_path, pub_pem, 0o644)
    except BaseException:
        priv_path.unlink(missing_ok=True)
        raise
    return priv_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode (O_EXCL: never an existing file or symlink), so a
    # private key is not readable by others for even an instant; the umask can only
    # narrow it, and fchmod restores exactly `mode`.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise SimKeyError(f"{path} already exists; refusing to overwrite a platform key") from None
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _read_key_file(path: str | Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise SimKeyError(f"cannot read {what} {str(path)!r}: {e.strerror}") from None
    if len(data) > _MAX_KEY_FILE:
        raise SimKeyError(f"{str(path)!r} is larger than {_MAX_KEY_FILE} bytes; not a {what}")
    return data


def _require_p256(key: object, where: str = "key") -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise SimKeyError(f"{where} is not an EC key; sim platform keys are P-256")
    if not isinstance(key.curve, ec.SECP256R1):
        raise SimKeyError(f"{where} is on curve {key.curve.name}, expected P-256 (secp256r1)")


def load_sim_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load a sim platform private key (unencrypted PEM, P-256)."""
    data = _read_key_file(path, "sim platform private key")
    where = repr(str(path))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SimKeyError(
            f"{where} is encrypted; sim platform keys are stored unencrypted "
            "(make one with `meshshield sim keygen`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (it is a public key)" if b"PUBLIC KEY" in data else ""
        raise SimKeyError(
            f"{where} is not a PEM private key{hint}; expected the {PRIVATE_KEY_FILE} "
            "written by `meshshield sim keygen`"
        ) from None
    _require_p256(key, where)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def load_sim_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Load a sim platform public key (PEM SubjectPublicKeyInfo, P-256)."""
    data = _read_key_file(path, "sim platform public key")
    where = repr(str(path))
    if b"PRIVATE KEY" in data:
        raise SimKeyError(
            f"{where} holds a private key; pass the public key ({PUBLIC_KEY_FILE}) instead, "
            "and keep the private key with the platform"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise SimKeyError(
            f"{where} is not a PEM public key; expected the {PUBLIC_KEY_FILE} "
            "written by `meshshield sim keygen`"
        ) from None
    _require_p256(key, where)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


# --- making evidence -----------------------------------------------------------------


def make_sim_evidence(
    key: ec.EllipticCurvePrivateKey,
    measurement_hex: str,
    report_data: bytes,
    debug: bool = False,
) -> dict[str, str]:
    """Sign a sim report for `measurement_hex` binding `report_data` (64 bytes).

    Raises ValueError for arguments of the wrong shape (this is the caller's input, not
    a peer's).
    """
    _require_p256(key)
    if len(measurement_hex) != 2 * MEASUREMENT_SIZE or not _is_hex(measurement_hex):
        raise ValueError(
            f"measurement must be {2 * MEASUREMENT_SIZE} hex digits (from `meshshield measure`)"
        )
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    report = SimReport(
        version=REPORT_VERSION,
        flags=FLAG_DEBUG if debug else 0,
        measurement=bytes.fromhex(measurement_hex),
        report_data=bytes(report_data),
        platform_key_id=_key_id(key.public_key()),
    ).to_bytes()
    signature = key.sign(report, ec.ECDSA(hashes.SHA256()))
    return {
        "report": base64.b64encode(report).decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


# --- parsing and verifying -----------------------------------------------------------


def _malformed(message: str) -> EvidenceError:
    return EvidenceError(Reason.EVIDENCE_MALFORMED, message)


def parse_sim_report(data: bytes) -> SimReport:
    """Parse the fixed report layout strictly; EvidenceError(evidence_malformed) if off."""
    if len(data) != REPORT_SIZE:
        hint = " (that is the size of a sev-snp report)" if len(data) == 1184 else ""
        raise _malformed(f"sim report must be {REPORT_SIZE} bytes, got {len(data)}{hint}")
    magic, version, flags, reserved, measurement, report_data, key_id = _LAYOUT.unpack(data)
    if magic != REPORT_MAGIC:
        raise _malformed(f"sim report magic is {magic!r}, expected {REPORT_MAGIC!r}")
    if version != REPORT_VERSION:
        raise _malformed(f"sim report version is {version}, expected {REPORT_VERSION}")
    if flags & ~FLAG_DEBUG:
        raise _malformed(
            f"sim report flags 0x{flags:04x} set reserved bits (only bit 0 is defined)"
        )
    if reserved != 0:
        raise _malformed(f"sim report reserved field is 0x{reserved:08x}, expected zero")
    return SimReport(version, flags, measurement, report_data, key_id)


def _b64_field(evidence: dict[object, object], name: str, max_bytes: int) -> bytes:
    value = evidence[name]
    if not isinstance(value, str):
        raise _malformed(f'sim evidence "{name}" must be a base64 string, got {_json_type(value)}')
    max_chars = 4 * ((max_bytes + 2) // 3)
    if len(value) > max_chars:
        raise _malformed(
            f'sim evidence "{name}" is {len(value)} characters of base64, at most {max_chars} '
            f"expected ({max_bytes} bytes)"
        )
    if not value.isascii():
        raise _malformed(f'sim evidence "{name}" is not base64 (non-ASCII characters)')
    encoded = value.encode("ascii")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise _malformed(f'sim evidence "{name}" is not valid standard base64') from None
    # Non-zero padding bits would let two strings carry the same bytes.
    if base64.b64encode(raw) != encoded:
        raise _malformed(f'sim evidence "{name}" is not canonical base64')
    return raw


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_shape(evidence: object) -> dict[object, object]:
    if not isinstance(evidence, dict):
        raise _malformed(
            'sim evidence must be a JSON object {"report": b64, "signature": b64}, '
            f"got {_json_type(evidence)}"
        )
    keys = set(evidence)
    if "quote" in keys:
        raise _malformed(
            'evidence has a "quote": it looks like tdx or sgx evidence, not sim; '
            "check the platform the service attests with"
        )
    if "certs" in keys:
        raise _malformed(
            'evidence has "certs": it looks like sev-snp evidence, not sim; '
            "check the platform the service attests with"
        )
    if keys != _EVIDENCE_KEYS:
        missing = sorted(_EVIDENCE_KEYS - keys)
        extra = sorted(repr(k) for k in keys - _EVIDENCE_KEYS)
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f'"{k}"' for k in missing))
        if extra:
            parts.append("unexpected " + ", ".join(extra[:5]))
        raise _malformed(
            'sim evidence must have exactly the keys "report" and "signature": ' + "; ".join(parts)
        )
    return evidence


def verify_sim_evidence(
    evidence: object, trusted_keys: Sequence[ec.EllipticCurvePublicKey]
) -> Claims:
    """Verify sim evidence (the decoded JSON, untrusted) against trusted platform keys.

    Raises only EvidenceError (evidence_malformed or signature_invalid) for any
    `evidence`. `trusted_keys` is configuration: a key that is not P-256 is the
    caller's error (SimKeyError).
    """
    obj = _check_shape(evidence)
    raw_report = _b64_field(obj, "report", REPORT_SIZE)
    raw_sig = _b64_field(obj, "signature", MAX_SIGNATURE_SIZE)
    report = parse_sim_report(raw_report)
    if not raw_sig:
        raise _malformed('sim evidence "signature" is empty')

    key = None
    for candidate in trusted_keys:
        _require_p256(candidate, "trusted sim platform key")
        if _key_id(candidate) == report.platform_key_id:
            key = candidate
            break
    key_id = report.platform_key_id.hex()
    if key is None:
        raise EvidenceError(
            Reason.SIGNATURE_INVALID,
            f"sim report is signed by platform key {key_id}, which is not trusted "
            f"({len(trusted_keys)} sim platform keys trusted); to accept it, start the CAS "
            f"with --trust-sim-platform <that key's {PUBLIC_KEY_FILE}> (key id {key_id})",
        )
    try:
        key.verify(raw_sig, raw_report, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceError(
            Reason.SIGNATURE_INVALID,
            f"sim report signature does not verify with trusted platform key {key_id}; "
            "the report was altered or signed by another key",
        ) from None

    return Claims(
        platform=Platform.SIM,
        measurement=report.measurement.hex(),
        report_data=report.report_data,
        debug=report.debug,
        tcb_status=TcbStatus.UNKNOWN,
        signer=None,
        product_id=None,
        svn=None,
        simulated=True,
        extra={"platform_key_id": key_id},
    )
