"""The CAS stays available to legitimate clients while strangers hold connections open
(issue 9, item 13).

On the old code the CAS had no connection cap and no handshake, header, body or idle
timeouts: idle TLS connections cost memory without bound, and once idle TCP
connections used up its file descriptors, legitimate requests failed. Here the CAS runs
with a small descriptor limit (inherited from this process), so a flood of a couple of
thousand connections is enough to show the difference.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from typing import TYPE_CHECKING

import pytest
from faultlib import address, many_fds, open_fds, rss_kib
from harness import CasProcess
from meshpeers import wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck

CAS_FD_LIMIT = 1024
IDLE_TLS = 300
IDLE_TCP = 1500
LEGITIMATE = 20


def legitimate_requests(cas: CasProcess, n: int) -> int:
    served = 0
    for i in range(n):
        with contextlib.suppress(OSError):
            if i % 2:
                ok = cas.get("/v1/health", timeout=5).status == 200
            else:
                ok = cas.post_json("/v1/attest/nonce", {}, timeout=5).status == 200
            served += ok
    return served


@pytest.mark.cas_fd_limit(CAS_FD_LIMIT)
def test_cas_serves_legitimate_requests_while_flooded_with_idle_connections(
    fault_cas: CasProcess, leak_check: LeakCheck,
) -> None:
    cas = fault_cas
    assert legitimate_requests(cas, 2) == 2  # warm-up
    leak_check.watch(cas)
    assert cas.proc is not None
    pid = cas.proc.pid
    host, port = address(cas)
    ctx = ssl.create_default_context(cafile=str(cas.bundle))
    held: list[socket.socket] = []
    with many_fds():
        try:
            # Strangers who finish the TLS handshake, then never send a request...
            for _ in range(IDLE_TLS):
                with contextlib.suppress(OSError):
                    raw = socket.create_connection((host, port), timeout=5)
                    held.append(raw)
                    held[-1] = ctx.wrap_socket(raw, server_hostname=host)
            # ...and strangers who never even start one.
            for _ in range(IDLE_TCP):
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection((host, port), timeout=5))
            wait_until(lambda: open_fds(pid) > 200, 10, "the CAS to accept the flood")
            served = legitimate_requests(cas, LEGITIMATE)
            fds, rss = open_fds(pid), rss_kib(pid)
        finally:
            for s in held:
                s.close()
    assert served == LEGITIMATE, (
        f"{served} of {LEGITIMATE} legitimate requests served while {len(held)} idle "
        f"connections were held (CAS: {fds} open descriptors, RSS {rss // 1024} MiB)"
    )
    assert fds < CAS_FD_LIMIT
    assert "Traceback" not in cas.stderr()
    # Once the strangers are gone, the CAS is back to a handful of descriptors.
    wait_until(lambda: open_fds(pid) < 100, 30, "the CAS to drop the closed connections")
    assert legitimate_requests(cas, 4) == 4


@pytest.mark.cas_args("--handshake-timeout", "1s", "--header-timeout", "1s",
                      "--body-timeout", "1s", "--idle-timeout", "1s")
def test_cas_closes_connections_that_stall(fault_cas: CasProcess,
                                           leak_check: LeakCheck) -> None:
    """Each phase of a connection has its deadline: handshake, headers, body, idle."""
    cas = fault_cas
    assert legitimate_requests(cas, 2) == 2  # warm-up
    leak_check.watch(cas)
    host, port = address(cas)
    ctx = ssl.create_default_context(cafile=str(cas.bundle))

    def closed_within(s: socket.socket | ssl.SSLSocket, seconds: float) -> float:
        started = time.monotonic()
        s.settimeout(seconds)
        try:
            while s.recv(4096):
                pass
        except (ConnectionError, ssl.SSLError):
            pass
        except TimeoutError:
            raise AssertionError(f"still open after {seconds} s") from None
        return time.monotonic() - started

    stalls: dict[str, socket.socket | ssl.SSLSocket] = {}
    # No TLS handshake at all.
    stalls["handshake"] = socket.create_connection((host, port), timeout=5)
    # Handshake done, request headers never finished.
    tls = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
    tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
    stalls["headers"] = tls
    # Headers done, body never finished.
    tls = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
    tls.sendall(b"POST /v1/attest/nonce HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                b"\r\n{")
    stalls["body"] = tls
    # One request answered, then the connection kept idle.
    tls = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
    tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert tls.recv(4096).startswith(b"HTTP/1.1 200")
    stalls["idle"] = tls
    for phase, s in stalls.items():
        took = closed_within(s, 10)
        assert took < 5, f"{phase}: closed only after {took:.1f} s"
        s.close()
    assert cas.get("/v1/health").status == 200
    assert "Traceback" not in cas.stderr()
