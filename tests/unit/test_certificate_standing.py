"""Does a certificate issued earlier still pass its session's CURRENT policy? A table of
(policy change, claims, expected reason), decided by the issuance rule itself, and the
CAS's per-session judging of stored certificates (incarnation, unreadable records)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from meshshield.attestation.claims import Claims, Platform, TcbStatus
from meshshield.cas.standing import FailingCertificates, judge_certificates, verified_claims
from meshshield.cas.store import IssuedCertificate
from meshshield.errors import Reason
from meshshield.policy import Policy, certificate_standing, parse_policy


def _hex(label: str, digits: int) -> str:
    return (hashlib.sha384 if digits == 96 else hashlib.sha256)(label.encode()).hexdigest()


SNP_M, HOST, HOST2 = _hex("snp", 96), _hex("host", 64), _hex("host2", 64)
SIM_M, SIM_M2 = _hex("sim", 64), _hex("sim2", 64)


def policy(*, snp_m: str = SNP_M, host: str = HOST, sim_m: str = SIM_M,
           tolerate: str = "[simulation, unknown-tcb]", with_api: bool = True) -> Policy:
    api = (f'  - name: api\n    tee:\n      - {{platform: sev-snp, measurement: "{snp_m}", '
           f'host_data: "{host}"}}\n      - {{platform: sim, measurement: "{sim_m}"}}\n'
           if with_api else "")
    text = (f'name: shop\nversion: "1"\nservices:\n{api}'
            f'  - name: web\n    tee: [{{platform: sim, measurement: "{SIM_M}"}}]\n'
            f"security: {{attestation: {{tolerate: {tolerate}}}}}\n")
    return parse_policy(text.encode(), "test", cas_dns=())


SNP = Claims(Platform.SEV_SNP, SNP_M, b"", debug=False, tcb_status=TcbStatus.UNKNOWN,
             extra={"host_data": HOST})
DEBUG_SNP = Claims(Platform.SEV_SNP, SNP_M, b"", debug=True, tcb_status=TcbStatus.UNKNOWN,
                   extra={"host_data": HOST})
SIM = Claims(Platform.SIM, SIM_M, b"", debug=False, simulated=True)

CASES: list[tuple[str, Policy | None, str, Claims, tuple[str, ...], Reason | None]] = [
    ("unchanged policy (sev-snp)", policy(), "api", SNP, (), None),
    ("unchanged policy (sim)", policy(), "api", SIM, (), None),
    ("another service changed", policy(), "web", SIM, (), None),
    ("session deleted", None, "api", SNP, (), Reason.SESSION_UNKNOWN),
    ("service removed", policy(with_api=False), "api", SNP, (), Reason.SERVICE_UNKNOWN),
    ("old build (measurement)", policy(snp_m=_hex("snp-v2", 96)), "api", SNP, (),
     Reason.MEASUREMENT_NOT_ALLOWED),
    ("workload changed (host_data)", policy(host=HOST2), "api", SNP, (),
     Reason.WORKLOAD_NOT_ALLOWED),
    ("sim build replaced", policy(sim_m=SIM_M2), "api", SIM, (),
     Reason.MEASUREMENT_NOT_ALLOWED),
    ("measurement revoked in the session", policy(), "api", SIM, (SIM_M,), Reason.REVOKED),
    ("debug still tolerated", policy(tolerate="[simulation, unknown-tcb, debug-mode]"),
     "api", DEBUG_SNP, (), None),
    ("debug no longer tolerated", policy(), "api", DEBUG_SNP, (),
     Reason.DEBUG_NOT_TOLERATED),
    ("unknown TCB no longer tolerated", policy(tolerate="[simulation]"), "api", SNP, (),
     Reason.TCB_UNKNOWN),
]


@pytest.mark.parametrize(("label", "pol", "service", "claims", "revoked", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_certificate_standing(label: str, pol: Policy | None, service: str, claims: Claims,
                              revoked: tuple[str, ...], expected: Reason | None) -> None:
    got = certificate_standing(pol, "shop", service, claims, revoked)
    assert (None if got is None else got.reason) is expected, (label, got)
    if got is not None:
        assert "shop" in got.message  # names the session (and service)


T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def issued(serial: str, claims: Claims, *, at: datetime = T0, raw: str | None = None
           ) -> IssuedCertificate:
    doc = {"session": "shop", "service": "api", "verified": claims.to_json()}
    return IssuedCertificate(serial, "shop", "api", "spiffe://x/shop/api", "fp",
                             at - timedelta(minutes=1), at + timedelta(hours=1),
                             raw if raw is not None else json.dumps(doc), "", at)


def test_verified_claims_round_trip_the_workload_fields() -> None:
    back = verified_claims(issued("1", SNP))
    assert back == SNP


def test_judging_a_session_keeps_passing_and_lists_failing() -> None:
    certs = [issued("a1", SNP), issued("b2", SIM)]
    failing = judge_certificates(certs, policy(host=HOST2), T0 - timedelta(days=1), ())
    assert set(failing) == {"a1"}
    assert failing["a1"].reason.reason is Reason.WORKLOAD_NOT_ALLOWED


def test_a_session_created_again_does_not_adopt_older_certificates() -> None:
    failing = judge_certificates([issued("a1", SNP)], policy(), T0 + timedelta(seconds=1), ())
    assert failing["a1"].reason.reason is Reason.SESSION_UNKNOWN
    assert "earlier session" in failing["a1"].reason.message


def test_an_unreadable_record_fails_closed() -> None:
    failing = judge_certificates([issued("a1", SNP, raw="{not json")], policy(), None, ())
    assert failing["a1"].reason.reason is Reason.REVOKED


def test_failing_set_is_replaced_per_session_and_pruned_at_expiry() -> None:
    empty = FailingCertificates()
    fc = empty.replaced("shop", judge_certificates([issued("a1", SNP)], None, None, ()))
    assert fc.get("a1") is not None and len(fc) == 1 and empty.get("a1") is None
    assert fc.replaced("shop", {}).get("a1") is None
    assert fc.pruned(T0 + timedelta(minutes=59)) is None
    gone = fc.pruned(T0 + timedelta(hours=1))
    assert gone is not None and len(gone) == 0 and len(fc) == 1
