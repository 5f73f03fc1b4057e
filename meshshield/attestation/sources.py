"""Where a workload gets its evidence: the TEE it runs in, or the sim stand-in.

Hardware evidence sources (SPEC §4), chosen with `source=` or the environment:

==============  ===============  =========================================================
source          platforms        how (module)
==============  ===============  =========================================================
configfs-tsm    sev-snp, tdx     /sys/kernel/config/tsm/report, root (`source_tsm`)
coco-aa         sev-snp, tdx,    the Confidential Containers attestation agent's REST API,
                sgx              http://127.0.0.1:8006 in the pod, no root (`source_coco`)
gramine         sgx              /dev/attestation inside a Gramine enclave (`source_gramine`)
==============  ===============  =========================================================

MESHSHIELD_EVIDENCE_SOURCE names the source, MESHSHIELD_COCO_AA_URL the agent (the
Kubernetes injector sets both for sev-snp and tdx pods). Without a source: sgx uses
gramine; sev-snp and tdx use configfs-tsm when its folder exists, else coco-aa when
MESHSHIELD_COCO_AA_URL is set, else configfs-tsm (whose error says what to do).
Every source checks that the evidence binds the report_data it was given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from meshshield.attestation.claims import Platform
from meshshield.attestation.measure import measure_paths
from meshshield.attestation.sim import load_sim_private_key, make_sim_evidence
from meshshield.attestation.source_base import EvidenceSourceError, require_report_data
from meshshield.attestation.source_coco import DEFAULT_AA_URL, coco_aa_evidence
from meshshield.attestation.source_gramine import DEFAULT_GRAMINE_ROOT, gramine_evidence
from meshshield.attestation.source_tsm import DEFAULT_TSM_ROOT, tsm_evidence

__all__ = [
    "COCO_AA_URL_ENV",
    "SOURCE_ENV",
    "EvidenceSource",
    "EvidenceSourceError",
    "collect_evidence",
    "resolve_source",
]

SOURCE_ENV = "MESHSHIELD_EVIDENCE_SOURCE"
COCO_AA_URL_ENV = "MESHSHIELD_COCO_AA_URL"


class EvidenceSource(StrEnum):
    CONFIGFS_TSM = "configfs-tsm"
    COCO_AA = "coco-aa"
    GRAMINE = "gramine"


_PLATFORMS = {
    EvidenceSource.CONFIGFS_TSM: (Platform.SEV_SNP, Platform.TDX),
    EvidenceSource.COCO_AA: (Platform.SEV_SNP, Platform.TDX, Platform.SGX),
    EvidenceSource.GRAMINE: (Platform.SGX,),
}


def resolve_source(
    platform: Platform,
    source: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    tsm_root: Path = DEFAULT_TSM_ROOT,
) -> EvidenceSource:
    """The source to use for hardware `platform` (see the module docstring)."""
    env = os.environ if environ is None else environ
    name = source if source is not None else env.get(SOURCE_ENV, "").strip()
    if name:
        try:
            chosen = EvidenceSource(name.strip().lower())
        except ValueError:
            known = ", ".join(s.value for s in EvidenceSource)
            origin = "source" if source is not None else SOURCE_ENV
            raise EvidenceSourceError(
                f"{origin}={name!r} is not an evidence source: use one of {known}"
            ) from None
    elif platform is Platform.SGX:
        chosen = EvidenceSource.GRAMINE
    elif not Path(tsm_root).is_dir() and env.get(COCO_AA_URL_ENV):
        chosen = EvidenceSource.COCO_AA
    else:
        chosen = EvidenceSource.CONFIGFS_TSM
    if platform not in _PLATFORMS[chosen]:
        able = ", ".join(p.value for p in _PLATFORMS[chosen])
        raise EvidenceSourceError(
            f"evidence source {chosen.value} gives {able} evidence, not {platform.value}; "
            f"set {SOURCE_ENV} to a source for {platform.value}"
        )
    return chosen


def collect_evidence(
    platform: Platform,
    report_data: bytes,
    *,
    workload: Sequence[str | Path] = (),
    sim_key: Path | None = None,
    source: str | None = None,
    environ: Mapping[str, str] | None = None,
    tsm_root: Path = DEFAULT_TSM_ROOT,
    tsm_privlevel: int | None = None,
    gramine_root: Path = DEFAULT_GRAMINE_ROOT,
    coco_aa_url: str | None = None,
) -> dict[str, Any]:
    """Evidence JSON (SPEC §4) for `platform` binding `report_data` (64 bytes).

    Raises EvidenceSourceError (or ValueError for a bad sim key) saying what to do.
    """
    if platform is Platform.SIM:
        if sim_key is None:
            raise EvidenceSourceError("--platform sim needs --sim-key FILE (sim-platform.key)")
        if not workload:
            raise EvidenceSourceError(
                "--platform sim needs --workload PATH: the files whose measurement is attested"
            )
        key = load_sim_private_key(sim_key)
        return make_sim_evidence(key, measure_paths(list(workload)), report_data)
    require_report_data(report_data)
    env = os.environ if environ is None else environ
    chosen = resolve_source(platform, source, environ=env, tsm_root=tsm_root)
    if chosen is EvidenceSource.CONFIGFS_TSM:
        return tsm_evidence(platform, report_data, root=tsm_root, privlevel=tsm_privlevel)
    if chosen is EvidenceSource.GRAMINE:
        return gramine_evidence(report_data, root=gramine_root)
    url = coco_aa_url or env.get(COCO_AA_URL_ENV, "").strip() or DEFAULT_AA_URL
    return coco_aa_evidence(platform, report_data, url=url)
