"""Where the shared attestation test vectors are (`../shared/vectors`, see PROVENANCE.md).

`vectors_dir()` returns the folder named by the environment variable MESHSHIELD_VECTORS,
else `<repository root>/../shared/vectors`; when neither exists the calling test is
skipped with a message saying where it looked and how to point at the vectors.
Import it from any test (tests/conftest.py puts this folder on sys.path):

    from vectors import vectors_dir
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV_VAR = "MESHSHIELD_VECTORS"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO_ROOT.parent / "shared" / "vectors"


def vectors_dir() -> Path:
    """The vectors folder, or pytest.skip when it is not available."""
    configured = os.environ.get(ENV_VAR)
    candidate = Path(configured) if configured else DEFAULT_DIR
    if (candidate / "PROVENANCE.md").is_file():
        return candidate
    where = f"${ENV_VAR}={configured}" if configured else f"{DEFAULT_DIR} (the default)"
    pytest.skip(
        f"attestation test vectors not found at {where}; set {ENV_VAR} to the folder that "
        "holds PROVENANCE.md to run these tests"
    )


def vector(relative: str) -> bytes:
    """The bytes of one vector file, e.g. ``vector("go-sev-guest/attestation.bin")``."""
    path = vectors_dir() / relative
    if not path.is_file():
        pytest.skip(f"test vector {relative} is missing from {vectors_dir()}")
    return path.read_bytes()
