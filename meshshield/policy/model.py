"""The policy of one session, as immutable values.

A `Policy` is what `parse_policy` builds from YAML (SPEC §3). Everything here is frozen
and hashable, so a policy can be shared between the CAS's request handlers and the
sidecar's peer checks without copying. Hex values are stored lowercase.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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


class SecretKind(StrEnum):
    """How the CAS makes a secret's value (SPEC §3 `secrets:`)."""

    RANDOM = "random"  # `size` random bytes
    ASCII = "ascii"  # `size` printable ASCII characters
    X509 = "x509"  # a P-256 key and a certificate from the session's secrets CA
    VALUE = "value"  # uploaded by an admin with `meshshield secret put`


SECRETS_MAX = 64
"""Secrets a session may define, and uses a service may list."""
SECRET_SIZE_DEFAULT = 32
SECRET_SIZE_MAX = 4096
"""Bytes (random) or characters (ascii) of a generated secret."""
SECRET_VALUE_MAX_BYTES = 64 * 1024
"""The largest value `meshshield secret put` uploads."""
SECRET_DNS_MAX = 32
SECRET_EXPORTS_MAX = 64
SECRET_FILE_DIR = "/run/secrets"  # noqa: S105 (a folder, not a password)
"""Where a service's `file:` secrets appear in the app (the sidecar's tmpfs folder)."""
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class SecretImport:
    """`import: {session, secret}`: the value is the exporting session's secret."""

    session: str
    secret: str


@dataclass(frozen=True, slots=True)
class Secret:
    """One entry of the top-level `secrets:` list.

    An imported secret has no kind of its own here (`kind` None): the exporting
    session's policy defines it.
    """

    name: str
    kind: SecretKind | None
    size: int | None = None
    dns: tuple[str, ...] = ()
    export: tuple[str, ...] = ()
    source: SecretImport | None = None
    # Where the entry is in the policy text, so the CAS can locate an import that no
    # other session exports (a check that needs the other session's policy).
    line: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SecretUse:
    """One entry of a service's `secrets:` list: which secret, and how the app gets it."""

    name: str
    env: str | None = None
    file: str | None = None

    @property
    def file_name(self) -> str | None:
        """The file's name inside the secrets folder (`file` without its folder)."""
        return None if self.file is None else self.file.rsplit("/", 1)[-1]


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
    secrets: tuple[SecretUse, ...] = ()

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
    secrets: tuple[Secret, ...] = ()

    def secret(self, name: str) -> Secret | None:
        for secret in self.secrets:
            if secret.name == name:
                return secret
        return None

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
