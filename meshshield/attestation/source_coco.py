"""Evidence from the Confidential Containers guest components, inside a CoCo pod.

The attestation agent (AA) of confidential-containers/guest-components is reached
through its REST front end, api-server-rest, on ``http://127.0.0.1:8006`` in the pod
sandbox (it answers loopback callers only; no root and no device access needed)::

    GET /aa/evidence?runtime_data=<value>[&encoding=base64]
    -> 200, application/octet-stream: the evidence JSON of the AA's attester

How runtime_data becomes report_data (read in guest-components' api-server-rest
`aa.rs`, attestation-agent `lib.rs` and the snp / tdx / sgx_dcap attesters):

- Without ``encoding``, the query value is taken as **text**: percent-decoded and
  turned into a UTF-8 string (invalid bytes become U+FFFD), and its UTF-8 bytes are
  the runtime data (issue guest-components#1434).
- With ``encoding=base64`` (guest-components PR #1487, merged 2026-05-22), the value is
  decoded as URL-safe base64 without padding into raw bytes.
- The AA does **not hash** runtime data for SEV-SNP, TDX or SGX: the attester refuses
  more than 64 bytes and zero-pads shorter input into REPORT_DATA. One exception: a
  recent SNP attester, in a guest running under an SVSM with the vTPM service, gets a
  VMPL0 report from the SVSM, which binds SHA-512(runtime_data || vTPM manifest) and
  adds ``svsm_manifest`` to the evidence. That REPORT_DATA can never equal SPEC §4's
  value, so such evidence is refused here (the CAS would say report_data_mismatch).

So meshshield sends its 64-byte binding, SHA-512("meshshield/v1" || nonce || SPKI), as
unpadded URL-safe base64 with ``encoding=base64``, and the TEE's REPORT_DATA is exactly
SPEC §4's value: the CAS needs no special case. An api-server-rest older than PR #1487
cannot carry our binding at all: 64 arbitrary bytes are not valid UTF-8 text, and any
text encoding of them (86 base64 or 128 hex characters) exceeds the attester's 64-byte
limit. Such a server answers 405 (builds that accept exactly one query parameter) or
500 ("no more than 64 bytes"); this module reports that and says to upgrade the guest
components. Whatever the server, the answer is parsed and its REPORT_DATA compared
with ours before it is used, so a binding the CAS would refuse never leaves the pod.

The AA's answer, and what we make of it:

- tdx / sgx: ``{"quote": base64, "cc_eventlog": ...}`` -> ``{"quote": base64}``.
- sev-snp: ``{"attestation_report": {...}, "cert_chain": [{"cert_type": "VCEK",
  "data": [bytes]}, ...]}``, the serde JSON of the `sev` crate's AttestationReport
  and CertTableEntry. The 1184-byte report is rebuilt field by field at the offsets of
  the SNP ABI (names of old and new `sev` releases both understood) and its signature
  checked here with the VCEK/VLEK from cert_chain: a rebuild that is not byte-exact is
  refused with a message, rather than becoming signature_invalid at the CAS.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from meshshield.attestation.claims import Platform
from meshshield.attestation.snp_chain import load_certificates
from meshshield.attestation.snp_report import REPORT_SIZE, SIGNED_SIZE
from meshshield.attestation.source_base import (
    EvidenceSourceError,
    b64,
    check_binding,
    require_report_data,
)
from meshshield.attestation.source_tsm import signing_key_of
from meshshield.errors import EvidenceError

DEFAULT_AA_URL = "http://127.0.0.1:8006"
EVIDENCE_PATH = "/aa/evidence"
TIMEOUT = 60.0  # a TDX quote goes through the host's quote generation service
MAX_RESPONSE = 1 << 20
UPGRADE_HINT = (
    "this api-server-rest does not understand encoding=base64 (added by guest-components "
    "PR #1487, 2026-05) and would take runtime_data as text, which cannot carry 64 "
    "arbitrary bytes; upgrade the pod's guest components (kata/CoCo release with "
    "api-server-rest after 2026-05-22)"
)


def coco_aa_evidence(
    platform: Platform,
    report_data: bytes,
    *,
    url: str = DEFAULT_AA_URL,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """SPEC §4 evidence JSON for `platform` from the CoCo attestation agent at `url`."""
    require_report_data(report_data)
    body = fetch_aa_evidence(url, report_data, timeout=timeout)
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        raise EvidenceSourceError(
            f"the attestation agent at {url} answered with {len(body)} bytes that are not "
            "JSON evidence"
        ) from None
    return aa_to_evidence(platform, answer, report_data, where=f"the attestation agent at {url}")


def evidence_url(url: str, report_data: bytes) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EvidenceSourceError(
            f"MESHSHIELD_COCO_AA_URL={url!r} is not an http(s) URL; inside a CoCo pod it is "
            f"{DEFAULT_AA_URL}"
        )
    runtime = base64.urlsafe_b64encode(bytes(report_data)).rstrip(b"=").decode("ascii")
    query = urllib.parse.urlencode({"runtime_data": runtime, "encoding": "base64"})
    return f"{url.rstrip('/')}{EVIDENCE_PATH}?{query}"


def fetch_aa_evidence(url: str, report_data: bytes, *, timeout: float = TIMEOUT) -> bytes:
    """GET /aa/evidence; the raw body, or EvidenceSourceError saying what to do."""
    full = evidence_url(url, report_data)
    # The AA listens on the pod's loopback: never go through an HTTP proxy for it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(full, method="GET")  # noqa: S310 - scheme checked above
    try:
        with opener.open(req, timeout=timeout) as r:
            body: bytes = r.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as e:
        raise _http_error(url, e.code, _text(e.read(2048))) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EvidenceSourceError(
            f"no attestation agent API at {url} ({reason}): inside a Confidential Containers "
            "pod, api-server-rest (guest components) serves it on 127.0.0.1:8006 with the "
            "attestation feature; check MESHSHIELD_COCO_AA_URL, or outside CoCo use "
            "MESHSHIELD_EVIDENCE_SOURCE=configfs-tsm"
        ) from None
    if len(body) > MAX_RESPONSE:
        raise EvidenceSourceError(f"the attestation agent at {url} answered with over 1 MiB")
    return body


def _text(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()[:300]


def _http_error(url: str, status: int, body: str) -> EvidenceSourceError:
    where = f"the attestation agent at {url}{EVIDENCE_PATH}"
    said = f" ({body})" if body else ""
    if status == 403:
        return EvidenceSourceError(
            f"{where} refused the request (403{said}): it answers loopback callers only; "
            "run the sidecar in the same pod and use http://127.0.0.1:8006"
        )
    if status == 404:
        return EvidenceSourceError(
            f"{where} does not exist (404{said}): start api-server-rest with the attestation "
            "feature (--features attestation or all)"
        )
    if status in (400, 405):
        return EvidenceSourceError(f"{where} rejected the request ({status}{said}): {UPGRADE_HINT}")
    hint = UPGRADE_HINT if "64 bytes" in body else "check the attestation agent's log"
    return EvidenceSourceError(f"{where} failed ({status}{said}): {hint}")


def aa_to_evidence(
    platform: Platform, answer: object, report_data: bytes, *, where: str
) -> dict[str, Any]:
    """Map the AA's attester JSON to SPEC §4 evidence, checking our binding."""
    if not isinstance(answer, Mapping):
        raise EvidenceSourceError(f"{where} answered with a JSON {type(answer).__name__}")
    keys = set(answer)
    if "attestation_report" in keys:
        found = Platform.SEV_SNP
    elif isinstance(answer.get("quote"), str):
        found = Platform.TDX if platform is not Platform.SGX else Platform.SGX
    elif {"svn", "report_data"} <= keys:
        raise EvidenceSourceError(
            f"{where} answered with the sample attester's evidence: it found no TEE. The pod "
            "is not running in a confidential VM (or the guest components lack the "
            f"{platform.value} attester)"
        )
    else:
        shown = sorted(str(k)[:30] for k in keys)[:6]
        raise EvidenceSourceError(
            f"{where} answered with evidence meshshield does not know (keys {shown}; vTPM-based "
            f"attesters are not supported); expected the {platform.value} attester's evidence"
        )
    if (found is Platform.SEV_SNP) != (platform is Platform.SEV_SNP):
        raise EvidenceSourceError(
            f"{where} runs a {'sev-snp' if found is Platform.SEV_SNP else 'tdx/sgx'} attester, "
            f"but the service attests as {platform.value}: set the platform this pod runs on"
        )
    if platform is Platform.SEV_SNP:
        return _snp_evidence(answer, report_data, where)
    quote = _b64_field(answer["quote"], "quote", where)
    check_binding(platform, quote, report_data, where)
    return {"quote": b64(quote)}


