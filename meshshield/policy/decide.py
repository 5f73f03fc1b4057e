"""Who may get a certificate, and who may talk to whom: pure decisions over a `Policy`.

`decide_issuance` is the CAS's question ("may this verified evidence get a certificate
for this service?"); `check_tolerances` and `allows_inbound` are the sidecar's peer
check (SPEC §5). Nothing here does I/O; every refusal is a `PolicyError` whose reason
code comes from SPEC §6 and whose message says what was expected, what was found and
what to do.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from meshshield.attestation.claims import Claims, Platform, TcbStatus
from meshshield.errors import PolicyError, Reason
from meshshield.policy.model import (
    IgnoreAdvisories,
    Policy,
    Service,
    SevSnpEntry,
    SgxEntry,
    SimEntry,
    TdxEntry,
    TeeEntry,
    Tolerance,
)

__all__ = ["allows_inbound", "certificate_standing", "check_tolerances", "decide_issuance",
           "decide_tee"]

_OUTDATED = frozenset(
    {TcbStatus.OUT_OF_DATE, TcbStatus.SW_HARDENING_NEEDED, TcbStatus.CONFIGURATION_NEEDED}
)

# How far an entry's checks got before one failed. When several entries share the
# measurement and all fail, the refusal reported is the one of the entry that came
# closest to passing: it is the most useful thing to tell the operator.
_STAGE_WORKLOAD, _STAGE_SIGNER, _STAGE_SVN = range(3)


def decide_issuance(
    policy: Policy,
    service_name: str,
    claims: Claims,
    revoked_measurements: Collection[str] = (),
) -> Service:
    """The service `claims` may get a certificate for, or PolicyError saying why not.

    Checks, in order: service, platform, simulation, revoked, measurement, workload,
    signer, svn, debug, tcb, advisories.
    """
    who = f"{policy.name}/{service_name}"
    service = policy.service(service_name)
    if service is None:
        known = ", ".join(s.name for s in policy.services) or "none"
        raise PolicyError(
            Reason.SERVICE_UNKNOWN,
            f"session {policy.name!r} has no service {service_name!r} (its services: "
            f"{known}); check the service name, or add the service to the policy and apply it",
        )
    decide_tee(service.tee, policy.tolerate, policy.ignore_advisories, claims, who=who,
               revoked_measurements=revoked_measurements)
    return service


def decide_tee(
    tee: tuple[TeeEntry, ...],
    tolerate: frozenset[Tolerance],
    ignore_advisories: IgnoreAdvisories,
    claims: Claims,
    *,
    who: str,
    revoked_measurements: Collection[str] = (),
    where: str = "the service's tee list",
) -> TeeEntry:
    """The `tee:` entry `claims` satisfy under these tolerances, or PolicyError saying
    why none does. The service decision (`decide_issuance`) and the check of the CAS's
    own evidence against an `--expect` file (`casverify`) are both this function.

    Checks, in order: platform, simulation, revoked, measurement, workload, signer, svn,
    debug, tcb, advisories.
    """
    platform = claims.platform
    entries = [entry for entry in tee if entry.platform == platform]
    if not entries:
        allowed = ", ".join(dict.fromkeys(e.platform.value for e in tee)) or "nothing"
        raise PolicyError(
            Reason.PLATFORM_NOT_ALLOWED,
            f"{who} may run on {allowed}; the evidence is from {platform.value}. Run it on an "
            f"allowed platform, or add a {platform.value} entry to {where}",
        )
    _check_simulation(tolerate, claims, who)

    measurement = claims.measurement.lower()
    if measurement in {m.lower() for m in revoked_measurements}:
        raise PolicyError(
            Reason.REVOKED,
            f"{platform.value} measurement {measurement} of {who} has been revoked; deploy a "
            "build whose measurement is not revoked",
        )
    candidates = [
        entry for entry in entries
        if entry.pinned_measurement is None or entry.pinned_measurement == measurement
    ]
    if not candidates:
        allowed = ", ".join(_short(e.pinned_measurement or "") for e in entries)
        what = "`meshshield measure` output" if platform is Platform.SIM else "measurement"
        raise PolicyError(
            Reason.MEASUREMENT_NOT_ALLOWED,
            f"{platform.value} measurement of {who} is not allowed: found {measurement}, the "
            f"policy allows {allowed}. If this build is approved, put its {what} into the "
            "policy and apply it; otherwise deploy the approved build",
        )

    failures: list[tuple[int, PolicyError]] = []
    for entry in candidates:
        failure = _entry_failure(entry, claims, who)
        if failure is None:
            break
        failures.append(failure)
    else:
        # max() keeps the first of equals, so policy order breaks ties.
        raise max(failures, key=lambda f: f[0])[1]

    check_tolerances(tolerate, ignore_advisories, claims, who=who)
    return entry


def certificate_standing(
    policy: Policy | None,
    session_name: str,
    service_name: str,
    claims: Claims,
    revoked_measurements: Collection[str] = (),
) -> PolicyError | None:
    """Whether a certificate issued earlier still passes its session's CURRENT policy:
    None if it does, else the refusal a fresh attestation with the same claims would get
    now. `policy` is None when the session no longer exists.

    It is the issuance rule itself (`decide_issuance`), so a certificate is never kept
    that would not be issued today: an old build, changed workload fields, a removed
    service, a revoked measurement or a lost tolerance all end it.
    """
    if policy is None:
        return PolicyError(
            Reason.SESSION_UNKNOWN,
            f"session {session_name!r} was deleted, so {session_name}/{service_name} is no "
            "longer part of the mesh; create the session again and let the service attest",
        )
    try:
        decide_issuance(policy, service_name, claims, revoked_measurements)
    except PolicyError as e:
        return e
    return None


def check_tolerances(
    tolerate: frozenset[Tolerance],
    ignore_advisories: IgnoreAdvisories,
    claims: Claims,
    *,
    who: str = "the workload",
) -> None:
    """Refuse claims with weaknesses the session does not tolerate.

    Used for issuance with the service's own session, and by the sidecar's peer check
    with the LOCAL session's tolerances: a session that does not tolerate simulation or
    debug never talks to such a peer, whatever the peer's policy says. `who` names the
    workload in messages (e.g. "peer shop/frontend").
    """
    _check_simulation(tolerate, claims, who)
    if claims.debug and Tolerance.DEBUG_MODE not in tolerate:
        raise PolicyError(
            Reason.DEBUG_NOT_TOLERATED,
            f"{who} runs a debug {claims.platform.value} TEE, whose memory the host can read; "
            "the session does not tolerate debug-mode. Deploy a production (non-debug) "
            "build, or add debug-mode to security.attestation.tolerate (development only)",
        )
    status = claims.tcb_status
    if status is TcbStatus.REVOKED:
        raise PolicyError(
            Reason.TCB_REVOKED,
            f"the {claims.platform.value} TCB of the host running {who} has been revoked by "
            "the vendor, and no policy tolerates that; move the workload to a patched host",
        )
    if status in _OUTDATED and Tolerance.OUTDATED_TCB not in tolerate:
        raise PolicyError(
            Reason.TCB_OUT_OF_DATE,
            f"the {claims.platform.value} TCB of the host running {who} is {status.value}, "
            "expected up_to_date; update the host's firmware and microcode, or add "
            "outdated-tcb to security.attestation.tolerate",
        )
    # Simulated claims are exempt: sim evidence has no hardware TCB at all, and the
    # session already accepted that by tolerating simulation (checked above).
    if status is TcbStatus.UNKNOWN and not _simulated(claims) and (
        Tolerance.UNKNOWN_TCB not in tolerate
    ):
        raise PolicyError(
            Reason.TCB_UNKNOWN,
            f"the {claims.platform.value} TCB status of the host running {who} is unknown "
            "(no TCB collateral to judge it by); give the CAS --collateral, or add "
            "unknown-tcb to security.attestation.tolerate",
        )
    if ignore_advisories != "*":
        ignored = {a.casefold() for a in ignore_advisories}
        open_ = [a for a in claims.advisories if a.casefold() not in ignored]
        if open_:
            raise PolicyError(
                Reason.ADVISORY_NOT_IGNORED,
                f"the host running {who} is affected by {', '.join(open_)}, which the "
                "session does not ignore; patch the host, or after assessing the advisories "
                "list them in security.attestation.ignore_advisories",
            )


def allows_inbound(
    service: Service, local_session: str, peer_session: str, peer_service: str
) -> bool:
    """Whether `service`'s allow_from admits peer_session/peer_service."""
    return any(
        ref.matches(local_session, peer_session, peer_service) for ref in service.allow_from
    )


