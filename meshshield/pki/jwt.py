"""JWT-SVIDs: ES256 JSON Web Tokens signed by the CAS, parsed strictly. Pure: no I/O.

A JWT-SVID (SPIFFE JWT-SVID specification) is a JWS in compact serialization
(RFC 7515 §7.1) whose header names `alg` and `kid` (and optionally `typ` "JWT" or
"JOSE"), and whose claims carry `sub` (the SPIFFE ID), `aud` and `exp`. meshshield's
CAS signs only with ECDSA P-256 and SHA-256 (RFC 7518 §3.4: the signature is r || s,
32 bytes each), so this parser accepts exactly that algorithm: no `none`, no HMAC,
no algorithm named by the token deciding how it is checked.

The parser is strict where lenience lets two readers disagree: base64url without
padding and in its one canonical form, JSON objects without duplicate keys, a
bounded size, and no `crit` header it would have to understand.

The trust domain's JWT authorities are published as JWKs with `use` "jwt-svid" and a
`kid` (the RFC 7638 thumbprint of the key) in its SPIFFE bundle.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from meshshield.errors import MeshError, Reason
from meshshield.pki.spiffe import parse_spiffe_id
from meshshield.strictjson import no_duplicate_keys

JWT_SVID_USE = "jwt-svid"
ALGORITHM = "ES256"
MAX_TOKEN_BYTES = 16 * 1024
MAX_KID_LENGTH = 128
MAX_AUDIENCES = 32
MAX_AUDIENCE_LENGTH = 512
# A future `iat`/`nbf` within this much of our clock is a clock difference, not a lie.
CLOCK_SKEW_SECONDS = 60
_P256_BYTES = 32
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# Claims the signer sets; the attestation claims may not override them.
REGISTERED = ("sub", "aud", "exp", "iat", "nbf", "iss", "jti")


class JwtError(MeshError):
    """A token that is malformed, unsigned by a known key, expired or for someone else."""


def _malformed(what: str) -> JwtError:
    return JwtError(Reason.BAD_REQUEST, f"JWT malformed: {what}")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    """Strict base64url: its alphabet only, no padding, the canonical encoding."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise _malformed(f"{what} is not base64url without padding")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise _malformed(f"{what} is not base64url") from None
    if b64url(data) != text:
        raise _malformed(f"{what} is not in canonical base64url (stray bits)")
    return data


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicate_keys,
                         parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _malformed(f"{what} is not a JSON object ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise _malformed(f"{what} is not a JSON object")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# -- keys -------------------------------------------------------------------------------


def _p256(key: ec.EllipticCurvePublicKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("JWT-SVID keys are ECDSA P-256")


def jwk_thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 thumbprint (SHA-256, base64url) of a P-256 key: its `kid`."""
    _p256(key)
    n = key.public_numbers()
    members = {"crv": "P-256", "kty": "EC",
               "x": b64url(n.x.to_bytes(_P256_BYTES, "big")),
               "y": b64url(n.y.to_bytes(_P256_BYTES, "big"))}
    return b64url(hashlib.sha256(_canonical(members)).digest())


def jwt_svid_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The JWK of a JWT authority, as a SPIFFE bundle carries it."""
    _p256(key)
    n = key.public_numbers()
    return {
        "use": JWT_SVID_USE, "kty": "EC", "crv": "P-256", "kid": jwk_thumbprint(key),
        "x": b64url(n.x.to_bytes(_P256_BYTES, "big")),
        "y": b64url(n.y.to_bytes(_P256_BYTES, "big")),
    }


def jwt_authorities(doc: object) -> dict[str, ec.EllipticCurvePublicKey]:
    """The JWT authorities (kid -> key) of a SPIFFE bundle document or JWK Set.

    Keys of another `use` are ignored (the bundle's X.509 authorities); a `jwt-svid`
    key must be EC P-256 with a `kid` and coordinates of a point on the curve.
    """
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWK Set is a JSON object with a "keys" array')
    out: dict[str, ec.EllipticCurvePublicKey] = {}
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, Mapping):
            raise ValueError(f"keys[{i}] is not a JSON object")
        if jwk.get("use") != JWT_SVID_USE:
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            raise ValueError(f"keys[{i}]: a jwt-svid key needs a kid")
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise ValueError(f"keys[{i}]: expected kty EC, crv P-256")
        try:
            coords = [b64url_decode(str(jwk.get(c, "")), f"keys[{i}].{c}") for c in "xy"]
        except JwtError as e:
            raise ValueError(e.message) from None
        if any(len(c) != _P256_BYTES for c in coords):
            raise ValueError(f"keys[{i}]: x and y must be {_P256_BYTES} bytes")
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(coords[0], "big"), int.from_bytes(coords[1], "big"),
                ec.SECP256R1(),
            ).public_key()
        except ValueError:
            raise ValueError(f"keys[{i}]: x, y is not a point on P-256") from None
        if kid in out:
            raise ValueError(f"keys[{i}]: kid {kid!r} named twice")
        out[kid] = key
    return out


# -- signing ----------------------------------------------------------------------------


def sign_jwt(key: ec.EllipticCurvePrivateKey, claims: Mapping[str, Any]) -> str:
    """An ES256 JWS (compact) of `claims`, with `kid` the key's thumbprint."""
    header = {"alg": ALGORITHM, "kid": jwk_thumbprint(key.public_key()), "typ": "JWT"}
    signing_input = f"{b64url(_canonical(header))}.{b64url(_canonical(claims))}"
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# -- parsing and verifying ---------------------------------------------------------------


