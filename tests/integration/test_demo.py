"""`meshshield demo` (what `make demo` runs) as a newcomer runs it."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path


def test_demo_runs_every_step_and_cleans_up() -> None:
    before = set(Path(tempfile.gettempdir()).glob("meshshield-demo-*"))
    r = subprocess.run([sys.executable, "-m", "meshshield.cli", "demo"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "SIMULATED" in out
    assert "spiffe://meshshield.local/demo/orders-api" in out
    assert "spiffe://meshshield.local/demo/web" in out
    assert "web got 200" in out and '"item": "scones"' in out
    assert "TLSv1.3" in out  # the live connection, from the sidecar's admin API
    assert "refused by the CAS: measurement_not_allowed" in out
    assert "refused the CAS: measurement_not_allowed" in out  # a sidecar doubting its CAS
    assert "expected " in out and "found " in out and "what to do:" in out
    assert "Demo complete" in out
    after = set(Path(tempfile.gettempdir()).glob("meshshield-demo-*"))
    assert after <= before, f"left behind: {after - before}"
    first = re.search(r"first request through the mesh after ([0-9.]+) s", out)
    assert first is not None
    leftover = subprocess.run(["pgrep", "-f", "meshshield-demo-"], capture_output=True)
    assert leftover.returncode == 1, leftover.stdout
