"""Churn: many short connections through a sidecar pair leave no descriptor or asyncio
task behind in the sidecars or the CAS (ghostunnel's churn test)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from harness import CasProcess
from meshpeers import DATAPLANES, Mesh, connect, roundtrip

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)

CONNECTIONS = 300
CLIENTS = 6


def _burst(port: int, n: int, errors: list[str], abrupt: bool) -> None:
    for i in range(n):
        try:
            with connect(port) as s:
                msg = f"churn {i}\n".encode()
                assert roundtrip(s, msg) == msg
                if abrupt and i % 3 == 0:  # some clients reset instead of closing
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except (OSError, AssertionError) as e:
            errors.append(f"{type(e).__name__}: {e}")


def test_many_short_connections_return_fds_and_tasks_to_baseline(
        fault_cas: CasProcess, shop_mesh: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    m = shop_mesh()
    port = m.outbound["echo"]
    with connect(port) as s:  # warm-up: TLS contexts, pools and caches are built now
        assert roundtrip(s, b"warm\n") == b"warm\n"
    for p in (fault_cas, m.backend, m.frontend):
        leak_check.watch(p)

    errors: list[str] = []
    per = CONNECTIONS // CLIENTS
    threads = [threading.Thread(target=_burst, args=(port, per, errors, k % 2 == 1))
               for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    # still serving after the churn
    with connect(port) as s:
        assert roundtrip(s, b"after\n") == b"after\n"
    leak_check.verify()
