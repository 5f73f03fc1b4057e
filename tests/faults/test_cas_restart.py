"""The CAS dies (SIGKILL) under live traffic: the mesh keeps serving on the certificates
it holds; once the CAS is relaunched on the same data the sidecars follow its events
again and renew, the CA (fingerprint and bundle) is the one they trusted before, and
nothing leaked in any process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from harness import CasProcess
from meshpeers import DATAPLANES, Mesh, connect, roundtrip, status, wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


class Traffic:
    """Clients in a thread: one long-lived connection and a new one per round, counted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            with connect(self.port) as old:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    msg = f"round {i}\n".encode()
                    try:
                        assert roundtrip(old, msg) == msg
                        with connect(self.port) as new:
                            assert roundtrip(new, msg) == msg
                        self.ok += 1
                    except (OSError, AssertionError) as e:
                        self.errors.append(f"round {i}: {type(e).__name__}: {e}")
                    self.stop.wait(0.05)
        except OSError as e:
            self.errors.append(f"long-lived connection: {e}")

    def rounds(self) -> int:
        return self.ok

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.mark.cas_args("--max-cert-ttl", "20s")
def test_cas_sigkill_and_restart_keeps_mesh_serving(
        fault_cas: CasProcess, shop_mesh: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    cas = fault_cas
    m = shop_mesh()
    sidecars = (m.frontend, m.backend)
    wait_until(lambda: all(status(sc)["cas"]["reachable"] for sc in sidecars), 10,
               "both sidecars following CAS events")
    fingerprint = cas.ca_fingerprint
    bundle_file = cas.bundle.read_bytes()
    bundle_api = cas.get("/v1/bundle").json()
    before = {sc.name: status(sc) for sc in sidecars}

    traffic = Traffic(m.outbound["echo"])
    try:
        wait_until(lambda: traffic.rounds() >= 3, 10, "traffic through the mesh")
        for p in (*sidecars, cas):
            leak_check.watch(p)

        assert cas.stop(signal.SIGKILL) == -signal.SIGKILL
        wait_until(lambda: not any(status(sc)["cas"]["reachable"] for sc in sidecars), 5,
                   "/status to show the CAS unreachable")
        served = traffic.rounds()
        wait_until(lambda: traffic.rounds() >= served + 10, 10,
                   "traffic to keep flowing while the CAS is down")
        for sc in sidecars:
            assert sc.get("/ready").status == 200, f"{sc.name} not ready without the CAS"
        assert not traffic.errors, traffic.errors[:5]

        cas.launch()  # same --data, same port
        assert cas.ca_fingerprint == fingerprint, "the relaunched CAS has another CA"
        assert cas.bundle.read_bytes() == bundle_file, "bundle.pem changed on restart"
        after = cas.get("/v1/bundle").json()
        assert (after["trust_domain"], after["bundle"]) == \
            (bundle_api["trust_domain"], bundle_api["bundle"]), "GET /v1/bundle changed"
        wait_until(lambda: all(status(sc)["cas"]["reachable"] for sc in sidecars), 45,
                   "both sidecars to reconnect to the CAS events", interval=0.1)
        # renewal at half the 20 s lifetime: each sidecar gets a new certificate from
        # the relaunched CAS, signed by the same CA
        wait_until(lambda: all(
            status(sc)["identity"]["serial"] != before[sc.name]["identity"]["serial"]
            for sc in sidecars), 30, "both sidecars to renew with the relaunched CAS",
            interval=0.2)
        # A new process: its baseline once the streams are back and each sidecar has
        # renewed, so the sidecars' pooled keep-alive connections to it (one or two per
        # sidecar, by how their requests overlapped) are part of it.
        leak_check.watch(cas)
        for sc in sidecars:
            st = status(sc)
            assert st["attestations"] > before[sc.name]["attestations"]
            assert st["cas"]["reconnects"] > before[sc.name]["cas"]["reconnects"]
            assert st["last_attest_error"] is None, st["last_attest_error"]
        served = traffic.rounds()
        wait_until(lambda: traffic.rounds() >= served + 5, 10,
                   "traffic to flow after the renewal")
    finally:
        traffic.finish()
    assert not traffic.errors, traffic.errors[:5]
    assert cas.get("/v1/bundle").json()["bundle"] == bundle_api["bundle"]
    leak_check.verify()
