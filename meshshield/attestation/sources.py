"""Where a workload gets its evidence: the TEE it runs in, or the sim stand-in."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshshield.attestation.claims import Platform
from meshshield.attestation.measure import measure_paths
from meshshield.attestation.sim import load_sim_private_key, make_sim_evidence


class EvidenceSourceError(Exception):
    """Evidence could not be obtained here (configuration, not a peer's fault)."""


def collect_evidence(
    platform: Platform,
    report_data: bytes,
    *,
    workload: Sequence[str | Path] = (),
    sim_key: Path | None = None,
) -> dict[str, Any]:
    """Evidence JSON for `platform` binding `report_data` (64 bytes)."""
    if platform is Platform.SIM:
        if sim_key is None:
            raise EvidenceSourceError("--platform sim needs --sim-key FILE (sim-platform.key)")
        if not workload:
            raise EvidenceSourceError(
                "--platform sim needs --workload PATH: the files whose measurement is attested"
            )
        key = load_sim_private_key(sim_key)
        return make_sim_evidence(key, measure_paths(list(workload)), report_data)
    raise EvidenceSourceError(
        f"no evidence source for platform {platform.value} on this machine: hardware "
        "evidence comes from configfs-tsm (/sys/kernel/config/tsm/report) in a confidential "
        "VM, or from the guest components inside a Confidential Containers pod"
    )
