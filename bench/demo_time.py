"""Time from starting `meshshield demo` to its first successful request through the mesh.

Runs the demo as a fresh process (interpreter start-up included) several times and
prints the median; target: <= 3 s on the reference 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET = 3.0


def one_run() -> tuple[float, float, int]:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "meshshield.cli", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = float("nan")
    assert proc.stdout is not None
    for line in proc.stdout:
        if "web got 200" in line and first != first:
            first = time.monotonic() - started
    rc = proc.wait(120)
    return first, time.monotonic() - started, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rows = [one_run() for _ in range(max(1, min(args.runs, 20)))]
    print(f"{'run':>4} {'first request s':>16} {'whole demo s':>13} {'exit':>5}")
    for i, (first, total, rc) in enumerate(rows, 1):
        print(f"{i:>4} {first:>16.2f} {total:>13.2f} {rc:>5}")
    med = statistics.median(r[0] for r in rows)
    print(f"median time to first request through the mesh: {med:.2f} s "
          f"(target <= {TARGET:.0f} s: {'met' if med <= TARGET else 'NOT met'})")
    return 0 if all(r[2] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
