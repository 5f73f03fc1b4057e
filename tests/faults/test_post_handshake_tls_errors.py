"""TLS errors after the handshake (the peer rejects our certificate with an alert; a
forged record arrives) end the connection: it leaves /connections, the active gauge
goes back down, the app sees a reset, one log line names it (no traceback), and the
end is counted by reason."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from faultlib import metric
from harness import SidecarProcess, run_cli
from meshpeers import DATAPLANES, LOOPBACK, connect, free_ports, no_traceback, status, wait_until
from onpath import OnPathMesh, how_it_ends

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)

CLOSED = "meshshield_sidecar_connections_closed_total"


def _ended_lines(sc: SidecarProcess) -> list[str]:
    return [x for x in sc.log().splitlines() if " ended: " in x]


def _s_server(tmp: Path, mesh: OnPathMesh, port: int) -> subprocess.Popen[bytes]:
    """`openssl s_server` holding a genuine backend certificate, but requiring client
    certificates from a CA of its own: in TLS 1.3 it answers our Finished with an alert,
    after our side of the handshake is complete."""
    cas = mesh.cas
    out = tmp / "backend-id"
    r = run_cli("attest", "--cas", cas.url, "--cas-bundle", str(cas.bundle), "--session",
                "shop", "--service", "backend", "--platform", "sim", "--workload",
                str(cas.workload), "--sim-key", str(cas.sim_dir / "sim-platform.key"),
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    foreign = tmp / "foreign"
    foreign.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=foreign CA",
                    "-days", "1", "-keyout", str(foreign / "key.pem"),
                    "-out", str(foreign / "ca.pem")], check=True, capture_output=True)
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"{LOOPBACK}:{port}", "-tls1_3", "-quiet",
         "-cert", str(out / "cert.pem"), "-key", str(out / "key.pem"),
         "-Verify", "1", "-verify_return_error", "-CAfile", str(foreign / "ca.pem")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc


def test_peer_alert_after_handshake_leaves_no_live_connection(
        onpath_mesh: OnPathMesh, tmp_path: Path, sidecar: Callable[..., SidecarProcess],
        leak_check: LeakCheck) -> None:
    mesh = onpath_mesh
    port, outbound = free_ports(2)
    server = _s_server(tmp_path, mesh, port)
    try:
        wait_until(lambda: server.poll() is not None or _listening(port), 10,
                   "openssl s_server to listen")
        assert server.poll() is None, server.stdout.read() if server.stdout else ""
        fe = sidecar(mesh.cas, "shop", "frontend", outbound=[
            f"{LOOPBACK}:{outbound}=backend@{LOOPBACK}:{port}"])
        # Baseline once ready: every connection of this route ends in the alert.
        for p in (mesh.cas, fe):
            leak_check.watch(p)
        with connect(outbound) as s:
            s.sendall(b"hello\n")
            s.settimeout(10)
            assert how_it_ends(s) == "reset"
        wait_until(lambda: status(fe)["connections"] == 0
                   and metric(fe, "meshshield_sidecar_active_connections") == 0, 10,
                   "the frontend to hold no live connection")
        wait_until(lambda: metric(fe, CLOSED, direction="outbound", reason="tls_error") == 1,
                   10, "the TLS error to be counted")
        lines = _ended_lines(fe)
        assert len(lines) == 1, lines
        assert "backend" in lines[0] and "tls_error" in lines[0], lines
        no_traceback(fe)
        leak_check.verify()
    finally:
        server.kill()
        server.wait(5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def test_forged_record_after_handshake_leaves_no_live_connection(
        onpath_mesh: OnPathMesh, leak_check: LeakCheck) -> None:
    """An on-path host injects an application-data record of garbage towards the
    backend's sidecar, which cannot authenticate it and ends the connection."""
    mesh = onpath_mesh
    mesh.watch(leak_check)
    assert mesh.onpath is not None
    counted = metric(mesh.backend, CLOSED, direction="inbound", reason="tls_error")
    lines = len(_ended_lines(mesh.backend))
    with mesh.connect() as s:
        mesh.onpath.inject("server", b"\x17\x03\x03\x00\x40" + os.urandom(64))
        s.settimeout(10)
        assert how_it_ends(s) == "reset"
    mesh.no_live_connections()
    wait_until(lambda: metric(mesh.backend, CLOSED, direction="inbound",
                              reason="tls_error") == counted + 1,
               10, "the forged record to be counted")
    new = _ended_lines(mesh.backend)[lines:]
    assert len(new) == 1 and "tls_error" in new[0] and "frontend" in new[0], new
    no_traceback(mesh.backend, mesh.frontend)
