"""A change made while the CAS is writing a snapshot to a subscriber (its write waiting
for the subscriber to read) reaches that subscriber within 1 s of the write finishing,
never only with the 15 s heartbeat.

A raw TLS subscriber stops reading; mesh-wide measurement revocations grow every
snapshot until the CAS's write to it blocks; more changes follow; then it reads again.

The CAS runs on the standard asyncio loop here: under uvloop a TLS write to a subscriber
that does not read never waits (the transport buffers without bound), which hides the
race but is a memory bound of its own.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from attested_peer import attested_peer
from harness import CasProcess
from meshpeers import LOOPBACK, apply

if TYPE_CHECKING:
    from conftest import LeakCheck


@pytest.fixture(autouse=True)
def standard_asyncio_loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """uvloop's TLS transport buffers without limit instead of making the write wait (see
    the module docstring), so the CAS runs on the standard loop here (autouse: set
    before fault_cas starts it)."""
    monkeypatch.setenv("MESHSHIELD_EVENT_LOOP", "asyncio")
    yield


def _tx_queue(local_port: int, remote_port: int) -> int:
    """Bytes queued for sending on the loopback socket local_port -> remote_port."""
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = row.split()
        if f[1].endswith(f":{local_port:04X}") and f[2].endswith(f":{remote_port:04X}"):
            return int(f[4].split(":")[0], 16)
    return 0


def _revoke_measurement(cas: CasProcess) -> int:
    r = cas.request("POST", "/v1/sessions/shop/revocations",
                    json.dumps({"measurement": secrets.token_hex(48), "mesh_wide": True}
                               ).encode(), admin=True)
    assert r.status == 201, r.body
    return int(r.json()["epoch"])


def test_a_change_during_a_blocked_snapshot_write_arrives_within_1s(
        fault_cas: CasProcess, leak_check: LeakCheck) -> None:
    cas = fault_cas
    apply(cas, cas.sim_policy("shop"))
    peer = attested_peer(cas, "shop", "backend")  # also the CAS's warm-up
    leak_check.watch(cas)
    cas_port = int(cas.url.rsplit(":", 1)[1])
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect((LOOPBACK, cas_port))
    my_port = raw.getsockname()[1]
    with cas.ssl_context(peer.cert, peer.key).wrap_socket(raw, server_hostname=LOOPBACK) as s:
        s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        while b"event: trust" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        # Stop reading. Each change writes a snapshot ~100 bytes larger than the
        # last; once the kernel's buffers are full the CAS's write waits for us.
        # The kernel's buffers are full when its send queue stops growing.
        epoch, changes, stalled, queued = 0, 0, 0, 0
        while changes < 2000 and stalled < 5:
            epoch = _revoke_measurement(cas)
            changes += 1
            now_queued = _tx_queue(cas_port, my_port)
            stalled = stalled + 1 if now_queued <= queued and queued > 500_000 else 0
            queued = max(queued, now_queued)
        assert stalled >= 5, f"the CAS's writes never blocked ({queued} bytes queued)"
        for _ in range(20):  # changes while the write is blocked
            epoch = _revoke_measurement(cas)
        # Read again; note when each event's id line arrives. The final change must
        # follow the event whose write was blocked, not wait for a heartbeat.
        started = time.monotonic()
        seen: list[tuple[int, float]] = []
        pending = b""
        s.settimeout(20)
        while not seen or seen[-1][0] != epoch:
            block = s.recv(1 << 20)
            assert block, "the CAS closed the stream"
            now = time.monotonic()
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            seen += [(int(x[4:]), now) for x in lines if x.startswith(b"id: ")]
            assert now - started < 20, seen[-3:]
    assert len(seen) >= 2, seen
    gap = seen[-1][1] - seen[-2][1]
    print(f"{changes + 20} changes; after reading resumed {len(seen)} events arrived, "
          f"the last change {seen[-1][1] - started:.2f} s after resuming and "
          f"{gap:.3f} s after the event before it")
    assert gap < 1.0, seen[-3:]
