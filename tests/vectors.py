"""Where the shared attestation test vectors are (`../shared/vectors`, see PROVENANCE.md).

`vectors_dir()` returns the folder named by the environment variable MESHSHIELD_VECTORS,
else `<repository root>/../shared/vectors`. When the folder (or a vector file in it) is
missing:

- in CI (`CI` set to anything but empty, `0` or `false`) or when MESHSHIELD_VECTORS is
  set, the calling test **fails**: someone asked for the real vectors, so their absence
  is a broken setup, never a silent skip (`.ci/run` sets both);
- otherwise (a developer's checkout without the vectors) the test is skipped with a
  message saying where it looked and how to point at the vectors.

Import it from any test (tests/conftest.py puts this folder on sys.path):

    from vectors import vectors_dir
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

ENV_VAR = "MESHSHIELD_VECTORS"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO_ROOT.parent / "shared" / "vectors"


def vectors_required() -> bool:
    """True when a missing vector must fail the test rather than skip it."""
    ci = os.environ.get("CI", "").strip().lower()
    return bool(os.environ.get(ENV_VAR)) or ci not in ("", "0", "false", "no")


def _missing(message: str) -> NoReturn:
    if vectors_required():
        why = f"${ENV_VAR} is set" if os.environ.get(ENV_VAR) else "CI is set"
        pytest.fail(f"{message} ({why}: the real vectors are required, not skipped)",
                    pytrace=False)
    pytest.skip(message)


def vectors_dir() -> Path:
    """The vectors folder; a failure or a skip (see above) when it is not available."""
    configured = os.environ.get(ENV_VAR)
    candidate = Path(configured) if configured else DEFAULT_DIR
    if (candidate / "PROVENANCE.md").is_file():
        return candidate
    where = f"${ENV_VAR}={configured}" if configured else f"{DEFAULT_DIR} (the default)"
    _missing(f"attestation test vectors not found at {where}; set {ENV_VAR} to the folder "
             "that holds PROVENANCE.md to run these tests")


def vector(relative: str) -> bytes:
    """The bytes of one vector file, e.g. ``vector("go-sev-guest/attestation.bin")``."""
    folder = vectors_dir()
    path = folder / relative
    if not path.is_file():
        _missing(f"test vector {relative} is missing from {folder}")
    return path.read_bytes()
