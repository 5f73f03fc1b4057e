"""Every sidecar connection is bounded: by its peer certificate's not_after (both sides
close it then, even with the CAS gone and traffic flowing), by `--idle-timeout` and by
`--max-connection-lifetime` (flags, or the same keys in `--config`). Each close is
logged, counted by reason and listed in /connections?refused=1."""

from __future__ import annotations

import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import CasProcess, SidecarProcess
from meshpeers import (
    Mesh,
    apply,
    connect,
    no_traceback,
    roundtrip,
    start_mesh,
    wait_refusal,
    wait_until,
)


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
    text = sc.get("/metrics").body.decode()
    want = (f'meshshield_sidecar_connections_closed_total{{direction="{direction}",'
            f'reason="{reason}"}}')
    for line in text.splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return 0.0


def test_connection_closed_at_peer_certificate_expiry(tmp_path: Path, echo_port: int) -> None:
    cas = CasProcess.start(tmp_path / "mesh", "--max-cert-ttl", "10s")
    m: Mesh | None = None
    try:
        apply(cas, cas.sim_policy("shop"))
        m = start_mesh(cas, "shop", {"echo": echo_port})
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
        no_traceback(m.backend, m.frontend)
    finally:
        if m is not None:
            m.stop()
        cas.stop()


def test_idle_timeout_closes_quiet_connection(tmp_path: Path, echo_port: int,
                                              leak_check: Any) -> None:
    cas = CasProcess.start(tmp_path / "mesh")
    m: Mesh | None = None
    try:
        apply(cas, cas.sim_policy("shop"))
        m = start_mesh(cas, "shop", {"echo": echo_port}, backend_extra=("--idle-timeout", "1s"))
        with connect(m.outbound["echo"]) as s:  # warm-up: lazy state is not a leak
            assert roundtrip(s, b"warm\n") == b"warm\n"
        wait_until(lambda: not m.backend.get("/connections").json()["connections"], 5,  # type: ignore[union-attr]
                   "the warm-up connection to end")
        for sc in (m.backend, m.frontend):
            leak_check.watch(sc)
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
        no_traceback(m.backend, m.frontend)
        leak_check.verify()  # timers and closed connections leave nothing behind
    finally:
        if m is not None:
            m.stop()
        cas.stop()


def test_max_connection_lifetime_closes_busy_connection(tmp_path: Path,
                                                        echo_port: int) -> None:
    cas = CasProcess.start(tmp_path / "mesh")
    m: Mesh | None = None
    config = tmp_path / "frontend.yaml"
    config.write_text("max-connection-lifetime: 2s\n")
    try:
        apply(cas, cas.sim_policy("shop"))
        m = start_mesh(cas, "shop", {"echo": echo_port},
                       frontend_extra=("--config", str(config)))
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
        no_traceback(m.backend, m.frontend)
    finally:
        if m is not None:
            m.stop()
        cas.stop()
