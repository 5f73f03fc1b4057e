"""One entry point from evidence JSON to Claims, whatever the platform."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.attestation.claims import Claims, Platform
from meshshield.attestation.sim import verify_sim_evidence
from meshshield.errors import EvidenceError, Reason


@dataclass(frozen=True)
class VerifierConfig:
    """What a verifier trusts beyond the pinned vendor roots."""

    sim_platform_keys: Sequence[ec.EllipticCurvePublicKey] = field(default_factory=tuple)


def platform_of(evidence: object) -> Platform:
    """Tell the platform from the evidence's JSON shape (SPEC §4 table).

    sim: {"report", "signature"}; sev-snp: {"report", "certs"}; tdx / sgx: {"quote"},
    told apart by the quote header (version 3 is SGX; versions 4 and 5 carry a TEE type,
    0x81 for TDX and 0 for SGX).
    """
    if not isinstance(evidence, Mapping):
        raise EvidenceError(
            Reason.EVIDENCE_MALFORMED,
            f"evidence must be a JSON object, found {type(evidence).__name__}",
        )
    keys = set(evidence)
    if "signature" in keys:
        return Platform.SIM
    if "certs" in keys:
        return Platform.SEV_SNP
    if "quote" in keys:
        return Platform.TDX
    if "report" in keys:
        return Platform.SEV_SNP
    raise EvidenceError(
        Reason.EVIDENCE_MALFORMED,
        "evidence has none of the keys of a known platform: expected "
        '{"report","signature"} (sim), {"report","certs"} (sev-snp) or {"quote"} (tdx, sgx); '
        f"found {sorted(str(k) for k in keys)[:6]}",
    )


def verify_evidence(
    platform: Platform, evidence: object, config: VerifierConfig, at: datetime
) -> Claims:
    """Verify evidence claimed to come from `platform`; raises EvidenceError."""
    del at  # the hardware platforms check certificate windows at this time
    if platform is Platform.SIM:
        return verify_sim_evidence(evidence, config.sim_platform_keys)
    raise EvidenceError(
        Reason.EVIDENCE_MALFORMED,
        f"platform {platform.value} evidence is not supported by this CAS build",
    )
