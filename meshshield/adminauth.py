"""Admin authentication: requests signed with the admin's P-256 key.

An admin key is made by `meshshield admin keygen --out DIR` (`admin.key`, PKCS#8 PEM,
mode 0600, and `admin.pub.pem`); its fingerprint is the SHA-256 of its SPKI DER, the
value `--admin-fingerprint` and a policy's `access_policy` name.

Every admin request carries one header:

    Authorization: MeshShield-Sig key=<b64 SPKI DER>, ts=<unix seconds>,
                   nonce=<b64 16 random bytes>, sig=<b64 DER ECDSA-SHA256>

The signature covers, joined by newlines: the literal `meshshield-admin/v1`, the HTTP
method, the path with its query string, `ts`, `nonce`, and the SHA-256 hex of the body.
The CAS accepts a timestamp within `MAX_SKEW` seconds of its clock and each
(key, nonce) once within that window, so a captured request cannot be replayed, moved
to another path or given another body. The seen (key, nonce) pairs are kept in the
CAS store until the request's timestamp leaves the window, so a restart does not
forget them, and only for keys that may act on the CAS (`Authority.admit_request`),
so a self-made key cannot fill the guard. Signed requests were chosen over TLS client
certificates because admin keys are not issued by the mesh CA (a fresh CAS has no one
to issue them to), and the TLS client-certificate slot stays free for mesh identities.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.errors import MeshError, Reason
from meshshield.pki.keys import spki_der, spki_fingerprint

SCHEME = "MeshShield-Sig"
DOMAIN = "meshshield-admin/v1"
MAX_SKEW = 300.0
MAX_HEADER = 4096
ADMIN_KEY_FILE = "admin.key"
ADMIN_PUB_FILE = "admin.pub.pem"


def _signed_bytes(method: str, path_qs: str, ts: str, nonce: str, body: bytes) -> bytes:
    return "\n".join(
        [DOMAIN, method.upper(), path_qs, ts, nonce, hashlib.sha256(body).hexdigest()]
    ).encode()


def write_admin_key(out_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """Create a fresh admin key in out_dir; refuses to overwrite one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path = out_dir / ADMIN_KEY_FILE
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (out_dir / ADMIN_PUB_FILE).write_bytes(pub)
    return key, spki_fingerprint(key.public_key())


def load_admin_key(key_dir: Path) -> ec.EllipticCurvePrivateKey:
    path = key_dir / ADMIN_KEY_FILE if key_dir.is_dir() else key_dir
    from meshshield.inputs import InputFileError, read_bounded

    try:
        data = read_bounded(path, what="admin key", limit=64 << 10)
    except OSError as e:
        raise ValueError(f"cannot read admin key {path}: {e.strerror}") from None
    except InputFileError as e:
        raise ValueError(str(e)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path} is not a P-256 key; make one with `meshshield admin keygen`")
    return key


def sign_request(
    key: ec.EllipticCurvePrivateKey,
    method: str,
    path_qs: str,
    body: bytes,
    *,
    now: float | None = None,
) -> str:
    """The Authorization header value for one request."""
    ts = str(int(time.time() if now is None else now))
    nonce = base64.b64encode(secrets.token_bytes(16)).decode()
    sig = key.sign(_signed_bytes(method, path_qs, ts, nonce, body), ec.ECDSA(hashes.SHA256()))
    spki = spki_der(key.public_key())
    return (
        f"{SCHEME} key={base64.b64encode(spki).decode()}, ts={ts}, nonce={nonce}, "
        f"sig={base64.b64encode(sig).decode()}"
    )


@dataclass(frozen=True)
class SignedRequest:
    """A request whose signature verified: who signed it, with which nonce, and when."""

    fingerprint: str
    nonce: str
    ts: int

    @property
    def expires_at(self) -> float:
        """When the signed timestamp leaves the skew window: replays end there."""
        return self.ts + MAX_SKEW


def _unauth(msg: str) -> MeshError:
    return MeshError(Reason.UNAUTHENTICATED, msg)


def verify_signature(
    header: str | None,
    method: str,
    path_qs: str,
    body: bytes,
    now: float,
) -> SignedRequest:
    """Check an Authorization header's form, timestamp and signature (no state); returns
    who signed it or raises MeshError(401). The caller checks the nonce was not seen."""
    if not header:
        raise _unauth(
            "this endpoint needs an admin: expected a signed request "
            f"(Authorization: {SCHEME} ...), found none; pass --admin-key DIR"
        )
    if len(header) > MAX_HEADER:
        raise _unauth(f"Authorization header is {len(header)} bytes, at most {MAX_HEADER}")
    scheme, _, rest = header.partition(" ")
    if scheme != SCHEME:
        raise _unauth(f"expected Authorization scheme {SCHEME}, found {scheme[:32]!r}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep or k in fields:
            raise _unauth("Authorization header is malformed: expected key=, ts=, nonce=, sig=")
        fields[k] = v
    if set(fields) != {"key", "ts", "nonce", "sig"}:
        raise _unauth(
            f"Authorization header has fields {sorted(fields)}, expected key, ts, nonce, sig"
        )
    try:
        spki = base64.b64decode(fields["key"], validate=True)
        sig = base64.b64decode(fields["sig"], validate=True)
        ts = int(fields["ts"])
        skew = now - ts  # OverflowError for an integer beyond a float
    except (binascii.Error, ValueError, OverflowError):
        raise _unauth("Authorization header: key and sig must be base64, ts an integer") from None
    if abs(skew) > MAX_SKEW:
        raise _unauth(
            f"signed request timestamp {ts} is {int(skew)} s from the CAS clock "
            f"(allowed ±{int(MAX_SKEW)} s); check the admin machine's clock"
        )
    try:
        pub = serialization.load_der_public_key(spki)
    except (ValueError, TypeError):
        raise _unauth("Authorization header: key is not a DER public key") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise _unauth("admin keys are P-256; make one with `meshshield admin keygen`")
    try:  # bounded, because the CAS stores it for the skew window
        nonce_len = len(base64.b64decode(fields["nonce"], validate=True))
    except (binascii.Error, ValueError):
        nonce_len = -1
    if not 16 <= nonce_len <= 32:
        raise _unauth("Authorization header: nonce must be base64 of 16 to 32 random bytes")
    try:
        pub.verify(
            sig, _signed_bytes(method, path_qs, fields["ts"], fields["nonce"], body),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature:
        raise _unauth(
            "request signature does not verify for this method, path and body; "
            "the request was altered or signed for another request"
        ) from None
    return SignedRequest(spki_fingerprint(pub), fields["nonce"], ts)


def replay_refused(signed: SignedRequest) -> MeshError:
    return _unauth(
        f"request already seen: key {signed.fingerprint[:16]}… used nonce "
        f"{signed.nonce[:12]}… before (a replayed or re-sent request); each signed request "
        "is accepted once, so sign each request anew"
    )
