"""Following the CAS: revocations close live connections within 1 s and refuse new ones;
the mesh keeps working while the CAS is down and the sidecars reconnect when it is back.

The CAS listens on a fixed loopback port (a later `--listen` overrides the harness's
port 0), so a relaunch on the same data comes back where the sidecars look for it.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from harness import CasProcess
from meshpeers import (
    DATAPLANES,
    LOOPBACK,
    EofWatch,
    LoopThread,
    Mesh,
    TcpBackend,
    apply,
    closed_by_peer,
    connect,
    echo,
    free_ports,
    make_workload,
    mesh_policy,
    no_traceback,
    refusals,
    refused_on_connect,
    roundtrip,
    start_mesh,
    status,
    wait_refusal,
    wait_until,
)


@dataclass
class Env:
    cas: CasProcess
    echo_port: int
    frontend_m: str
    dataplane: str


@pytest.fixture(scope="module", params=DATAPLANES)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("casfollow")
    (port,) = free_ports(1)
    cas = CasProcess.start(root / "mesh", "--listen", f"{LOOPBACK}:{port}")
    assert cas.url.endswith(f":{port}"), cas.url
    lt = LoopThread()
    app = TcpBackend(lt, echo)
    try:
        # shop's frontend runs its own build, so revoking its measurement leaves the
        # backend (and the other sessions, which run the backend's build) alone.
        fm = cas.measurement(make_workload(cas, "frontend-app"))
        apply(cas, mesh_policy("shop", backend_m=cas.measurement(), frontend_m=fm))
        apply(cas, cas.sim_policy("kiosk"))
        apply(cas, cas.sim_policy("cafe"))
        apply(cas, cas.sim_policy("deli"))
        apply(cas, cas.sim_policy("gate"))
        yield Env(cas, app.port, fm, request.param)
    finally:
        app.close()
        lt.close()
        cas.stop()


@pytest.fixture
def mesh_of(env: Env) -> Iterator[dict[str, Mesh]]:
    started: dict[str, Mesh] = {}
    yield started
    for m in started.values():
        m.stop()
    for m in started.values():
        no_traceback(m.backend, m.frontend)


def _live(sc_mesh: Mesh) -> list[dict[str, object]]:
    return list(sc_mesh.backend.get("/connections").json()["connections"])


def _refused_through(port: int) -> None:
    assert refused_on_connect(port, b"hello?\n"), "the refused connection was not closed"


def test_revoking_the_frontend_measurement_closes_its_connection_within_1s(
        env: Env, mesh_of: dict[str, Mesh]) -> None:
    fw = env.cas.root / "frontend-app"
    m = mesh_of["shop"] = start_mesh(env.cas, "shop", {"echo": env.echo_port},
                                     frontend_workload=fw, dataplane=env.dataplane)
    port = m.outbound["echo"]
    s = connect(port)
    with s:
        assert roundtrip(s, b"before\n") == b"before\n"
        wait_until(lambda: _live(m), 5, "the connection in the backend's /connections")
        watch = EofWatch(s)
        n = len(refusals(m.backend))
        sent = time.monotonic()
        r = env.cas.request("POST", "/v1/sessions/shop/revocations",
                            json.dumps({"measurement": env.frontend_m, "mesh_wide": True}
                                       ).encode(), admin=True)
        answered = time.monotonic()
        assert r.status == 201, r.body
        watch.thread.join(timeout=10)
        assert watch.at is not None, f"the connection was not closed ({watch.how})"
    latency = watch.at - answered
    print(f"revocation: connection closed ({watch.how}) {latency * 1000:.0f} ms after the "
          f"revocation response, {(watch.at - sent) * 1000:.0f} ms after the request")
    assert latency < 1.0
    r1 = wait_refusal(m.backend, "revoked", after=n)
    assert env.frontend_m in r1["message"], r1
    # The next connection is refused by the backend, with the same reason.
    n = len(refusals(m.backend))
    _refused_through(port)
    wait_refusal(m.backend, "revoked", after=n,
                 peer_spiffe_id="spiffe://meshshield.local/shop/frontend")
    assert _live(m) == []


def test_revoking_a_serial_with_the_cli_closes_and_refuses(
        env: Env, mesh_of: dict[str, Mesh]) -> None:
    m = mesh_of["cafe"] = start_mesh(env.cas, "cafe", {"echo": env.echo_port},
                                     dataplane=env.dataplane)
    serial = status(m.frontend)["identity"]["serial"]
    with connect(m.outbound["echo"]) as s:
        assert roundtrip(s, b"before\n") == b"before\n"
        n = len(refusals(m.backend))
        r = env.cas.cli("revoke", "cafe", "--serial", serial)
        assert r.returncode == 0, r.stderr
        assert serial in r.stdout, r.stdout
        s.settimeout(5)
        wait_until(lambda: closed_by_peer(s), 5, "the revoked connection to be closed")
    wait_refusal(m.backend, "revoked", after=n)
    n = len(refusals(m.backend))
    _refused_through(m.outbound["echo"])
    r1 = wait_refusal(m.backend, "revoked", after=n)
    assert serial in r1["message"], r1


def test_a_policy_update_that_drops_the_frontend_closes_and_refuses(
        env: Env, mesh_of: dict[str, Mesh]) -> None:
    m = mesh_of["deli"] = start_mesh(env.cas, "deli", {"echo": env.echo_port},
                                     dataplane=env.dataplane)
    old = env.cas.sim_policy("deli")
    new = old.replace("predecessor: null",
                      f"predecessor: \"{hashlib.sha256(old.encode()).hexdigest()}\"")
    new = new.replace("allow_from: [frontend]", "allow_from: []")
    with connect(m.outbound["echo"]) as s:
        assert roundtrip(s, b"before\n") == b"before\n"
        watch = EofWatch(s)
        r = env.cas.request("PUT", "/v1/sessions/deli", new.encode(), admin=True,
                            headers={"Content-Type": "application/yaml"})
        applied = time.monotonic()
        assert r.status == 200, r.body
        watch.thread.join(timeout=10)
        assert watch.at is not None, f"the connection was not closed ({watch.how})"
    latency = watch.at - applied
    print(f"policy update: connection closed ({watch.how}) {latency * 1000:.0f} ms after "
          "the update response")
    assert latency < 1.0
    wait_refusal(m.backend, "peer_not_allowed",
                 peer_spiffe_id="spiffe://meshshield.local/deli/frontend")
    n = len(refusals(m.backend))
    _refused_through(m.outbound["echo"])
    wait_refusal(m.backend, "peer_not_allowed", after=n)


def test_cas_down_the_mesh_keeps_serving_then_events_resume(
        env: Env, mesh_of: dict[str, Mesh]) -> None:
    m = mesh_of["kiosk"] = start_mesh(env.cas, "kiosk", {"echo": env.echo_port},
                                      dataplane=env.dataplane)
    port = m.outbound["echo"]
    sidecars = (m.frontend, m.backend)
    wait_until(lambda: all(status(sc)["cas"]["reachable"] for sc in sidecars), 10,
               "both sidecars following CAS events")
    before = {sc.name: status(sc)["cas"]["reconnects"] for sc in sidecars}
    with connect(port) as old:
        assert roundtrip(old, b"one\n") == b"one\n"

        killed = time.monotonic()
        assert env.cas.stop(signal.SIGKILL) == -signal.SIGKILL
        wait_until(lambda: not any(status(sc)["cas"]["reachable"] for sc in sidecars), 5,
                   "/status to show the CAS unreachable")
        noticed = time.monotonic() - killed
        for sc in sidecars:
            st = status(sc)
            assert st["cas"]["last_error"], st["cas"]
            assert sc.get("/ready").status == 200  # still serving with its certificate
        assert roundtrip(old, b"two\n") == b"two\n"
        with connect(port) as new:
            assert roundtrip(new, b"new while the CAS is down\n") == \
                b"new while the CAS is down\n"

        env.cas.launch()  # same --data, same port
        relaunched = time.monotonic()
        wait_until(lambda: all(status(sc)["cas"]["reachable"] for sc in sidecars), 45,
                   "both sidecars to reconnect to the CAS events", interval=0.1)
        back = time.monotonic() - relaunched
        for sc in sidecars:
            assert status(sc)["cas"]["reconnects"] > before[sc.name]
        assert roundtrip(old, b"three\n") == b"three\n"
        with connect(port) as new:
            assert roundtrip(new, b"after\n") == b"after\n"
    print(f"CAS killed: unreachable in /status after {noticed * 1000:.0f} ms; "
          f"events followed again {back:.1f} s after the relaunch")
    # Following again means acting again: a revocation now reaches the backend.
    with connect(port) as s:
        assert roundtrip(s, b"x\n") == b"x\n"
        r = env.cas.cli("revoke", "kiosk", "--serial", status(m.frontend)["identity"]["serial"])
        assert r.returncode == 0, r.stderr
        s.settimeout(5)
        wait_until(lambda: closed_by_peer(s), 5, "the revoked connection to be closed")


def _syn_sent_to(port: int) -> bool:
    """A socket of this host is in SYN_SENT towards loopback `port` (/proc/net/tcp)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(r.split()[2].endswith(f":{port:04X}") and r.split()[3] == "02" for r in rows)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_a_revocation_while_connecting_to_the_app_still_refuses(
        env: Env, mesh_of: dict[str, Mesh]) -> None:
    """The peer passed the check, then the sidecar waits to connect to a slow app; the
    revocation arrives in between. The connection must be refused, not forwarded."""
    app = socket.socket()
    app.bind((LOOPBACK, 0))
    app.listen(0)  # room for one pending connection, and the blocker takes it
    app_port = int(app.getsockname()[1])
    blocker = socket.create_connection((LOOPBACK, app_port))
    slow_connect = env.cas.root / "slow-connect.yaml"
    slow_connect.write_text("connect_timeout: 30s\n")
    with app, blocker:
        m = mesh_of["gate"] = start_mesh(env.cas, "gate", {"slow": app_port},
                                         backend_extra=("--config", str(slow_connect)),
                                         dataplane=env.dataplane)
        serial = status(m.frontend)["identity"]["serial"]
        epoch = status(m.backend)["epoch"]
        with connect(m.outbound["slow"]) as client:
            client.sendall(b"GET /secret HTTP/1.0\r\n\r\n")
            wait_until(lambda: _syn_sent_to(app_port), 10,
                       "the backend sidecar to be connecting to the app (SYN_SENT)")
            r = env.cas.request("POST", "/v1/sessions/gate/revocations",
                                json.dumps({"serial": serial}).encode(), admin=True)
            assert r.status == 201, r.body
            wait_until(lambda: status(m.backend)["epoch"] > epoch, 5,
                       "the backend to apply the revocation")
            app.accept()[0].close()  # make room: the sidecar's SYN retry gets in
            app.settimeout(20)
            conn, _ = app.accept()
            with conn:
                conn.settimeout(10)
                assert closed_by_peer(conn), "the revoked peer's bytes reached the app"
            wait_refusal(m.backend, "revoked",
                         peer_spiffe_id="spiffe://meshshield.local/gate/frontend")
            client.settimeout(10)
            assert closed_by_peer(client)
        assert _live(m) == []


