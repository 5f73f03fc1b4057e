"""Intel TDX quotes (DCAP v4, and v5 with TDX 1.0 or 1.5 bodies) -> Claims.

Evidence JSON: ``{"quote": b64}``. The quote carries its PCK chain (certification data
type 6 wrapping type 5); see `meshshield.attestation.dcap` for the shared layout and
what makes a quote genuine.

TD report body (584 B; TDX 1.5 appends 64 B), offsets within the body::

      0  16  TEE_TCB_SVN          184  48  MRCONFIGID
     16  48  MRSEAM               232  48  MROWNER
     64  48  MRSIGNERSEAM         280  48  MROWNERCONFIG
    112   8  SEAMATTRIBUTES       328  48  RTMR0 .. 472 RTMR3 (48 each)
    120   8  TDATTRIBUTES (bit 0 = DEBUG)
    128   8  XFAM                 520  64  REPORTDATA
    136  48  MRTD                 584  16  TEE_TCB_SVN_2 (1.5)  600  48  MRSERVICETD (1.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from meshshield.attestation import dcap, pck
from meshshield.attestation.claims import Claims, Platform
from meshshield.attestation.collateral import Collateral, TcbVerdict, verify_quote
from meshshield.errors import EvidenceError, Reason


@dataclass(frozen=True)
class TdReport:
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & 0x01)


def parse_td_report(body: bytes) -> TdReport:
    if len(body) not in (dcap.TD_REPORT10_SIZE, dcap.TD_REPORT15_SIZE):
        raise EvidenceError(
            Reason.EVIDENCE_MALFORMED,
            f"TD report body must be {dcap.TD_REPORT10_SIZE} or {dcap.TD_REPORT15_SIZE} "
            f"bytes, got {len(body)}",
        )
    v15 = len(body) == dcap.TD_REPORT15_SIZE
    return TdReport(
        tee_tcb_svn=body[0:16],
        mr_seam=body[16:64],
        mr_signer_seam=body[64:112],
        seam_attributes=body[112:120],
        td_attributes=body[120:128],
        xfam=body[128:136],
        mr_td=body[136:184],
        mr_config_id=body[184:232],
        mr_owner=body[232:280],
        mr_owner_config=body[280:328],
        rtmrs=(body[328:376], body[376:424], body[424:472], body[472:520]),
        report_data=body[520:584],
        tee_tcb_svn2=body[584:600] if v15 else None,
        mr_service_td=body[600:648] if v15 else None,
    )


def parse_tdx_quote(quote: bytes) -> tuple[dcap.Quote, TdReport]:
    """Parse a TDX quote; SGX quotes and other bytes are evidence_malformed."""
    q = dcap.parse_quote(quote)
    if q.header.tee_type != dcap.TEE_TYPE_TDX or q.body_type == dcap.BODY_TYPE_SGX:
        raise EvidenceError(
            Reason.EVIDENCE_MALFORMED,
            f"quote is an SGX quote (version {q.version}, TEE type 0x{q.header.tee_type:02x}), "
            "not TDX (TEE type 0x81): check the platform the service attests with",
        )
    return q, parse_td_report(q.body)


def verify_tdx_quote(
    quote: bytes,
    *,
    at: datetime,
    collateral: Collateral | None = None,
    roots: Sequence[x509.Certificate] | None = None,
) -> Claims:
    """Verify a raw TDX quote at time `at`; raises only EvidenceError for any bytes.

    `roots` replaces the pinned Intel SGX Root CA (tests); `collateral` yields the TCB
    status and advisories, which are otherwise `unknown` and empty.
    """
    at = pck.require_aware(at)
    trusted = pck.trusted_intel_roots(roots)
    q, td = parse_tdx_quote(quote)
    verdict = verify_quote(q, at=at, roots=trusted, qe_mrsigner=dcap.TDX_QE_MRSIGNER,
                           collateral=collateral,
                           tdx=(td.tee_tcb_svn, td.mr_signer_seam, td.seam_attributes))
    return _claims(q, td, verdict)


def verify_tdx_evidence(
    evidence: object,
    *,
    at: datetime,
    collateral: Collateral | None = None,
    roots: Sequence[x509.Certificate] | None = None,
) -> Claims:
    """Verify ``{"quote": b64}`` TDX evidence (decoded JSON, untrusted)."""
    raw = dcap.quote_from_evidence(evidence, "tdx")
    return verify_tdx_quote(raw, at=at, collateral=collateral, roots=roots)


def _claims(q: dcap.Quote, td: TdReport, verdict: TcbVerdict) -> Claims:
    extra: dict[str, object] = {
        "mrtd": td.mr_td.hex(),
        "mrconfigid": td.mr_config_id.hex(),
        "rtmr0": td.rtmrs[0].hex(),
        "rtmr1": td.rtmrs[1].hex(),
        "rtmr2": td.rtmrs[2].hex(),
        "rtmr3": td.rtmrs[3].hex(),
        "mrowner": td.mr_owner.hex(),
        "mrownerconfig": td.mr_owner_config.hex(),
        "td_attributes": td.td_attributes.hex(),
        "xfam": td.xfam.hex(),
        "tee_tcb_svn": td.tee_tcb_svn.hex(),
        "mrseam": td.mr_seam.hex(),
        "mrsignerseam": td.mr_signer_seam.hex(),
        "quote_version": q.version,
    }
    if td.tee_tcb_svn2 is not None and td.mr_service_td is not None:
        extra["tee_tcb_svn2"] = td.tee_tcb_svn2.hex()
        extra["mrservicetd"] = td.mr_service_td.hex()
    extra.update(verdict.extra())
    return Claims(
        platform=Platform.TDX,
        measurement=td.mr_td.hex(),
        report_data=td.report_data,
        debug=td.debug,
        tcb_status=verdict.status,
        signer=None,
        product_id=None,
        svn=None,
        simulated=False,
        advisories=verdict.advisories,
        extra=extra,
    )