@dataclass(frozen=True)
class ParsedJwt:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def kid(self) -> str:
        return str(self.header["kid"])


def parse_jwt(token: str) -> ParsedJwt:
    """Split and decode a compact JWS; nothing is verified yet. JwtError if malformed."""
    if not isinstance(token, str):
        raise _malformed("expected a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise _malformed(f"{len(token)} characters, at most {MAX_TOKEN_BYTES}")
    parts = token.split(".")
    if len(parts) != 3:
        raise _malformed(f"expected 3 dot-separated parts (JWS compact), found {len(parts)}")
    header = _json_object(b64url_decode(parts[0], "header"), "header")
    claims = _json_object(b64url_decode(parts[1], "payload"), "payload")
    signature = b64url_decode(parts[2], "signature")
    if header.get("alg") != ALGORITHM:
        raise JwtError(Reason.SIGNATURE_INVALID,
                       f"JWT alg is {str(header.get('alg'))[:20]!r}; only {ALGORITHM} is accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
        raise _malformed("the header has no kid naming the signing key")
    if "typ" in header and header["typ"] not in ("JWT", "JOSE"):
        raise _malformed(f"typ is {str(header['typ'])[:20]!r}, expected JWT or JOSE")
    if "crit" in header:
        raise _malformed("the header has crit extensions, which this verifier does not know")
    if len(signature) != 2 * _P256_BYTES:
        raise _malformed(f"an ES256 signature is 64 bytes, found {len(signature)}")
    return ParsedJwt(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def verify_signature(parsed: ParsedJwt, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
    key = keys.get(parsed.kid)
    if key is None:
        raise JwtError(Reason.SIGNATURE_INVALID,
                       f"JWT signed by key {parsed.kid[:40]!r}, which is not a JWT authority "
                       "of the trust bundle")
    r = int.from_bytes(parsed.signature[:32], "big")
    s = int.from_bytes(parsed.signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), parsed.signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise JwtError(Reason.SIGNATURE_INVALID, "JWT signature does not verify") from None


@dataclass(frozen=True)
class JwtSvid:
    spiffe_id: str
    audience: tuple[str, ...]
    expiry: int
    claims: dict[str, Any]


def _int_claim(claims: Mapping[str, Any], name: str, required: bool) -> int | None:
    v = claims.get(name)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v or abs(v) > 2**53:
        raise _malformed(f"claim {name!r} must be a NumericDate (seconds)")
    return int(v)


def validate_jwt_svid(
    token: str,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    audience: str,
    now: float,
    trust_domain: str,
) -> JwtSvid:
    """A JWT-SVID of `trust_domain`, signed by one of `keys`, unexpired, for `audience`."""
    parsed = parse_jwt(token)
    verify_signature(parsed, keys)
    claims = parsed.claims
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _malformed("claim 'sub' (the SPIFFE ID) is missing")
    try:
        sid = parse_spiffe_id(sub)
    except ValueError as e:
        raise _malformed(f"claim 'sub': {e}") from None
    if sid.trust_domain != trust_domain or not sid.path_segments:
        raise JwtError(Reason.PEER_NOT_ALLOWED,
                       f"JWT-SVID subject {sub[:100]!r} is not a workload of trust domain "
                       f"{trust_domain}")
    exp = _int_claim(claims, "exp", required=True)
    assert exp is not None
    if now >= exp:
        raise JwtError(Reason.UNAUTHENTICATED, f"JWT-SVID expired {int(now - exp)} s ago")
    for name in ("nbf", "iat"):
        t = _int_claim(claims, name, required=False)
        if t is not None and t > now + CLOCK_SKEW_SECONDS:
            raise JwtError(Reason.UNAUTHENTICATED, f"JWT-SVID {name} lies in the future")
    aud = claims.get("aud")
    auds: Sequence[object] = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not auds or not all(isinstance(a, str) for a in auds):
        raise _malformed("claim 'aud' must be a string or a list of strings")
    if audience not in auds:
        raise JwtError(Reason.FORBIDDEN,
                       f"JWT-SVID is for audience {[str(a)[:60] for a in auds][:5]}, "
                       f"not {audience[:100]!r}")
    return JwtSvid(sub, tuple(str(a) for a in auds), exp, claims)


def check_audience(audience: Sequence[str]) -> list[str]:
    """The audience list of a JWT-SVID request: 1..32 non-empty strings, deduplicated."""
    out: list[str] = []
    if not audience:
        raise JwtError(Reason.BAD_REQUEST, "a JWT-SVID needs at least one audience")
    if len(audience) > MAX_AUDIENCES:
        raise JwtError(Reason.BAD_REQUEST, f"at most {MAX_AUDIENCES} audiences")
    for a in audience:
        if not isinstance(a, str) or not 0 < len(a) <= MAX_AUDIENCE_LENGTH:
            raise JwtError(Reason.BAD_REQUEST,
                           f"each audience is a string of 1..{MAX_AUDIENCE_LENGTH} characters")
        if a not in out:
            out.append(a)
    return out


def jwt_svid_claims(
    spiffe_id: str, audience: Sequence[str], issued_at: int, expires_at: int,
    attestation: Mapping[str, Any],
) -> dict[str, Any]:
    """The claims of a JWT-SVID: the registered ones and the attestation claims."""
    extra = {k: v for k, v in attestation.items() if k not in REGISTERED}
    return {**extra, "sub": spiffe_id, "aud": list(audience), "iat": issued_at,
            "exp": expires_at}
