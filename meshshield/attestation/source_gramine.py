"""SGX evidence from inside a Gramine enclave, through its ``/dev/attestation`` files.

Gramine (manifest ``sgx.remote_attestation = "dcap"``) exposes pseudo-files:

- ``attestation_type``: ``dcap``, ``epid`` or ``none`` (read);
- ``user_report_data``: write exactly 64 bytes; they become the enclave report's
  REPORT_DATA;
- ``quote``: read; Gramine builds an SGX ECDSA (DCAP v3) quote over the last
  user_report_data written.

The quote maps to ``{"quote": base64}`` (SPEC §4). Writing and reading are two steps,
so one process at a time should attest; the quote's REPORT_DATA is checked against
ours before it is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshshield.attestation.claims import Platform
from meshshield.attestation.source_base import (
    EvidenceSourceError,
    b64,
    check_binding,
    require_report_data,
)

DEFAULT_GRAMINE_ROOT = Path("/dev/attestation")
MAX_QUOTE = 1 << 20


def gramine_evidence(report_data: bytes, *, root: Path = DEFAULT_GRAMINE_ROOT) -> dict[str, Any]:
    """``{"quote": b64}`` for `report_data` from Gramine's /dev/attestation at `root`."""
    require_report_data(report_data)
    root = Path(root)
    if not root.is_dir():
        raise EvidenceSourceError(
            f"{root} does not exist: sgx evidence comes from inside a Gramine enclave "
            "(gramine-sgx) whose manifest sets sgx.remote_attestation = \"dcap\""
        )
    kind_path = root / "attestation_type"
    if kind_path.exists():
        kind = _read(kind_path, 64).decode("ascii", "replace").strip()
        if kind != "dcap":
            raise EvidenceSourceError(
                f"{kind_path} says {kind!r}: meshshield verifies DCAP (ECDSA) quotes; set "
                'sgx.remote_attestation = "dcap" in the Gramine manifest'
            )
    data_path = root / "user_report_data"
    try:
        with open(data_path, "wb", buffering=0) as f:
            written = f.write(bytes(report_data))
    except OSError as e:
        raise EvidenceSourceError(
            f"writing 64 bytes to {data_path} failed: {e.strerror or e}"
        ) from None
    if written != len(report_data):
        raise EvidenceSourceError(f"short write to {data_path}: {written} of 64 bytes")
    quote = _read(root / "quote", MAX_QUOTE)
    if not quote:
        raise EvidenceSourceError(f"{root / 'quote'} was empty: Gramine produced no quote")
    check_binding(Platform.SGX, quote, report_data, f"Gramine ({root / 'quote'})")
    return {"quote": b64(quote)}


def _read(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        hint = ""
        if path.name == "quote":
            hint = (
                " (is the AESM service / quote provider library (libsgx-dcap-default-qpl) "
                "configured on the host?)"
            )
        raise EvidenceSourceError(f"reading {path} failed: {e.strerror or e}{hint}") from None
    if len(data) > limit:
        raise EvidenceSourceError(f"{path} is larger than {limit} bytes")
    return data
