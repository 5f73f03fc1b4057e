"""The CAS's durable state behind one interface.

SQLite (`SqliteStore`) is the default, one file under `--data`; a PostgreSQL store for
several replicas implements the same `Store` protocol. Every method is one transaction:
it either happens whole or not at all, and a method that returns has committed, so a
response sent after it never describes state that a crash can lose.

Every change that alters what a sidecar must trust (a session created, updated or
deleted, a revocation, a CA change) bumps the mesh-wide `epoch` in the same
transaction, and every change writes its audit row in that transaction too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from meshshield.errors import MeshError, Reason


class StoreError(Exception):
    """Base of the store's refusals."""


class AlreadyExists(StoreError):
    pass


class NotFound(StoreError):
    pass


class StoreUnavailable(StoreError, MeshError):
    """The store cannot be opened or used: a corrupt file, a schema this release does not
    know, a database that is down or restarting. The message says what was found and
    what to do. It is a MeshError (`store_unavailable`, HTTP 503), so a request that
    meets it gets a 503 with that reason, never a 500."""

    def __init__(self, message: str) -> None:
        MeshError.__init__(self, Reason.STORE_UNAVAILABLE, message)


class CaSetChanged(StoreError):
    """`save_cas` was given a CA set that does not include every stored CA: another
    process (a replica) created or rotated a CA meanwhile. Reload and decide again."""


class PredecessorMismatch(StoreError):
    def __init__(self, current: str) -> None:
        super().__init__(f"current policy hash is {current}")
        self.current = current


@dataclass(frozen=True)
class SessionRecord:
    name: str
    policy: bytes
    policy_hash: str
    creator: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class HistoryRecord:
    session: str
    policy_hash: str
    predecessor: str | None
    author: str
    at: datetime
    action: str  # create | update | delete


@dataclass(frozen=True)
class CaStoredRecord:
    """A CA as stored: the certificate in PEM and the private key sealed (never plain)."""

    fingerprint: str
    cert_pem: str
    sealed_key: bytes
    state: str  # active | next | retired
    activate_at: datetime | None
    retire_after: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class IssuedCertificate:
    serial: str
    session: str
    service: str
    spiffe_id: str
    issuer_fingerprint: str
    not_before: datetime
    not_after: datetime
    claims_json: str
    cert_pem: str
    issued_at: datetime


@dataclass(frozen=True)
class Revocation:
    id: int
    session: str
    kind: str  # serial | measurement (mesh-wide) | session_measurement
    # value: a serial, a measurement, or for session_measurement SESSION/MEASUREMENT
    value: str
    actor: str
    at: datetime


@dataclass(frozen=True)
class Report:
    reporter: str  # SPIFFE ID of the sidecar that sent it
    body_json: str
    at: datetime


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    session: str | None
    detail: str


@dataclass(frozen=True)
class KekWrapRecord:
    """The key-encryption key wrapped for one holder (`cas/kekwrap.py` blob format).

    kind "tee-sealed": key_id names the TEE identity (platform, chip/key, measurement)
    whose sealing key opens it; kind "recovery-key": key_id is the SHA-256 of the
    recovery public key's SPKI."""

    kind: str
    key_id: str
    blob: bytes
    detail: str
    created_at: datetime


# A check a session write runs inside its transaction, against the sessions as the
# database holds them then (every replica's committed changes): it gets {name:
# policy_hash} of every session and a reader of one session in that transaction, and
# raises to refuse the write (nothing is written). Session writes that carry a check
# take turns, so two replicas cannot both pass theirs (say, both claim one DNS name).
SessionCheck = Callable[[Mapping[str, str], Callable[[str], "SessionRecord | None"]], None]


@dataclass(frozen=True)
class StoredSecret:
    """One secret's current value, sealed under the secrets key (cas/secrets.py)."""

    session: str
    name: str
    version: int  # 1 when first made; each rotate or put adds 1
    kind: str
    sealed: bytes
    actor: str  # "cas" for a generated value, else the admin key's fingerprint
    created_at: datetime  # when this version was made


@dataclass(frozen=True)
class SecretRelease:
    """One attest response that carried secrets: who got which (names, never values)."""

    id: int
    at: datetime
    session: str
    service: str
    measurement: str
    serial: str
    secrets_json: str  # [{"name", "from", "version"}...]


