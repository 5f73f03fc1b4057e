"""One entry point from evidence JSON to Claims, whatever the platform."""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.attestation.claims import Claims, Platform
from meshshield.attestation.collateral import Collateral
from meshshield.attestation.sgx import verify_sgx_evidence
from meshshield.attestation.sim import verify_sim_evidence
from meshshield.attestation.snp import verify_snp_evidence
from meshshield.attestation.tdx import verify_tdx_evidence
from meshshield.errors import EvidenceError, Reason

TDX_TEE_TYPE = 0x81


@dataclass(frozen=True)
class VerifierConfig:
    """What a verifier trusts beyond the pinned vendor roots."""

    sim_platform_keys: Sequence[ec.EllipticCurvePublicKey] = field(default_factory=tuple)
    collateral: Collateral | None = None


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
        return _dcap_platform(evidence["quote"])
    if "report" in keys:
        return Platform.SEV_SNP
    raise EvidenceError(
        Reason.EVIDENCE_MALFORMED,
        "evidence has none of the keys of a known platform: expected "
        '{"report","signature"} (sim), {"report","certs"} (sev-snp) or {"quote"} (tdx, sgx); '
        f"found {sorted(str(k) for k in keys)[:6]}",
    )


def _dcap_platform(quote_b64: object) -> Platform:
    """SGX or TDX from a quote's header; anything undecodable goes to the TDX parser,
    which reports precisely what is wrong with it."""
    if isinstance(quote_b64, str):
        try:
            head = base64.b64decode(quote_b64[:16], validate=True)
        except (binascii.Error, ValueError):
            return Platform.TDX
        if len(head) >= 8:
            version, _key_type, tee_type = struct.unpack_from("<HHI", head)
            if version == 3 or (version in (4, 5) and tee_type == 0):
                return Platform.SGX
    return Platform.TDX


def verify_evidence(
    platform: Platform, evidence: object, config: VerifierConfig, at: datetime
) -> Claims:
    """Verify evidence claimed to come from `platform`; raises EvidenceError."""
    if platform is Platform.SIM:
        return verify_sim_evidence(evidence, config.sim_platform_keys)
    if platform is Platform.SEV_SNP:
        return verify_snp_evidence(evidence, at=at)
    if platform is Platform.TDX:
        return verify_tdx_evidence(evidence, at=at, collateral=config.collateral)
    return verify_sgx_evidence(evidence, at=at, collateral=config.collateral)
