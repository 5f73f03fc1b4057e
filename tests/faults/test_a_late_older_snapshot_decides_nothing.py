"""One view, the newest, decides everything: a trust event that arrives late, with an
older epoch than the sidecar's current view, neither closes live connections nor
changes what new connections are checked against.

The backend follows a CAS front whose event stream the test writes; the frontend talks
to the real CAS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from casfront import CasFront
from faultlib import warm_up
from harness import CasProcess, SidecarProcess
from meshpeers import (
    DATAPLANES,
    LOOPBACK,
    apply,
    closed_by_peer,
    connect,
    free_ports,
    refusals,
    roundtrip,
    status,
    wait_until,
)

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


def test_a_late_snapshot_revoking_the_peer_does_not_close_its_live_connection(
        fault_cas: CasProcess, echo_port: int, cas_front: Callable[..., CasFront],
        sidecar: Callable[..., SidecarProcess], leak_check: LeakCheck) -> None:
    cas = fault_cas
    apply(cas, cas.sim_policy("shop"))
    front = cas_front(cas)
    inbound, outbound = free_ports(2)
    backend = sidecar(front.as_cas(), "shop", "backend",
                      inbound=[f"{LOOPBACK}:{inbound}={LOOPBACK}:{echo_port}"])
    frontend = sidecar(cas, "shop", "frontend",
                       outbound=[f"{LOOPBACK}:{outbound}=backend@{LOOPBACK}:{inbound}"])
    wait_until(lambda: front.open_streams() == 1, 20,
               "the backend following the front's events")
    warm_up(outbound)
    for p in (cas, backend, frontend):
        leak_check.watch(p)
    snap = front.last_trust()
    e = int(snap["epoch"])
    serial = status(frontend)["identity"]["serial"]
    with connect(outbound) as s:
        assert roundtrip(s, b"before\n") == b"before\n"
        front.push_event({**snap, "epoch": e + 5})
        wait_until(lambda: status(backend)["epoch"] == e + 5, 10, "epoch e+5 current")
        # late: older than the current view, and it would revoke the frontend
        front.push_event({**snap, "epoch": e + 1, "revoked_serials": [serial]})
        front.push_event({**snap, "epoch": e + 6})  # in order: the late one came first
        wait_until(lambda: status(backend)["epoch"] == e + 6, 10, "epoch e+6 current")
        assert roundtrip(s, b"still open\n") == b"still open\n"
        with connect(outbound) as s2:
            assert roundtrip(s2, b"new\n") == b"new\n"
    assert not [r for r in refusals(backend) if r["reason"] == "revoked"]
    # and the newest view does decide: a current revocation closes at once
    with connect(outbound) as s:
        assert roundtrip(s, b"again\n") == b"again\n"
        front.push_event({**snap, "epoch": e + 7, "revoked_serials": [serial]})
        s.settimeout(5)
        wait_until(lambda: closed_by_peer(s), 5, "the revoked connection closed")
