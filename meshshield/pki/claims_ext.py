"""The attestation claims certificate extension (SPEC §5).

A leaf carries the claims as an attestation result in the RATS Conceptual Message
Wrapper extension (`pki.cmw`, OID 1.3.6.1.5.5.7.1.35, non-critical): a JSON Record CMW

    ["application/vnd.meshshield.claims+json", base64url(CLAIMS), 8]

where CLAIMS is exactly `json.dumps(claims, sort_keys=True, separators=(",", ":"))`
(an object with exactly the keys in `CLAIM_KEYS`) and 8 is the Attestation Results bit
of `ind`. When the service's policy says `embed_evidence: true`, the extension is a
Collection CMW instead, `{"claims": <that record>, "evidence": [EVIDENCE_MEDIA_TYPE,
base64url(EVIDENCE), 4]}`, where EVIDENCE is the canonical JSON of the evidence the CAS
verified (its SHA-256 is the claims' `evidence_sha256`), so a third party can verify
the hardware report again.

The first format (the bare claims JSON under the 126-bit OID `LEGACY_CLAIMS_OID`, which
GnuTLS, RustCrypto and Go cannot parse) is no longer issued; a peer presenting it is
refused with a message saying so.

Encoding is our side (the CAS): a bad claims mapping is a programming error and raises
ValueError. Decoding is the peer's side: anything wrong with a peer's extension raises
MeshError(Reason.PEER_NOT_ALLOWED) with a message that names the problem.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from meshshield.attestation.claims import Claims, Platform, TcbStatus
from meshshield.clock import rfc3339
from meshshield.errors import MeshError, Reason
from meshshield.pki.cmw import (
    CMW_OID,
    IND_ATTESTATION_RESULTS,
    IND_EVIDENCE,
    CmwError,
    CmwRecord,
    cmw_extension,
    decode_extension_value,
)
from meshshield.strictjson import no_duplicate_keys

CLAIMS_OID = CMW_OID  # the claims ride in the CMW extension
# The retired first format; kept only to tell its holders why they are refused.
LEGACY_CLAIMS_OID = x509.ObjectIdentifier("2.25.64512675946787070938330132843556121317")

CLAIMS_MEDIA_TYPE = "application/vnd.meshshield.claims+json"
EVIDENCE_MEDIA_TYPE = "application/vnd.meshshield.evidence+json"

CLAIM_KEYS: frozenset[str] = frozenset(
    {
        "platform",
        "measurement",
        "signer",
        "product_id",
        "svn",
        "debug",
        "tcb_status",
        "session",
        "service",
        "policy_hash",
        "evidence_sha256",
        "attested_at",
        "simulated",
    }
)

# Far above any real claims object (~600 bytes); bounds what we hand to json.loads.
MAX_CLAIMS_BYTES = 16 * 1024
# The whole extension value: claims plus, with embed_evidence, a TDX quote with its PCK
# chain (~10 KiB) or an SNP report with its VCEK, base64url-inflated.
MAX_EXTENSION_BYTES = 96 * 1024
# The largest evidence the CAS embeds: base64url-inflated, plus the claims, it stays
# under MAX_EXTENSION_BYTES, so every certificate the CAS issues is one peers accept.
MAX_EMBEDDED_EVIDENCE_BYTES = 64 * 1024

_HEX = re.compile(r"(?:[0-9a-f]{2}){1,128}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[a-z0-9-]{1,63}")
_RFC3339_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z")
_PLATFORMS = frozenset(p.value for p in Platform)
_TCB_STATUSES = frozenset(t.value for t in TcbStatus)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _matches(pattern: re.Pattern[str], v: object) -> bool:
    return isinstance(v, str) and pattern.fullmatch(v) is not None


def _is_time(v: object) -> bool:
    return _matches(_RFC3339_Z, v) and _parses_as_time(str(v))


# key -> (is the value acceptable?, what was expected)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "platform": (lambda v: v in _PLATFORMS, f"one of {', '.join(sorted(_PLATFORMS))}"),
    "measurement": (lambda v: _matches(_HEX, v), "lowercase hex"),
    "signer": (lambda v: v is None or _matches(_HEX, v), "lowercase hex or null"),
    "product_id": (lambda v: v is None or (_is_int(v) and 0 <= v < 2**64),
                   "a non-negative integer or null"),
    "svn": (lambda v: v is None or (_is_int(v) and 0 <= v < 2**64),
            "a non-negative integer or null"),
    "debug": (lambda v: isinstance(v, bool), "true or false"),
    "tcb_status": (lambda v: v in _TCB_STATUSES, f"one of {', '.join(sorted(_TCB_STATUSES))}"),
    "session": (lambda v: _matches(_NAME, v), "a name of [a-z0-9-]{1,63}"),
    "service": (lambda v: _matches(_NAME, v), "a name of [a-z0-9-]{1,63}"),
    "policy_hash": (lambda v: _matches(_SHA256_HEX, v), "64 lowercase hex digits"),
    "evidence_sha256": (lambda v: _matches(_SHA256_HEX, v), "64 lowercase hex digits"),
    "attested_at": (_is_time, "an RFC 3339 UTC time ending in Z"),
    "simulated": (lambda v: isinstance(v, bool), "true or false"),
}
assert set(_CHECKS) == CLAIM_KEYS


def _problems(claims: Mapping[str, Any]) -> list[str]:
    """Everything wrong with a claims object, one message each; empty when valid."""
    keys = set(claims.keys())
    out: list[str] = []
    if missing := CLAIM_KEYS - keys:
        out.append(f"missing keys: {', '.join(sorted(missing))}")
    if extra := keys - CLAIM_KEYS:
        out.append(f"unexpected keys: {', '.join(sorted(map(str, extra)))}")
    for key, (ok, expected) in _CHECKS.items():
        # Unhashable values (lists, dicts) must not break the `in` checks.
        if key in claims and not (_hashable(claims[key]) and ok(claims[key])):
            out.append(f"{key}: expected {expected}, found {_short(claims[key])}")
    # A simulated platform must never present itself as hardware-backed.
    if claims.get("platform") == Platform.SIM.value and claims.get("simulated") is not True:
        out.append("simulated: platform is sim, so simulated must be true")
    return out


def _hashable(v: object) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _parses_as_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def encode_claims(claims: Mapping[str, Any]) -> bytes:
    """The extension value for `claims`; ValueError if the keys or types are wrong."""
    problems = _problems(claims)
    if problems:
        raise ValueError("invalid certificate claims: " + "; ".join(problems))
    return json.dumps(dict(claims), sort_keys=True, separators=(",", ":")).encode("utf-8")


def claims_extension(
    claims: Mapping[str, Any], evidence: bytes | None = None
) -> x509.UnrecognizedExtension:
    """The CMW extension to add (non-critical) to a certificate builder: the claims
    record, or a collection of it and the `evidence` record when evidence is given."""
    record = CmwRecord(CLAIMS_MEDIA_TYPE, encode_claims(claims), IND_ATTESTATION_RESULTS)
    if evidence is None:
        return cmw_extension(record)
    if len(evidence) > MAX_EMBEDDED_EVIDENCE_BYTES:
        raise ValueError(f"evidence of {len(evidence)} bytes is too large to embed; at most "
                         f"{MAX_EMBEDDED_EVIDENCE_BYTES}")
    return cmw_extension(
        {"claims": record, "evidence": CmwRecord(EVIDENCE_MEDIA_TYPE, evidence, IND_EVIDENCE)}
    )


def certificate_claims(
    claims: Claims,
    *,
    session: str,
    service: str,
    policy_hash: str,
    evidence_sha256: str,
    attested_at: datetime,
) -> dict[str, Any]:
    """The certificate's claims object, from verified evidence and the issuance context."""
    return {
        "platform": claims.platform.value,
        "measurement": claims.measurement,
        "signer": claims.signer,
        "product_id": claims.product_id,
        "svn": claims.svn,
        "debug": claims.debug,
        "tcb_status": claims.tcb_status.value,
        "session": session,
        "service": service,
        "policy_hash": policy_hash,
        "evidence_sha256": evidence_sha256,
        "attested_at": rfc3339(attested_at),
        "simulated": claims.simulated,
    }


