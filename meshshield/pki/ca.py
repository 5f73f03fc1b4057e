"""The mesh CA: generating roots, rotating them, and issuing certificates.

Rotation (SPEC §5: "the bundle carries the next CA before it signs anything, and keeps
the old one until the last leaf it signed has expired") is pure logic over a list of
`CaRecord`s in `CaSet`; storing the records is the CAS's job.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshshield.pki.claims_ext import claims_extension
from meshshield.pki.keys import generate_p256, spki_der, spki_fingerprint
from meshshield.pki.spiffe import parse_spiffe_id, trust_domain_id, validate_trust_domain

CaState = Literal["active", "next", "retired"]

# A root is valid from a little before its creation so that peers whose clocks run
# slightly behind the CAS still accept it.
CA_BACKDATE = timedelta(hours=1)


@dataclass(frozen=True)
class CaRecord:
    """One CA certificate, its key (None when not loaded) and its rotation state.

    - "active": the signer, unless a due "next" exists.
    - "next": published in the bundle now, signs from `activate_at` on.
    - "retired": no longer signs; stays in the bundle while `retire_after` > now.
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None
    state: CaState
    activate_at: datetime | None = None
    retire_after: datetime | None = None

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate DER, lowercase hex (computed once: it is on the
        issuance path)."""
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def generate_ca(
    trust_domain: str, now: datetime, validity_days: int = 3650
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 root for `trust_domain`.

    It carries no name constraints: a critical URI constraint is refused outright by
    verifiers that do not implement URI constraints (pyca/cryptography's, among
    others; SPIFFE X509-SVID §4.2 warns of the same), and the trust domain of a peer's
    SPIFFE ID is enforced by the peer check instead (SPEC §5).
    """
    validate_trust_domain(trust_domain)
    if validity_days < 1:
        raise ValueError(f"validity_days must be at least 1, got {validity_days}")
    key = generate_p256()
    short_id = spki_fingerprint(key.public_key())[:8]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshshield"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshshield CA {trust_domain} {short_id}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_id(trust_domain))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