def _b64_field(value: str, name: str, where: str) -> bytes:
    text = value.strip()
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceSourceError(f'{where}: "{name}" is not base64') from None


# --- sev-snp: the `sev` crate's serde JSON back into report bytes -------------------------

_U32 = {"version": 0x000, "guest_svn": 0x004, "vmpl": 0x030, "sig_algo": 0x034,
        "key_info": 0x048, "author_key_en": 0x048}
_U64 = {"policy": 0x008, "plat_info": 0x040, "launch_mit_vector": 0x1F8,
        "current_mit_vector": 0x200}
_U8 = {"cpuid_fam_id": 0x188, "cpuid_mod_id": 0x189, "cpuid_step": 0x18A,
       "current_build": 0x1E8, "current_minor": 0x1E9, "current_major": 0x1EA,
       "committed_build": 0x1EC, "committed_minor": 0x1ED, "committed_major": 0x1EE}
_BYTES = {"family_id": (0x010, 16), "image_id": (0x020, 16), "report_data": (0x050, 64),
          "measurement": (0x090, 48), "host_data": (0x0C0, 32), "id_key_digest": (0x0E0, 48),
          "author_key_digest": (0x110, 48), "report_id": (0x140, 32),
          "report_id_ma": (0x160, 32), "chip_id": (0x1A0, 64)}
