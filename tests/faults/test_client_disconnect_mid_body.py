"""A client that hangs up half-way through its request body (issue 9, item 15).

Anyone may open a connection to the CAS, announce a body and leave before sending it.
That is the client's doing, not the server's: the CAS must not log a traceback for it
(1.1 kB of log per unauthenticated client on the old code) nor count it as a 500.
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING

from faultlib import address, metric
from harness import CasProcess
from meshpeers import wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck

CLIENTS = 5


def _hang_up_mid_body(cas: CasProcess, path: str) -> None:
    host, port = address(cas)
    ctx = ssl.create_default_context(cafile=str(cas.bundle))
    with socket.create_connection((host, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 4096\r\n\r\n{\"session\": \"sh".encode()
        )


def _counted(cas: CasProcess, route: str, status: str) -> float:
    labels = {"route": route, **({"status": status} if status else {})}
    return metric(cas, "meshshield_cas_requests_total", **labels)


def test_client_disconnect_mid_body_is_not_a_500(fault_cas: CasProcess,
                                                 leak_check: LeakCheck) -> None:
    cas = fault_cas
    assert cas.get("/v1/health").status == 200  # warm-up (a route not counted below)
    leak_check.watch(cas)
    log_before = len(cas.stderr())
    for path in ("/v1/attest", "/v1/attest/nonce", "/v1/sessions"):
        for _ in range(CLIENTS):
            _hang_up_mid_body(cas, path)
    # Every abandoned request is accounted for once the CAS noticed the hang-ups.
    wait_until(
        lambda: all(_counted(cas, p, "") >= CLIENTS
                    for p in ("/v1/attest", "/v1/attest/nonce", "/v1/sessions")),
        15, "the CAS to count the abandoned requests",
    )
    for path in ("/v1/attest", "/v1/attest/nonce", "/v1/sessions"):
        assert _counted(cas, path, "500") == 0, cas.get("/metrics").body.decode()
        assert _counted(cas, path, "client_closed") == CLIENTS
    log = cas.stderr()[log_before:]
    assert "Traceback" not in log, log
    # At most one short line per abandoned request.
    assert len(log) <= 3 * CLIENTS * 200, log
    # And the CAS still serves.
    assert cas.get("/v1/health").status == 200
