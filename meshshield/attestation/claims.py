"""What verified evidence says about a workload, independent of the platform."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

REPORT_DATA_DOMAIN = b"meshshield/v1"
NONCE_SIZE = 32
REPORT_DATA_SIZE = 64


class Platform(StrEnum):
    SEV_SNP = "sev-snp"
    TDX = "tdx"
    SGX = "sgx"
    SIM = "sim"


class TcbStatus(StrEnum):
    UP_TO_DATE = "up_to_date"
    SW_HARDENING_NEEDED = "sw_hardening_needed"
    CONFIGURATION_NEEDED = "configuration_needed"
    OUT_OF_DATE = "out_of_date"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


def _frozen(m: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True)
class Claims:
    """Verified facts from one piece of evidence.

    `measurement` is lowercase hex: the launch digest (sev-snp), MRTD (tdx), MRENCLAVE
    (sgx) or the workload digest (sim). `extra` holds the platform's own fields
    (host_data, chip_id, reported_tcb, mrconfigid, rtmr0..3, ...), JSON-serialisable.
    """

    platform: Platform
    measurement: str
    report_data: bytes
    debug: bool
    tcb_status: TcbStatus = TcbStatus.UNKNOWN
    signer: str | None = None
    product_id: int | None = None
    svn: int | None = None
    simulated: bool = False
    advisories: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=lambda: _frozen(None))

    def __post_init__(self) -> None:
        if not isinstance(self.extra, MappingProxyType):
            object.__setattr__(self, "extra", _frozen(self.extra))

    def to_json(self) -> dict[str, Any]:
        """The `evidence verify --json` view: common fields, then the platform's own."""
        out: dict[str, Any] = {
            "platform": self.platform.value,
            "measurement": self.measurement,
            "signer": self.signer,
            "product_id": self.product_id,
            "svn": self.svn,
            "debug": self.debug,
            "tcb_status": self.tcb_status.value,
            "report_data": self.report_data.hex(),
            "simulated": self.simulated,
            "advisories": list(self.advisories),
        }
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Claims:
        """The inverse of `to_json` (the CAS keeps each issued certificate's verified
        claims this way, to judge it again when its policy changes). KeyError or
        ValueError if a common field is missing or of the wrong kind."""
        common = {"platform", "measurement", "signer", "product_id", "svn", "debug",
                  "tcb_status", "report_data", "simulated", "advisories"}
        return cls(
            platform=Platform(doc["platform"]),
            measurement=str(doc["measurement"]),
            report_data=bytes.fromhex(str(doc.get("report_data") or "")),
            debug=bool(doc["debug"]),
            tcb_status=TcbStatus(doc["tcb_status"]),
            signer=None if doc.get("signer") is None else str(doc["signer"]),
            product_id=_opt_int(doc.get("product_id")),
            svn=_opt_int(doc.get("svn")),
            simulated=bool(doc.get("simulated", False)),
            advisories=tuple(str(a) for a in doc.get("advisories") or ()),
            extra={k: v for k, v in doc.items() if k not in common},
        )


def _opt_int(v: object) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"expected an integer or null, found {v!r}")
    return v


def expected_report_data(nonce: bytes, spki_der: bytes) -> bytes:
    """report_data = SHA-512(b"meshshield/v1" || nonce || SPKI-DER) (SPEC §4)."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return hashlib.sha512(REPORT_DATA_DOMAIN + nonce + spki_der).digest()


CAS_REPORT_DATA_DOMAIN = b"meshshield/cas/v1"


def cas_report_data(nonce: bytes, tls_spki_sha256: bytes, ca_sha256s: list[bytes]) -> bytes:
    """The CAS's own report_data (its self-attestation, `POST /v1/cas/attestation`):

        SHA-512(b"meshshield/cas/v1" || nonce (32 bytes)
                || SHA-256(SPKI DER of the CAS's TLS key)
                || SHA-256(DER of CA certificate 1) || ... || SHA-256(DER of CA n))

    with the CA certificates in the order of the bundle returned beside the evidence.
    Every item after the domain is fixed-size, so the concatenation is unambiguous; the
    domain keeps it apart from a service's report_data (`expected_report_data`).
    """
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    if len(tls_spki_sha256) != 32 or any(len(d) != 32 for d in ca_sha256s):
        raise ValueError("the TLS key and CA digests must be SHA-256 (32 bytes each)")
    h = hashlib.sha512(CAS_REPORT_DATA_DOMAIN + nonce + tls_spki_sha256)
    for digest in ca_sha256s:
        h.update(digest)
    return h.digest()
