"""Renewal never dies and never half-applies: a CAS answer that does not validate (bad
PEM, no certificate, a certificate of another key, a malformed trust snapshot) is logged,
counted, shown in /status and retried; the sidecar only ever holds a whole good answer.

The sidecar talks to a CAS front that passes nonce and attest on to the real CAS and
spoils the answers a test asks it to.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from casfront import CasFront
from harness import CasProcess, SidecarProcess
from meshpeers import apply, status, wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck

BAD_PEM = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"

pytestmark = pytest.mark.cas_args("--max-cert-ttl", "10s")


@pytest.fixture
def front(fault_cas: CasProcess, cas_front: Callable[..., CasFront]) -> CasFront:
    apply(fault_cas, fault_cas.sim_policy("shop"))
    return cas_front(fault_cas)


def _other_key_certificate(cas: CasProcess) -> str:
    r = cas.attest("shop", "backend")
    assert r.status == 200, r.body
    return str(r.json()["certificate"])


def _held_serial(sc: SidecarProcess) -> str | None:
    ident = status(sc)["identity"]
    return None if ident is None else str(ident["serial"])


def test_sidecar_attests_on_first_start_despite_malformed_cas_answers(
        front: CasFront, sidecar: Callable[..., SidecarProcess],
        leak_check: LeakCheck) -> None:
    other = _other_key_certificate(front.cas)  # the CAS's warm-up: one attestation
    # The sidecar is not watched: its faults all come before its first certificate,
    # the earliest a baseline can be taken.
    leak_check.watch(front.cas)
    front.spoil += [
        lambda a: {**a, "certificate": BAD_PEM},
        lambda a: {k: v for k, v in a.items() if k != "certificate"},
        lambda a: {**a, "certificate": other},
        lambda a: {**a, "trust": {"epoch": "soon", "services": 7}},
        lambda a: "[1, 2",
    ]
    sc = sidecar(front.as_cas(), "shop", "backend", inbound=["127.0.0.1:0=127.0.0.1:9"],
                 wait_ready=False)
    sc.wait_ready(timeout=45)
    st = status(sc)
    assert front.attests == 6, front.attests
    assert st["attestations"] == 1 and st["attest_failures"] == 5, st
    good = front.answers[-1]
    assert st["identity"]["serial"] == good["serial"], (st["identity"], good["serial"])
    log = sc.log()
    attempts = re.findall(r"no certificate yet: attestation failed \(attempt (\d)\)", log)
    assert attempts == ["1", "2", "3", "4", "5"], log
    assert "public key is not the key this sidecar made" in log, log
    assert "trust snapshot is malformed" in log, log


def test_a_spoiled_renewal_is_never_half_applied_and_renewal_goes_on(
        front: CasFront, sidecar: Callable[..., SidecarProcess],
        leak_check: LeakCheck) -> None:
    sc = sidecar(front.as_cas(), "shop", "backend", inbound=["127.0.0.1:0=127.0.0.1:9"])
    first = _held_serial(sc)
    other = _other_key_certificate(front.cas)
    for p in (front.cas, sc):
        leak_check.watch(p)
    n = front.attests
    front.spoil += [
        # a good certificate with a snapshot that does not parse: nothing may apply
        lambda a: {**a, "trust": {**a["trust"], "epoch": None}},
        lambda a: {**a, "certificate": other},
    ]
    seen: set[str | None] = set()

    def renewed() -> bool:
        seen.add(_held_serial(sc))
        return front.attests >= n + 3 and _held_serial(sc) == front.answers[-1]["serial"]

    wait_until(renewed, 40, "a good renewal after two spoiled answers", interval=0.02)
    spoiled = front.answers[n]["serial"]
    assert spoiled not in seen, "the certificate of a spoiled answer was installed"
    assert spoiled not in sc.log()
    assert _held_serial(sc) not in (first, spoiled)
    st = status(sc)
    assert st["attest_failures"] == 2 and st["attestations"] >= 2, st
    metrics = sc.get("/metrics").body.decode()
    assert "meshshield_sidecar_attest_failures_total 2.0" in metrics, metrics
    # and it keeps renewing on schedule afterwards
    now = front.attests
    wait_until(lambda: front.attests > now, 15, "the next scheduled renewal")
    wait_until(lambda: sc.get("/ready").status == 200, 10, "the sidecar ready")
