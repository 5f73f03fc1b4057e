"""Every sidecar connection is bounded: by its peer certificate's not_after (both sides
close it then, even with the CAS gone and traffic flowing), by `--idle-timeout` and by
`--max-connection-lifetime` (flags, or the same keys in `--config`). Each close is
logged, counted by reason and listed in /connections?refused=1."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from faultlib import metric, warm_up
from harness import CasProcess, SidecarProcess
from meshpeers import DATAPLANES, Mesh, connect, roundtrip, wait_refusal, wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


class Chatter:
    """Keeps a connection busy (a round trip every `every` s) until it is cut; notes
    when. Bounded: it gives up after `limit` s."""

    def __init__(self, s: socket.socket, every: float = 0.25, limit: float = 30.0) -> None:
        self.cut_at: float | None = None
        self.stop = threading.Event()
        s.settimeout(5)

        def run() -> None:
            deadline = time.monotonic() + limit
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    if roundtrip(s, b"ping\n") != b"ping\n":
                        break
                except (OSError, ConnectionError):
                    self.cut_at = time.time()
                    return
                self.stop.wait(every)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, timeout: float) -> float | None:
        self.thread.join(timeout)
        return self.cut_at


def _cut_at(s: socket.socket, timeout: float) -> float | None:
    """Wall time the quiet connection `s` was cut, or None if it was not within timeout."""
    s.settimeout(timeout)
    try:
        if s.recv(1) == b"":
            return time.time()
    except (ConnectionResetError, BrokenPipeError):
        return time.time()
    except TimeoutError:
        return None
    return None


def _metric(sc: SidecarProcess, direction: str, reason: str) -> float:
    return metric(sc, "meshshield_sidecar_connections_closed_total", direction=direction,
                  reason=reason)


@pytest.mark.cas_args("--max-cert-ttl", "10s")
def test_connection_closed_at_peer_certificate_expiry(
        fault_cas: CasProcess, shop_mesh: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    cas = fault_cas
    m = shop_mesh()
    warm_up(m.outbound["echo"])
    # The CAS is not watched: it is killed on purpose below.
    for sc in (m.backend, m.frontend):
        leak_check.watch(sc)
    with connect(m.outbound["echo"]) as s:
        assert roundtrip(s, b"hello\n") == b"hello\n"
        expiry = min(
            datetime.fromisoformat(
                sc.get("/connections").json()["connections"][0]["cert_not_after"]
            ).timestamp()
            for sc in (m.backend, m.frontend))
        # The CAS goes away: no event will tell the sidecars anything any more.
        assert cas.stop(signal.SIGKILL) == -signal.SIGKILL
        chat = Chatter(s)
        cut = chat.wait(timeout=expiry - time.time() + 5)
        chat.stop.set()
    assert cut is not None, "the connection outlived its peer's certificate"
    print(f"cut {cut - expiry:+.2f} s from the earlier peer certificate's not_after")
    assert expiry - 1.0 <= cut <= expiry + 2.5
    closed = [sc for sc in (m.backend, m.frontend)
              if _metric(sc, "inbound" if sc is m.backend else "outbound",
                         "certificate_expired") == 1]
    assert closed, "no side counted a certificate_expired close"
    r = wait_refusal(closed[0], "certificate_expired")
    assert "expired" in r["message"] and r["peer_spiffe_id"], r


def test_idle_timeout_closes_quiet_connection(
        fault_cas: CasProcess, shop_mesh: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    m = shop_mesh(backend_extra=("--idle-timeout", "1s"))
    warm_up(m.outbound["echo"])  # lazy state is not a leak
    wait_until(lambda: not m.backend.get("/connections").json()["connections"], 5,
               "the warm-up connection to end")
    for p in (fault_cas, m.backend, m.frontend):
        leak_check.watch(p)
    with connect(m.outbound["echo"]) as quiet, connect(m.outbound["echo"]) as busy:
        assert roundtrip(quiet, b"then silence\n") == b"then silence\n"
        last = time.time()
        chat = Chatter(busy, every=0.2, limit=3.0)
        cut = _cut_at(quiet, 5)
        assert cut is not None, "the quiet connection was not closed"
        assert 0.9 <= cut - last <= 2.5, f"closed {cut - last:.2f} s after the last byte"
        assert chat.wait(timeout=10) is None, "the busy connection was closed"
        assert roundtrip(busy, b"still open\n") == b"still open\n"
        last = time.time()
        cut = _cut_at(busy, 5)
        assert cut is not None and cut - last <= 2.5
    r = wait_refusal(m.backend, "idle_timeout")
    assert "1 s" in r["message"] and r["peer_spiffe_id"].endswith("/shop/frontend"), r
    assert _metric(m.backend, "inbound", "idle_timeout") == 2
    leak_check.verify()  # timers and closed connections leave nothing behind


def test_max_connection_lifetime_closes_busy_connection(
        fault_cas: CasProcess, shop_mesh: Callable[..., Mesh], tmp_path: Path,
        leak_check: LeakCheck) -> None:
    config = tmp_path / "frontend.yaml"
    config.write_text("max-connection-lifetime: 2s\n")
    m = shop_mesh(frontend_extra=("--config", str(config)))
    warm_up(m.outbound["echo"])
    for p in (fault_cas, m.backend, m.frontend):
        leak_check.watch(p)
    with connect(m.outbound["echo"]) as s:
        opened = time.time()
        chat = Chatter(s, every=0.1)
        cut = chat.wait(timeout=10)
        chat.stop.set()
    assert cut is not None, "the connection outlived --max-connection-lifetime"
    assert 1.8 <= cut - opened <= 4.0, f"closed after {cut - opened:.2f} s"
    r = wait_refusal(m.frontend, "max_connection_lifetime")
    assert "2 s" in r["message"], r
    assert _metric(m.frontend, "outbound", "max_connection_lifetime") == 1
    with connect(m.outbound["echo"]) as s:  # a new connection starts a new lifetime
        assert roundtrip(s, b"again\n") == b"again\n"
