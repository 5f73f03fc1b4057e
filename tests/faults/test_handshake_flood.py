"""Handshakes in progress have their own budget, per direction and per source address,
apart from established connections (SPEC §7): strangers that open connections and never
finish the TLS handshake cannot starve legitimate inbound calls from other addresses,
nor any outbound app call; what is over budget is closed at once and counted."""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from faultlib import metric, rss_kib
from flood import FloodMesh, handshake_flood
from harness import CasProcess
from meshpeers import DATAPLANES, closed_by_peer, no_traceback, status, wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck

REFUSED = "meshshield_sidecar_refusals_total"
FLOOD = 300  # from one address; over the established cap below and the per-source budget
CAP = 200
CALLS = 20

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


@pytest.fixture
def flood_mesh(fault_cas: CasProcess, echo_port: int,
               dataplane: str) -> Iterator[Callable[..., FloodMesh]]:
    """`flood_mesh(*target_flags)`: a FloodMesh on the fault CAS, with room in this
    process (and the sidecars) for the flood's sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * FLOOD:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * FLOOD), hard))
    started: list[FloodMesh] = []

    def start(*target_extra: str) -> FloodMesh:
        m = FloodMesh.start(fault_cas, echo_port, target_extra=target_extra,
                            dataplane=dataplane)
        started.append(m)
        return m

    try:
        yield start
        for m in started:
            no_traceback(m.target, m.other)
    finally:
        for m in started:
            m.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_handshake_flood_from_one_address_does_not_starve_app_calls(
        fault_cas: CasProcess, flood_mesh: Callable[..., FloodMesh],
        leak_check: LeakCheck) -> None:
    mesh = flood_mesh("--max-connections", str(CAP), "--handshake-timeout", "60s")
    assert mesh.served(3, "before") == (3, 3)
    for p in (fault_cas, mesh.target, mesh.other):
        leak_check.watch(p)
    rss_before = rss_kib(mesh.target.proc.pid)
    with handshake_flood(mesh.target_inbound, ["127.0.0.2"], FLOOD) as held:
        inbound, outbound = mesh.served(CALLS, "during")
        rss_during = rss_kib(mesh.target.proc.pid)
        # The budget for one source address held; the rest were closed at once.
        for s in held:
            s.settimeout(0.01)
        turned_away = sum(closed_by_peer(s) for s in held)
        refused = metric(mesh.target, REFUSED, direction="inbound",
                         reason="over_handshake_budget_per_source")
    print(f"flood of {FLOOD} never-finishing handshakes from one address: "
          f"{inbound}/{CALLS} inbound and {outbound}/{CALLS} outbound calls served; "
          f"{turned_away} turned away at once; sidecar RSS {rss_before // 1024} -> "
          f"{rss_during // 1024} MiB")
    assert (inbound, outbound) == (CALLS, CALLS)
    assert turned_away >= FLOOD - 128, turned_away
    assert refused >= FLOOD - 128, refused
    wait_until(lambda: status(mesh.target)["connections"] == 0, 10,
               "the legitimate connections to be released")


def test_handshake_flood_from_many_addresses_does_not_starve_outbound_calls(
        fault_cas: CasProcess, flood_mesh: Callable[..., FloodMesh],
        leak_check: LeakCheck) -> None:
    """Strangers from many addresses fill the whole inbound handshake budget: inbound
    handshakes are refused meanwhile, but outbound app calls have their own."""
    m = flood_mesh("--max-handshakes", "64", "--max-handshakes-per-source", "16",
                   "--handshake-timeout", "60s")
    assert m.served(1, "warm-up") == (1, 1)
    for p in (fault_cas, m.target, m.other):
        leak_check.watch(p)
    sources = [f"127.0.0.{i}" for i in range(2, 10)]
    with handshake_flood(m.target_inbound, sources, 16):
        wait_until(lambda: metric(m.target, REFUSED, direction="inbound",
                                  reason="over_handshake_budget") > 0, 10,
                   "the global inbound handshake budget to be full")
        _inbound, outbound = m.served(CALLS, "during")
    assert outbound == CALLS
