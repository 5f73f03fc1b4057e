"""Intel SGX ECDSA quotes (DCAP v3) -> Claims.

Evidence JSON: ``{"quote": b64}``, e.g. what Gramine's ``/dev/attestation/quote``
returns. The body is the enclave's SGX report (384 B, layout in
`meshshield.attestation.dcap.EnclaveReport`); the signature data carries the QE report
and the PCK chain (certification data type 5). What makes a quote genuine is in
`meshshield.attestation.dcap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509

from meshshield.attestation import dcap, pck
from meshshield.attestation.claims import Claims, Platform
from meshshield.attestation.collateral import Collateral, verify_quote
from meshshield.errors import EvidenceError, Reason


def parse_sgx_quote(quote: bytes) -> tuple[dcap.Quote, dcap.EnclaveReport]:
    """Parse an SGX v3 quote; TDX quotes and other bytes are evidence_malformed."""
    q = dcap.parse_quote(quote)
    if q.header.tee_type != dcap.TEE_TYPE_SGX:
        raise EvidenceError(
            Reason.EVIDENCE_MALFORMED,
            f"quote is a TDX quote (version {q.version}, TEE type 0x81), not SGX: check the "
            "platform the service attests with",
        )
    if q.version != 3:
        raise EvidenceError(
            Reason.EVIDENCE_MALFORMED,
            f"SGX quote version is {q.version}; meshshield verifies SGX ECDSA quotes of "
            "version 3 (what DCAP's quote library produces for SGX)",
        )
    return q, dcap.parse_enclave_report(q.body)


def verify_sgx_quote(
    quote: bytes,
    *,
    at: datetime,
    collateral: Collateral | None = None,
    roots: Sequence[x509.Certificate] | None = None,
) -> Claims:
    """Verify a raw SGX quote at time `at`; raises only EvidenceError for any bytes.

    `roots` replaces the pinned Intel SGX Root CA (tests); `collateral` yields the TCB
    status and advisories, which are otherwise `unknown` and empty.
    """
    at = pck.require_aware(at)
    trusted = pck.trusted_intel_roots(roots)
    q, report = parse_sgx_quote(quote)
    verdict = verify_quote(q, at=at, roots=trusted, qe_mrsigner=dcap.SGX_QE3_MRSIGNER,
                           collateral=collateral, tdx=None)
    extra: dict[str, object] = {
        "mrenclave": report.mr_enclave.hex(),
        "mrsigner": report.mr_signer.hex(),
        "isv_prod_id": report.isv_prod_id,
        "isv_svn": report.isv_svn,
        "attributes": report.attributes.hex(),
        "misc_select": f"{report.misc_select:08x}",
        "cpu_svn": report.cpu_svn.hex(),
        "config_id": report.config_id.hex(),
        "config_svn": report.config_svn,
        "isv_ext_prod_id": report.isv_ext_prod_id.hex(),
        "isv_family_id": report.isv_family_id.hex(),
        "quote_version": q.version,
    }
    extra.update(verdict.extra())
    return Claims(
        platform=Platform.SGX,
        measurement=report.mr_enclave.hex(),
        report_data=report.report_data,
        debug=report.debug,
        tcb_status=verdict.status,
        signer=report.mr_signer.hex(),
        product_id=report.isv_prod_id,
        svn=report.isv_svn,
        simulated=False,
        advisories=verdict.advisories,
        extra=extra,
    )


def verify_sgx_evidence(
    evidence: object,
    *,
    at: datetime,
    collateral: Collateral | None = None,
    roots: Sequence[x509.Certificate] | None = None,
) -> Claims:
    """Verify ``{"quote": b64}`` SGX evidence (decoded JSON, untrusted)."""
    raw = dcap.quote_from_evidence(evidence, "sgx")
    return verify_sgx_quote(raw, at=at, collateral=collateral, roots=roots)
