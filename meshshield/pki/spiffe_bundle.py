"""The SPIFFE trust bundle document (a JWK Set), built from and read back into CA
certificates. Pure: no I/O.

From the SPIFFE Trust Domain and Bundle specification, section 4: the bundle is an
RFC 7517 JWK Set with `keys` (MUST), `spiffe_sequence` (SHOULD; a monotonically
increasing integer that MUST change whenever the contents change) and
`spiffe_refresh_hint` (SHOULD; seconds); each JWK has `kty` and `use` (MUST), and
consumers ignore keys of an unknown `kty` or `use`. From the X509-SVID specification,
section 6: one JWK per CA certificate, `use` "x509-svid", no `kid`, and `x5c` holding
exactly that one certificate as base64 (not base64url) DER (RFC 7517 §4.7). The EC key
parameters follow RFC 7518 §6.2.1: `crv` "P-256", `x` and `y` the full-width 32-byte
big-endian coordinates in base64url without padding.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

X509_SVID_USE = "x509-svid"
# Section 6.1 of the bundle spec advises consumers to default to about five minutes; a
# rotation publishes the next CA at least one leaf lifetime (>= 5 minutes) before it
# signs, so a consumer polling this often always holds it in time.
DEFAULT_REFRESH_HINT_SECONDS = 300

_P256_BYTES = 32


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def x509_svid_jwk(cert: x509.Certificate) -> dict[str, Any]:
    """The JWK of one CA certificate; ValueError unless its key is ECDSA P-256."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"CA {cert.subject.rfc4514_string()} has no P-256 key")
    numbers = key.public_numbers()
    return {
        "use": X509_SVID_USE,
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(_P256_BYTES, "big")),
        "y": _b64url(numbers.y.to_bytes(_P256_BYTES, "big")),
        "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")],
    }


def spiffe_bundle_document(
    cas: Sequence[x509.Certificate],
    *,
    sequence: int,
    refresh_hint_seconds: int = DEFAULT_REFRESH_HINT_SECONDS,
) -> dict[str, Any]:
    """The SPIFFE bundle of a trust domain whose X.509 authorities are `cas`."""
    if sequence < 0 or refresh_hint_seconds < 1:
        raise ValueError("sequence must be >= 0 and the refresh hint >= 1 second")
    return {
        "keys": [x509_svid_jwk(c) for c in cas],
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_seconds,
    }


class SpiffeBundleError(ValueError):
    """A SPIFFE bundle document that does not hold what it must; the message says what."""


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def x509_authorities(doc: object) -> list[x509.Certificate]:
    """The X.509 CA certificates of a SPIFFE bundle document (X509-SVID §6).

    Keys of another `use` or `kty` are ignored, as the specification requires; an
    `x509-svid` key is refused when its first `x5c` entry is not a certificate, or when
    its EC parameters name a different key than that certificate's.
    """
    if not isinstance(doc, Mapping):
        raise SpiffeBundleError("a SPIFFE bundle is a JSON object")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise SpiffeBundleError('a SPIFFE bundle needs a "keys" array')
    for name in ("spiffe_sequence", "spiffe_refresh_hint"):
        if name in doc and not (_is_int(doc[name]) and doc[name] >= 0):
            raise SpiffeBundleError(f"{name} must be a non-negative integer")
    out: list[x509.Certificate] = []
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, Mapping):
            raise SpiffeBundleError(f"keys[{i}] is not a JSON object")
        if jwk.get("use") != X509_SVID_USE or "kty" not in jwk:
            continue
        if "kid" in jwk:
            raise SpiffeBundleError(f"keys[{i}]: an x509-svid key MUST NOT carry a kid")
        x5c = jwk.get("x5c")
        if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
            continue  # "If x5c is not set, or is empty, then the entry MUST be ignored."
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
        except (binascii.Error, ValueError) as e:
            raise SpiffeBundleError(
                f"keys[{i}].x5c[0] is not a base64 DER certificate ({e})"
            ) from None
        if jwk["kty"] == "EC":
            _check_ec_params(i, jwk, cert)
        out.append(cert)
    return out


def _check_ec_params(i: int, jwk: Mapping[str, Any], cert: x509.Certificate) -> None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SpiffeBundleError(f"keys[{i}] says EC but its certificate has another key")
    if jwk.get("crv") != "P-256":
        raise SpiffeBundleError(f"keys[{i}].crv is {jwk.get('crv')!r}, expected 'P-256'")
    numbers = key.public_numbers()
    for name, value in (("x", numbers.x), ("y", numbers.y)):
        text = jwk.get(name)
        want = _b64url(value.to_bytes(_P256_BYTES, "big"))
        if not isinstance(text, str) or text != want:
            raise SpiffeBundleError(
                f"keys[{i}].{name} does not match the public key of its x5c certificate"
            )
