"""Reading Intel collateral files: TCB info / enclave identity JSON, certificates, CRLs.

Only parsing and shape checks happen here; signatures and validity are checked against
each quote in `meshshield.attestation.collateral`. Every problem is an EvidenceError
(evidence_malformed) that names the file and the JSON path.

The signed bytes of a TCB info or enclave identity are the ``"tcbInfo"`` /
``"enclaveIdentity"`` value exactly as it appears in the file: the top-level object is
walked with the standard library's JSON scanner to find where that value starts and
ends, and the slice of the original text is kept. Duplicate keys anywhere are refused
(they would let the signed text and the parsed meaning disagree).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from json.decoder import scanstring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.attestation.dcap import EnclaveReport
from meshshield.attestation.pck import PARSE_ERRORS, check_readable, verify_p256
from meshshield.errors import EvidenceError, Reason
from meshshield.strictjson import no_duplicate_keys

_MAX_FILE = 4 << 20
_MAX_FILES = 512
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)
_WS = " \t\r\n"


def _bad(source: str, message: str) -> EvidenceError:
    return EvidenceError(Reason.EVIDENCE_MALFORMED, f"collateral {source}: {message}")


@dataclass(frozen=True)
class SignedDoc:
    kind: str  # "tcbInfo" or "enclaveIdentity"
    source: str
    raw: bytes  # the signed bytes
    signature: bytes  # r || s
    issue_date: datetime
    next_update: datetime
    eval_number: int

    def signed_by(self, cert: x509.Certificate) -> bool:
        try:
            key = cert.public_key()
        except PARSE_ERRORS:
            return False
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            return False
        return verify_p256(key, self.signature, self.raw)


@dataclass(frozen=True)
class CollateralCrl:
    source: str
    crl: x509.CertificateRevocationList

    def signed_by(self, cert: x509.Certificate) -> bool:
        try:
            key = cert.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False
            return self.crl.is_signature_valid(key)
        except PARSE_ERRORS:
            return False


@dataclass(frozen=True)
class TcbLevel:
    sgx_svns: tuple[int, ...]
    pce_svn: int
    tdx_svns: tuple[int, ...] | None
    status: str
    date: str
    advisories: tuple[str, ...]


@dataclass(frozen=True)
class IsvLevel:
    isvsvn: int
    status: str
    advisories: tuple[str, ...]


@dataclass(frozen=True)
class ModuleIdentity:
    """A TDX module's expected MRSIGNERSEAM and SEAM attributes (and, if versioned, levels)."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[IsvLevel, ...]

    def check(self, mrsignerseam: bytes, seam_attributes: bytes, source: str) -> None:
        masked = bytes(a & m for a, m in zip(seam_attributes, self.attributes_mask, strict=False))
        if mrsignerseam != self.mrsigner or masked != self.attributes:
            raise EvidenceError(
                Reason.CHAIN_INVALID,
                f"TDX module (MRSIGNERSEAM {mrsignerseam.hex()}, SEAM attributes "
                f"{seam_attributes.hex()}) does not match Intel's TDX module identity "
                f"{self.id or ''} in {source} (MRSIGNER {self.mrsigner.hex()})",
            )


@dataclass(frozen=True)
class TcbInfo:
    doc: SignedDoc
    id: str
    fmspc: bytes
    pce_id: bytes
    eval_number: int
    levels: tuple[TcbLevel, ...]
    tdx_module: ModuleIdentity | None
    module_identities: tuple[ModuleIdentity, ...]


@dataclass(frozen=True)
class QeIdentity:
    doc: SignedDoc
    id: str
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[IsvLevel, ...]

    def check(self, qe: EnclaveReport) -> None:
        masked = bytes(a & m for a, m in zip(qe.attributes, self.attributes_mask, strict=True))
        problems = []
        if qe.mr_signer != self.mrsigner:
            problems.append(f"MRSIGNER {qe.mr_signer.hex()} != {self.mrsigner.hex()}")
        if qe.isv_prod_id != self.isvprodid:
            problems.append(f"ISVPRODID {qe.isv_prod_id} != {self.isvprodid}")
        if qe.misc_select & self.miscselect_mask != self.miscselect:
            problems.append(f"masked MISCSELECT {qe.misc_select & self.miscselect_mask:08x}")
        if masked != self.attributes:
            problems.append(f"masked ATTRIBUTES {masked.hex()} != {self.attributes.hex()}")
        if problems:
            raise EvidenceError(
                Reason.CHAIN_INVALID,
                f"the quoting enclave does not match Intel's {self.id} identity in "
                f"{self.doc.source}: " + "; ".join(problems),
            )


