"""Which issued certificates still pass their session's current policy.

A certificate's claims passed when it was issued; a policy update (another build, other
workload fields, a lost tolerance), the removal of its service, a measurement revoked in
its session, or the deletion of its session can end that. Whenever a session changes,
the CAS judges that session's unexpired certificates again (only that session's) with
the issuance rule itself (`meshshield.policy.certificate_standing`), and every trust
snapshot's `revoked_serials` carries the serials that no longer pass: sidecars of every
session refuse them and close their live connections, and the CAS refuses them on its
own mesh endpoints.

Nothing here does I/O: the caller hands in the certificates (from the store) and the
current policy, and keeps the result.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from meshshield.attestation.claims import Claims
from meshshield.cas.store import IssuedCertificate
from meshshield.errors import PolicyError, Reason
from meshshield.policy import Policy, certificate_standing


@dataclass(frozen=True)
class Failing:
    """An unexpired certificate whose claims no longer pass, and why."""

    serial: str
    session: str
    service: str
    not_after: datetime
    reason: PolicyError


def verified_claims(cert: IssuedCertificate) -> Claims:
    """The verified claims recorded at issuance (the certificate's own claims for a
    record made before the verified ones were kept: those lack the workload fields,
    so a policy pinning them judges such a certificate as failing)."""
    doc = json.loads(cert.claims_json)
    verified = doc.get("verified") if isinstance(doc, dict) else None
    return Claims.from_json(verified if isinstance(verified, dict) else doc)


def judge_certificates(
    certs: Iterable[IssuedCertificate],
    policy: Policy | None,
    session_created_at: datetime | None,
    revoked_measurements: Collection[str],
) -> dict[str, Failing]:
    """The certificates among `certs` (all of one session) that fail its current
    `policy` (None: the session is deleted), by serial."""
    out: dict[str, Failing] = {}
    for cert in certs:
        reason = _judge(cert, policy, session_created_at, revoked_measurements)
        if reason is not None:
            out[cert.serial] = Failing(cert.serial, cert.session, cert.service,
                                       cert.not_after, reason)
    return out


def _judge(cert: IssuedCertificate, policy: Policy | None, created_at: datetime | None,
           revoked_measurements: Collection[str]) -> PolicyError | None:
    if policy is not None and created_at is not None and cert.issued_at < created_at:
        # A session deleted and created again (perhaps by someone else) does not adopt
        # the certificates of the one before it.
        return PolicyError(
            Reason.SESSION_UNKNOWN,
            f"certificate {cert.serial} was issued for an earlier session named "
            f"{cert.session!r}, which was deleted; the service must attest again",
        )
    try:
        claims = verified_claims(cert)
    except (ValueError, KeyError, TypeError):
        return PolicyError(
            Reason.REVOKED,
            f"the CAS cannot read the claims it recorded for certificate {cert.serial}; "
            "the service must attest again",
        )
    return certificate_standing(policy, cert.session, cert.service, claims,
                                revoked_measurements)


class FailingCertificates:
    """The failing certificates of every session. Never changed in place: a change makes
    a new one, so a reader on any thread sees one consistent version."""

    def __init__(self, by_session: Mapping[str, Mapping[str, Failing]] | None = None) -> None:
        self._by_session = {k: dict(v) for k, v in (by_session or {}).items() if v}
        self._by_serial = {f.serial: f for per in self._by_session.values()
                           for f in per.values()}

    def replaced(self, session: str, failing: Mapping[str, Failing]) -> FailingCertificates:
        """These, with `session`'s failing certificates now `failing`."""
        return FailingCertificates({**self._by_session, session: failing})

    def pruned(self, now: datetime) -> FailingCertificates | None:
        """These without the certificates expired at `now` (no handshake accepts them any
        more), or None when none has."""
        if all(f.not_after > now for f in self._by_serial.values()):
            return None
        return FailingCertificates({
            k: {serial: f for serial, f in per.items() if f.not_after > now}
            for k, per in self._by_session.items()
        })

    def get(self, serial: str) -> Failing | None:
        return self._by_serial.get(serial)

    def __iter__(self) -> Iterator[Failing]:
        return iter(self._by_serial.values())

    def __len__(self) -> int:
        return len(self._by_serial)
