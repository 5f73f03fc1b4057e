"""Certificate signing requests from sidecars (untrusted input).

Only the public key of a CSR is used: subject, attributes and requested extensions
are ignored, because everything a certificate says comes from the policy and the
verified evidence. The CSR still has to be well-formed, signed by its own key (proof
of possession) and carry an ECDSA P-256 key.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from meshshield.errors import MeshError, Reason

MAX_CSR_BYTES = 64 * 1024
_LABEL = "CERTIFICATE REQUEST"
_BEGIN = re.compile(rb"-----BEGIN ([^-\r\n]{0,64})-----")
_END = re.compile(rb"-----END ([^-\r\n]{0,64})-----")


def _invalid(message: str) -> MeshError:
    return MeshError(Reason.CSR_INVALID, message)


def _describe(key: PublicKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC key on curve {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, dsa.DSAPublicKey):
        return f"a DSA-{key.key_size} key"
    names = {
        ed25519.Ed25519PublicKey: "an Ed25519 key",
        ed448.Ed448PublicKey: "an Ed448 key",
        x25519.X25519PublicKey: "an X25519 key",
        x448.X448PublicKey: "an X448 key",
    }
    for cls, name in names.items():
        if isinstance(key, cls):
            return name
    return f"a {type(key).__name__}"


def _single_pem_block(data: bytes) -> bytes:
    begins = list(_BEGIN.finditer(data))
    ends = list(_END.finditer(data))
    if not begins:
        raise _invalid(
            f"CSR is not PEM: expected a '-----BEGIN {_LABEL}-----' block "
            "(e.g. from `openssl req -new`)"
        )
    if len(begins) > 1:
        labels = ", ".join(m.group(1).decode("ascii", "replace") for m in begins)
        raise _invalid(
            f"CSR PEM holds {len(begins)} blocks ({labels}); send exactly one "
            f"{_LABEL} block"
        )
    begin = begins[0]
    label = begin.group(1).decode("ascii", "replace")
    if label != _LABEL:
        raise _invalid(f"CSR PEM block is a {label!r}, expected a {_LABEL!r}")
    if not ends or ends[-1].start() < begin.end():
        raise _invalid(f"CSR PEM is truncated: no '-----END {_LABEL}-----' line")
    if len(ends) > 1 or ends[0].group(1) != begin.group(1):
        raise _invalid(f"CSR PEM has mismatched END lines; expected one '-----END {_LABEL}-----'")
    return data[begin.start() : ends[0].end()] + b"\n"


def public_key_from_csr(pem: str | bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a PEM CSR whose signature verifies.

    Raises MeshError(Reason.CSR_INVALID) saying what was wrong: too large, not PEM,
    not exactly one CERTIFICATE REQUEST block, unparseable, signed by a different key
    than the one it carries, or a key other than EC P-256.
    """
    if len(pem) > MAX_CSR_BYTES:
        raise _invalid(f"CSR is {len(pem)} bytes; at most {MAX_CSR_BYTES} are accepted")
    if isinstance(pem, str):
        try:
            data = pem.encode("ascii")
        except UnicodeEncodeError:
            raise _invalid("CSR is not PEM: it contains non-ASCII characters") from None
    else:
        data = bytes(pem)
    block = _single_pem_block(data)
    try:
        csr = x509.load_pem_x509_csr(block)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as e:
        raise _invalid(f"CSR does not parse as a PKCS#10 certificate request: {e}") from None
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise _invalid(
            f"CSR public key is unsupported or malformed ({e}); an EC P-256 key is required"
        ) from None
    try:
        signature_ok = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise _invalid(f"CSR signature cannot be checked ({e})") from None
    if not signature_ok:
        raise _invalid(
            "CSR signature does not verify with the public key it carries: it was signed "
            "by another key or altered; sign the CSR with the key it requests a certificate for"
        )
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise _invalid(
            f"CSR carries {_describe(key)}; an EC P-256 (secp256r1) key is required"
        )
    return key
