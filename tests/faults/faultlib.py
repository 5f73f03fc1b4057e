"""Small helpers the fault scenarios share: descriptor limits, readings from /proc, the
CAS's address, and a process's metrics."""

from __future__ import annotations

import contextlib
import re
import resource
from collections.abc import Iterator
from pathlib import Path

from harness import CasProcess, SidecarProcess
from meshpeers import connect, roundtrip


@contextlib.contextmanager
def soft_fd_limit(n: int) -> Iterator[None]:
    """Processes started inside inherit a soft descriptor limit of `n` (at most the hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def many_fds() -> Iterator[None]:
    """This test process opens thousands of sockets: its soft limit raised to the hard."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with soft_fd_limit(hard):
        yield


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def address(cas: CasProcess) -> tuple[str, int]:
    """The CAS's (host, port)."""
    host, port = cas.url.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


def metric(proc: CasProcess | SidecarProcess, name: str, *, required: bool = False,
           **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`: 0 when there is none,
    unless `required` (then a missing metric fails)."""
    text = proc.get("/metrics").body.decode()
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
            found = True
    assert found or not required, f"{name} {labels or ''} missing from /metrics"
    return total


def warm_up(port: int) -> None:
    """One connection through a mesh route to an echo app: TLS contexts, pools and
    caches are built now, before a leak check's baseline."""
    with connect(port) as s:
        assert roundtrip(s, b"warm-up\n") == b"warm-up\n"
