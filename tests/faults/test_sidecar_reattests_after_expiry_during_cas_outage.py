"""A sidecar whose certificate expired while the CAS was down attests again by itself
within seconds of the CAS returning: nonce and attest go without a client certificate,
so the expired one can no longer fail the handshake with the CAS.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path

from harness import CasProcess
from meshpeers import (
    LOOPBACK,
    LoopThread,
    TcpBackend,
    apply,
    connect,
    echo,
    free_ports,
    no_traceback,
    roundtrip,
    start_mesh,
    status,
    wait_until,
)


def test_sidecar_reattests_after_expiry_during_cas_outage(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    cas = CasProcess.start(tmp_path / "mesh", "--max-cert-ttl", "10s",
                           "--listen", f"{LOOPBACK}:{port}")
    lt = LoopThread()
    app = TcpBackend(lt, echo)
    mesh = None
    try:
        apply(cas, cas.sim_policy("shop"))
        mesh = start_mesh(cas, "shop", {"echo": app.port})
        sidecars = (mesh.frontend, mesh.backend)
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
        no_traceback(*sidecars)
    finally:
        if mesh is not None:
            mesh.stop()
        app.close()
        lt.close()
        cas.stop()