_TCB = {"current_tcb": 0x038, "reported_tcb": 0x180, "committed_tcb": 0x1E0,
        "launch_tcb": 0x1F0}
_VERSION = {"current": 0x1E8, "committed": 0x1EC}  # {major, minor, build} -> build, minor, major
_REQUIRED = ("version", "policy", "report_data", "measurement", "reported_tcb", "signature")
TURIN_FAMILY = 0x1A


def snp_report_from_sev_json(obj: Mapping[str, Any]) -> bytes:
    """Rebuild the 1184-byte report from the `sev` crate's serde JSON; ValueError if a
    field has an unexpected shape. Unknown fields are ignored (reserved bytes are 0)."""
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"fields {missing} are missing")
    out = bytearray(REPORT_SIZE)
    turin = _int(obj.get("cpuid_fam_id") or 0, "cpuid_fam_id", 0xFF) >= TURIN_FAMILY
    for name, off in _U32.items():
        if obj.get(name) is not None:
            struct.pack_into("<I", out, off, _int(obj[name], name, 0xFFFFFFFF))
    for name, off in _U64.items():
        if obj.get(name) is not None:
            struct.pack_into("<Q", out, off, _int(obj[name], name, (1 << 64) - 1))
    for name, off in _U8.items():
        if obj.get(name) is not None:
            out[off] = _int(obj[name], name, 0xFF)
    for name, (off, size) in _BYTES.items():
        if obj.get(name) is not None:
            out[off : off + size] = _bytes(obj[name], name, size)
    for name, off in _TCB.items():
        if obj.get(name) is not None:
            out[off : off + 8] = _tcb(obj[name], name, turin)
    for name, off in _VERSION.items():
        v = obj.get(name)
        if isinstance(v, Mapping):
            out[off : off + 3] = bytes(
                _int(v.get(k, 0), f"{name}.{k}", 0xFF) for k in ("build", "minor", "major")
            )
    sig = obj["signature"]
    if not isinstance(sig, Mapping) or "r" not in sig or "s" not in sig:
        raise ValueError('"signature" must be an object with "r" and "s"')
    out[0x2A0:0x2E8] = _bytes(sig["r"], "signature.r", 72)
    out[0x2E8:0x330] = _bytes(sig["s"], "signature.s", 72)
    return bytes(out)


def _int(value: object, name: str, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f'"{name}" must be an integer 0..{top}, got {str(value)[:40]}')
    return value


def _bytes(value: object, name: str, size: int | None) -> bytes:
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f'"{name}" is a string but not base64') from None
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        if len(value) > 1 << 16:
            raise ValueError(f'"{name}" is too long')
        raw = bytes(_int(b, name, 0xFF) for b in value)
    else:
        raise ValueError(f'"{name}" must be a list of bytes, got {type(value).__name__}')
    if size is not None and len(raw) != size:
        raise ValueError(f'"{name}" must be {size} bytes, got {len(raw)}')
    return raw