def _simulated(claims: Claims) -> bool:
    return claims.simulated or claims.platform is Platform.SIM


def _check_simulation(tolerate: frozenset[Tolerance], claims: Claims, who: str) -> None:
    if _simulated(claims) and Tolerance.SIMULATION not in tolerate:
        raise PolicyError(
            Reason.SIMULATION_NOT_TOLERATED,
            f"{who} presented simulated evidence, which has no hardware guarantee; the "
            "session does not tolerate simulation. Run it in a hardware TEE, or add "
            "simulation to security.attestation.tolerate (development only)",
        )


def _entry_failure(entry: TeeEntry, claims: Claims, who: str) -> tuple[int, PolicyError] | None:
    """Why `claims` do not satisfy one tee entry (whose measurement already matched)."""
    if isinstance(entry, SevSnpEntry):
        return _snp_failure(entry, claims, who)
    if isinstance(entry, TdxEntry):
        return _tdx_failure(entry, claims, who)
    if isinstance(entry, SgxEntry):
        return _sgx_failure(entry, claims, who)
    assert isinstance(entry, SimEntry)
    return None


def _workload_refusal(field: str, expected: str, found: str | None, who: str
                      ) -> tuple[int, PolicyError]:
    return _STAGE_WORKLOAD, PolicyError(
        Reason.WORKLOAD_NOT_ALLOWED,
        f"{field} of {who} does not match the policy: expected {_short(expected)}, found "
        f"{found or 'none'}. The workload (images, commands, configuration) differs from the "
        f"approved one: deploy the approved workload, or if the change is intended put this "
        f"{field} into the policy and apply it",
    )


