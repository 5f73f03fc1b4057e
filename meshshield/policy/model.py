"""The policy of one session, as immutable values.

A `Policy` is what `parse_policy` builds from YAML (SPEC §3). Everything here is frozen
and hashable, so a policy can be shared between the CAS's request handlers and the
sidecar's peer checks without copying. Hex values are stored lowercase.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Literal

from meshshield.attestation.claims import Platform

CREATOR = "CREATOR"
"""Placeholder in `access_policy` for the admin who created the session."""

CERT_TTL_DEFAULT_SECONDS = 3600
CERT_TTL_MIN_SECONDS = 300
CERT_TTL_MAX_SECONDS = 86400

NAME_PATTERN = re.compile(r"[a-z0-9-]{1,63}")
"""Session and service names (SPEC §3)."""


class Tolerance(StrEnum):
    """Weaknesses a session accepts in the evidence of its own services and its peers."""

    DEBUG_MODE = "debug-mode"
    OUTDATED_TCB = "outdated-tcb"
    UNKNOWN_TCB = "unknown-tcb"
    SIMULATION = "simulation"


@dataclass(frozen=True, slots=True)
class SnpTcb:
    """Minimum SEV-SNP TCB component versions; None means "any"."""

    bootloader: int | None = None
    tee: int | None = None
    snp: int | None = None
    microcode: int | None = None
    fmc: int | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("bootloader", "tee", "snp", "microcode", "fmc")

    def pinned(self) -> dict[str, int]:
        """The components that have a minimum, by name."""
        out: dict[str, int] = {}
        for name in self.FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class SevSnpEntry:
    """A confidential VM on AMD SEV-SNP: launch digest plus the workload bound by HOST_DATA."""

    measurement: str
    host_data: str
    min_tcb: SnpTcb | None = None

    platform: ClassVar[Platform] = Platform.SEV_SNP

    @property
    def pinned_measurement(self) -> str | None:
        return self.measurement


@dataclass(frozen=True, slots=True)
class TdxEntry:
    """A trust domain on Intel TDX: MRTD plus the workload bound by MRCONFIGID and/or RTMRs.

    `rtmr` holds RTMR0..3 in order; None at a position means "any value".
    """

    mrtd: str
    mrconfigid: str | None = None
    rtmr: tuple[str | None, str | None, str | None, str | None] | None = None

    platform: ClassVar[Platform] = Platform.TDX

    @property
    def pinned_measurement(self) -> str | None:
        return self.mrtd


@dataclass(frozen=True, slots=True)
class SgxEntry:
    """An SGX enclave (app and sidecar in one enclave), pinned by MRENCLAVE or by signer."""

    mrenclave: str | None = None
    mrsigner: str | None = None
    product_id: int | None = None
    min_svn: int | None = None

    platform: ClassVar[Platform] = Platform.SGX

    @property
    def pinned_measurement(self) -> str | None:
        # A signer-pinned entry accepts every enclave that signer builds for the product.
        return self.mrenclave


@dataclass(frozen=True, slots=True)
class SimEntry:
    """The development stand-in: no hardware guarantee, a digest of the app's files."""

    measurement: str

    platform: ClassVar[Platform] = Platform.SIM

    @property
    def pinned_measurement(self) -> str | None:
        return self.measurement


TeeEntry = SevSnpEntry | TdxEntry | SgxEntry | SimEntry

IgnoreAdvisories = tuple[str, ...] | Literal["*"]
"""Advisory ids a session accepts in evidence, or "*" for all of them."""


@dataclass(frozen=True, slots=True)
class PeerRef:
    """One `allow_from` entry: who may connect in.

    session None means the local session; service None means any service of that session
    (written "*", only for the local session).
    """

    session: str | None
    service: str | None

    @classmethod
    def from_text(cls, text: str) -> PeerRef:
        """Parse "svc", "session/svc" or "*"; ValueError says which forms are accepted."""
        if text == "*":
            return cls(None, None)
        session, slash, service = text.rpartition("/")
        if not slash:
            if NAME_PATTERN.fullmatch(text):
                return cls(None, text)
        elif NAME_PATTERN.fullmatch(session) and NAME_PATTERN.fullmatch(service):
            return cls(session, service)
        raise ValueError(
            f"expected a service name, session/service or \"*\", found {text!r} "
            "(names are 1-63 characters of a-z, 0-9 and -)"
        )

    def matches(self, local_session: str, peer_session: str, peer_service: str) -> bool:
        session = self.session if self.session is not None else local_session
        if session != peer_session:
            return False
        return self.service is None or self.service == peer_service

    def __str__(self) -> str:
        service = self.service if self.service is not None else "*"
        return service if self.session is None else f"{self.session}/{service}"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    tee: tuple[TeeEntry, ...]
    dns: tuple[str, ...] = ()
    allow_from: tuple[PeerRef, ...] = ()
    cert_ttl_seconds: int = CERT_TTL_DEFAULT_SECONDS
    # The raw evidence rides in the certificate beside the claims, so that a third
    # party can verify the hardware report again (RA-TLS).
    embed_evidence: bool = False

    @property
    def platforms(self) -> tuple[Platform, ...]:
        """The platforms this service may run on, in policy order, without repeats."""
        return tuple(dict.fromkeys(entry.platform for entry in self.tee))


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    version: str
    predecessor: str | None
    services: tuple[Service, ...]
    tolerate: frozenset[Tolerance] = frozenset()
    ignore_advisories: IgnoreAdvisories = ()
    access_read: tuple[str, ...] = (CREATOR,)
    access_update: tuple[str, ...] = (CREATOR,)

    def service(self, name: str) -> Service | None:
        for service in self.services:
            if service.name == name:
                return service
        return None

    def readers(self, creator_fp: str) -> frozenset[str]:
        """Admin fingerprints that may read this session, CREATOR resolved."""
        return _resolve(self.access_read, creator_fp)

    def updaters(self, creator_fp: str) -> frozenset[str]:
        """Admin fingerprints that may update, delete and revoke in this session."""
        return _resolve(self.access_update, creator_fp)

    def tolerates(self, tolerance: Tolerance) -> bool:
        return tolerance in self.tolerate


def _resolve(entries: tuple[str, ...], creator_fp: str) -> frozenset[str]:
    return frozenset(creator_fp.lower() if e == CREATOR else e for e in entries)
