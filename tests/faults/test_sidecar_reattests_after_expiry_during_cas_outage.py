"""A sidecar whose certificate expired while the CAS was down attests again by itself
within seconds of the CAS returning: nonce and attest go without a client certificate,
so the expired one can no longer fail the handshake with the CAS.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import pytest
from faultlib import warm_up
from harness import CasProcess
from meshpeers import DATAPLANES, Mesh, connect, roundtrip, status, wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


@pytest.mark.cas_args("--max-cert-ttl", "10s")
def test_sidecar_reattests_after_expiry_during_cas_outage(
        fault_cas: CasProcess, shop_mesh: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    cas = fault_cas
    mesh = shop_mesh()
    sidecars = (mesh.frontend, mesh.backend)
    warm_up(mesh.outbound["echo"])
    # The CAS is not watched: it is killed below, and its relaunch ends the scenario.
    for sc in sidecars:
        leak_check.watch(sc)
    assert cas.stop(signal.SIGKILL) == -signal.SIGKILL
    old = {sc.name: status(sc)["identity"] for sc in sidecars}
    expiry = max(datetime.fromisoformat(i["not_after"]).timestamp() for i in old.values())
    wait_until(lambda: time.time() > expiry + 1, 20, "both certificates to expire")
    wait_until(lambda: all(sc.get("/ready").status == 503 for sc in sidecars), 5,
               "both sidecars unready with an expired certificate")

    cas.launch()  # same data, same port
    back = time.monotonic()

    def renewed() -> bool:
        return all(status(sc)["identity"]["serial"] != old[sc.name]["serial"]
                   and sc.get("/ready").status == 200 for sc in sidecars)

    wait_until(renewed, 15, "both sidecars to hold a new certificate", interval=0.1)
    took = time.monotonic() - back
    print(f"re-attested {took:.1f} s after the CAS returned")
    assert took < 10, took
    with connect(mesh.outbound["echo"]) as s:
        assert roundtrip(s, b"after the outage\n") == b"after the outage\n"
    wait_until(lambda: all(status(sc)["cas"]["reachable"] for sc in sidecars), 15,
               "both sidecars following CAS events again")
