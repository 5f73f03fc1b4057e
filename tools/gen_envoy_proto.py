"""Regenerate meshshield/_proto/envoy/**/*_pb2.py(i) from the .proto files beside them.

Run with `make proto` (grpcio-tools and googleapis-common-protos in a virtual environment
of its own). The .proto files are subsets of Envoy's API (envoyproxy/data-plane-api),
with the upstream package names, message names and field numbers, holding only the
fields the SDS server uses. They are compiled under the path meshshield/_proto/..., so
the generated modules import each other inside this package and their file names in
protobuf's default pool cannot collide with a full copy of Envoy's API.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import google.rpc
import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "meshshield/_proto").rglob("*.proto"))


def main() -> int:
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    googleapis = os.path.dirname(os.path.dirname(list(google.rpc.__path__)[0]))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "-I", well_known,
         "-I", googleapis, "--python_out=.", "--pyi_out=.", *PROTOS],
        cwd=ROOT, check=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
