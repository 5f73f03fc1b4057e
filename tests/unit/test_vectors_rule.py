"""The real vectors are never skipped silently: with MESHSHIELD_VECTORS set or in CI a
missing vectors folder or vector file fails the test (tests/vectors.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

TINY = """
from vectors import vector, vectors_dir

def test_needs_the_folder():
    vectors_dir()

def test_needs_a_file():
    vector("no-such-source/no-such-file.bin")
"""


def _run(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_tiny.py").write_text(TINY)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MESHSHIELD_VECTORS")}
    env.update(env_extra, PYTHONPATH=str(TESTS))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_tiny.py")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )


def test_a_missing_vectors_folder_named_by_the_variable_fails_not_skips(
        tmp_path: Path) -> None:
    r = _run(tmp_path, {"MESHSHIELD_VECTORS": "/nonexistent"})
    assert r.returncode == 1, r.stdout + r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert "2 failed" in summary and "skipped" not in summary, r.stdout
    assert "/nonexistent" in r.stdout and "required, not skipped" in r.stdout, r.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_a_missing_vectors_folder_fails(tmp_path: Path, ci: str) -> None:
    # MESHSHIELD_VECTORS names a folder without PROVENANCE.md; CI alone would fail too
    r = _run(tmp_path, {"CI": ci, "MESHSHIELD_VECTORS": str(tmp_path / "empty")})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 failed" in r.stdout, r.stdout


def test_a_missing_vector_file_fails_when_the_vectors_are_required(tmp_path: Path) -> None:
    folder = tmp_path / "vectors"
    folder.mkdir()
    (folder / "PROVENANCE.md").write_text("test folder\n")
    r = _run(tmp_path, {"MESHSHIELD_VECTORS": str(folder)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 1 passed" in r.stdout, r.stdout
    assert "no-such-file.bin is missing" in r.stdout, r.stdout