def _refuse(message: str) -> MeshError:
    return MeshError(
        Reason.PEER_NOT_ALLOWED,
        f"peer certificate claims extension (CMW, {CMW_OID.dotted_string}): {message}",
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def decode_claims(value: bytes) -> dict[str, Any]:
    """Parse and check an extension value; MeshError(PEER_NOT_ALLOWED) if it is wrong."""
    if len(value) > MAX_CLAIMS_BYTES:
        raise _refuse(f"value is {len(value)} bytes; at most {MAX_CLAIMS_BYTES} are allowed")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _refuse(f"value is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(
            text, object_pairs_hook=no_duplicate_keys, parse_constant=_no_constants
        )
    except (ValueError, RecursionError) as e:
        raise _refuse(f"value is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _refuse(f"value is JSON {type(obj).__name__}, expected an object")
    problems = _problems(obj)
    if problems:
        raise _refuse("; ".join(problems))
    return obj


@dataclass(frozen=True)
class AttestationExtension:
    """What a leaf's CMW extension carries: the checked claims, and the raw evidence
    when the service's policy embeds it (its SHA-256 is `claims["evidence_sha256"]`)."""

    claims: dict[str, Any]
    evidence: bytes | None


def _check_record(record: CmwRecord, where: str, media_type: str, ind: int) -> bytes:
    if record.type != media_type:
        raise _refuse(f"{where} has type {_short(record.type)}, expected {media_type}")
    if record.ind is not None and record.ind != ind:
        raise _refuse(f"{where} has ind {record.ind}, expected {ind} or none")
    return record.value


def decode_claims_extension(value: bytes) -> AttestationExtension:
    """Parse and check a CMW extension value; MeshError(PEER_NOT_ALLOWED) if it is wrong."""
    try:
        cmw = decode_extension_value(value, max_bytes=MAX_EXTENSION_BYTES)
    except CmwError as e:
        raise _refuse(str(e)) from None
    if isinstance(cmw, CmwRecord):
        raw = _check_record(cmw, "record", CLAIMS_MEDIA_TYPE, IND_ATTESTATION_RESULTS)
        return AttestationExtension(decode_claims(raw), None)
    if extra := sorted(set(cmw) - {"claims", "evidence"}):
        raise _refuse(f"collection has unexpected entries {', '.join(map(_short, extra))}; "
                      "expected claims and evidence")
    if "claims" not in cmw:
        raise _refuse("collection has no claims entry")
    claims = decode_claims(
        _check_record(cmw["claims"], "claims", CLAIMS_MEDIA_TYPE, IND_ATTESTATION_RESULTS)
    )
    evidence: bytes | None = None
    if "evidence" in cmw:
        evidence = _check_record(cmw["evidence"], "evidence", EVIDENCE_MEDIA_TYPE, IND_EVIDENCE)
        digest = hashlib.sha256(evidence).hexdigest()
        if not secrets.compare_digest(digest, str(claims["evidence_sha256"])):
            raise _refuse(f"embedded evidence has SHA-256 {digest[:16]}…, but the claims "
                          f"name {str(claims['evidence_sha256'])[:16]}…")
    return AttestationExtension(claims, evidence)


def attestation_from_certificate(cert: x509.Certificate) -> AttestationExtension:
    """The checked CMW extension of a peer's leaf certificate.

    Raises MeshError(Reason.PEER_NOT_ALLOWED) when the extension is missing (saying so
    plainly when the certificate has the retired first format), appears more than
    once, or does not decode to valid claims.
    """
    try:
        exts = cert.extensions
    except x509.DuplicateExtension:
        raise _refuse("the certificate carries an extension more than once") from None
    except ValueError as e:
        raise _refuse(f"the certificate's extensions do not parse ({e})") from None
    try:
        ext = exts.get_extension_for_oid(CMW_OID)
    except x509.ExtensionNotFound:
        if any(e.oid == LEGACY_CLAIMS_OID for e in exts):
            raise _refuse(
                f"missing; the certificate carries the retired claims extension "
                f"{LEGACY_CLAIMS_OID.dotted_string} instead, so it was issued by a CAS "
                "before the move to the CMW extension; upgrade that CAS and let the peer "
                "renew (meshshield certificates live at most 24 h)"
            ) from None
        raise _refuse(
            "missing; the peer's certificate was not issued by a meshshield CAS after "
            "attestation"
        ) from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - not parsed
        raise _refuse("unexpected extension type")
    return decode_claims_extension(value.value)


def claims_from_certificate(cert: x509.Certificate) -> dict[str, Any]:
    """The checked claims of a peer's leaf certificate (see attestation_from_certificate)."""
    return attestation_from_certificate(cert).claims
