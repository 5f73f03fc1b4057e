"""Certificates do not outlive the policy that allowed them.

A policy update, or the deletion of a session, closes every live connection whose peer
certificate's claims no longer pass the session's CURRENT policy (old build, service
removed, session gone) and refuses new ones; the CAS refuses them on its own mesh
endpoints too. Serials of a deleted session can still be revoked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from attested_peer import AttestedPeer, attested_peer, cut
from faultlib import warm_up
from harness import CasProcess, SidecarProcess
from meshpeers import (
    DATAPLANES,
    LOOPBACK,
    LoopThread,
    Mesh,
    TcpBackend,
    apply,
    connect,
    echo,
    free_ports,
    make_workload,
    mesh_policy,
    refusals,
    refused_on_connect,
    roundtrip,
    status,
    wait_refusal,
)

from meshshield.adminauth import load_admin_key, write_admin_key

if TYPE_CHECKING:
    from conftest import LeakCheck

ON_BOTH_PLANES = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)

TD = "spiffe://meshshield.local"


@dataclass
class Env:
    cas: CasProcess
    echo_port: int


@pytest.fixture(scope="module")
def env(dataplane: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # A CAS per data plane: the scenarios apply the same sessions on each.
    cas = CasProcess.start(tmp_path_factory.mktemp(f"stale-{dataplane}") / "mesh")
    lt = LoopThread()
    app = TcpBackend(lt, echo)
    try:
        yield Env(cas, app.port)
    finally:
        app.close()
        lt.close()
        cas.stop()


def _successor(old: str, new: str) -> str:
    """`new` as the update of `old` (predecessor set to old's hash)."""
    h = hashlib.sha256(old.encode()).hexdigest()
    return new.replace("predecessor: null", f'predecessor: "{h}"')


def _cut_within(s: socket.socket, seconds: float, what: str) -> None:
    s.settimeout(seconds)
    assert cut(s), f"{what}: the connection was still open after {seconds:g} s"


def _send_if_open(s: socket.socket, data: bytes) -> None:
    """Send unless the peer has already cut the connection (a refusal can beat us)."""
    with contextlib.suppress(OSError, ssl.SSLError):
        s.sendall(data)


def _refused_through(port: int) -> None:
    assert refused_on_connect(port, b"hello?\n"), \
        "a new connection: the connection was still open after 10 s"


def _backend_alone(sidecar: Callable[..., SidecarProcess], cas: CasProcess, session: str,
                   app_port: int) -> tuple[SidecarProcess, int]:
    (port,) = free_ports(1)
    sc = sidecar(cas, session, "backend", inbound=[f"{LOOPBACK}:{port}={LOOPBACK}:{app_port}"])
    return sc, port


@ON_BOTH_PLANES
def test_policy_update_closes_live_connection_of_old_build(
        env: Env, meshes: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    cas = env.cas
    v1 = make_workload(cas, "frontend-v1")
    v2 = make_workload(cas, "frontend-v2")
    (v2 / "server.py").write_text("print('hello from frontend v2')\n")
    bm = cas.measurement()
    old = mesh_policy("shop", backend_m=bm, frontend_m=cas.measurement(v1))
    apply(cas, old)
    m = meshes(cas, "shop", {"echo": env.echo_port}, frontend_workload=v1)
    warm_up(m.outbound["echo"])
    for p in (cas, m.backend, m.frontend):
        leak_check.watch(p)
    with connect(m.outbound["echo"]) as s:
        assert roundtrip(s, b"v1 talking\n") == b"v1 talking\n"
        n = len(refusals(m.backend))
        # v2 is approved, v1 is not any more: the running v1 must be cut.
        apply(cas, _successor(old, mesh_policy("shop", backend_m=bm,
                                                frontend_m=cas.measurement(v2))))
        _cut_within(s, 5, "the live connection of the old build")
    r = wait_refusal(m.backend, "revoked", after=n, peer_spiffe_id=f"{TD}/shop/frontend")
    assert status(m.frontend)["identity"]["serial"] in r["message"], r
    n = len(refusals(m.backend))
    _refused_through(m.outbound["echo"])
    wait_refusal(m.backend, "revoked", after=n, peer_spiffe_id=f"{TD}/shop/frontend")
    assert m.backend.get("/connections").json()["connections"] == []


def _star_policy(name: str, m: str, *, with_frontend: bool) -> str:
    frontend = (f'  - name: frontend\n    tee: [{{platform: sim, measurement: "{m}"}}]\n'
                if with_frontend else "")
    return (f'name: {name}\nversion: "1"\npredecessor: null\nservices:\n'
            f'  - name: backend\n    tee: [{{platform: sim, measurement: "{m}"}}]\n'
            f'    allow_from: ["*"]\n{frontend}'
            "security:\n  attestation:\n    tolerate: [simulation]\n")


@ON_BOTH_PLANES
def test_removed_service_peer_is_cut_and_refused(
        env: Env, meshes: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    """backend admits any service of its session ("*"); removing frontend from the
    policy leaves the backend's allow_from as it was, yet frontend must be cut."""
    cas = env.cas
    m_ = cas.measurement()
    old = _star_policy("cafe", m_, with_frontend=True)
    apply(cas, old)
    m = meshes(cas, "cafe", {"echo": env.echo_port})
    warm_up(m.outbound["echo"])
    for p in (cas, m.backend, m.frontend):
        leak_check.watch(p)
    with connect(m.outbound["echo"]) as s:
        assert roundtrip(s, b"still here\n") == b"still here\n"
        apply(cas, _successor(old, _star_policy("cafe", m_, with_frontend=False)))
        _cut_within(s, 5, "the live connection of the removed service")
    wait_refusal(m.backend, "revoked", peer_spiffe_id=f"{TD}/cafe/frontend")
    n = len(refusals(m.backend))
    _refused_through(m.outbound["echo"])
    wait_refusal(m.backend, "revoked", after=n, peer_spiffe_id=f"{TD}/cafe/frontend")


def _two_tenants(cas: CasProcess, mall: str, deli: str) -> str:
    """mall/backend admits deli/frontend; deli is a session of its own."""
    m_ = cas.measurement()
    apply(cas, (f'name: {mall}\nversion: "1"\npredecessor: null\nservices:\n'
                f'  - name: backend\n    tee: [{{platform: sim, measurement: "{m_}"}}]\n'
                f'    allow_from: ["{deli}/frontend"]\n'
                "security:\n  attestation:\n    tolerate: [simulation]\n"))
    deli_policy = _star_policy(deli, m_, with_frontend=True)
    apply(cas, deli_policy)
    return deli_policy


def _delete(cas: CasProcess, session: str) -> None:
    r = cas.request("DELETE", f"/v1/sessions/{session}", admin=True)
    assert r.status == 200, r.body


@ON_BOTH_PLANES
def test_deleted_session_peer_is_cut_and_refused(
        env: Env, sidecar: Callable[..., SidecarProcess], leak_check: LeakCheck) -> None:
    cas = env.cas
    _two_tenants(cas, "mall", "deli")
    backend, port = _backend_alone(sidecar, cas, "mall", env.echo_port)
    peer = attested_peer(cas, "deli", "frontend")
    with peer.connect(port) as s:  # warm-up
        assert roundtrip(s, b"warm-up\n") == b"warm-up\n"
    for p in (cas, backend):
        leak_check.watch(p)
    with peer.connect(port) as s:
        assert roundtrip(s, b"from deli\n") == b"from deli\n"
        _delete(cas, "deli")
        _cut_within(s, 5, "the live connection from the deleted session")
    r = wait_refusal(backend, "revoked", peer_spiffe_id=f"{TD}/deli/frontend")
    assert peer.serial in r["message"], r
    n = len(refusals(backend))
    with peer.connect(port) as s:
        _send_if_open(s, b"anyone?\n")
        _cut_within(s, 10, "a new connection from the deleted session")
    wait_refusal(backend, "revoked", after=n, peer_spiffe_id=f"{TD}/deli/frontend")


@ON_BOTH_PLANES
def test_deleted_session_serial_stays_revocable(
        env: Env, sidecar: Callable[..., SidecarProcess], leak_check: LeakCheck) -> None:
    cas = env.cas
    leak_check.watch(cas)
    deli_policy = _two_tenants(cas, "arcade", "bakery")
    peer = attested_peer(cas, "bakery", "frontend")
    _delete(cas, "bakery")
    r = cas.cli("revoke", "bakery", "--serial", peer.serial)
    assert r.returncode == 0, r.stderr
    assert peer.serial in r.stdout, r.stdout
    # The same name created again (the same build allowed) does not bring it back.
    apply(cas, deli_policy)
    backend, port = _backend_alone(sidecar, cas, "arcade", env.echo_port)
    leak_check.watch(backend)  # its first connection is the refusal below
    with peer.connect(port) as s:
        _send_if_open(s, b"back again?\n")
        _cut_within(s, 10, "a connection with the revoked serial")
    r1 = wait_refusal(backend, "revoked", peer_spiffe_id=f"{TD}/bakery/frontend")
    assert peer.serial in r1["message"], r1
    fresh = attested_peer(cas, "bakery", "frontend")  # a new attestation is fine
    with fresh.connect(port) as s:
        assert roundtrip(s, b"new cert\n") == b"new cert\n"


def _mesh_get(cas: CasProcess, peer: AttestedPeer, method: str, path: str,
              body: bytes | None = None) -> tuple[int, str | None]:
    ctx = ssl.create_default_context(cafile=str(cas.bundle))
    ctx.load_cert_chain(str(peer.cert), str(peer.key))
    req = urllib.request.Request(cas.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["code"]


def test_cas_refuses_events_and_reports_of_a_certificate_that_no_longer_passes(
        env: Env, leak_check: LeakCheck) -> None:
    cas = env.cas
    leak_check.watch(cas)
    _two_tenants(cas, "plaza", "diner")
    peer = attested_peer(cas, "diner", "frontend")
    report = json.dumps({"connections": []}).encode()
    assert _mesh_get(cas, peer, "GET", "/v1/events")[0] == 200
    assert _mesh_get(cas, peer, "POST", "/v1/reports", report)[0] == 202
    _delete(cas, "diner")
    assert _mesh_get(cas, peer, "GET", "/v1/events") == (403, "revoked")
    assert _mesh_get(cas, peer, "POST", "/v1/reports", report) == (403, "revoked")


def test_deleted_session_updater_who_is_named_nowhere_else_can_still_revoke(
        env: Env, tmp_path: Path, leak_check: LeakCheck) -> None:
    """The replay guard admits only keys that may act; the updater of a deleted session
    whose certificates are still in force may act (it may revoke them)."""
    cas = env.cas
    leak_check.watch(cas)
    _, tenant_fp = write_admin_key(tmp_path / "tenant")
    tenant = load_admin_key(tmp_path / "tenant")
    policy = cas.sim_policy("kiosk", extra=(
        f'access_policy:\n  read: [CREATOR, "{tenant_fp}"]\n'
        f'  update: [CREATOR, "{tenant_fp}"]\n'))
    apply(cas, policy)
    peer = attested_peer(cas, "kiosk", "frontend")
    _delete(cas, "kiosk")
    body = json.dumps({"serial": peer.serial}).encode()
    r = cas.request("POST", "/v1/sessions/kiosk/revocations", body, admin=tenant)
    assert r.status == 201, r.body
    assert r.json()["serial"] == peer.serial
    # A key named by no session, live or deleted, still may do nothing.
    stranger = write_admin_key(tmp_path / "stranger")[0]
    r2 = cas.request("POST", "/v1/sessions/kiosk/revocations", body, admin=stranger)
    assert r2.status == 403 and r2.code == "forbidden", r2.body