# --- JSON with exact signed bytes ------------------------------------------------------


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _top_level(text: str, source: str) -> dict[str, tuple[Any, int, int]]:
    """Members of the top-level JSON object: key -> (value, start, end) in `text`."""
    decoder = json.JSONDecoder(object_pairs_hook=no_duplicate_keys)
    members: dict[str, tuple[Any, int, int]] = {}
    try:
        i = _skip(text, 0)
        if text[i : i + 1] != "{":
            raise ValueError("not a JSON object")
        i = _skip(text, i + 1)
        while text[i : i + 1] != "}":
            if text[i : i + 1] != '"':
                raise ValueError(f"expected a key at character {i}")
            key, i = scanstring(text, i + 1)
            i = _skip(text, i)
            if text[i : i + 1] != ":":
                raise ValueError(f"expected ':' at character {i}")
            start = _skip(text, i + 1)
            value, end = decoder.raw_decode(text, start)
            if key in members:
                raise ValueError(f"duplicate key {key!r}")
            members[key] = (value, start, end)
            i = _skip(text, end)
            if text[i : i + 1] == ",":
                i = _skip(text, i + 1)
            elif text[i : i + 1] != "}":
                raise ValueError(f"expected ',' or '}}' at character {i}")
        if _skip(text, i + 1) != len(text):
            raise ValueError("data after the JSON object")
    except (ValueError, RecursionError) as e:
        raise _bad(source, f"not valid JSON: {e}") from None
    return members


class _Json:
    """Typed access to a parsed JSON object, with errors naming file and path."""

    def __init__(self, value: Any, source: str, path: str) -> None:
        if not isinstance(value, dict):
            raise _bad(source, f"{path} must be an object")
        self.value: dict[str, Any] = value
        self.source, self.path = source, path

    def _get(self, key: str, default: Any = ...) -> Any:
        if key not in self.value:
            if default is not ...:
                return default
            raise _bad(self.source, f"{self.path}.{key} is missing")
        return self.value[key]

    def jobj(self, key: str) -> _Json:
        return _Json(self._get(key), self.source, f"{self.path}.{key}")

    def jint(self, key: str, default: Any = ...) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 32:
            raise _bad(self.source, f"{self.path}.{key} must be a non-negative integer")
        return v

    def jstr(self, key: str, default: Any = ...) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise _bad(self.source, f"{self.path}.{key} must be a string")
        return v

    def jhex(self, key: str, size: int) -> bytes:
        v = self.jstr(key)
        try:
            b = bytes.fromhex(v)
        except ValueError:
            b = b""
        if len(b) != size or len(v) != 2 * size:
            raise _bad(self.source, f"{self.path}.{key} must be {2 * size} hex digits")
        return b

    def jtime(self, key: str) -> datetime:
        v = self.jstr(key)
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            t = None
        if t is None or t.tzinfo is None:
            raise _bad(self.source, f"{self.path}.{key} must be an RFC 3339 time, got {v[:40]!r}")
        return t.astimezone(UTC)

    def jlist(self, key: str, default: Any = ...) -> list[Any]:
        v = self._get(key, default)
        if not isinstance(v, list):
            raise _bad(self.source, f"{self.path}.{key} must be an array")
        return v

    def jitems(self, key: str) -> list[_Json]:
        return [
            _Json(v, self.source, f"{self.path}.{key}[{i}]") for i, v in enumerate(self.jlist(key))
        ]

    def jstrings(self, key: str) -> tuple[str, ...]:
        v = self.jlist(key, [])
        if not all(isinstance(s, str) for s in v):
            raise _bad(self.source, f"{self.path}.{key} must be an array of strings")
        return tuple(v)


def _svns(j: _Json, key: str) -> tuple[int, ...]:
    comps = j.jitems(key)
    if len(comps) != 16:
        raise _bad(j.source, f"{j.path}.{key} must have 16 components, has {len(comps)}")
    return tuple(c.jint("svn") for c in comps)


def _tcb_level(j: _Json) -> TcbLevel:
    tcb = j.jobj("tcb")
    if "sgxtcbcomponents" in tcb.value:
        sgx = _svns(tcb, "sgxtcbcomponents")
    else:  # TCB info v2
        sgx = tuple(tcb.jint(f"sgxtcbcomp{i:02d}svn") for i in range(1, 17))
    tdx = _svns(tcb, "tdxtcbcomponents") if "tdxtcbcomponents" in tcb.value else None
    return TcbLevel(
        sgx,
        tcb.jint("pcesvn"),
        tdx,
        j.jstr("tcbStatus"),
        j.jstr("tcbDate", ""),
        j.jstrings("advisoryIDs"),
    )


def _isv_levels(j: _Json) -> tuple[IsvLevel, ...]:
    levels = [
        IsvLevel(lv.jobj("tcb").jint("isvsvn"), lv.jstr("tcbStatus"), lv.jstrings("advisoryIDs"))
        for lv in j.jitems("tcbLevels")
    ]
    return tuple(sorted(levels, key=lambda lv: -lv.isvsvn))


def _module(j: _Json, with_levels: bool) -> ModuleIdentity:
    return ModuleIdentity(
        id=j.jstr("id", ""),
        mrsigner=j.jhex("mrsigner", 48),
        attributes=j.jhex("attributes", 8),
        attributes_mask=j.jhex("attributesMask", 8),
        levels=_isv_levels(j) if with_levels else (),
    )


