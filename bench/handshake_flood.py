"""A flood of TLS handshakes that never finish, from one address, against a sidecar
with its default budgets: legitimate inbound and outbound calls served meanwhile, and
the sidecar's RSS.

    python bench/handshake_flood.py [--flood 4100] [--calls 50]

The flooder opens `--flood` connections from 127.0.0.2 to the sidecar's inbound
listener, each sending half a ClientHello, and holds them; meanwhile `--calls` app
calls reach the sidecar as inbound connections (from another sidecar on 127.0.0.1) and
as many leave it as outbound ones. To measure another checkout of meshshield, put it
first on PYTHONPATH (the sidecars inherit it).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for sub in ("tests", "tests/e2e", "tests/faults"):
    sys.path.insert(0, str(HERE.parent / sub))

from flood import FloodMesh, handshake_flood, rss_kib  # noqa: E402
from harness import CasProcess  # noqa: E402
from meshpeers import echo_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--flood", type=int, default=4100)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    flood, calls = max(1, min(args.flood, 8000)), max(1, min(args.calls, 500))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * flood + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    import meshshield

    print(f"meshshield from {Path(meshshield.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp, echo_server() as app_port:
        cas = CasProcess.start(Path(tmp) / "mesh")
        mesh: FloodMesh | None = None
        try:
            mesh = FloodMesh.start(cas, app_port)
            pid = mesh.target.proc.pid
            rss_idle = rss_kib(pid)
            started = time.monotonic()
            with handshake_flood(mesh.target_inbound, ["127.0.0.2"], flood):
                opened = time.monotonic() - started
                inbound, outbound = mesh.served(calls, "during the flood")
                rss_flood = rss_kib(pid)
                took = time.monotonic() - started
            print(f"flood: {flood} never-finishing handshakes from 127.0.0.2, opened in "
                  f"{opened:.1f} s; calls made {took - opened:.1f} s after")
            print(f"legitimate inbound calls served during the flood:  {inbound}/{calls}")
            print(f"legitimate outbound calls served during the flood: {outbound}/{calls}")
            print(f"sidecar RSS: {rss_idle / 1024:.0f} MiB idle, {rss_flood / 1024:.0f} MiB "
                  "during the flood")
        finally:
            if mesh is not None:
                mesh.stop()
            cas.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