class CaSet:
    """Rotation over the CA records of one trust domain. Pure: no I/O, no clock.

    Invariants (checked on construction, kept by every method):

    1. Exactly one "active" record and at most one "next"; a "next" has `activate_at`,
       a "retired" has `retire_after`.
    2. Signer: the "next" once `activate_at` <= now, else the "active". So a CA only
       signs from `activate_at` on, and the old active stops signing at that instant
       even before `promote` runs.
    3. Bundle at `now`: the active, the next (from the moment `plan_rotation` adds it,
       so before it signs anything), and every retired CA with `retire_after` > now.
       The signer is always in the bundle.
    4. `promote` retires the old active with `retire_after` = the latest not_after of
       the certificates it signed, so it leaves the bundle exactly when the last of
       them expires - and no earlier.

    A rotation is: `plan_rotation(now, cert, key, activate_after)` with activate_after
    long enough for every peer to fetch the new bundle (at least the longest leaf TTL,
    as sidecars also get the bundle at renewal), then, once due,
    `promote(now, max_leaf_not_after_of_old)`.
    """

    def __init__(self, records: Sequence[CaRecord]) -> None:
        self.records: tuple[CaRecord, ...] = tuple(records)
        actives = [r for r in self.records if r.state == "active"]
        nexts = [r for r in self.records if r.state == "next"]
        if len(actives) != 1:
            raise ValueError(f"a CA set needs exactly one active CA, found {len(actives)}")
        if len(nexts) > 1:
            raise ValueError(f"a CA set holds at most one next CA, found {len(nexts)}")
        for r in self.records:
            if r.state == "next" and r.activate_at is None:
                raise ValueError(f"next CA {r.fingerprint[:16]} has no activate_at")
            if r.state == "retired" and r.retire_after is None:
                raise ValueError(f"retired CA {r.fingerprint[:16]} has no retire_after")
        self.active = actives[0]
        self.next: CaRecord | None = nexts[0] if nexts else None

    def _due_next(self, now: datetime) -> CaRecord | None:
        n = self.next
        if n is not None and n.activate_at is not None and n.activate_at <= now:
            return n
        return None

    def signing_ca(self, now: datetime) -> CaRecord:
        """The CA that signs at `now`."""
        return self._due_next(now) or self.active

    def bundle(self, now: datetime) -> list[x509.Certificate]:
        """Trusted CA certificates at `now`: signer first, then the others."""
        retired = sorted(
            (r for r in self.records
             if r.state == "retired" and r.retire_after is not None and r.retire_after > now),
            key=lambda r: (r.retire_after, r.fingerprint),
            reverse=True,
        )
        ordered = [self.signing_ca(now), self.active, *([self.next] if self.next else []),
                   *retired]
        seen: set[str] = set()
        out: list[x509.Certificate] = []
        for r in ordered:
            if r.fingerprint not in seen:
                seen.add(r.fingerprint)
                out.append(r.cert)
        return out

    def bundle_pem(self, now: datetime) -> str:
        return "".join(cert_pem(c) for c in self.bundle(now))

    def plan_rotation(
        self,
        now: datetime,
        new_cert: x509.Certificate,
        new_key: ec.EllipticCurvePrivateKey,
        activate_after: timedelta,
    ) -> list[CaRecord]:
        """The records with `new_cert` added as "next", signing from now + activate_after."""
        if self.next is not None:
            raise ValueError(
                f"a rotation is already planned (next CA {self.next.fingerprint[:16]} "
                f"activates at {self.next.activate_at}); promote it first"
            )
        if activate_after <= timedelta(0):
            raise ValueError(
                "activate_after must be positive: the bundle has to carry the next CA "
                "before it signs anything"
            )
        if spki_der(new_cert.public_key()) != spki_der(new_key.public_key()):
            raise ValueError("the new CA key does not match the new CA certificate")
        activate_at = now + activate_after
        if new_cert.not_valid_after_utc <= activate_at:
            raise ValueError(
                f"the new CA expires ({new_cert.not_valid_after_utc}) before it would "
                f"activate ({activate_at})"
            )
        record = CaRecord(new_cert, new_key, "next", activate_at=activate_at)
        if record.fingerprint in {r.fingerprint for r in self.records}:
            raise ValueError("the new CA certificate is already in the set")
        return [*self.records, record]

    def force_rotation(
        self, now: datetime, new_cert: x509.Certificate, new_key: ec.EllipticCurvePrivateKey
    ) -> list[CaRecord]:
        """The records with `new_cert` active and signing at once, every other CA retired
        as of `now` - out of the bundle immediately.

        For a key compromise: unlike `plan_rotation` this breaks every leaf the old CAs
        signed (peers must attest again), which is the point: nothing the compromised
        key signed may be trusted any longer."""
        if spki_der(new_cert.public_key()) != spki_der(new_key.public_key()):
            raise ValueError("the new CA key does not match the new CA certificate")
        if new_cert.not_valid_after_utc <= now:
            raise ValueError(f"the new CA expired at {new_cert.not_valid_after_utc}")
        record = CaRecord(new_cert, new_key, "active")
        if record.fingerprint in {r.fingerprint for r in self.records}:
            raise ValueError("the new CA certificate is already in the set")
        out = [
            r if r.state == "retired" and r.retire_after is not None and r.retire_after <= now
            else replace(r, state="retired", activate_at=None, retire_after=now)
            for r in self.records
        ]
        return [*out, record]

    def promote(self, now: datetime, max_leaf_not_after_of_old: datetime) -> list[CaRecord]:
        """Make a due "next" the active CA and retire the old one.

        `max_leaf_not_after_of_old` is the latest not_after of every certificate the
        old active signed (leaves and the CAS's own); the old CA stays in the bundle
        until then (capped at its own expiry, which its leaves never outlive). When no
        "next" is due the records are returned unchanged, so this is safe to call on
        every tick.
        """
        due = self._due_next(now)
        if due is None:
            return list(self.records)
        old = self.active
        retire_after = min(max_leaf_not_after_of_old, old.cert.not_valid_after_utc)
        out: list[CaRecord] = []
        for r in self.records:
            if r is old:
                out.append(replace(r, state="retired", retire_after=retire_after))
            elif r is due:
                out.append(replace(r, state="active"))
            else:
                out.append(r)
        return out

    def prune(self, now: datetime) -> list[CaRecord]:
        """The records without retired CAs that have left the bundle."""
        return [
            r for r in self.records
            if not (r.state == "retired" and r.retire_after is not None and r.retire_after <= now)
        ]


def _require_key(ca: CaRecord) -> ec.EllipticCurvePrivateKey:
    if ca.key is None:
        raise ValueError(f"CA {ca.fingerprint[:16]} has no private key loaded; cannot sign")
    return ca.key


