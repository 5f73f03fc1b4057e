"""What every evidence source shares: its error, and the check that the TEE bound our
report_data.

An evidence source (configfs-tsm, the Confidential Containers attestation agent,
Gramine) asks the TEE for evidence over 64 bytes of report_data and maps the answer
into the evidence JSON of SPEC §4. Before the evidence leaves the workload, the source
parses it with the platform's own parser and checks that the report_data inside is the
one it asked for: a source that hashes, truncates or re-encodes the input would
otherwise only show up at the CAS as `report_data_mismatch`.
"""

from __future__ import annotations

import base64

from meshshield.attestation.claims import REPORT_DATA_SIZE, Platform
from meshshield.errors import EvidenceError


class EvidenceSourceError(Exception):
    """Evidence could not be obtained here (configuration, not a peer's fault).

    The message names the path or URL involved and what to do about it.
    """


def b64(raw: bytes) -> str:
    """Standard, padded base64: the only encoding the verifiers accept."""
    return base64.b64encode(raw).decode("ascii")


def require_report_data(report_data: bytes) -> None:
    if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_SIZE:
        size = len(report_data) if isinstance(report_data, bytes | bytearray) else "not bytes"
        raise EvidenceSourceError(
            f"report_data must be exactly {REPORT_DATA_SIZE} bytes (got {size}): it is "
            'SHA-512("meshshield/v1" || nonce || SPKI), see SPEC §4'
        )


def embedded_report_data(platform: Platform, blob: bytes) -> bytes:
    """The report_data inside a raw SNP report or DCAP quote; EvidenceError if it does
    not parse as `platform`'s evidence."""
    if platform is Platform.SEV_SNP:
        from meshshield.attestation.snp_report import parse_snp_report

        return parse_snp_report(blob).report_data
    if platform is Platform.TDX:
        from meshshield.attestation.tdx import parse_tdx_quote

        return parse_tdx_quote(blob)[1].report_data
    if platform is Platform.SGX:
        from meshshield.attestation.sgx import parse_sgx_quote

        return parse_sgx_quote(blob)[1].report_data
    raise ValueError(f"no hardware evidence for platform {platform.value}")


def check_binding(platform: Platform, blob: bytes, report_data: bytes, where: str) -> None:
    """Raise EvidenceSourceError unless `blob` parses as `platform` evidence binding
    exactly `report_data`. `where` names the source (a path or URL) in the message."""
    kind = "report" if platform is Platform.SEV_SNP else "quote"
    try:
        found = embedded_report_data(platform, blob)
    except EvidenceError as e:
        raise EvidenceSourceError(
            f"{where} returned a {platform.value} {kind} that does not parse "
            f"({e.reason.value}: {e.message})"
        ) from None
    if found != bytes(report_data):
        raise EvidenceSourceError(
            f"{where} returned a {platform.value} {kind} whose report_data is "
            f"{found.hex()[:32]}..., not the {bytes(report_data).hex()[:32]}... it was asked "
            "to bind: the source changed the input (hashed, truncated or re-encoded it), so "
            "the CAS would refuse the evidence with report_data_mismatch"
        )
