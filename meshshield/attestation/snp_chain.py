"""AMD SEV-SNP certificates: ARK -> ASK -> VCEK or ARK -> ASVK -> VLEK, and VCEK extensions.

Every signature in the chain is RSASSA-PSS with SHA-384 (MGF1-SHA-384, salt 48) by an
RSA key; the ARK is self-signed and must be one of the pinned roots (by default the
three AMD ARKs shipped in `certs/`, pinned by SHA-256 fingerprint here). The leaf
(VCEK, or VLEK for a cloud provider's loaded key) is an ECDSA P-384 key whose issuer
names the product: ``SEV-Milan`` / ``SEV-VLEK-Milan`` and so on. When the evidence does
not carry the ASK or ASVK, the one shipped in `certs/` for that product is used.

Failures are EvidenceError: evidence_malformed when the bytes are not certificates,
chain_invalid when they are but do not chain to a pinned ARK at the given time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from meshshield.attestation.roots import load_pinned_root
from meshshield.attestation.snp_report import Product
from meshshield.errors import EvidenceError, Reason

# SHA-256 of the DER of each shipped certificate (certs/README.md lists their sources).
AMD_ARK_SHA256: dict[Product, str] = {
    Product.MILAN: "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    Product.GENOA: "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    Product.TURIN: "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}
AMD_INTERMEDIATE_SHA256: dict[tuple[Product, str], str] = {
    (Product.MILAN, "vcek"): "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    (Product.GENOA, "vcek"): "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    (Product.TURIN, "vcek"): "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
    (Product.MILAN, "vlek"): "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    (Product.GENOA, "vlek"): "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    (Product.TURIN, "vlek"): "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
}

_AMD_ARC = "1.3.6.1.4.1.3704.1"
OID_PRODUCT_NAME = x509.ObjectIdentifier(_AMD_ARC + ".2")
OID_BL_SPL = x509.ObjectIdentifier(_AMD_ARC + ".3.1")
OID_TEE_SPL = x509.ObjectIdentifier(_AMD_ARC + ".3.2")
OID_SNP_SPL = x509.ObjectIdentifier(_AMD_ARC + ".3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(_AMD_ARC + ".3.8")
OID_FMC_SPL = x509.ObjectIdentifier(_AMD_ARC + ".3.9")
OID_HWID = x509.ObjectIdentifier(_AMD_ARC + ".4")
OID_CSP_ID = x509.ObjectIdentifier(_AMD_ARC + ".5")

LEAF_CN = {"SEV-VCEK": "vcek", "SEV-VLEK": "vlek"}
# What `cryptography` raises for certificate bytes it cannot decode, at load time or
# lazily when a field is first read.
CERT_DECODE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.AttributeNotFound,
)
MAX_CERTS_BYTES = 64 * 1024
MAX_CERTS = 8
_PEM_BEGIN = b"-----BEGIN"


@dataclass(frozen=True)
class VerifiedChain:
    """A leaf that chains to a pinned root at the verification time."""

    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePublicKey
    kind: str  # "vcek" or "vlek"
    product: Product
    intermediate: x509.Certificate
    root: x509.Certificate


def _malformed(message: str) -> EvidenceError:
    return EvidenceError(Reason.EVIDENCE_MALFORMED, "sev-snp certificates: " + message)


def _chain_invalid(message: str) -> EvidenceError:
    return EvidenceError(Reason.CHAIN_INVALID, "sev-snp certificate chain: " + message)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(_der(cert)).hexdigest()


@contextlib.contextmanager
def _serial_zero_allowed() -> Iterator[None]:
    # AMD issues every VCEK and VLEK with serial number 0, which RFC 5280 forbids and
    # `cryptography` warns about; the serial plays no part in this chain.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def _der_length(data: bytes) -> int:
    """Total length of the DER SEQUENCE at the start of `data` (header included)."""
    if len(data) < 2 or data[0] != 0x30:
        raise _malformed("not PEM and not a DER certificate (no SEQUENCE at the start)")
    first = data[1]
    if first < 0x80:
        return 2 + first
    n = first & 0x7F
    if n == 0 or n > 3 or len(data) < 2 + n:
        raise _malformed("DER certificate has an unsupported length encoding")
    return 2 + n + int.from_bytes(data[2 : 2 + n], "big")


def load_certificates(blob: bytes) -> list[x509.Certificate]:
    """Certificates from PEM, or one DER certificate optionally followed by PEM."""
    if not isinstance(blob, (bytes, bytearray)):
        raise _malformed(f"expected bytes, got {type(blob).__name__}")
    if len(blob) > MAX_CERTS_BYTES:
        raise _malformed(f"{len(blob)} bytes of certificates; at most {MAX_CERTS_BYTES} accepted")
    # Only leading padding is stripped before a DER certificate: its last bytes may be
    # zero (1 in 256 signatures end in 0x00), and its length header says where it ends.
    data = bytes(blob).lstrip(b"\x00 \t\r\n")
    certs: list[x509.Certificate] = []
    try:
        with _serial_zero_allowed():
            if data and not data.startswith(_PEM_BEGIN):
                end = _der_length(data)
                if end > len(data):
                    raise _malformed(f"DER certificate declares {end} bytes, {len(data)} given")
                certs.append(x509.load_der_x509_certificate(data[:end]))
                data = data[end:].strip(b"\x00 \t\r\n")
                if data and not data.startswith(_PEM_BEGIN):
                    raise _malformed("bytes after the DER certificate are not PEM certificates")
            data = data.rstrip(b"\x00 \t\r\n")
            if data:
                certs.extend(x509.load_pem_x509_certificates(data))
    except CERT_DECODE_ERRORS as e:
        raise _malformed(f"could not parse a certificate ({type(e).__name__}: {e})") from None
    if len(certs) > MAX_CERTS:
        raise _malformed(f"{len(certs)} certificates given; at most {MAX_CERTS} accepted")
    return certs


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if len(attrs) == 1 else None
    return value if isinstance(value, str) else ""


def _describe(role: str, cert: x509.Certificate) -> str:
    return f"{role} (CN={common_name(cert.subject)}, SHA-256 {fingerprint(cert)[:16]}...)"


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_window(role: str, cert: x509.Certificate, at: datetime) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if start <= at <= end:
        return
    state = "has expired" if at > end else "is not yet valid"
    raise _chain_invalid(
        f"{_describe(role, cert)} {state}: it is valid from {_iso(start)} to {_iso(end)}, "
        f"and the verification time is {_iso(at)}"
    )


def _check_issued_by(child: x509.Certificate, role: str, issuer: x509.Certificate, by: str) -> None:
    """RSASSA-PSS/SHA-384 signature of `issuer` over `child`, plus CA constraints."""
    if child.issuer != issuer.subject:
        raise _chain_invalid(
            f"{role} is issued by {child.issuer.rfc4514_string()!r}, "
            f"not by the {by} {issuer.subject.rfc4514_string()!r}"
        )
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise _chain_invalid(f"{_describe(by, issuer)} is not a CA (basicConstraints)")
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise _chain_invalid(f"{_describe(by, issuer)} may not sign certificates (keyUsage)")
    except x509.ExtensionNotFound:
        pass
    if child.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        raise _chain_invalid(
            f"{role} is signed with {child.signature_algorithm_oid.dotted_string}; "
            "AMD signs with RSASSA-PSS"
        )
    params = child.signature_algorithm_parameters
    hash_alg = child.signature_hash_algorithm
    if not isinstance(params, padding.PSS) or not isinstance(hash_alg, hashes.SHA384):
        raise _chain_invalid(f"{role} signature is not RSASSA-PSS with SHA-384")
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise _chain_invalid(f"{_describe(by, issuer)} does not hold an RSA key")
    try:
        key.verify(child.signature, child.tbs_certificate_bytes, params, hash_alg)
    except InvalidSignature:
        raise _chain_invalid(
            f"the signature on {_describe(role, child)} does not verify with the key of "
            f"{_describe(by, issuer)}"
        ) from None


@functools.cache
def pinned_arks() -> tuple[x509.Certificate, ...]:
    """The shipped AMD ARKs (Milan, Genoa, Turin), each checked against its pin."""
    return tuple(
        load_pinned_root(f"amd_ark_{product.value}.pem", sha)
        for product, sha in AMD_ARK_SHA256.items()
    )


@functools.cache
def shipped_intermediate(product: Product, kind: str) -> x509.Certificate:
    """The shipped ASK (kind "vcek") or ASVK (kind "vlek") of a product, pin-checked."""
    stem = "ask" if kind == "vcek" else "asvk"
    return load_pinned_root(
        f"amd_{stem}_{product.value}.pem", AMD_INTERMEDIATE_SHA256[(product, kind)]
    )


def _product_of_issuer(leaf: x509.Certificate, kind: str) -> Product:
    issuer_cn = common_name(leaf.issuer)
    prefix = "SEV-" if kind == "vcek" else "SEV-VLEK-"
    for product in Product:
        if issuer_cn == prefix + product.value.capitalize():
            return product
    expected = ", ".join(prefix + p.value.capitalize() for p in Product)
    raise _chain_invalid(
        f"the {kind.upper()} is issued by CN={issuer_cn!r}; expected one of {expected}"
    )


def _pick_leaf(certs: Sequence[x509.Certificate], want_kind: str | None) -> x509.Certificate:
    leaves: dict[bytes, x509.Certificate] = {}
    for c in certs:
        if common_name(c.subject) in LEAF_CN:
            leaves.setdefault(_der(c), c)
    if not leaves:
        raise _malformed(
            f"no VCEK or VLEK (CN=SEV-VCEK or CN=SEV-VLEK) among the {len(certs)} certificates "
            "given; pass the report's VCEK/VLEK in the evidence's \"certs\" or with --certs"
        )
    found = list(leaves.values())
    if len(found) > 1:
        found = [c for c in found if LEAF_CN[common_name(c.subject)] == want_kind] or found
    if len(found) > 1:
        raise _malformed(f"{len(found)} different {want_kind or 'leaf'} certificates given")
    return found[0]


def verify_chain(
    certs: Sequence[x509.Certificate],
    *,
    at: datetime,
    want_kind: str | None,
    roots: Sequence[x509.Certificate] | None = None,
) -> VerifiedChain:
    """Find the leaf among `certs` and verify it up to a pinned root at time `at`.

    `want_kind` ("vcek"/"vlek", from the report) only breaks ties when several leaves
    are given; the caller compares the report's SIGNING_KEY with the result's `kind`.
    """
    trusted = tuple(roots) if roots is not None else pinned_arks()
    trusted_der = {_der(r) for r in trusted}
    for c in certs:
        if c.subject == c.issuer and _der(c) not in trusted_der:
            raise _chain_invalid(
                f"the certificates given include the self-signed {_describe('root', c)}, which "
                "is not a pinned AMD ARK; only the ARKs shipped in certs/ are trusted"
            )
    leaf = _pick_leaf(certs, want_kind)
    kind = LEAF_CN[common_name(leaf.subject)]
    role = kind.upper()
    product = _product_of_issuer(leaf, kind)
    mid_role = "ASK" if kind == "vcek" else "ASVK"
    candidates = [c for c in certs if c.subject == leaf.issuer and c.subject != c.issuer]
    if not candidates:
        candidates = [shipped_intermediate(product, kind)]
    # Several certificates may carry the issuer's name; the one whose key signed the
    # leaf is the intermediate (the first one's error is reported if none did).
    first_error: EvidenceError | None = None
    for intermediate in candidates:
        try:
            _check_issued_by(leaf, role, intermediate, mid_role)
            break
        except EvidenceError as e:
            first_error = first_error or e
    else:
        assert first_error is not None
        raise first_error
    root_candidates = [r for r in trusted if r.subject == intermediate.issuer]
    if not root_candidates:
        raise _chain_invalid(
            f"{_describe(mid_role, intermediate)} is issued by "
            f"{intermediate.issuer.rfc4514_string()!r}, which is not a pinned AMD ARK"
        )
    root = root_candidates[0]
    _check_issued_by(intermediate, mid_role, root, "ARK")
    _check_issued_by(root, "ARK", root, "ARK")
    for r, c in (("ARK", root), (mid_role, intermediate), (role, leaf)):
        _check_window(r, c, at)
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise _chain_invalid(f"{_describe(role, leaf)} does not hold an ECDSA P-384 key")
    return VerifiedChain(leaf, key, kind, product, intermediate, root)


# --- VCEK / VLEK extensions -----------------------------------------------------------


def _der_tlv(value: bytes, tag: int, what: str) -> bytes:
    if len(value) < 2 or value[0] != tag:
        raise _chain_invalid(f"{what} is not DER (tag 0x{tag:02x} expected)")
    n = value[1]
    start = 2
    if n & 0x80:
        width = n & 0x7F
        if width != 1 or len(value) < 3:
            raise _chain_invalid(f"{what} has an unsupported DER length")
        n, start = value[2], 3
    if len(value) != start + n or n == 0:
        raise _chain_invalid(f"{what} has a DER length that does not match its size")
    return value[start:]


def _raw_extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def spl_extension(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> int | None:
    """A security patch level extension: a DER INTEGER 0..255 (sometimes in two bytes)."""
    raw = _raw_extension(cert, oid)
    if raw is None:
        return None
    content = _der_tlv(raw, 0x02, f"{what} extension ({oid.dotted_string})")
    value = int.from_bytes(content, "big", signed=True)
    if not 0 <= value <= 255:
        raise _chain_invalid(f"{what} extension ({oid.dotted_string}) is {value}, not 0..255")
    return value


def string_extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    """An IA5String extension (productName, cspID) as text, or None if absent or odd."""
    raw = _raw_extension(cert, oid)
    if raw is None or len(raw) < 2 or raw[0] != 0x16 or raw[1] != len(raw) - 2:
        return None
    return raw[2:].decode("ascii", "replace")


def hwid_extension(cert: x509.Certificate) -> bytes | None:
    """hwID: raw bytes as AMD's KDS issues it, or wrapped in a DER OCTET STRING."""
    raw = _raw_extension(cert, OID_HWID)
    if raw is None or len(raw) in (8, 64):
        return raw
    return _der_tlv(raw, 0x04, f"hwID extension ({OID_HWID.dotted_string})")
