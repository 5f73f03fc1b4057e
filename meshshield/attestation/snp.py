"""AMD SEV-SNP evidence: an attestation report and its VCEK/VLEK in, Claims out.

Evidence JSON (SPEC §4): ``{"report": b64 (1184 bytes), "certs": PEM VCEK or VLEK,
optionally followed by the ASK/ASVK and ARK}``.

What makes a report valid, in the order it is checked:

1. The report parses strictly (`snp_report.parse_snp_report`): version 2, 3 or 5,
   ECDSA P-384 signature algorithm, zeros wherever the ABI reserves them.
2. The VCEK (or VLEK) chains to a pinned AMD ARK through the product's ASK (or ASVK),
   every signature RSASSA-PSS/SHA-384, every certificate valid at `at`
   (`snp_chain.verify_chain`). The ASK/ASVK shipped in `certs/` is used when the
   evidence does not carry one.
3. The report's ECDSA P-384/SHA-384 signature (r, s little-endian at 0x2A0/0x2E8) over
   bytes 0x000..0x29F verifies with the VCEK/VLEK key.
4. The report agrees with the certificate: SIGNING_KEY names the kind of key that
   signed it; the CPUID (version 3+) names the certificate's product; REPORTED_TCB
   equals the VCEK/VLEK's SPL extensions (bootloader, TEE, SNP, microcode, and FMC on
   Turin, whose TCB_VERSION layout differs); CHIP_ID equals a VCEK's hwID unless the
   host masked it (all zero).

Step 2 comes before step 3 so that a certificate that is not AMD's is reported as
chain_invalid whatever the report says, and a changed report byte as
signature_invalid whatever the certificate says; step 4 only runs on a report AMD
signed. There is no TCB collateral for SNP yet, so `tcb_status` is unknown.

Every failure is an EvidenceError: evidence_malformed (shape, base64, layout),
signature_invalid (report signature, or an unsigned report) or chain_invalid
(certificates, windows, pins, and report/certificate disagreement).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meshshield.attestation.claims import Claims, Platform, TcbStatus
from meshshield.attestation.snp_chain import (
    CERT_DECODE_ERRORS,
    MAX_CERTS,
    MAX_CERTS_BYTES,
    OID_BL_SPL,
    OID_CSP_ID,
    OID_FMC_SPL,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    VerifiedChain,
    hwid_extension,
    load_certificates,
    spl_extension,
    string_extension,
    verify_chain,
)
from meshshield.attestation.snp_report import (
    REPORT_SIZE,
    Product,
    SigningKey,
    SnpReport,
    TcbVersion,
    decode_tcb,
    parse_snp_report,
)
from meshshield.errors import EvidenceError, Reason

__all__ = ["verify_snp_evidence", "verify_snp_report"]

_EVIDENCE_KEYS = frozenset({"report", "certs"})
_MAX_REPORT_B64 = 4 * ((REPORT_SIZE + 2) // 3)


def verify_snp_evidence(
    evidence: object,
    *,
    at: datetime,
    extra_certs: bytes | None = None,
    roots: Sequence[x509.Certificate] | None = None,
) -> Claims:
    """Verify decoded SEV-SNP evidence JSON (untrusted) at time `at`.

    `extra_certs` (DER or PEM, e.g. the CLI's --certs) adds to the evidence's "certs",
    which may then be omitted. `roots` replaces the pinned AMD ARKs (tests only).
    Raises only EvidenceError.
    """
    obj = _check_shape(evidence, have_extra=extra_certs is not None)
    report = _b64_report(obj["report"])
    blobs: list[bytes] = []
    pem = obj.get("certs")
    if pem is not None:
        if not isinstance(pem, str) or not pem.isascii() or len(pem) > MAX_CERTS_BYTES:
            raise _malformed(
                f'"certs" must be a PEM string of at most {MAX_CERTS_BYTES} ASCII characters'
            )
        blobs.append(pem.encode("ascii"))
    if extra_certs is not None:
        blobs.append(extra_certs)
    return _verify(report, blobs, at=at, roots=roots)


def verify_snp_report(
    report: bytes,
    certs: bytes,
    *,
    at: datetime,
    roots: Sequence[x509.Certificate] | None = None,
) -> Claims:
    """Verify a raw 1184-byte report with its VCEK/VLEK (DER or PEM, optionally followed
    by the ASK/ASVK and ARK as PEM) at time `at`. Raises only EvidenceError."""
    return _verify(report, [certs], at=at, roots=roots)


def _verify(
    raw_report: bytes,
    cert_blobs: Sequence[bytes],
    *,
    at: datetime,
    roots: Sequence[x509.Certificate] | None,
) -> Claims:
    when = _utc(at)
    report = parse_snp_report(raw_report)
    try:
        certs: list[x509.Certificate] = []
        for blob in cert_blobs:
            certs.extend(load_certificates(blob))
        if len(certs) > MAX_CERTS:
            raise _malformed(f"{len(certs)} certificates given; at most {MAX_CERTS} accepted")
        want = {SigningKey.VCEK: "vcek", SigningKey.VLEK: "vlek"}.get(report.signing_key)
        chain = verify_chain(certs, at=when, want_kind=want, roots=roots)
        _check_report_signature(report, chain)
        reported = _check_report_matches_chain(report, chain)
        return _claims(report, chain, reported)
    except CERT_DECODE_ERRORS as e:
        # `cryptography` parses certificates lazily; a malformed name or extension
        # surfaces here rather than at load time.
        raise _malformed(f"certificate could not be decoded ({type(e).__name__}: {e})") from None


def _utc(at: datetime) -> datetime:
    if not isinstance(at, datetime):
        raise TypeError("at must be a datetime")
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _check_report_signature(report: SnpReport, chain: VerifiedChain) -> None:
    if report.signing_key is SigningKey.NONE:
        raise EvidenceError(
            Reason.SIGNATURE_INVALID,
            "sev-snp report is unsigned (SIGNING_KEY = 7 at offset 0x048): the firmware did "
            "not sign it; request a report from the guest's /dev/sev-guest or configfs-tsm",
        )
    try:
        chain.leaf_key.verify(
            encode_dss_signature(report.signature_r, report.signature_s),
            report.signed_bytes,
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature:
        raise EvidenceError(
            Reason.SIGNATURE_INVALID,
            f"sev-snp report signature does not verify with the {chain.kind.upper()} given "
            "(report bytes 0x000..0x29f were changed, or the certificate belongs to another "
            "chip or TCB)",
        ) from None


def _mismatch(message: str) -> EvidenceError:
    return EvidenceError(Reason.CHAIN_INVALID, "sev-snp report and certificate: " + message)


def _check_report_matches_chain(report: SnpReport, chain: VerifiedChain) -> TcbVersion:
    """Step 4 of the module docstring; returns REPORTED_TCB decoded for the product."""
    kind, product, role = chain.kind, chain.product, chain.kind.upper()
    signed_by = "vcek" if report.signing_key is SigningKey.VCEK else "vlek"
    if signed_by != kind:
        raise _mismatch(
            f"SIGNING_KEY says the report was signed by the {signed_by.upper()}, "
            f"but the certificate given is a {role}"
        )
    cpu = report.cpuid_product
    if cpu is not None and cpu is not product:
        raise _mismatch(
            f"the report's CPUID is that of {cpu.value.capitalize()}, but the {role} is "
            f"issued for {product.value.capitalize()}"
        )
    name = string_extension(chain.leaf, OID_PRODUCT_NAME)
    if name is not None and name.split("-")[0].lower() != product.value:
        raise _mismatch(f"the {role} names product {name!r} but is issued by {product.value}")
    reported = decode_tcb(report.reported_tcb, product)
    fields: list[tuple[str, x509.ObjectIdentifier, int | None]] = [
        ("bootloader", OID_BL_SPL, reported.bootloader),
        ("tee", OID_TEE_SPL, reported.tee),
        ("snp", OID_SNP_SPL, reported.snp),
        ("microcode", OID_UCODE_SPL, reported.microcode),
    ]
    if product is Product.TURIN:
        fields.append(("fmc", OID_FMC_SPL, reported.fmc))
    for field, oid, value in fields:
        spl = spl_extension(chain.leaf, oid, f"{role} {field} SPL")
        if spl is None:
            raise _mismatch(f"the {role} has no {field} SPL extension ({oid.dotted_string})")
        if spl != value:
            raise _mismatch(
                f"REPORTED_TCB {field} is {value} but the {role} is for {field} SPL {spl}; "
                f"fetch the {role} for this TCB ({_tcb_text(reported)}) from AMD's KDS"
            )
    if kind == "vcek" and any(report.chip_id):
        _check_hwid(report, chain)
    return reported


def _check_hwid(report: SnpReport, chain: VerifiedChain) -> None:
    hwid = hwid_extension(chain.leaf)
    if hwid is None:
        raise _mismatch("the VCEK has no hwID extension (1.3.6.1.4.1.3704.1.4)")
    chip = report.chip_id
    if len(hwid) == len(chip):
        same = hwid == chip
    elif chain.product is Product.TURIN and len(hwid) == 8:
        same = hwid == chip[:8] and not any(chip[8:])
    else:
        raise _mismatch(f"the VCEK hwID is {len(hwid)} bytes; expected 64 (8 on Turin)")
    if not same:
        raise _mismatch(
            f"CHIP_ID {chip.hex()[:16]}... is not the VCEK's hwID {hwid.hex()[:16]}...: "
            "the VCEK belongs to another chip"
        )


def _tcb_text(tcb: TcbVersion) -> str:
    return ", ".join(f"{k}={v}" for k, v in tcb.to_json().items())


def _claims(report: SnpReport, chain: VerifiedChain, reported: TcbVersion) -> Claims:
    product = chain.product
    extra: dict[str, Any] = {
        "host_data": report.host_data.hex(),
        "chip_id": report.chip_id.hex(),
        "chip_id_masked": not any(report.chip_id),
        "reported_tcb": reported.to_json(),
        "current_tcb": decode_tcb(report.current_tcb, product).to_json(),
        "committed_tcb": decode_tcb(report.committed_tcb, product).to_json(),
        "launch_tcb": decode_tcb(report.launch_tcb, product).to_json(),
        "report_version": report.version,
        "guest_svn": report.guest_svn,
        "vmpl": report.vmpl,
        "policy": f"0x{report.policy:x}",
        "platform_info": f"0x{report.platform_info:x}",
        "product": product.value,
        "signing_key": chain.kind,
        "id_key_digest": report.id_key_digest.hex(),
        "author_key_digest": report.author_key_digest.hex(),
        "author_key_en": report.author_key_en,
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "report_id": report.report_id.hex(),
        "firmware": report.firmware_json(),
    }
    if report.cpuid is not None:
        fam, model, step = report.cpuid
        extra["cpuid"] = {"family": fam, "model": model, "stepping": step}
    if report.launch_mit_vector is not None and report.current_mit_vector is not None:
        extra["launch_mit_vector"] = f"0x{report.launch_mit_vector:x}"
        extra["current_mit_vector"] = f"0x{report.current_mit_vector:x}"
    csp = string_extension(chain.leaf, OID_CSP_ID)
    if csp is not None:
        extra["csp_id"] = csp
    return Claims(
        platform=Platform.SEV_SNP,
        measurement=report.measurement.hex(),
        report_data=report.report_data,
        debug=report.debug,
        tcb_status=TcbStatus.UNKNOWN,
        extra=extra,
    )


# --- evidence JSON --------------------------------------------------------------------


def _malformed(message: str) -> EvidenceError:
    return EvidenceError(Reason.EVIDENCE_MALFORMED, "sev-snp evidence: " + message)


def _check_shape(evidence: object, *, have_extra: bool) -> dict[object, object]:
    if not isinstance(evidence, dict):
        raise _malformed(
            'must be a JSON object {"report": base64, "certs": PEM}, '
            f"got {type(evidence).__name__}"
        )
    keys = set(evidence)
    if "quote" in keys:
        raise _malformed(
            'it has a "quote": that is tdx or sgx evidence, not sev-snp; check the platform '
            "the service attests with"
        )
    if "signature" in keys:
        raise _malformed(
            'it has a "signature": that is sim evidence, not sev-snp; check the platform '
            "the service attests with"
        )
    unknown = sorted(repr(k) for k in keys - _EVIDENCE_KEYS)
    if unknown:
        raise _malformed(
            'only the keys "report" and "certs" are allowed; unexpected ' + ", ".join(unknown[:5])
        )
    if "report" not in keys:
        raise _malformed('"report" (the base64 attestation report) is missing')
    if evidence.get("certs") is None and not have_extra:
        raise _malformed(
            '"certs" (the PEM VCEK or VLEK) is missing; include it, or pass it with --certs'
        )
    return evidence


def _b64_report(value: object) -> bytes:
    if not isinstance(value, str):
        raise _malformed(f'"report" must be a base64 string, got {type(value).__name__}')
    if len(value) > _MAX_REPORT_B64 or not value.isascii():
        raise _malformed(
            f'"report" must be at most {_MAX_REPORT_B64} characters of base64 '
            f"({REPORT_SIZE} bytes), got {len(value)} characters"
        )
    encoded = value.encode("ascii")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise _malformed('"report" is not valid standard base64') from None
    if base64.b64encode(raw) != encoded:
        raise _malformed('"report" is not canonical base64')
    return raw
