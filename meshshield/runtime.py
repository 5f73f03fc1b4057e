"""Process runtime counters for leak checks: open descriptors and asyncio tasks.

The sidecar shows them in `GET /status` (`runtime: {tasks, fds}`); the CAS and the
sidecar export them as gauges (`meshshield_cas_tasks`, `meshshield_sidecar_tasks`,
`..._open_fds`). The fault-injection tests compare them against a baseline.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry


def runtime_counts() -> dict[str, int | None]:
    """`tasks`: asyncio tasks of the running loop (None outside one); `fds`: open
    descriptors of this process (None where /proc is missing)."""
    try:
        tasks: int | None = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = None
    try:
        fds: int | None = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    return {"tasks": tasks, "fds": fds}


class _RuntimeCollector(Collector):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        counts = runtime_counts()
        for key, name, doc in (("tasks", "tasks", "asyncio tasks on the event loop"),
                               ("fds", "open_fds", "Open file descriptors")):
            value = counts[key]
            if value is not None:
                fam = GaugeMetricFamily(f"{self.prefix}_{name}", doc)
                fam.add_metric([], value)
                yield fam


def register_runtime_gauges(registry: CollectorRegistry, prefix: str) -> None:
    """Add `<prefix>_tasks` and `<prefix>_open_fds` gauges, read at scrape time."""
    registry.register(_RuntimeCollector(prefix))