def test_without_the_cas_new_connections_work_until_the_certificates_expire(
        tmp_path: Path) -> None:
    """Staleness is bounded by the certificate's lifetime: renewal needs the CAS."""
    cas = CasProcess.start(tmp_path / "short", "--max-cert-ttl", "10s")
    lt = LoopThread()
    app = TcpBackend(lt, echo)
    m: Mesh | None = None
    try:
        apply(cas, cas.sim_policy("shop"))
        m = start_mesh(cas, "shop", {"echo": app.port})
        port = m.outbound["echo"]
        assert cas.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = time.time()
        with connect(port) as s:
            assert roundtrip(s, b"CAS gone, certificate valid\n") == \
                b"CAS gone, certificate valid\n"
        not_after = {sc.name: datetime.fromisoformat(
            status(sc)["identity"]["not_after"]).timestamp() for sc in (m.frontend, m.backend)}
        expiry = max(not_after.values())
        assert expiry - killed < 11
        # The frontend refuses the backend's certificate from just past its not_after:
        # within that second, TLS libraries that check validity in whole seconds still
        # pass it, and the sidecar must refuse it all the same.
        wait_until(lambda: time.time() > not_after[m.backend.name] + 0.05, 15,
                   "the backend's certificate to expire", interval=0.01)
        n = len(refusals(m.frontend))
        _refused_through(port)
        r = wait_refusal(m.frontend, "tls_handshake_failed", after=n)
        assert "expired" in r["message"], r
        wait_until(lambda: time.time() > expiry + 0.05, 15, "the certificates to expire")
        # an expired certificate is not "held": kubelet stops sending traffic
        ready = m.frontend.get("/ready")
        assert ready.status == 503 and b"expired" in ready.body, ready
        no_traceback(m.backend, m.frontend)
    finally:
        if m is not None:
            m.stop()
        app.close()
        lt.close()
        cas.stop()
