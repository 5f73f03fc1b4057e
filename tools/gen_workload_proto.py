"""Regenerate meshshield/sidecar/spiffe_workload/workload_pb2*.py from workload.proto.

Run with `make proto` (it installs grpcio-tools into a separate virtual environment,
so the project's own protobuf runtime is not touched). The generated message module
is then rewritten to register its descriptors in a pool of its own instead of
protobuf's default pool: the Workload API has no proto package, so every
implementation (py-spiffe's client among them) declares the same top-level names, and
two of them in the default pool of one process fail to import ("duplicate symbol").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("meshshield/sidecar/spiffe_workload/workload.proto")
OUT = ROOT / PROTO.parent / "workload_pb2.py"

DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = """\
# A pool of its own (tools/gen_workload_proto.py says why), holding struct.proto first.
_POOL = _descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(google_dot_protobuf_dot_struct__pb2.DESCRIPTOR.serialized_pb)
"""


def main() -> int:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
         "--pyi_out=.", "--grpc_python_out=.", str(PROTO)],
        cwd=ROOT, check=True,
    )
    text = OUT.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{OUT}: expected one {DEFAULT_POOL!r}; the generator changed")
    text = text.replace(DEFAULT_POOL, PRIVATE_POOL + "DESCRIPTOR = _POOL.AddSerializedFile(")
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
