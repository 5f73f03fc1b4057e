"""The webhook and the sidecar admin API: bounded like the CAS (issue 9, item 13).

Both are reachable by more than their intended clients (the webhook by anything in the
cluster, the admin API by anything on the host), and on the old code both kept every
connection that anyone opened until their file descriptors ran out, and logged a full
traceback for each malformed request. Each runs here with a small descriptor limit
inherited from this process, so a flood of 1,500 idle connections shows it.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from faultlib import many_fds, soft_fd_limit
from harness import CasProcess, SidecarProcess
from meshpeers import LOOPBACK, free_ports, wait_until

from meshshield.kube.cli_support import run_webhook_certs

if TYPE_CHECKING:
    from conftest import LeakCheck

FD_LIMIT = 1024
IDLE = 1500
MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"\x16\x03\x01\x00\xa5garbage that is not HTTP\r\n\r\n",
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /mutate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


@contextlib.contextmanager
def idle_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    """n connections that never send a byte (this process's soft limit raised for them)."""
    held: list[socket.socket] = []
    with many_fds():
        try:
            for _ in range(n):
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection((LOOPBACK, port), timeout=5))
            yield held
        finally:
            for s in held:
                s.close()


def send_raw(port: int, data: bytes, ctx: ssl.SSLContext | None = None) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        s: socket.socket = ctx.wrap_socket(raw, server_hostname=HOST) if ctx else raw
        s.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                out += chunk
        return out


# -- the webhook ---------------------------------------------------------------------------

HOST = "meshshield-webhook.meshshield.svc"


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, ssl.SSLContext]]:
    certs = tmp_path / "certs"
    assert run_webhook_certs("meshshield-webhook", "meshshield", str(certs),
                             stdout=io.StringIO(), stderr=io.StringIO()) == 0
    (port,) = free_ports(1)
    code = (
        "import sys\nfrom meshshield.kube.cli_support import run_webhook\n"
        f"sys.exit(run_webhook('{LOOPBACK}:{port}', {str(certs / 'tls.crt')!r}, "
        f"{str(certs / 'tls.key')!r}))\n"
    )
    err = (tmp_path / "webhook.stderr").open("wb")
    with soft_fd_limit(FD_LIMIT):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                stderr=err)
    err.close()
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    try:
        wait_until(lambda: healthz(port, ctx) == 200, 30, "the webhook to answer /healthz")
        yield proc, port, ctx
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def healthz(port: int, ctx: ssl.SSLContext) -> int:
    try:
        conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=5, context=ctx)
        ctx.check_hostname = False
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except OSError:
        return 0


def test_webhook_serves_while_flooded_and_logs_malformed_http_in_one_line(
    webhook: tuple[subprocess.Popen[bytes], int, ssl.SSLContext], tmp_path: Path,
    leak_check: LeakCheck,
) -> None:
    proc, port, ctx = webhook
    assert healthz(port, ctx) == 200  # warm-up
    leak_check.watch(proc, name="webhook")  # descriptors only: it reports no tasks
    for data in MALFORMED:
        answer = send_raw(port, data, ctx)
        assert re.match(rb"HTTP/1\.[01] 4", answer), answer[:200]
    with idle_connections(port, IDLE) as held:
        served = sum(healthz(port, ctx) == 200 for _ in range(10))
    assert served == 10, f"{served} of 10 health checks served with {len(held)} idle held"
    leak_check.verify()
    proc.terminate()
    proc.wait(timeout=15)
    log = (tmp_path / "webhook.stderr").read_text()
    assert "Traceback" not in log, log[-3000:]


# -- the sidecar admin API -----------------------------------------------------------------


@pytest.fixture
def lone_sidecar(fault_cas: CasProcess, sidecar: Callable[..., SidecarProcess]) -> SidecarProcess:
    """A backend sidecar of session shop, started with FD_LIMIT descriptors."""
    r = fault_cas.apply_policy(fault_cas.sim_policy("shop"))
    assert r.returncode == 0, r.stderr
    listen, app = free_ports(2)
    with soft_fd_limit(FD_LIMIT):
        return sidecar(fault_cas, "shop", "backend",
                       inbound=[f"{LOOPBACK}:{listen}={LOOPBACK}:{app}"])


def test_admin_api_serves_while_flooded_and_logs_malformed_http_in_one_line(
    lone_sidecar: SidecarProcess, leak_check: LeakCheck,
) -> None:
    sidecar = lone_sidecar
    port = int(urlsplit(sidecar.admin).port or 0)
    assert sidecar.get("/status").status == 200  # warm-up
    leak_check.watch(sidecar)
    for data in MALFORMED:
        answer = send_raw(port, data)
        assert re.match(rb"HTTP/1\.[01] 4", answer), answer[:200]
    with idle_connections(port, IDLE) as held:
        started = time.monotonic()
        served = 0
        for _ in range(10):
            with contextlib.suppress(OSError):
                served += sidecar.get("/status").status == 200
        took = time.monotonic() - started
    assert served == 10, f"{served} of 10 /status calls served with {len(held)} idle held"
    assert took < 30
    log = sidecar.log()
    assert "Traceback" not in log, log[-3000:]