def _snp_failure(entry: SevSnpEntry, claims: Claims, who: str) -> tuple[int, PolicyError] | None:
    host_data = _hex_claim(claims.extra.get("host_data"))
    if host_data != entry.host_data:
        return _workload_refusal("sev-snp host_data", entry.host_data, host_data, who)
    if entry.min_tcb is not None:
        reported = claims.extra.get("reported_tcb")
        reported = reported if isinstance(reported, Mapping) else {}
        low = []
        for name, minimum in entry.min_tcb.pinned().items():
            value = reported.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                shown = "missing" if value is None else str(value)
                low.append(f"{name} {shown} (need >= {minimum})")
        if low:
            return _STAGE_SVN, PolicyError(
                Reason.TCB_OUT_OF_DATE,
                f"the sev-snp reported TCB of the host running {who} is below the policy's "
                f"min_tcb: {', '.join(low)}; update the host's SEV-SNP firmware and "
                "microcode, or lower min_tcb in the policy",
            )
    return None


def _tdx_failure(entry: TdxEntry, claims: Claims, who: str) -> tuple[int, PolicyError] | None:
    if entry.mrconfigid is not None:
        found = _hex_claim(claims.extra.get("mrconfigid"))
        if found != entry.mrconfigid:
            return _workload_refusal("tdx mrconfigid", entry.mrconfigid, found, who)
    for i, expected in enumerate(entry.rtmr or ()):
        if expected is None:
            continue
        found = _hex_claim(claims.extra.get(f"rtmr{i}"))
        if found != expected:
            return _workload_refusal(f"tdx rtmr{i}", expected, found, who)
    return None


def _sgx_failure(entry: SgxEntry, claims: Claims, who: str) -> tuple[int, PolicyError] | None:
    if entry.mrsigner is not None:
        signer = _hex_claim(claims.signer)
        if signer != entry.mrsigner:
            return _STAGE_SIGNER, PolicyError(
                Reason.SIGNER_NOT_ALLOWED,
                f"sgx mrsigner of {who} does not match the policy: expected "
                f"{_short(entry.mrsigner)}, found {signer or 'none'}. Sign the enclave with "
                "the approved key, or put this mrsigner into the policy and apply it",
            )
    if entry.product_id is not None and claims.product_id != entry.product_id:
        return _STAGE_SIGNER, PolicyError(
            Reason.SIGNER_NOT_ALLOWED,
            f"sgx product_id of {who} does not match the policy: expected {entry.product_id}, "
            f"found {claims.product_id}. Deploy the approved product, or change product_id "
            "in the policy",
        )
    if entry.min_svn is not None and (claims.svn is None or claims.svn < entry.min_svn):
        return _STAGE_SVN, PolicyError(
            Reason.SVN_TOO_LOW,
            f"sgx isv_svn of {who} is {claims.svn}, the policy requires at least "
            f"{entry.min_svn}; deploy the current build of the enclave, or lower min_svn in "
            "the policy",
        )
    return None


def _hex_claim(value: Any) -> str | None:
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return None


def _short(hex_value: str) -> str:
    """A long hex value shortened for the "expected" side of a message."""
    return hex_value if len(hex_value) <= 24 else f"{hex_value[:12]}...{hex_value[-8:]}"
