"""The peer check (SPEC §5): may this TLS peer exchange bytes with us?

Pure: a certificate and the current trust view in, a `PeerInfo` or a MeshError with a
reason code out. The TLS layer has already verified the chain against the trust bundle
(a sidecar's contexts use CERT_REQUIRED with only the bundle loaded); everything after
the chain is decided here, on both sides of every connection, before any byte is
forwarded:

1. the certificate carries one SPIFFE ID, of our trust domain, naming session/service;
2. its claims extension parses;
3. neither its serial nor its measurement is revoked (mesh-wide; the CAS lists as revoked
   the serials whose claims no longer pass their session's current policy, and those
   carrying a measurement revoked in their session);
4. its claims satisfy the LOCAL session's tolerances: a session that does not tolerate
   simulation or debug never talks to a simulated or debug peer, whatever the peer's
   own policy allowed;
5. the local policy allows it: inbound, the peer's service is in the local service's
   `allow_from`; outbound, the peer is exactly the service the route names.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from meshshield.attestation.claims import Claims, Platform, TcbStatus
from meshshield.errors import MeshError, Reason
from meshshield.pki.ca import issued_by_bundle, serial_hex
from meshshield.pki.claims_ext import claims_from_certificate
from meshshield.pki.spiffe import SpiffeId, parse_spiffe_id, spiffe_id_of
from meshshield.policy import IgnoreAdvisories, PeerRef, Tolerance, check_tolerances

__all__ = ["PeerInfo", "TrustView", "check_peer", "issued_by_bundle"]


@dataclass(frozen=True)
class TrustView:
    """What a sidecar trusts now: built from the CAS's `trust` snapshot."""

    trust_domain: str
    session: str
    epoch: int
    exists: bool
    allow_from: Mapping[str, tuple[PeerRef, ...]]
    tolerate: frozenset[Tolerance]
    ignore_advisories: IgnoreAdvisories
    revoked_serials: frozenset[str]
    revoked_measurements: frozenset[str]
    policy_hash: str | None = None
    bundle_pem: str = ""

    @classmethod
    def from_snapshot(cls, snap: Mapping[str, Any]) -> TrustView:
        """Parse a trust snapshot (from the CAS, so trusted, but still shape-checked)."""
        try:
            services = snap.get("services") or {}
            allow = {
                str(name): tuple(PeerRef.from_text(str(x)) for x in svc.get("allow_from", []))
                for name, svc in services.items()
            }
            tol: set[Tolerance] = set()
            for t in snap.get("tolerate", []):
                tol.add(Tolerance(t))
            ia = snap.get("ignore_advisories", [])
            return cls(
                trust_domain=str(snap["trust_domain"]),
                session=str(snap["session"]),
                epoch=int(snap["epoch"]),
                exists=bool(snap.get("exists", True)),
                allow_from=allow,
                tolerate=frozenset(tol),
                ignore_advisories="*" if ia == "*" else tuple(str(x) for x in ia),
                revoked_serials=frozenset(str(x) for x in snap.get("revoked_serials", [])),
                revoked_measurements=frozenset(
                    str(x) for x in snap.get("revoked_measurements", [])
                ),
                policy_hash=snap.get("policy_hash"),
                bundle_pem=str(snap.get("bundle", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"trust snapshot is malformed: {e}") from None


@dataclass(frozen=True)
class PeerInfo:
    spiffe_id: str
    session: str
    service: str
    serial: str
    not_after: str
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def measurement(self) -> str:
        return str(self.claims.get("measurement", ""))


def _claims_object(c: Mapping[str, Any]) -> Claims:
    try:
        platform = Platform(c["platform"])
        tcb = TcbStatus(c["tcb_status"])
    except (KeyError, ValueError):
        raise MeshError(
            Reason.PEER_NOT_ALLOWED,
            f"peer claims name an unknown platform or TCB status "
            f"({c.get('platform')!r}, {c.get('tcb_status')!r})",
        ) from None
    return Claims(
        platform=platform,
        measurement=str(c["measurement"]),
        report_data=b"",
        debug=bool(c["debug"]),
        tcb_status=tcb,
        signer=c.get("signer"),
        product_id=c.get("product_id"),
        svn=c.get("svn"),
        simulated=bool(c["simulated"]),
    )


_Facts = tuple[str | None, SpiffeId | None, dict[str, Any], str, str]


@functools.lru_cache(maxsize=4096)
def _facts(cert: x509.Certificate) -> _Facts | MeshError:
    """What a certificate says, parsed once per certificate (a peer presents the same one
    on every connection until it renews). Certificates hash and compare by their DER."""
    try:
        uri = spiffe_id_of(cert)
        sid = parse_spiffe_id(uri) if uri else None
    except ValueError as e:
        return MeshError(Reason.PEER_NOT_ALLOWED, f"peer SPIFFE ID is malformed: {e}")
    try:
        claims = claims_from_certificate(cert)
    except MeshError as e:
        return e
    return (uri, sid, claims, serial_hex(cert),
            cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))


def check_peer(
    cert: x509.Certificate | None,
    view: TrustView,
    *,
    local_service: str,
    direction: str,
    expected: tuple[str, str] | None = None,
) -> PeerInfo:
    """Decide about one peer. `expected` is the (session, service) an outbound route names."""
    if cert is None:
        raise MeshError(
            Reason.CERTIFICATE_MISSING,
            "peer presented no certificate; mesh peers must present their attested "
            "certificate (is the client a meshshield sidecar?)",
        )
    facts = _facts(cert)
    if isinstance(facts, MeshError):
        raise MeshError(facts.reason, facts.message)
    uri, sid, claims, serial, not_after = facts
    if sid is None or sid.trust_domain != view.trust_domain or len(sid.path_segments) != 2:
        raise MeshError(
            Reason.PEER_NOT_ALLOWED,
            f"peer identity {uri!r} is not a workload of trust domain {view.trust_domain} "
            "(expected spiffe://<trust-domain>/<session>/<service>)",
        )
    peer_session, peer_service = sid.path_segments
    who = f"peer {peer_session}/{peer_service}"
    if claims.get("session") != peer_session or claims.get("service") != peer_service:
        raise MeshError(
            Reason.PEER_NOT_ALLOWED,
            f"{who}: claims name {claims.get('session')}/{claims.get('service')}, "
            "which does not match the certificate's SPIFFE ID",
        )
    if serial in view.revoked_serials:
        raise MeshError(
            Reason.REVOKED,
            f"{who}: certificate serial {serial} is revoked (explicitly, or its claims no "
            "longer pass its session's current policy); it must attest again with a build "
            "the policy allows",
        )
    if claims["measurement"] in view.revoked_measurements:
        raise MeshError(
            Reason.REVOKED,
            f"{who}: measurement {claims['measurement']} is revoked mesh-wide; deploy an "
            "approved build",
        )
    if not view.exists:
        raise MeshError(
            Reason.PEER_NOT_ALLOWED,
            f"local session {view.session} no longer exists on the CAS; no peer is allowed",
        )
    check_tolerances(view.tolerate, view.ignore_advisories, _claims_object(claims), who=who)
    if direction == "inbound":
        refs = view.allow_from.get(local_service, ())
        if not any(r.matches(view.session, peer_session, peer_service) for r in refs):
            shown = ", ".join(str(r) for r in refs) or "nobody"
            raise MeshError(
                Reason.PEER_NOT_ALLOWED,
                f"{who} may not connect to {view.session}/{local_service}: its allow_from "
                f"admits {shown}; add {peer_session}/{peer_service} to allow_from if intended",
            )
    elif expected is not None and (peer_session, peer_service) != expected:
        raise MeshError(
            Reason.PEER_NOT_ALLOWED,
            f"route expects {expected[0]}/{expected[1]} but the server is {who}; "
            "check the outbound route's address",
        )
    return PeerInfo(
        spiffe_id=uri or "",
        session=peer_session,
        service=peer_service,
        serial=serial,
        not_after=not_after,
        claims=claims,
    )
