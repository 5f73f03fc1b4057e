"""Issuance and peer decisions as tables of (policy, claims, expected reason)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from meshshield.attestation.claims import Claims, Platform, TcbStatus
from meshshield.errors import PolicyError, Reason
from meshshield.policy import (
    Policy,
    Tolerance,
    allows_inbound,
    check_tolerances,
    decide_issuance,
    parse_policy,
)


def hexof(label: str, digits: int) -> str:
    digest = hashlib.sha384 if digits == 96 else hashlib.sha256
    return digest(label.encode()).hexdigest()


SNP_M, SNP_H, SNP_H2 = hexof("snp", 96), hexof("host-data", 64), hexof("host-data-2", 64)
TDX_MRTD, TDX_CFG, TDX_RTMR0 = hexof("mrtd", 96), hexof("cfg", 96), hexof("rtmr0", 96)
SGX_E, SGX_S, SGX_S2 = hexof("mrenclave", 64), hexof("mrsigner", 64), hexof("mrsigner-2", 64)
SIM_M = hexof("sim", 64)
OTHER96, OTHER64 = hexof("other", 96), hexof("other", 64)

# backend may run on every platform. Its two sev-snp entries share the launch digest
# (same firmware and guest image) and differ in the workload they bind.
POLICY_TEXT = f"""\
name: shop
version: "1"
services:
  - name: backend
    tee:
      - platform: sev-snp
        measurement: "{SNP_M}"
        host_data: "{SNP_H}"
        min_tcb: {{snp: 8, microcode: 115}}
      - platform: sev-snp
        measurement: "{SNP_M}"
        host_data: "{SNP_H2}"
      - platform: tdx
        mrtd: "{TDX_MRTD}"
        mrconfigid: "{TDX_CFG}"
        rtmr: ["{TDX_RTMR0}", null, null, null]
      - platform: sgx
        mrenclave: "{SGX_E}"
        mrsigner: "{SGX_S}"
        product_id: 7
        min_svn: 3
      - platform: sgx
        mrsigner: "{SGX_S2}"
        product_id: 9
        min_svn: 5
      - platform: sim
        measurement: "{SIM_M}"
    allow_from: [frontend, edge/gateway]
  - name: frontend
    tee:
      - platform: sev-snp
        measurement: "{SNP_M}"
        host_data: "{SNP_H}"
    allow_from: ["*"]
  - name: db
    tee:
      - platform: sgx
        mrenclave: "{SGX_E}"
security:
  attestation:
    tolerate: [simulation]
    ignore_advisories: [INTEL-SA-00615]