class Store(Protocol):
    engine: str  # "sqlite" or "postgresql"

    def close(self) -> None: ...

    def unavailable(self) -> str | None:
        """Why the store is known to be unusable right now (its last call failed to reach
        it), without calling it; None when it is not known to be."""
        ...

    def record_counts(self) -> dict[str, int]:
        """How many records of each durable kind the store holds (CAs, sessions, policy
        history, certificates, revocations, audit); a fresh store has none. The CAS
        refuses to create a CA in a store that holds any."""
        ...

    # -- epoch ------------------------------------------------------------
    def epoch(self) -> int: ...

    # -- CA -----------------------------------------------------------------
    def load_cas(self) -> list[CaStoredRecord]: ...

    def save_cas(self, records: Sequence[CaStoredRecord], actor: str, at: datetime) -> int:
        """Replace the CA set (insert new rows, update states); bumps the epoch.

        `records` must name every stored CA (the caller's whole view of the set): if the
        store holds one it does not name, the set changed since the caller read it and
        nothing is written (`CaSetChanged`). Writers are serialised, so of two replicas
        creating the first CA, or planning a rotation, at once exactly one succeeds."""
        ...

    # -- JWT-SVID signing keys (cas/jwt.py) -----------------------------------
    def load_jwt_keys(self) -> list[tuple[str, bytes]]:
        """(kid, sealed key) of every JWT signing key, oldest first."""
        ...

    def add_jwt_key(self, kid: str, sealed_key: bytes, at: datetime) -> bool:
        """Store a JWT signing key unless one exists already (replicas starting together
        keep the first); False if another was there. Audited; no epoch change."""
        ...

    # -- the key-encryption key's wraps (cas/kekstore.py) ------------------------
    def kek_wraps(self) -> list[KekWrapRecord]:
        """Every stored wrap of the KEK, oldest first."""
        ...

    def put_kek_wrap(self, wrap: KekWrapRecord, actor: str, *, first: bool = False,
                     audit: bool = True) -> bool:
        """Store (or replace) the wrap for (kind, key_id); audited. `first`: only into a
        store with no wrap and no CA (replicas initialising together: one wins), False
        if it was not empty. `audit=False` on a first start only: the CAS audits its
        initialisation once the first CA exists (an audit record before it would read
        as lost state)."""
        ...

    def add_audit(self, actor: str, action: str, detail: str, at: datetime) -> None:
        """One audit record (KEK releases and refusals)."""
        ...

    # -- sessions -----------------------------------------------------------
    def create_session(
        self, name: str, policy: bytes, policy_hash: str, creator: str, at: datetime,
        check: SessionCheck | None = None,
    ) -> int: ...

    def get_session(self, name: str) -> SessionRecord | None: ...

    def list_sessions(self) -> list[SessionRecord]: ...

    def session_hashes(self) -> dict[str, str]:
        """{name: policy_hash} of every session: what changed, without reading policies."""
        ...

    def update_session(
        self,
        name: str,
        policy: bytes,
        policy_hash: str,
        predecessor: str | None,
        actor: str,
        at: datetime,
        check: SessionCheck | None = None,
    ) -> int:
        """Replace the session's policy if its current hash is `predecessor`
        (`PredecessorMismatch` otherwise), decided in the write's transaction."""
        ...

    def delete_session(self, name: str, actor: str, at: datetime,
                       check: SessionCheck | None = None) -> int: ...

    def history(self, name: str) -> list[HistoryRecord]: ...

    def last_session(self, name: str) -> SessionRecord | None:
        """The last version of a session, deleted or not (from its history): who could
        update it when it was deleted may still revoke its certificates."""
        ...

    # -- nonces -------------------------------------------------------------
    def use_nonce(self, nonce: bytes, expires_at: datetime) -> bool:
        """Record that an attestation nonce (cas/nonces.py) was used, kept until
        `expires_at`; False if it was used before (by any replica)."""
        ...

    def record_issuance(self, cert: IssuedCertificate, nonce: bytes, nonce_expires: datetime,
                        epoch: int) -> tuple[str, int]:
        """One issued certificate, recorded with its attestation nonce's single use, in one
        statement or transaction, only if the store's epoch is still `epoch` (the view
        the certificate was decided on). Answers the store's epoch and "issued",
        "nonce_used" (nothing written) or "stale" (another epoch: nothing written)."""
        ...

    def purge_nonces(self, now: datetime) -> int:
        """Forget the uses of nonces that expired at or before `now`."""
        ...

    # -- admin request nonces (replay guard) ---------------------------------------
    def remember_request_nonce(
        self, fingerprint: str, nonce: str, expires_at: datetime, now: datetime
    ) -> bool:
        """Record that key `fingerprint` used request nonce `nonce`, kept until
        `expires_at` (when its signed timestamp leaves the skew window). False if that
        pair is already recorded and unexpired: a replay. The check and the insert are
        one transaction, so two replicas cannot both accept one request."""
        ...

    def purge_request_nonces(self, now: datetime) -> int: ...

    # -- certificates -------------------------------------------------------
    def record_certificate(self, cert: IssuedCertificate) -> None: ...

    def get_certificate(self, serial: str) -> IssuedCertificate | None: ...

    def count_certificates(self) -> int: ...

    def certificates_of(self, session: str, now: datetime) -> list[IssuedCertificate]:
        """The session's certificates that have not expired at `now`."""
        ...

    def certificate_sessions(self, now: datetime) -> list[str]:
        """Every session (existing or deleted) holding an unexpired certificate."""
        ...

    def last_not_after(self, issuer_fingerprint: str) -> datetime | None: ...

    # -- revocations --------------------------------------------------------
    def add_revocation(
        self, session: str, kind: str, value: str, actor: str, at: datetime
    ) -> int: ...

    def revocations(self) -> list[Revocation]: ...

    def revoked_serials(self, now: datetime) -> dict[str, datetime]:
        """Revoked serials whose certificates have not expired at `now`, with their
        not_after (the rows of expired ones stay, for audit)."""
        ...

    # -- reports & audit ----------------------------------------------------
    def put_report(self, reporter: str, body_json: str, at: datetime) -> None: ...

    def reports(self) -> list[Report]: ...

    def audit_log(self, limit: int = 100) -> list[AuditRecord]: ...

    # -- secrets ------------------------------------------------------------------
    def get_secret(self, session: str, name: str) -> StoredSecret | None: ...

    def create_secret(self, secret: StoredSecret) -> StoredSecret:
        """Store a first value unless one exists; the value stored now either way (two
        replicas making one at once keep the first)."""
        ...

    def replace_secret(self, secret: StoredSecret, action: str) -> StoredSecret:
        """Store a new value (version one more than the last), audited as `action`."""
        ...

    def record_secret_release(self, release: SecretRelease) -> None: ...

    def secret_releases(self, session: str, limit: int = 1000) -> list[SecretRelease]:
        """The session's releases, newest first."""
        ...
