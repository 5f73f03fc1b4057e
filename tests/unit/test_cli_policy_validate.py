"""`meshshield policy validate`: the SPEC §3 example passes; each malformed policy fails
with its `FILE:LINE: PATH: MESSAGE` line and exit code 1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshshield.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "policies"
INVALID = sorted((FIXTURES / "invalid").glob("*.policy.yaml"))
EXPECT = re.compile(r"^# expect: (\d+): (\S+): (.+)$", re.M)


def _expectations(path: Path) -> list[tuple[int, str, str]]:
    return [(int(n), p, m) for n, p, m in EXPECT.findall(path.read_text())]


def test_there_are_at_least_twenty_distinct_malformed_policies() -> None:
    with_expectations = [p for p in INVALID if _expectations(p)]
    assert len(with_expectations) >= 20
    names = {p.name for p in with_expectations}
    for must in ("sim", "host-data", "tdx", "dns"):
        assert any(must in n for n in names), f"no fixture about {must}"


def test_valid_example_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "validate", str(FIXTURES / "shop.policy.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_policy_reports_line_and_path(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _expectations(path)
    if not expected:
        pytest.fail(f"{path.name} has no '# expect:' line")
    # the fixtures are written for a CAS that serves cas.mesh.example
    assert main(["policy", "validate", str(path), "--cas-dns", "cas.mesh.example"]) == 1
    err = capsys.readouterr().err.splitlines()
    for line, field, message in expected:
        prefix = f"{path}:{line}: {field}: "
        hits = [e for e in err if e.startswith(prefix)]
        assert hits, f"expected a line starting {prefix!r}, got:\n" + "\n".join(err)
        assert any(message.strip() in h for h in hits), (message, hits)


def test_real_command_in_a_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "shop.policy.yaml"
    text = (FIXTURES / "shop.policy.yaml").read_text()
    text = text.replace('version: "1"', "version: 1\nflavour: mild")
    bad.write_text(text)
    vline = text.splitlines().index("version: 1") + 1
    r = subprocess.run([sys.executable, "-m", "meshshield.cli", "policy", "validate", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert any(x.startswith(f"{bad}:{vline}: version: ") for x in lines), lines
    assert any(x.startswith(f"{bad}:{vline + 1}: flavour: ") for x in lines), lines
    assert "Traceback" not in r.stderr
    ok = subprocess.run([sys.executable, "-m", "meshshield.cli", "policy", "validate",
                         str(FIXTURES / "shop.policy.yaml")], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_dns_under_a_cas_name_given_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (FIXTURES / "shop.policy.yaml").read_text()
    assert "dns:" in text
    p = tmp_path / "p.yaml"
    p.write_text(re.sub(r"dns: \[[^\]]*\]", "dns: [api.cas.mesh.example]", text, count=1))
    assert main(["policy", "validate", str(p), "--cas-dns", "cas.mesh.example"]) == 1
    assert "cas.mesh.example" in capsys.readouterr().err
    assert main(["policy", "validate", str(p)]) == 0


def test_usage_error_exits_two() -> None:
    with pytest.raises(SystemExit) as e:
        main(["policy", "validate"])
    assert e.value.code == 2