"""
POLICY = parse_policy(POLICY_TEXT.encode())
REPORT_DATA = bytes(64)


def strict(policy: Policy = POLICY) -> Policy:
    return dataclasses.replace(policy, tolerate=frozenset(), ignore_advisories=())


def tolerating(*tolerances: Tolerance) -> Policy:
    return dataclasses.replace(POLICY, tolerate=POLICY.tolerate | set(tolerances))


def snp(**changes: Any) -> Claims:
    extra = {"host_data": SNP_H, "chip_id": "00" * 64,
             "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}}
    extra.update(changes.pop("extra", {}))
    base = Claims(Platform.SEV_SNP, SNP_M, REPORT_DATA, debug=False,
                  tcb_status=TcbStatus.UP_TO_DATE, extra=extra)
    return dataclasses.replace(base, **changes)


def tdx(**changes: Any) -> Claims:
    extra = {"mrconfigid": TDX_CFG, "rtmr0": TDX_RTMR0, "rtmr1": OTHER96,
             "rtmr2": OTHER96, "rtmr3": OTHER96}
    extra.update(changes.pop("extra", {}))
    base = Claims(Platform.TDX, TDX_MRTD, REPORT_DATA, debug=False,
                  tcb_status=TcbStatus.UP_TO_DATE, extra=extra)
    return dataclasses.replace(base, **changes)


def sgx(**changes: Any) -> Claims:
    base = Claims(Platform.SGX, SGX_E, REPORT_DATA, debug=False,
                  tcb_status=TcbStatus.UP_TO_DATE, signer=SGX_S, product_id=7, svn=3,
                  extra={"mrsigner": SGX_S})
    return dataclasses.replace(base, **changes)


def sim(**changes: Any) -> Claims:
    base = Claims(Platform.SIM, SIM_M, REPORT_DATA, debug=False, simulated=True)
    return dataclasses.replace(base, **changes)


Case = tuple[str, Policy, str, Claims, Reason | None]

ISSUANCE: list[Case] = [
    # (id, policy, service, claims, expected refusal or None for "issued")
    ("snp-ok", POLICY, "backend", snp(), None),
    ("snp-ok-second-workload", POLICY, "backend", snp(extra={"host_data": SNP_H2}), None),
    ("snp-uppercase-claims", POLICY, "backend",
     snp(measurement=SNP_M.upper(), extra={"host_data": SNP_H.upper()}), None),
    ("tdx-ok", POLICY, "backend", tdx(), None),
    ("sgx-mrenclave-ok", POLICY, "backend", sgx(), None),
    ("sgx-signer-ok", POLICY, "backend",
     sgx(measurement=OTHER64, signer=SGX_S2, product_id=9, svn=5), None),
    ("sim-ok", POLICY, "backend", sim(), None),
    ("sgx-mrenclave-only-ok", POLICY, "db", sgx(signer=OTHER64, product_id=1, svn=0), None),
    # service, platform, simulation
    ("service-unknown", POLICY, "payments", snp(), Reason.SERVICE_UNKNOWN),
    ("platform-not-allowed", POLICY, "frontend", tdx(), Reason.PLATFORM_NOT_ALLOWED),
    ("platform-before-simulation", strict(), "frontend", sim(), Reason.PLATFORM_NOT_ALLOWED),
    ("simulation-not-tolerated", strict(), "backend", sim(), Reason.SIMULATION_NOT_TOLERATED),
    ("simulated-hardware-platform", strict(), "backend", snp(simulated=True),
     Reason.SIMULATION_NOT_TOLERATED),
    # revoked, measurement
    ("revoked-measurement", POLICY, "backend", snp(), Reason.REVOKED),
    ("measurement-not-allowed-snp", POLICY, "backend", snp(measurement=OTHER96),
     Reason.MEASUREMENT_NOT_ALLOWED),
    ("measurement-not-allowed-tdx", POLICY, "backend", tdx(measurement=OTHER96),
     Reason.MEASUREMENT_NOT_ALLOWED),
    ("measurement-not-allowed-sim", POLICY, "backend", sim(measurement=OTHER64),
     Reason.MEASUREMENT_NOT_ALLOWED),
    ("measurement-not-allowed-sgx", POLICY, "db", sgx(measurement=OTHER64),
     Reason.MEASUREMENT_NOT_ALLOWED),
    ("measurement-before-debug", POLICY, "backend", snp(measurement=OTHER96, debug=True),
     Reason.MEASUREMENT_NOT_ALLOWED),
    # workload
    ("snp-host-data-differs", POLICY, "backend", snp(extra={"host_data": OTHER64}),
     Reason.WORKLOAD_NOT_ALLOWED),
    ("snp-host-data-missing", POLICY, "backend", snp(extra={"host_data": None}),
     Reason.WORKLOAD_NOT_ALLOWED),
    ("tdx-mrconfigid-differs", POLICY, "backend", tdx(extra={"mrconfigid": OTHER96}),
     Reason.WORKLOAD_NOT_ALLOWED),
    ("tdx-rtmr0-differs", POLICY, "backend", tdx(extra={"rtmr0": OTHER96}),
     Reason.WORKLOAD_NOT_ALLOWED),
    ("tdx-rtmr-null-means-any", POLICY, "backend", tdx(extra={"rtmr3": TDX_RTMR0}), None),
    # signer, svn
    ("sgx-signer-differs", POLICY, "backend", sgx(signer=OTHER64), Reason.SIGNER_NOT_ALLOWED),
    ("sgx-signer-missing", POLICY, "backend", sgx(signer=None), Reason.SIGNER_NOT_ALLOWED),
    ("sgx-product-differs", POLICY, "backend", sgx(product_id=8), Reason.SIGNER_NOT_ALLOWED),
    ("sgx-signer-entry-product-differs", POLICY, "backend",
     sgx(measurement=OTHER64, signer=SGX_S2, product_id=7, svn=5), Reason.SIGNER_NOT_ALLOWED),
    ("sgx-svn-too-low", POLICY, "backend", sgx(svn=2), Reason.SVN_TOO_LOW),
    ("sgx-svn-missing", POLICY, "backend", sgx(svn=None), Reason.SVN_TOO_LOW),
    ("sgx-signer-entry-svn-too-low", POLICY, "backend",
     sgx(measurement=OTHER64, signer=SGX_S2, product_id=9, svn=4), Reason.SVN_TOO_LOW),
    ("snp-min-tcb-not-met", POLICY, "backend",
     snp(extra={"reported_tcb": {"bootloader": 3, "tee": 0, "snp": 7, "microcode": 115}}),
     Reason.TCB_OUT_OF_DATE),
    ("snp-reported-tcb-missing", POLICY, "backend", snp(extra={"reported_tcb": None}),
     Reason.TCB_OUT_OF_DATE),
    ("snp-min-tcb-only-on-its-entry", POLICY, "backend",
     snp(extra={"host_data": SNP_H2, "reported_tcb": {"snp": 1}}), None),
    # debug, tcb, advisories
    ("debug", POLICY, "backend", snp(debug=True), Reason.DEBUG_NOT_TOLERATED),
    ("debug-tolerated", tolerating(Tolerance.DEBUG_MODE), "backend", snp(debug=True), None),
    ("debug-before-tcb", POLICY, "backend",
     snp(debug=True, tcb_status=TcbStatus.OUT_OF_DATE), Reason.DEBUG_NOT_TOLERATED),
    ("tcb-out-of-date", POLICY, "backend", snp(tcb_status=TcbStatus.OUT_OF_DATE),
     Reason.TCB_OUT_OF_DATE),
    ("tcb-sw-hardening", POLICY, "backend", tdx(tcb_status=TcbStatus.SW_HARDENING_NEEDED),
     Reason.TCB_OUT_OF_DATE),
    ("tcb-configuration", POLICY, "backend", sgx(tcb_status=TcbStatus.CONFIGURATION_NEEDED),
     Reason.TCB_OUT_OF_DATE),
    ("tcb-outdated-tolerated", tolerating(Tolerance.OUTDATED_TCB), "backend",
     sgx(tcb_status=TcbStatus.CONFIGURATION_NEEDED), None),
    ("tcb-revoked", POLICY, "backend", snp(tcb_status=TcbStatus.REVOKED), Reason.TCB_REVOKED),
    ("tcb-revoked-whatever-is-tolerated", tolerating(*Tolerance), "backend",
     tdx(tcb_status=TcbStatus.REVOKED), Reason.TCB_REVOKED),
    ("tcb-unknown", POLICY, "backend", tdx(tcb_status=TcbStatus.UNKNOWN), Reason.TCB_UNKNOWN),
    ("tcb-unknown-tolerated", tolerating(Tolerance.UNKNOWN_TCB), "backend",
     tdx(tcb_status=TcbStatus.UNKNOWN), None),
    ("tcb-unknown-sim-exempt", POLICY, "backend", sim(tcb_status=TcbStatus.UNKNOWN), None),
    ("advisory-not-ignored", POLICY, "backend", sgx(advisories=("INTEL-SA-00828",)),
     Reason.ADVISORY_NOT_IGNORED),
    ("advisory-ignored", POLICY, "backend", sgx(advisories=("intel-sa-00615",)), None),
    ("advisory-all-ignored", dataclasses.replace(POLICY, ignore_advisories="*"), "backend",
     sgx(advisories=("INTEL-SA-00828", "INTEL-SA-00615")), None),
    ("advisory-after-tcb", POLICY, "backend",
     sgx(tcb_status=TcbStatus.SW_HARDENING_NEEDED, advisories=("INTEL-SA-00828",)),
     Reason.TCB_OUT_OF_DATE),
]

REVOKED = {"revoked-measurement": [SNP_M.upper(), OTHER96]}


@pytest.mark.parametrize(("case_id", "policy", "service", "claims", "reason"), ISSUANCE,
                         ids=[c[0] for c in ISSUANCE])
def test_issuance(case_id: str, policy: Policy, service: str, claims: Claims,
                  reason: Reason | None) -> None:
    revoked = REVOKED.get(case_id, [hexof("revoked-elsewhere", 64)])
    if reason is None:
        assert decide_issuance(policy, service, claims, revoked) is policy.service(service)
        return
    with pytest.raises(PolicyError) as info:
        decide_issuance(policy, service, claims, revoked)
    assert info.value.reason is reason, info.value.message
    names = "session 'shop'" if reason is Reason.SERVICE_UNKNOWN else f"shop/{service}"
    assert names in info.value.message


def refusal(policy: Policy, service: str, claims: Claims) -> str:
    with pytest.raises(PolicyError) as info:
        decide_issuance(policy, service, claims)
    return info.value.message


def test_measurement_refusal_shows_found_and_allowed_and_what_to_do() -> None:
    message = refusal(POLICY, "backend", snp(measurement=OTHER96))
    assert OTHER96 in message  # the found value in full
    assert f"{SNP_M[:12]}...{SNP_M[-8:]}" in message  # allowed ones shortened
    assert "deploy the approved build" in message
    assert "meshshield measure" in refusal(POLICY, "backend", sim(measurement=OTHER64))


def test_workload_refusal_names_the_field_and_both_values() -> None:
    message = refusal(POLICY, "backend", tdx(extra={"rtmr0": OTHER96}))
    assert "tdx rtmr0 of shop/backend" in message
    assert OTHER96 in message and f"{TDX_RTMR0[:12]}..." in message


def test_the_entry_that_got_furthest_explains_the_refusal() -> None:
    # Two sev-snp entries share the measurement: the first binds SNP_H and needs a TCB,
    # the second binds SNP_H2. Claims with SNP_H and an old TCB fail the first entry at
    # the TCB and the second at the workload; the TCB is the useful thing to say.
    claims = snp(extra={"reported_tcb": {"snp": 7, "microcode": 100}})
    message = refusal(POLICY, "backend", claims)
    assert "snp 7 (need >= 8)" in message and "microcode 100 (need >= 115)" in message


def test_tcb_and_debug_messages_say_what_to_do() -> None:
    assert "production (non-debug) build" in refusal(POLICY, "backend", snp(debug=True))
    assert "outdated-tcb" in refusal(POLICY, "backend", snp(tcb_status=TcbStatus.OUT_OF_DATE))
    assert "--collateral" in refusal(POLICY, "backend", tdx(tcb_status=TcbStatus.UNKNOWN))
    assert "INTEL-SA-00828" in refusal(POLICY, "backend", sgx(advisories=("INTEL-SA-00828",)))


# -- the sidecar's peer check: the LOCAL session's tolerances -------------------------------

PEER: list[tuple[str, frozenset[Tolerance], Claims, Reason | None]] = [
    ("hardware-peer", frozenset(), snp(), None),
    ("sim-peer-refused", frozenset(), sim(), Reason.SIMULATION_NOT_TOLERATED),
    ("sim-peer-tolerated", frozenset({Tolerance.SIMULATION}), sim(), None),
    ("debug-peer-refused", frozenset({Tolerance.SIMULATION}), snp(debug=True),
     Reason.DEBUG_NOT_TOLERATED),
    ("outdated-peer", frozenset(), sgx(tcb_status=TcbStatus.OUT_OF_DATE),
     Reason.TCB_OUT_OF_DATE),
    ("revoked-peer", frozenset(Tolerance), sgx(tcb_status=TcbStatus.REVOKED),
     Reason.TCB_REVOKED),
    ("unknown-peer", frozenset(), tdx(tcb_status=TcbStatus.UNKNOWN), Reason.TCB_UNKNOWN),
    ("advisory-peer", frozenset(), sgx(advisories=("X-1",)), Reason.ADVISORY_NOT_IGNORED),
]


@pytest.mark.parametrize(("case_id", "tolerate", "claims", "reason"), PEER,
                         ids=[c[0] for c in PEER])
def test_check_tolerances(case_id: str, tolerate: frozenset[Tolerance], claims: Claims,
                          reason: Reason | None) -> None:
    check: Callable[[], None] = lambda: check_tolerances(  # noqa: E731
        tolerate, (), claims, who="peer edge/gateway"
    )
    if reason is None:
        check()
        return
    with pytest.raises(PolicyError) as info:
        check()
    assert info.value.reason is reason
    assert "peer edge/gateway" in info.value.message


@pytest.mark.parametrize(
    ("service", "peer_session", "peer_service", "allowed"),
    [
        ("backend", "shop", "frontend", True),
        ("backend", "edge", "gateway", True),
        ("backend", "shop", "backend", False),
        ("backend", "edge", "frontend", False),
        ("backend", "shop", "gateway", False),
        ("frontend", "shop", "backend", True),
        ("frontend", "shop", "db", True),
        ("frontend", "edge", "gateway", False),
        ("db", "shop", "backend", False),  # no allow_from: nobody
    ],
)
def test_allows_inbound(service: str, peer_session: str, peer_service: str,
                        allowed: bool) -> None:
    svc = POLICY.service(service)
    assert svc is not None
    assert allows_inbound(svc, "shop", peer_session, peer_service) is allowed