def _tcb(value: object, name: str, turin: bool) -> bytes:
    if isinstance(value, int) and not isinstance(value, bool):
        return struct.pack("<Q", _int(value, name, (1 << 64) - 1))
    if not isinstance(value, Mapping):
        raise ValueError(f'"{name}" must be a TCB object, got {type(value).__name__}')
    bl, tee, snp, ucode = (
        _int(value.get(k, 0), f"{name}.{k}", 0xFF)
        for k in ("bootloader", "tee", "snp", "microcode")
    )
    fmc = value.get("fmc")
    if fmc is not None or turin:
        return bytes([_int(fmc or 0, f"{name}.fmc", 0xFF), bl, tee, snp, 0, 0, 0, ucode])
    return bytes([bl, tee, 0, 0, 0, 0, snp, ucode])


def _snp_evidence(answer: Mapping[str, Any], report_data: bytes, where: str) -> dict[str, Any]:
    if answer.get("svsm_manifest") is not None:
        raise EvidenceSourceError(
            f"{where} obtained the sev-snp report through the SVSM vTPM service "
            "(svsm_manifest present): the SVSM puts SHA-512(runtime_data || vTPM manifest) "
            "into REPORT_DATA, not the 64 bytes meshshield binds, so the CAS would refuse it "
            "with report_data_mismatch. Use MESHSHIELD_EVIDENCE_SOURCE=configfs-tsm in the "
            "guest (as root), or a guest without the SVSM vTPM service"
        )
    raw = answer["attestation_report"]
    try:
        if isinstance(raw, Mapping):
            report = snp_report_from_sev_json(raw)
        else:  # some builds give the raw report (base64 or a byte list)
            report = _bytes(raw, "attestation_report", REPORT_SIZE)
    except ValueError as e:
        raise EvidenceSourceError(f"{where}: sev-snp attestation_report: {e}") from None
    check_binding(Platform.SEV_SNP, report, report_data, where)
    kind = "VLEK" if signing_key_of(report) == 1 else "VCEK"
    chain = _cert_chain(answer.get("cert_chain"), where)
    if kind not in chain:
        raise EvidenceSourceError(
            f"{where}: the sev-snp evidence's cert_chain has no {kind} (it has "
            f"{sorted(chain) or 'nothing'}): the host did not supply the certificates with "
            f"the report. Configure the host to provide the {kind} (SNP extended guest "
            f"request, e.g. `snphost import`), because the CAS verifies the {kind} carried "
            "in the evidence"
        )
    _check_rebuilt_signature(report, chain[kind], kind, where)
    pems = [chain[k] for k in (kind, "ASK", "ASVK", "ARK") if k in chain]
    return {"report": b64(report), "certs": "".join(pems)}


def _cert_chain(entries: object, where: str) -> dict[str, str]:
    """cert_type -> PEM for a `sev` CertTableEntry list."""
    if entries is None:
        return {}
    if not isinstance(entries, Sequence) or isinstance(entries, str | bytes):
        raise EvidenceSourceError(f'{where}: "cert_chain" must be a list')
    out: dict[str, str] = {}
    for e in entries[:16]:
        if not isinstance(e, Mapping):
            continue
        kind = e.get("cert_type")
        if not isinstance(kind, str) or kind.upper() not in ("VCEK", "VLEK", "ASK", "ARK"):
            continue  # CRLs, OTHER(uuid)
        try:
            data = _bytes(e.get("data"), f"cert_chain {kind}", None)
            certs = load_certificates(data)
        except (ValueError, EvidenceError) as err:
            raise EvidenceSourceError(f"{where}: the {kind} in cert_chain: {err}") from None
        if certs:
            out[kind.upper()] = certs[0].public_bytes(Encoding.PEM).decode("ascii")
    return out


def _check_rebuilt_signature(report: bytes, pem: str, kind: str, where: str) -> None:
    key = load_certificates(pem.encode("ascii"))[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EvidenceSourceError(f"{where}: the {kind} does not hold an EC key")
    r = int.from_bytes(report[0x2A0:0x2E8], "little")
    s = int.from_bytes(report[0x2E8:0x330], "little")
    try:
        key.verify(encode_dss_signature(r, s), report[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise EvidenceSourceError(
            f"{where}: the sev-snp report rebuilt from the attestation agent's JSON does not "
            f"verify with the {kind} it sent: the agent's `sev` crate lays the report out in "
            "a way meshshield does not know yet (report the attestation agent's version), or "
            f"the {kind} belongs to another chip"
        ) from None