def _signed(source: str, data: bytes) -> tuple[str, _Json, SignedDoc]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(source, "JSON is not UTF-8") from None
    members = _top_level(text, source)
    kinds = [k for k in ("tcbInfo", "enclaveIdentity") if k in members]
    if len(kinds) != 1 or "signature" not in members:
        raise _bad(
            source,
            'expected {"tcbInfo": ..., "signature": hex} or '
            '{"enclaveIdentity": ..., "signature": hex}',
        )
    kind = kinds[0]
    value, start, end = members[kind]
    sig_hex = members["signature"][0]
    body = _Json(value, source, kind)
    if not isinstance(sig_hex, str) or len(sig_hex) != 128:
        raise _bad(source, "signature must be 128 hex digits (r || s)")
    try:
        signature = bytes.fromhex(sig_hex)
    except ValueError:
        raise _bad(source, "signature must be 128 hex digits (r || s)") from None
    doc = SignedDoc(
        kind,
        source,
        text[start:end].encode("utf-8"),
        signature,
        body.jtime("issueDate"),
        body.jtime("nextUpdate"),
        body.jint("tcbEvaluationDataNumber", 0),
    )
    return kind, body, doc


def _parse_json(source: str, data: bytes) -> TcbInfo | QeIdentity:
    kind, b, doc = _signed(source, data)
    if kind == "tcbInfo":
        return TcbInfo(
            doc=doc,
            id=b.jstr("id", "SGX"),
            fmspc=b.jhex("fmspc", 6),
            pce_id=b.jhex("pceId", 2),
            eval_number=doc.eval_number,
            levels=tuple(_tcb_level(lv) for lv in b.jitems("tcbLevels")),
            tdx_module=_module(b.jobj("tdxModule"), False) if "tdxModule" in b.value else None,
            module_identities=tuple(_module(m, True) for m in b.jitems("tdxModuleIdentities"))
            if "tdxModuleIdentities" in b.value
            else (),
        )
    misc = b.jhex("miscselect", 4)
    misc_mask = b.jhex("miscselectMask", 4)
    return QeIdentity(
        doc=doc,
        id=b.jstr("id", "QE"),
        # The hex is the MISCSELECT bytes as they sit in the report (Intel's QVL reads it
        # little-endian), so it compares with the report's little-endian u32.
        miscselect=int.from_bytes(misc, "little"),
        miscselect_mask=int.from_bytes(misc_mask, "little"),
        attributes=b.jhex("attributes", 16),
        attributes_mask=b.jhex("attributesMask", 16),
        mrsigner=b.jhex("mrsigner", 32),
        isvprodid=b.jint("isvprodid"),
        levels=_isv_levels(b),
    )


# --- files -------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as e:
        raise _bad(str(path.name), f"cannot read: {e.strerror}") from None
    if len(data) > _MAX_FILE:
        raise _bad(path.name, f"larger than {_MAX_FILE} bytes; not collateral")
    return data


def load_files(
    paths: Iterable[Path],
) -> tuple[
    tuple[TcbInfo, ...],
    tuple[QeIdentity, ...],
    tuple[CollateralCrl, ...],
    tuple[x509.Certificate, ...],
    tuple[str, ...],
]:
    infos: list[TcbInfo] = []
    identities: list[QeIdentity] = []
    crls: list[CollateralCrl] = []
    certs: list[x509.Certificate] = []
    sources: list[str] = []
    for n, path in enumerate(paths):
        if n >= _MAX_FILES:
            raise _bad(str(path.parent), f"more than {_MAX_FILES} files")
        source = Path(path).name
        data = _read(Path(path))
        sources.append(source)
        stripped = data.lstrip()
        if stripped.startswith(b"{"):
            doc = _parse_json(source, data)
            (infos if isinstance(doc, TcbInfo) else identities).append(doc)  # type: ignore[arg-type]
            continue
        if b"%20CERTIFICATE" in data or b"%20X509%20CRL" in data:
            data = urllib.parse.unquote_to_bytes(data.strip())
        try:
            if b"-----BEGIN X509 CRL-----" in data:
                crls.extend(_crl(source, x509.load_pem_x509_crl(m)) for m in _PEM_CRL.findall(data))
            elif b"-----BEGIN CERTIFICATE-----" in data:
                for cert in x509.load_pem_x509_certificates(data.rstrip(b"\x00")):
                    check_readable(cert)
                    certs.append(cert)
            elif data[:1] == b"\x30":
                try:
                    crls.append(_crl(source, x509.load_der_x509_crl(data)))
                except PARSE_ERRORS:
                    cert = x509.load_der_x509_certificate(data)
                    check_readable(cert)
                    certs.append(cert)
            else:
                raise ValueError("not JSON, PEM or DER")
        except PARSE_ERRORS as e:
            raise _bad(
                source,
                f"not a TCB info / enclave identity JSON, PEM certificates or a CRL ({e})",
            ) from None
    return tuple(infos), tuple(identities), tuple(crls), tuple(certs), tuple(sources)


def _crl(source: str, crl: x509.CertificateRevocationList) -> CollateralCrl:
    """Parse now what `cryptography` reads lazily; ValueError if malformed."""
    _ = crl.issuer, crl.last_update_utc, crl.next_update_utc
    _ = [r.serial_number for r in crl]
    return CollateralCrl(source, crl)
