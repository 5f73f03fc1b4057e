"""Intel collateral (TCB info, QE identity, CRLs) -> the TCB status of a verified quote.

Collateral folder (``--collateral DIR``)
----------------------------------------
Files are recognised by their content, so any names work; we recommend::

    tcb_info_<fmspc>.json          PCS /tcb response body      {"tcbInfo": {...}, "signature": hex}
    qe_identity.json               PCS /qe/identity body        {"enclaveIdentity": {...}, ...}
    td_qe_identity.json            PCS TDX /qe/identity body
    tcb_info_issuer_chain.pem      the TCB-Info-Issuer-Chain / SGX-Enclave-Identity-Issuer-Chain
                                   response headers: PEM certificates (URL-encoded is fine)
    pck_crl_platform.der           PCS /pckcrl?ca=platform (DER or PEM)
    pck_crl_processor.der          PCS /pckcrl?ca=processor
    root_ca_crl.der                Intel SGX Root CA CRL (IntelSGXRootCA.der)

Every regular file in the folder must be one of: a JSON TCB info or enclave identity,
PEM certificates, or a CRL (DER or PEM). Names starting with ``.`` and ``*.md`` /
``*.txt`` files are skipped; anything else is refused, naming the file. Several TCB
infos (one per FMSPC, SGX and TDX) may sit side by side.

What is checked when a quote is evaluated (`evaluate_tcb`)
---------------------------------------------------------
- The ECDSA P-256 signature of each TCB info / enclave identity over the exact bytes of
  its ``"tcbInfo"`` / ``"enclaveIdentity"`` value as it appears in the file (never
  re-serialised), by a certificate from the folder that is directly issued by the pinned
  Intel SGX Root CA; that certificate and the root are valid at ``at``, and ``at`` lies
  within ``issueDate .. nextUpdate``. A forged document is `signature_invalid`; a broken
  or stale chain, or stale collateral, is `chain_invalid` with the window in the message.
- The TCB info for the PCK certificate's FMSPC and PCE-ID (``id`` "TDX" for TDX quotes,
  "SGX" for SGX quotes). Its first TCB level whose SGX component SVNs and PCESVN are all
  <= the PCK certificate's (and, for TDX, whose TDX component SVNs are <= the quote's
  TEE_TCB_SVN) gives the platform status. For TDX 1.5 and later (TEE_TCB_SVN[1] > 0)
  the TDX module is rated by its own identity ``TDX_<version>`` in ``tdxModuleIdentities``
  (its ISVSVN is TEE_TCB_SVN[0]) and the level comparison skips TEE_TCB_SVN[0..1], as
  Intel's QVL does. MRSIGNERSEAM and the SEAM attributes must match the TDX module
  identity (``tdxModule`` for version 0).
- The QE identity (``TD_QE`` for TDX, ``QE`` for SGX): MRSIGNER, ISVPRODID and masked
  MISCSELECT / ATTRIBUTES must match (else `chain_invalid`); ISVSVN picks the QE level.
- CRLs issued by the quote's PCK CA or by the root: signature and window at ``at``; a
  revoked PCK leaf or PCK CA makes the status ``revoked``.

The worst of the platform, TDX module and QE statuses wins. A platform below every
level Intel lists (Intel: "TCB level not supported") is reported as ``out_of_date``.
A missing piece (no TCB info for the FMSPC, no QE identity) counts as ``unknown``,
which still loses to ``out_of_date`` and ``revoked``.

Intel's status -> SPEC §4: UpToDate -> up_to_date; SWHardeningNeeded ->
sw_hardening_needed; ConfigurationNeeded and ConfigurationAndSWHardeningNeeded ->
configuration_needed; OutOfDate and OutOfDateConfigurationNeeded -> out_of_date;
Revoked -> revoked. Intel's own word is kept in the claims as ``intel_tcb_status``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509

from meshshield.attestation import dcap, pck
from meshshield.attestation.claims import TcbStatus
from meshshield.attestation.collateral_docs import (
    CollateralCrl,
    QeIdentity,
    SignedDoc,
    TcbInfo,
    TcbLevel,
    load_files,
)
from meshshield.errors import EvidenceError, Reason

_INTEL_STATUS: dict[str, tuple[int, TcbStatus]] = {
    "UpToDate": (0, TcbStatus.UP_TO_DATE),
    "SWHardeningNeeded": (1, TcbStatus.SW_HARDENING_NEEDED),
    "ConfigurationNeeded": (2, TcbStatus.CONFIGURATION_NEEDED),
    "ConfigurationAndSWHardeningNeeded": (3, TcbStatus.CONFIGURATION_NEEDED),
    "Unknown": (4, TcbStatus.UNKNOWN),
    "OutOfDate": (5, TcbStatus.OUT_OF_DATE),
    "OutOfDateConfigurationNeeded": (6, TcbStatus.OUT_OF_DATE),
    "TcbLevelNotSupported": (7, TcbStatus.OUT_OF_DATE),
    "Revoked": (8, TcbStatus.REVOKED),
}


@dataclass(frozen=True)
class Collateral:
    """Parsed (not yet verified) collateral; verified against each quote at its `at`."""

    tcb_infos: tuple[TcbInfo, ...] = ()
    qe_identities: tuple[QeIdentity, ...] = ()
    crls: tuple[CollateralCrl, ...] = ()
    certificates: tuple[x509.Certificate, ...] = ()
    sources: tuple[str, ...] = ()


def load_collateral(directory: Path) -> Collateral:
    """Load a collateral folder (layout in the module docstring).

    Raises EvidenceError (evidence_malformed) naming the file for anything unreadable.
    """
    path = Path(directory)
    try:
        entries = sorted(p for p in path.iterdir())
    except OSError as e:
        raise EvidenceError(
            Reason.EVIDENCE_MALFORMED, f"cannot read collateral folder {path}: {e.strerror}"
        ) from None
    files = [
        p
        for p in entries
        if not p.name.startswith(".") and p.suffix.lower() not in (".md", ".txt") and p.is_file()
    ]
    return load_collateral_files(files)


def load_collateral_files(paths: Iterable[Path]) -> Collateral:
    """Load the given collateral files (same content rules as `load_collateral`)."""
    infos, identities, crls, certs, sources = load_files(paths)
    return Collateral(infos, identities, crls, certs, sources)


@dataclass(frozen=True)
class TcbVerdict:
    status: TcbStatus
    intel_status: str | None = None
    advisories: tuple[str, ...] = ()
    details: tuple[tuple[str, object], ...] = field(default=())

    @classmethod
    def unknown(cls) -> TcbVerdict:
        return cls(TcbStatus.UNKNOWN)

    def extra(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.details)
        if self.intel_status is not None:
            out["intel_tcb_status"] = self.intel_status
        return out


def _chain_invalid(message: str) -> EvidenceError:
    return EvidenceError(Reason.CHAIN_INVALID, message)


def _verify_doc(
    doc: SignedDoc, c: Collateral, at: datetime, roots: Sequence[x509.Certificate]
) -> None:
    signer = next((cert for cert in c.certificates if doc.signed_by(cert)), None)
    if signer is None:
        raise EvidenceError(
            Reason.SIGNATURE_INVALID,
            f"{doc.kind} in {doc.source}: the signature does not verify with any of the "
            f"{len(c.certificates)} certificates in the collateral; add its issuer chain "
            "(the PCS response header) or fetch an unaltered copy",
        )
    anchor = pck.find_anchor(signer, roots)
    if anchor is None:
        raise _chain_invalid(
            f"{doc.kind} in {doc.source} is signed by {pck.cert_label(signer)}, which is not "
            "issued by the trusted Intel SGX Root CA"
        )
    pck.check_validity(anchor, at, f"Intel SGX Root CA (collateral {doc.source})")
    pck.check_validity(signer, at, f"collateral signing certificate (for {doc.source})")
    if not doc.issue_date <= at <= doc.next_update:
        raise _chain_invalid(
            f"{doc.kind} in {doc.source} is valid {pck.rfc3339(doc.issue_date)} to "
            f"{pck.rfc3339(doc.next_update)}, not at {pck.rfc3339(at)}; fetch current "
            "collateral from Intel PCS"
        )


def _pick(docs: Sequence[TcbInfo] | Sequence[QeIdentity], at: datetime) -> SignedDoc | None:
    """The newest (highest tcbEvaluationDataNumber) document, preferring ones valid at `at`."""
    if not docs:
        return None
    ranked = sorted(
        (d.doc for d in docs),
        key=lambda d: (d.issue_date <= at <= d.next_update, d.eval_number, d.issue_date),
    )
    return ranked[-1]


def _check_crls(
    c: Collateral, chain: pck.PckChain, at: datetime
) -> tuple[str, tuple[tuple[str, object], ...]] | None:
    for crl in c.crls:
        if crl.crl.issuer == chain.intermediate.subject:
            issuer, target, what = chain.intermediate, chain.leaf, "PCK leaf"
        elif crl.crl.issuer == chain.root.subject:
            issuer, target, what = chain.root, chain.intermediate, "PCK CA"
        else:
            continue
        if not crl.signed_by(issuer):
            raise _chain_invalid(f"CRL in {crl.source} is not signed by {pck.cert_label(issuer)}")
        last, nxt = crl.crl.last_update_utc, crl.crl.next_update_utc
        if nxt is None or not last <= at <= nxt:
            window = f"{pck.rfc3339(last)} to {pck.rfc3339(nxt) if nxt else '?'}"
            raise _chain_invalid(
                f"CRL in {crl.source} is valid {window}, not at {pck.rfc3339(at)}; fetch a "
                "current CRL from Intel PCS"
            )
        entry = crl.crl.get_revoked_certificate_by_serial_number(target.serial_number)
        if entry is not None:
            return "Revoked", (
                ("revoked_certificate", f"{what} {pck.cert_label(target)}"),
                ("revoked_by", crl.source),
            )
    return None


def _platform_level(
    info: TcbInfo, platform: pck.PckTcb, tee_tcb_svn: bytes | None, skip_module: bool
) -> TcbLevel | None:
    for level in info.levels:
        if platform.pce_svn < level.pce_svn:
            continue
        if any(p < lv for p, lv in zip(platform.comp_svns, level.sgx_svns, strict=True)):
            continue
        if tee_tcb_svn is None:
            return level
        if level.tdx_svns is None:
            continue
        start = 2 if skip_module else 0
        if any(tee_tcb_svn[i] < level.tdx_svns[i] for i in range(start, 16)):
            continue
        return level
    return None


def _module_status(
    info: TcbInfo, tdx: tuple[bytes, bytes, bytes]
) -> tuple[bool, str | None, tuple[str, ...]]:
    """(skip module bytes?, module status or None, advisories); checks MRSIGNERSEAM."""
    tee, mrsignerseam, seam_attrs = tdx
    version, isvsvn = tee[1], tee[0]
    if version > 0:
        want = f"TDX_{version:02X}"
        ident = next((m for m in info.module_identities if m.id.upper() == want), None)
        if ident is None:
            return True, "TcbLevelNotSupported", ()
        ident.check(mrsignerseam, seam_attrs, info.doc.source)
        level = next((lv for lv in ident.levels if lv.isvsvn <= isvsvn), None)
        if level is None:
            oldest = ident.levels[-1].advisories if ident.levels else ()
            return True, "TcbLevelNotSupported", oldest
        return True, level.status, level.advisories
    if info.tdx_module is not None:
        info.tdx_module.check(mrsignerseam, seam_attrs, info.doc.source)
    return False, None, ()


def verify_quote(
    quote: dcap.Quote,
    *,
    at: datetime,
    roots: Sequence[x509.Certificate],
    qe_mrsigner: bytes,
    collateral: Collateral | None,
    tdx: tuple[bytes, bytes, bytes] | None,
) -> TcbVerdict:
    """Signatures and PCK chain of a parsed SGX or TDX quote, then its TCB status from
    `collateral` (unknown without it). `tdx` as for `evaluate_tcb`."""
    chain = dcap.verify_quote_signatures(quote, at=at, roots=roots, qe_mrsigner=qe_mrsigner)
    if collateral is None:
        return TcbVerdict.unknown()
    return evaluate_tcb(collateral, chain=chain, qe_report=quote.sig.qe_report, tdx=tdx,
                        at=at, roots=roots)


def evaluate_tcb(
    collateral: Collateral,
    *,
    chain: pck.PckChain,
    qe_report: dcap.EnclaveReport,
    tdx: tuple[bytes, bytes, bytes] | None,
    at: datetime,
    roots: Sequence[x509.Certificate],
) -> TcbVerdict:
    """TCB status of a quote whose signatures and PCK chain are already verified.

    `tdx` is (TEE_TCB_SVN, MRSIGNERSEAM, SEAMATTRIBUTES) for TDX quotes, None for SGX.
    """
    tcb = pck.pck_tcb(chain.leaf)
    details: list[tuple[str, object]] = [("fmspc", tcb.fmspc.hex())]
    revoked = _check_crls(collateral, chain, at)
    if revoked is not None:
        return TcbVerdict(TcbStatus.REVOKED, "Revoked", (), (*details, *revoked[1]))

    statuses: list[str] = []
    advisories: list[str] = []
    info_id, qe_id = ("TDX", "TD_QE") if tdx is not None else ("SGX", "QE")
    infos = [
        i
        for i in collateral.tcb_infos
        if i.id == info_id and i.fmspc == tcb.fmspc and i.pce_id == tcb.pce_id
    ]
    info_doc = _pick(infos, at)
    if info_doc is None:
        statuses.append("Unknown")
        details.append(("tcb_info", f"none for {info_id} FMSPC {tcb.fmspc.hex()}"))
    else:
        info = next(i for i in infos if i.doc is info_doc)
        _verify_doc(info_doc, collateral, at, roots)
        details.append(("tcb_evaluation_data_number", info.eval_number))
        skip, module_status = False, None
        module_adv: tuple[str, ...] = ()
        if tdx is not None:
            skip, module_status, module_adv = _module_status(info, tdx)
        if module_status is not None:
            statuses.append(module_status)
            advisories.extend(module_adv)
        level = _platform_level(info, tcb, tdx[0] if tdx else None, skip)
        if level is None:
            # Below every level Intel lists: at least the oldest level's advisories apply.
            statuses.append("TcbLevelNotSupported")
            if info.levels:
                advisories.extend(info.levels[-1].advisories)
        else:
            statuses.append(level.status)
            advisories.extend(level.advisories)
            details.append(("tcb_date", level.date))

    identities = [q for q in collateral.qe_identities if q.id == qe_id]
    qe_doc = _pick(identities, at)
    if qe_doc is None:
        statuses.append("Unknown")
        details.append(("qe_identity", f"none with id {qe_id}"))
    else:
        ident = next(q for q in identities if q.doc is qe_doc)
        _verify_doc(qe_doc, collateral, at, roots)
        ident.check(qe_report)
        qe_level = next((lv for lv in ident.levels if lv.isvsvn <= qe_report.isv_svn), None)
        qe_status = qe_level.status if qe_level else "TcbLevelNotSupported"
        statuses.append(qe_status)
        details.append(("qe_tcb_status", qe_status))
        if qe_level is not None:
            advisories.extend(qe_level.advisories)

    worst = max(statuses, key=lambda s: _INTEL_STATUS.get(s, (4, TcbStatus.UNKNOWN))[0])
    status = _INTEL_STATUS.get(worst, (4, TcbStatus.UNKNOWN))[1]
    return TcbVerdict(status, worst, tuple(dict.fromkeys(advisories)), tuple(details))