def _check_dns(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if not name or not name.isascii() or any(c.isspace() for c in name) or len(name) > 253:
            raise ValueError(f"invalid DNS SAN {name!r}: expected an ASCII host name")
        if name not in out:
            out.append(name)
    return out


def _aki(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _build(
    ca: CaRecord,
    public_key: CertificatePublicKeyTypes,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    ekus: list[x509.ObjectIdentifier],
    not_before: datetime,
    not_after: datetime,
    extra: list[x509.ExtensionType],
) -> x509.Certificate:
    key = _require_key(ca)
    if not_before.tzinfo is None or not_after.tzinfo is None:
        raise ValueError("not_before and not_after must be timezone-aware (UTC)")
    not_after = min(not_after, ca.cert.not_valid_after_utc)
    if not_after <= not_before:
        raise ValueError(
            f"certificate would have no validity: not_before {not_before} is not before "
            f"not_after {not_after} (clamped to the CA's expiry)"
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(ca.cert), critical=False)
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256())


def issue_leaf(
    ca: CaRecord,
    public_key: CertificatePublicKeyTypes,
    *,
    spiffe_id: str,
    dns: Sequence[str],
    not_before: datetime,
    not_after: datetime,
    claims: Mapping[str, Any] | None,
    evidence: bytes | None = None,
) -> x509.Certificate:
    """A mesh leaf: URI SAN = `spiffe_id`, DNS SANs, serverAuth + clientAuth, claims.

    Subject is CN=<last path segment> (the service). not_after is clamped to the CA's
    own expiry. When `claims` is given its session/service must match the SPIFFE ID;
    `evidence` (canonical evidence JSON) rides beside the claims when given.
    """
    parsed = parse_spiffe_id(spiffe_id)
    if not parsed.path_segments:
        raise ValueError(f"leaf SPIFFE ID {spiffe_id!r} has no path; expected a workload ID")
    extra: list[x509.ExtensionType] = []
    if claims is not None:
        segments = parsed.path_segments
        named = (claims.get("session"), claims.get("service"))
        if len(segments) == 2 and named != segments:
            raise ValueError(
                f"claims name session/service {named[0]}/{named[1]} but the SPIFFE ID is "
                f"{spiffe_id}"
            )
        extra.append(claims_extension(claims, evidence))
    return _build(
        ca,
        public_key,
        common_name=parsed.path_segments[-1],
        sans=[x509.UniformResourceIdentifier(str(parsed)),
              *(x509.DNSName(n) for n in _check_dns(dns))],
        ekus=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=not_before,
        not_after=not_after,
        extra=extra,
    )


def issue_server_cert(
    ca: CaRecord,
    public_key: CertificatePublicKeyTypes,
    *,
    spiffe_id: str,
    dns: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """The CAS's own HTTPS certificate: URI SAN, DNS and IP SANs, serverAuth only."""
    parsed = parse_spiffe_id(spiffe_id)
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(str(parsed)),
        *(x509.DNSName(n) for n in _check_dns(dns)),
        *(x509.IPAddress(ip) for ip in dict.fromkeys(ips)),
    ]
    return _build(
        ca,
        public_key,
        common_name=(parsed.path_segments or (parsed.trust_domain,))[-1],
        sans=sans,
        ekus=[ExtendedKeyUsageOID.SERVER_AUTH],
        not_before=not_before,
        not_after=not_after,
        extra=[],
    )


def serial_hex(cert: x509.Certificate) -> str:
    """The serial as lowercase hex without leading zeros or separators ("1a2b...")."""
    return format(cert.serial_number, "x")


def normalize_serial(text: str) -> str:
    """A user-typed serial ("0x01:A2:...", "01a2...") in `serial_hex` form."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError(f"serial {text!r} is not hex (e.g. 3f9a0c... as shown by openssl)")
    return format(int(cleaned, 16), "x")


@functools.lru_cache(maxsize=16)
def _bundle_cas(bundle_pem: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(bundle_pem.encode()))
    except ValueError:
        return ()


@functools.lru_cache(maxsize=4096)
def issued_by_bundle(cert: x509.Certificate, bundle_pem: str) -> bool:
    """True if `cert` is signed by one of the CAs in `bundle_pem` (mesh leaves and the
    CAS's certificate are issued directly by a root). Certificates admitted before a
    bundle change fail this once their CA has been removed."""
    for ca in _bundle_cas(bundle_pem):
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_pem_chain(text: str | bytes) -> list[x509.Certificate]:
    """Every CERTIFICATE in PEM `text`, in order; ValueError if there is none or one is bad."""
    data = text.encode("ascii") if isinstance(text, str) else text
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError(f"not a PEM certificate chain: {e}") from None
    return certs
