"""The CAS's decisions: sessions, nonces, attestation with issuance, revocations.

This is the part of the CAS that knows nothing of HTTP: requests arrive as bytes or
decoded JSON, answers leave as dicts or a MeshError with a reason code. The HTTP layer
(`meshshield.cas.http`) only authenticates, limits sizes and serialises.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.adminauth import SignedRequest, replay_refused
from meshshield.attestation.claims import NONCE_SIZE, Claims, Platform, expected_report_data
from meshshield.attestation.collateral import load_collateral
from meshshield.attestation.verify import VerifierConfig, platform_of, verify_evidence
from meshshield.cas.castate import CaState
from meshshield.cas.edges import own_connections
from meshshield.cas.jwt import JwtAuthority
from meshshield.cas.nonces import PURGE_MARGIN as NONCE_PURGE_MARGIN
from meshshield.cas.nonces import NonceMint
from meshshield.cas.secrets import SecretVault
from meshshield.cas.standing import FailingCertificates, judge_certificates
from meshshield.cas.store import (
    AlreadyExists,
    IssuedCertificate,
    NotFound,
    PredecessorMismatch,
    Revocation,
    SessionCheck,
    SessionRecord,
    Store,
)
from meshshield.clock import Clock, SystemClock, rfc3339
from meshshield.errors import MeshError, PolicyError, Reason
from meshshield.pki.ca import cert_pem, issue_leaf, serial_hex
from meshshield.pki.claims_ext import (
    MAX_EMBEDDED_EVIDENCE_BYTES,
    certificate_claims,
    claims_from_certificate,
)
from meshshield.pki.csr import public_key_from_csr
from meshshield.pki.keys import spki_der
from meshshield.pki.spiffe import spiffe_id
from meshshield.pki.spiffe_bundle import spiffe_bundle_document
from meshshield.policy import (
    Policy,
    PolicyInvalid,
    Secret,
    decide_issuance,
    import_problems,
    parse_policy,
    policy_hash,
)
from meshshield.policy.decide import allows_inbound

log = logging.getLogger("meshshield.cas")

NAME_RE = re.compile(r"^[a-z0-9-]{1,63}$")
HEX_RE = re.compile(r"^[0-9a-f]+$")
MAX_FIELD = 64 * 1024
# CA time boundaries per epoch are few (two per CA, a handful of CAs).
SEQUENCE_STRIDE = 1024
MAX_EVIDENCE_JSON = 512 * 1024


@dataclass
class CasConfig:
    data_dir: Path
    trust_domain: str = "meshshield.local"
    dns: tuple[str, ...] = ("localhost",)
    admin_fingerprints: frozenset[str] = frozenset()
    sim_platform_keys: tuple[ec.EllipticCurvePublicKey, ...] = ()
    collateral_dir: Path | None = None
    nonce_ttl: float = 60.0
    max_cert_ttl: float | None = None
    kek: bytes = b""
    clock: Clock = field(default_factory=SystemClock)
    database: str | None = None  # postgresql://...; None: SQLite in data_dir


@dataclass(frozen=True)
class LoadedSession:
    record: SessionRecord
    policy: Policy

    @property
    def incarnation(self) -> tuple[str, datetime]:
        """What, when it changes, means the session's certificates must be judged again."""
        return self.record.policy_hash, self.record.created_at


def _scoped_measurements(revs: Iterable[Revocation]) -> dict[str, frozenset[str]]:
    """Measurements revoked in one session only, by session."""
    out: dict[str, set[str]] = {}
    for r in revs:
        if r.kind == "session_measurement":
            session, _, measurement = r.value.partition("/")
            out.setdefault(session, set()).add(measurement)
    return {k: frozenset(v) for k, v in out.items()}


def _json_default(v: object) -> str:
    if isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


@dataclass
class AuthorityStats:
    """Work done, for /metrics: what a change costs is counted, not guessed."""

    policies_parsed: int = 0


def _forbidden(who: str, name: str, what: str) -> MeshError:
    return MeshError(
        Reason.FORBIDDEN,
        f"admin key {who[:16]}… may not {what} session {name!r}: no access_policy."
        f"{what} of a session by that name names it; ask the session's owners to add "
        "the key, or check the session name",
    )


def _bad(message: str) -> MeshError:
    return MeshError(Reason.BAD_REQUEST, message)


def _field_str(body: Mapping[str, Any], name: str, limit: int = MAX_FIELD) -> str:
    v = body.get(name)
    if not isinstance(v, str):
        found = "nothing" if v is None else f"a JSON {type(v).__name__}"
        raise _bad(f'"{name}" must be a string, found {found}')
    if len(v) > limit:
        reason = Reason.BODY_TOO_LARGE if limit >= MAX_FIELD else Reason.BAD_REQUEST
        raise MeshError(reason, f'"{name}" is {len(v)} characters, at most {limit}')
    return v


# Decisions taken again when the store's epoch moved on before the certificate was
# recorded (cas/store.py record_issuance), before the client is asked to retry.
ISSUE_ATTEMPTS = 4


def _nonce_used() -> MeshError:
    return MeshError(
        Reason.NONCE_INVALID,
        "nonce was already used (nonces are single use, on every replica); request a "
        "fresh nonce with POST /v1/attest/nonce",
    )


class Authority:
    """All CAS state transitions; one per CAS process."""

    def __init__(self, config: CasConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.clock = config.clock
        self.ca = CaState(store, config.kek, config.trust_domain)
        self.jwt = JwtAuthority(store, config.kek)
        self.secrets = SecretVault(store, self.key_encryption_key(), config.trust_domain)
        self.nonces = NonceMint(self.key_encryption_key())
        collateral = load_collateral(config.collateral_dir) if config.collateral_dir else None
        self.verifier = VerifierConfig(
            sim_platform_keys=config.sim_platform_keys, collateral=collateral
        )
        # The caches below are replaced whole, never changed in place, so readers on any
        # thread see one consistent version; `_write` lets one change at a time through.
        self._sessions: dict[str, LoadedSession] = {}
        # Explicitly revoked serials of unexpired certificates, with their not_after.
        self._revoked_serials: dict[str, datetime] = {}
        self._revoked_measurements: frozenset[str] = frozenset()  # mesh-wide
        self._session_measurements: dict[str, frozenset[str]] = {}  # revoked in one session
        self._failing = FailingCertificates()  # no longer pass their session's policy
        self._revoked_list: tuple[int, list[str]] | None = None
        self._epoch = -1
        self._snapshots: dict[str, tuple[int, dict[str, Any]]] = {}
        self._actors: tuple[int, int, frozenset[str]] | None = None
        self._bundle_seen = ""
        self._parsed: dict[tuple[str, str], Policy] = {}  # by a change, before it was stored
        self._write = threading.RLock()
        self.stats = AuthorityStats()
        self.listeners: list[Callable[[int], None]] = []
        # How listeners are called: the HTTP layer runs Authority's methods on worker
        # threads and has this hand the call to its event loop.
        self.dispatch: Callable[[Callable[[], None]], None] = lambda call: call()
        self.attest_results: Callable[[str, str, str], None] = lambda _s, _p, _r: None

    def key_encryption_key(self) -> bytes:
        """The CAS's key-encryption key (32 bytes, AES-256): what every secret the CAS
        keeps at rest is sealed under (`pki.seal.seal_private_key` for keys; AES-GCM
        with a per-purpose context for other secrets). It comes from the KEK file or,
        for an attested CAS, from the store's TEE-sealed / recovery wraps or a peer
        replica (`cas/kekstore.py`), and is the same on every replica of one store.
        Never log it, return it over the API or write it anywhere unencrypted."""
        return self.config.kek

    # -- state cache ------------------------------------------------------------
    def start(self, found: Sequence[str] = (), where: str = "the store") -> None:
        """Load (or, in empty state only, create) the CA; `found`: state outside the store."""
        self.ca.ensure(self.clock.now(), found, where)
        self.jwt.ensure(self.clock.now())
        self.refresh(force=True)
        self._bundle_seen = self.ca.bundle_pem(self.clock.now())

    def refresh(self, force: bool = False, epoch: int | None = None) -> bool:
        """Bring the cached state up to the store's epoch (another writer, a replica or
        the CLI, may have bumped it). Incremental: only a session whose policy hash
        changed is read and parsed again, and CA keys only when the CA set changed.
        `epoch`: the store's epoch, just read along with other work (`attest`)."""
        if not force and (self.store.epoch() if epoch is None else epoch) == self._epoch:
            return False
        with self._write:
            epoch = self.store.epoch()
            if not force and epoch == self._epoch:
                return False
            first = self._epoch == -1
            before = {n: s.incarnation for n, s in self._sessions.items()}
            scoped_before = self._session_measurements
            self._load_sessions()
            now = self.clock.now()
            revs = self.store.revocations()
            self._revoked_serials = self.store.revoked_serials(now)
            self._revoked_measurements = frozenset(
                r.value for r in revs if r.kind == "measurement"
            )
            self._session_measurements = _scoped_measurements(revs)
            self.ca.reload(now)
            sessions = self._sessions
            if first:
                changed = set(self.store.certificate_sessions(now))
            else:
                changed = {
                    n for n in before.keys() | sessions.keys()
                    if before.get(n) != (sessions[n].incarnation if n in sessions else None)
                } | {
                    n for n in scoped_before.keys() | self._session_measurements.keys()
                    if scoped_before.get(n) != self._session_measurements.get(n)
                }
            self.judge_sessions(changed)
            self._snapshots = {}
            self._revoked_list = None
            self._epoch = epoch
            return True

    def _load_sessions(self) -> None:
        current = self._sessions
        sessions: dict[str, LoadedSession] = {}
        for name, h in self.store.session_hashes().items():
            old = current.get(name)
            if old is not None and old.record.policy_hash == h:
                sessions[name] = old
                continue
            rec = self.store.get_session(name)
            if rec is None:
                continue  # deleted since the names were read; the next epoch says so
            pol = self._parsed.pop((name, rec.policy_hash), None)
            if pol is None:
                try:
                    pol = self._parse_stored(rec)
                except PolicyInvalid as e:  # stored before a rule tightened: keep it out
                    log.error("session %s: stored policy no longer valid: %s", rec.name, e)
                    continue
            sessions[name] = LoadedSession(rec, pol)
        self._sessions = sessions

    def _parse_stored(self, rec: SessionRecord) -> Policy:
        self.stats.policies_parsed += 1
        return parse_policy(rec.policy, f"session {rec.name}", cas_dns=())

    def judge_sessions(self, names: Iterable[str]) -> None:
        """Judge the unexpired certificates of these sessions again against their current
        policies (call once the cached sessions and revocations are current). Only the
        sessions named are read: a change to one session costs that session's
        certificates, not the mesh's."""
        now = self.clock.now()
        judged = self._failing
        for name in sorted(names):
            s = self._sessions.get(name)
            failing = judge_certificates(
                self.store.certificates_of(name, now),
                None if s is None else s.policy,
                None if s is None else s.record.created_at,
                self._session_measurements.get(name, frozenset()),
            )
            for f in failing.values():
                if judged.get(f.serial) is None:
                    log.info("session %s: certificate %s of %s/%s no longer passes: %s: %s",
                             name, f.serial, f.session, f.service, f.reason.reason.value,
                             f.reason.message)
            judged = judged.replaced(name, failing)
        if judged is not self._failing:
            self._failing = judged
            self._revoked_list = None
            self._snapshots = {}

    def _changed(self, epoch: int) -> None:
        self.refresh(force=True)
        self._notify(epoch)

    def _notify(self, epoch: int) -> None:
        for listener in list(self.listeners):
            self.dispatch(functools.partial(listener, epoch))

    def follow(self, epoch: int | None = None) -> bool:
        """Another replica changed the store (its notification named `epoch`; None: some
        may have been missed): catch up now and wake the listeners, instead of waiting
        for the next tick. Does store I/O: call it off the event loop."""
        if epoch is not None and epoch <= self._epoch:
            return False  # this replica's own change, or one it already follows
        if not self.refresh():
            return False
        self._notify(self._epoch)
        return True

    @property
    def epoch(self) -> int:
        return self._epoch

    # -- authorisation ------------------------------------------------------------
    def _session(self, name: str) -> LoadedSession:
        s = self._sessions.get(name)
        if s is None:
            raise MeshError(
                Reason.SESSION_UNKNOWN,
                f"no session named {name!r} on this CAS; create it with "
                "`meshshield policy apply FILE` or check the session name",
            )
        return s

    def _authorised(self, who: str, name: str, update: bool) -> LoadedSession:
        """The session `who` may read (or update). A key that may not gets the same
        answer whether the session exists or not; only a CAS admin, who may create any
        session, hears that one is missing."""
        s = self._sessions.get(name)
        if s is None and self.is_admin(who):
            return self._session(name)  # raises session_unknown
        allowed = frozenset() if s is None else (
            s.policy.updaters(s.record.creator) if update else s.policy.readers(s.record.creator)
        )
        if s is None or who not in allowed:
            raise _forbidden(who, name, "update" if update else "read")
        return s

    def may_act(self, who: str) -> bool:
        """Whether key `who` may do anything here: a CAS admin, or named (or the creator)
        in some session's access_policy."""
        # Cached per epoch (every session change bumps it) and per sessions mapping.
        sessions = self._sessions
        if self._actors is None or self._actors[:2] != (self._epoch, id(sessions)):
            keys = frozenset(
                fp for s in sessions.values()
                for fp in s.policy.readers(s.record.creator) | s.policy.updaters(s.record.creator)
            ) | self._deleted_session_updaters(sessions)
            self._actors = (self._epoch, id(sessions), keys)
        return self.is_admin(who) or who in self._actors[2]

    def _deleted_session_updaters(self, sessions: Mapping[str, LoadedSession]) -> frozenset[str]:
        """The updaters of the last version of every deleted session that still has
        certificates in force: they may revoke those serials (`_authorise_revocation`),
        so the replay guard must admit their signed requests."""
        keys: set[str] = set()
        for name in self.store.certificate_sessions(self.clock.now()):
            if name in sessions:
                continue
            last = self.store.last_session(name)
            if last is None:
                continue
            try:
                pol = parse_policy(last.policy, f"session {name}", cas_dns=())
            except PolicyInvalid:
                continue
            keys |= pol.updaters(last.creator)
        return frozenset(keys)

    def admit_request(self, signed: SignedRequest) -> str:
        """The second half of admin authentication, after the signature verified: a key
        that may do nothing is refused before its nonce is stored, so it cannot fill the
        replay guard; a nonce already seen (durably, across restarts) is a replay. Does
        store I/O: call it off the event loop where that matters."""
        who = signed.fingerprint
        if not self.may_act(who) and not (self.refresh() and self.may_act(who)):
            # (Refused on what another replica changed just now? Asked again, current.)
            raise MeshError(
                Reason.FORBIDDEN,
                f"admin key {who[:16]}… may not act on this CAS: it is not among the CAS's "
                "--admin-fingerprint keys and no session's access_policy names it; ask an "
                "admin to add it",
            )
        now = self.clock.now()
        expires = datetime.fromtimestamp(signed.expires_at, now.tzinfo)
        if not self.store.remember_request_nonce(who, signed.nonce, expires, now):
            raise replay_refused(signed)
        return who

    def is_admin(self, who: str) -> bool:
        return who in self.config.admin_fingerprints

    def require_admin(self, who: str, action: str) -> None:
        if not self.is_admin(who):
            raise MeshError(
                Reason.FORBIDDEN,
                f"admin key {who[:16]}… may not {action}: it is not among the CAS's "
                "--admin-fingerprint keys",
            )

    # -- sessions -------------------------------------------------------------------
    def _parse(self, body: bytes, label: str) -> Policy:
        """Parse a policy sent by an admin. CPU work, done before taking the write lock
        so that a big policy holds up no one else's change."""
        self.stats.policies_parsed += 1
        return parse_policy(body, label, cas_dns=self.config.dns)

    def _check_dns_unclaimed(self, pol: Policy, sessions: Iterable[Policy]) -> None:
        """A qualified DNS SAN belongs to one session: another session's service could
        otherwise get a certificate that clients verifying by host name accept for this
        one. Single-label names ("backend") are namespace-relative in Kubernetes and are
        legitimately reused by sessions in different namespaces, so they are exempt."""
        owners = {
            name: f"{p.name}/{svc.name}"
            for p in sessions if p.name != pol.name
            for svc in p.services for name in svc.dns if "." in name
        }
        clashes = [
            f"services[{i}].dns: {name!r} already belongs to {owners[name]}"
            for i, svc in enumerate(pol.services) for name in svc.dns if name in owners
        ]
        if clashes:
            raise PolicyError(
                Reason.POLICY_INVALID,
                "DNS names are claimed by another session: " + "; ".join(clashes)
                + "; choose names of your own",
            )

    def _stored(self, name: str, h: str, read: Callable[[str], SessionRecord | None]
                ) -> LoadedSession | None:
        """Session `name` at policy hash `h`: cached if current, else read and parsed."""
        s = self._sessions.get(name)
        if s is not None and s.record.policy_hash == h:
            return s
        rec = read(name)
        if rec is None:
            return None
        try:
            return LoadedSession(rec, self._parse_stored(rec))
        except PolicyInvalid:
            return None  # kept out of service (see _load_sessions)

    def _stored_check(self, name: str, pol: Policy | None, updater: str | None = None
                      ) -> SessionCheck:
        """What a write of session `name` checks inside its transaction, on the sessions
        as the database holds them (not this replica's cache, which another replica's
        change may not have reached): that `updater` (an update, a delete) may update
        the stored version, that no other session claims `pol`'s DNS names, and that
        every secret `pol` imports is exported to it."""

        def check(hashes: Mapping[str, str], read: Callable[[str], SessionRecord | None]
                  ) -> None:
            if updater is not None and name in hashes:
                s = self._stored(name, hashes[name], read)
                if s is None or updater not in s.policy.updaters(s.record.creator):
                    raise _forbidden(updater, name, "update")
            if pol is not None:
                others = {n: self._stored(n, h, read) for n, h in hashes.items() if n != name}
                self._check_dns_unclaimed(pol, [s.policy for s in others.values()
                                                if s is not None])

                def exporter(session: str) -> Policy | None:
                    s = others.get(session)
                    return None if s is None else s.policy

                self._check_imports(pol, exporter)  # each import matched by an export

        return check

    def create_session(self, who: str, body: bytes) -> SessionRecord:
        self.require_admin(who, "create sessions")
        pol = self._parse(body, "policy")
        if pol.predecessor is not None:
            raise PolicyError(
                Reason.POLICY_INVALID,
                f"session {pol.name!r} does not exist yet, so its policy has no predecessor; "
                f"found predecessor {pol.predecessor}; set `predecessor: null`",
            )
        h = policy_hash(body)
        with self._write:
            try:
                epoch = self.store.create_session(pol.name, body, h, who, self.clock.now(),
                                                  check=self._stored_check(pol.name, pol))
            except AlreadyExists:
                raise MeshError(
                    Reason.CONFLICT,
                    f"session {pol.name!r} already exists; to change it, send a new version "
                    "with `predecessor:` set to its current policy hash (`meshshield policy "
                    "get`)",
                ) from None
            self._parsed[(pol.name, h)] = pol  # the refresh below takes it, parsing nothing
            self._changed(epoch)
            return self._session(pol.name).record

    def read_session(self, who: str, name: str) -> SessionRecord:
        s = self._authorised(who, name, update=False)
        return s.record

    def update_session(self, who: str, name: str, body: bytes) -> SessionRecord:
        self.refresh()  # a session another replica created or changed just now
        self._authorised(who, name, update=True)
        pol = self._parse(body, "policy")
        if pol.name != name:
            raise PolicyError(
                Reason.POLICY_INVALID,
                f"policy names session {pol.name!r} but was sent to session {name!r}",
            )
        h = policy_hash(body)
        with self._write:
            try:
                # Who may update, and the DNS names, decided on the stored sessions.
                epoch = self.store.update_session(
                    name, body, h, pol.predecessor, who, self.clock.now(),
                    check=self._stored_check(name, pol, who),
                )
            except PredecessorMismatch as e:
                raise MeshError(
                    Reason.PREDECESSOR_MISMATCH,
                    f"policy for session {name!r} names predecessor {pol.predecessor}, but "
                    f"the current policy hash is {e.current}; someone else may have changed "
                    "it: fetch it with `meshshield policy get`, merge, and set predecessor "
                    "to its hash",
                ) from None
            except NotFound:
                raise self._gone(name) from None
            self._parsed[(name, h)] = pol
            self._changed(epoch)
            return self._session(name).record

    def _gone(self, name: str) -> MeshError:
        return MeshError(Reason.SESSION_UNKNOWN, f"session {name!r} was deleted meanwhile")

    def delete_session(self, who: str, name: str) -> None:
        self.refresh()  # a change another replica made just now
        with self._write:
            self._authorised(who, name, update=True)
            try:
                epoch = self.store.delete_session(name, who, self.clock.now(),
                                                  check=self._stored_check(name, None, who))
            except NotFound:
                raise self._gone(name) from None
            self._changed(epoch)

    def _authorise_revocation(self, who: str, name: str) -> None:
        """Who may revoke in session `name`: its updaters; for a deleted session (whose
        certificates stay revocable) the updaters of its last version, or a CAS admin."""
        last = None if name in self._sessions else self.store.last_session(name)
        if last is None:  # an existing session, or none ever: the usual answer
            self._authorised(who, name, update=True)
            return
        if self.is_admin(who):
            return
        try:
            pol: Policy | None = parse_policy(last.policy, f"session {name}", cas_dns=())
        except PolicyInvalid:
            pol = None
        if pol is None or who not in pol.updaters(last.creator):
            self._authorised(who, name, update=True)  # forbidden, as for any stranger

    def revoke(self, who: str, name: str, body: object) -> dict[str, Any]:
        """Revoke a certificate serial of the session, or a measurement: in this session
        only, or mesh-wide (`"mesh_wide": true`, a CAS admin only)."""
        shape = 'revocation body must be {"serial": HEX} or {"measurement": HEX} (with ' \
            '"mesh_wide": true for a mesh-wide one, CAS admins only)'
        if not isinstance(body, dict) or not body:
            raise _bad(shape)
        mesh_wide = body.get("mesh_wide", False)
        kinds = set(body) - {"mesh_wide"}
        if len(kinds) != 1 or not kinds <= {"serial", "measurement"} or (
            not isinstance(mesh_wide, bool) or ("mesh_wide" in body and "serial" in body)
        ):
            raise _bad(shape)
        kind = kinds.pop()
        self.refresh()  # a change another replica made just now
        if mesh_wide:
            self.require_admin(who, "revoke a measurement mesh-wide (a session's updaters "
                                    "may revoke it in their session only)")
        else:
            self._authorise_revocation(who, name)
        value = body[kind]
        if not isinstance(value, str) or not HEX_RE.match(value.lower()) or len(value) > 128:
            raise _bad(f'"{kind}" must be a lowercase hex string, found {str(value)[:80]!r}')
        value = value.lower()
        out: dict[str, Any] = {}
        if kind == "serial":
            value = value.lstrip("0") or "0"
            cert = self.store.get_certificate(value)
            if cert is None or cert.session != name:
                raise MeshError(
                    Reason.NOT_FOUND,
                    f"no certificate with serial {value} was issued for session {name!r}; "
                    "check the serial (see the sidecar's /status or the certificate)",
                )
            stored_kind, stored = "serial", value
        else:
            if len(value) not in (64, 96):
                raise _bad(
                    f"measurement must be 64 (sim, sgx) or 96 (sev-snp, tdx) hex digits, "
                    f"found {len(value)}"
                )
            self._session(name)  # not in a deleted session
            if mesh_wide:
                stored_kind, stored = "measurement", value
                out["scope"] = "mesh-wide"
            else:
                stored_kind, stored = "session_measurement", f"{name}/{value}"
                out["scope"] = "session"
        with self._write:
            # Authorisation may have changed meanwhile.
            if mesh_wide:
                self.require_admin(who, "revoke a measurement mesh-wide")
            else:
                self._authorise_revocation(who, name)
            epoch = self.store.add_revocation(name, stored_kind, stored, who,
                                              self.clock.now())
            self._changed(epoch)
        if kind == "measurement":
            log.info("session %s: measurement %s revoked %s by %s…", name, value,
                     "mesh-wide" if mesh_wide else "in this session only", who[:16])
        return {"epoch": epoch, "session": name, kind: value, **out}

    # -- bundle & trust snapshots -------------------------------------------------------
    def bundle(self) -> dict[str, Any]:
        now = self.clock.now()
        return {
            "trust_domain": self.config.trust_domain,
            "bundle": self.ca.bundle_pem(now),
            "epoch": self._epoch,
            "cas": self.ca.describe(now),
        }

    def spiffe_bundle(self) -> dict[str, Any]:
        """The same CAs as a SPIFFE bundle document. It also carries the JWT-SVID
        authority (cas/jwt.py).

        Its sequence must change whenever its contents do (SPIFFE Trust Domain and
        Bundle §4), and they change with the epoch and also, within one epoch, when a CA
        reaches its activate_at or retire_after. So the sequence is the epoch times a
        stride plus the number of those instants already passed: it grows at every
        change, and a later epoch always sorts after an earlier one."""
        now = self.clock.now()
        cas = self.ca.set
        passed = sum(1 for r in cas.records for t in (r.activate_at, r.retire_after)
                     if t is not None and t <= now)
        doc = spiffe_bundle_document(cas.bundle(now),
                                     sequence=self._epoch * SEQUENCE_STRIDE + passed)
        doc["keys"].extend(self.jwt.jwks())
        return doc

    def trust_snapshot(self, session: str) -> dict[str, Any]:
        """The full `trust` snapshot for a session (policy part cached per epoch)."""
        cached = self._snapshots.get(session)
        if cached is None or cached[0] != self._epoch:
            cached = (self._epoch, self._policy_snapshot(session))
            self._snapshots[session] = cached
        return {**cached[1], "bundle": self.ca.bundle_pem(self.clock.now())}

    def _policy_snapshot(self, session: str) -> dict[str, Any]:
        s = self._sessions.get(session)
        services: dict[str, Any] = {}
        tolerate: list[str] = []
        ignore: list[str] | str = []
        if s is not None:
            for svc in s.policy.services:
                services[svc.name] = {
                    "spiffe_id": spiffe_id(self.config.trust_domain, session, svc.name),
                    "allow_from": [str(p) for p in svc.allow_from],
                    "dns": list(svc.dns),
                }
            tolerate = sorted(t.value for t in s.policy.tolerate)
            ia = s.policy.ignore_advisories
            ignore = ia if isinstance(ia, str) else list(ia)
        return {
            "epoch": self._epoch,
            "trust_domain": self.config.trust_domain,
            "session": session,
            "exists": s is not None,
            "policy_hash": None if s is None else s.record.policy_hash,
            "services": services,
            "tolerate": tolerate,
            "ignore_advisories": ignore,
            "revoked_serials": self._revoked_serial_list(),
            "revoked_measurements": sorted(self._revoked_measurements),
        }

    def _revoked_serial_list(self) -> list[str]:
        """Every serial a peer must be refused for, mesh-wide: revoked explicitly, or no
        longer passing its session's policy. Certificates past their not_after are left
        out (no handshake accepts them), so snapshots stay as small as the set of live
        certificates; the revocation rows stay in the store."""
        cached, epoch = self._revoked_list, self._epoch
        if cached is None or cached[0] != epoch:
            now = self.clock.now()
            revoked, failing = self._revoked_serials, self._failing  # whole versions
            serials = {s for s, not_after in revoked.items() if not_after > now}
            serials.update(f.serial for f in failing if f.not_after > now)
            cached = (epoch, sorted(serials))
            self._revoked_list = cached
        return cached[1]

    def is_revoked_serial(self, serial: str) -> bool:
        """Revoked explicitly, or its claims no longer pass its session's policy."""
        return serial in self._revoked_serials or self._failing.get(serial) is not None

    def certificate_refusal(self, cert: x509.Certificate) -> MeshError | None:
        """Why a mesh client certificate may no longer use the CAS's mesh endpoints
        (/v1/events, /v1/reports), or None."""
        serial = serial_hex(cert)
        failing = self._failing.get(serial)
        if failing is not None:
            return MeshError(
                Reason.REVOKED,
                f"client certificate serial {serial} of {failing.session}/{failing.service} "
                f"no longer passes its session's policy ({failing.reason.reason.value}: "
                f"{failing.reason.message})",
            )
        if serial in self._revoked_serials:
            return MeshError(Reason.REVOKED, f"client certificate serial {serial} is revoked")
        if self._revoked_measurements:
            try:
                measurement = claims_from_certificate(cert)["measurement"]
            except MeshError as e:
                return e
            if measurement in self._revoked_measurements:
                return MeshError(
                    Reason.REVOKED,
                    f"client certificate measurement {measurement} is revoked mesh-wide",
                )
        return None

    # -- nonces ----------------------------------------------------------------------
    def new_nonce(self) -> dict[str, str]:
        """A fresh attestation nonce. Nothing is stored (cas/nonces.py): cheap enough to
        run on the event loop, and it opens on every replica of this store."""
        # Whole seconds, so the expiry the client is shown is exactly the one enforced.
        expires = (self.clock.now() + timedelta(seconds=self.config.nonce_ttl)).replace(
            microsecond=0
        )
        nonce = self.nonces.mint(expires)
        return {"nonce": base64.b64encode(nonce).decode(), "expires_at": rfc3339(expires)}

    def _open_nonce(self, text: str) -> tuple[bytes, datetime]:
        """The nonce and its expiry, if this CAS (or a replica) minted it and it has not
        expired; whether it was used before is the store's to say."""
        try:
            nonce = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            nonce = b""
        if len(nonce) != NONCE_SIZE:
            raise MeshError(
                Reason.NONCE_INVALID,
                f"nonce must be standard base64 of {NONCE_SIZE} bytes, found {text[:60]!r}; "
                "request one with POST /v1/attest/nonce",
            )
        expires = self.nonces.open(nonce)
        if expires is None:
            raise MeshError(
                Reason.NONCE_INVALID,
                "nonce was not issued by this CAS (or was altered); request a fresh nonce "
                "with POST /v1/attest/nonce",
            )
        if expires <= self.clock.now():
            raise MeshError(
                Reason.NONCE_INVALID,
                f"nonce expired at {rfc3339(expires)} (nonces live "
                f"{self.config.nonce_ttl:g} s); request a fresh nonce and attest within its "
                "lifetime",
            )
        return nonce, expires

    def _consume_nonce(self, text: str) -> bytes:
        """The nonce, checked and its single use recorded."""
        nonce, expires = self._open_nonce(text)
        if not self.store.use_nonce(nonce, expires):
            raise _nonce_used()
        return nonce

    # -- attestation --------------------------------------------------------------------
    def attest(self, body: object) -> dict[str, Any]:
        """Verify evidence for a service and issue its certificate, or raise MeshError."""
        if not isinstance(body, dict):
            raise _bad(f"attest body must be a JSON object, found {type(body).__name__}")
        allowed = {"session", "service", "csr", "nonce", "evidence", "platform"}
        extra = sorted(set(body) - allowed)
        if extra:
            raise _bad(f"unknown keys {extra[:5]}; expected {sorted(allowed)}")
        session = _field_str(body, "session", 63)
        service = _field_str(body, "service", 63)
        csr_pem = _field_str(body, "csr")
        nonce_text = _field_str(body, "nonce", 128)
        evidence = body.get("evidence")
        if evidence is None:
            raise _bad('"evidence" is missing: expected the platform\'s evidence JSON object')
        if len(json.dumps(evidence)) > MAX_EVIDENCE_JSON:
            raise MeshError(Reason.BODY_TOO_LARGE, "evidence is larger than 512 KiB")
        # Nonce and evidence first: a caller without valid evidence learns nothing about
        # which sessions and services exist.
        nonce, nonce_expires = self._open_nonce(nonce_text)
        key = public_key_from_csr(csr_pem)
        platform = self._platform(body.get("platform"), evidence)
        now = self.clock.now()
        claims = verify_evidence(platform, evidence, self.verifier, now)
        self._check_binding(claims, nonce, key)
        # Decided on the cached view, and recorded (with the nonce's single use) only if
        # the store is still at that view's epoch: else the view is brought up to the
        # store's and the decision taken again, so no certificate is issued on a view
        # older than the store's when it is recorded.
        for _ in range(ISSUE_ATTEMPTS):
            seen = self._epoch
            try:
                out = self._decide_and_issue(session, service, claims, evidence, key, now,
                                             (nonce, nonce_expires, seen))
            except MeshError:
                # A refusal stands only on the newest view: a session or service created
                # a moment ago through another replica is not refused as unknown.
                epoch = self.store.epoch()
                if epoch == seen:
                    raise
                self.refresh(epoch=epoch)
                continue
            if out is not None:
                return out
        raise MeshError(
            Reason.STORE_UNAVAILABLE,
            f"the CAS's policies and revocations changed {ISSUE_ATTEMPTS} times while this "
            "attestation was being decided; retry it",
        )

    def _decide_and_issue(
        self, session: str, service: str, claims: Claims, evidence: object,
        key: ec.EllipticCurvePublicKey, now: datetime, use: tuple[bytes, datetime, int],
    ) -> dict[str, Any] | None:
        """One decision and issuance on the current view; None if the store's epoch had
        moved past the view's by the time the certificate was to be recorded."""
        s = self._session(session)
        if s.policy.service(service) is None:
            raise MeshError(
                Reason.SERVICE_UNKNOWN,
                f"session {session!r} has no service {service!r}; check --service, or add "
                "the service to the policy and apply it",
            )
        revoked = self._revoked_measurements | self._session_measurements.get(session, frozenset())
        svc = decide_issuance(s.policy, service, claims, revoked)
        # Secrets are looked up before the certificate is issued: one that cannot be
        # released refuses the attestation instead of leaving the service without it.
        resolved = self.secrets.resolve(s.policy, svc.name, self._policy_of, now)
        out = self._issue(s, svc.name, svc.dns, svc.cert_ttl_seconds, claims, evidence, key, now,
                          embed_evidence=svc.embed_evidence, use=use)
        if out is None:
            return None
        if resolved:
            out["secrets"] = self.secrets.release(
                resolved, session=session, service=svc.name, measurement=claims.measurement,
                serial=out["serial"], spiffe_id=out["spiffe_id"], recipient=key,
                signer=self._leaf_signer(now), x509_ttl=timedelta(seconds=svc.cert_ttl_seconds),
                now=now,
            )
        return out

    def _leaf_signer(self, now: datetime) -> ec.EllipticCurvePrivateKey:
        """The key of the CA that signed the certificate just issued (the same `now`)."""
        key = self.ca.signing(now).key
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def _policy_of(self, session: str) -> Policy | None:
        s = self._sessions.get(session)
        return None if s is None else s.policy

    # -- secrets (admin) -------------------------------------------------------------------
    def _check_imports(self, pol: Policy, exporter: Callable[[str], Policy | None]) -> None:
        problems = import_problems(pol, "policy", exporter)
        if problems:
            raise PolicyInvalid(problems)

    def _secret_of(self, who: str, session: str, name: str, update: bool) -> Secret:
        s = self._authorised(who, session, update=update)
        secret = s.policy.secret(name)
        if secret is None:
            known = ", ".join(x.name for x in s.policy.secrets) or "none"
            raise MeshError(Reason.NOT_FOUND, f"session {session!r} defines no secret {name!r} "
                                              f"(its secrets: {known})")
        return secret

    def put_secret(self, who: str, session: str, name: str, value: bytes) -> dict[str, Any]:
        with self._write:
            secret = self._secret_of(who, session, name, update=True)
            row = self.secrets.put(session, secret, value, who, self.clock.now())
        return {"session": session, "secret": name, "version": row.version}

    def rotate_secret(self, who: str, session: str, name: str) -> dict[str, Any]:
        with self._write:
            secret = self._secret_of(who, session, name, update=True)
            row = self.secrets.rotate(session, secret, who, self.clock.now())
        return {"session": session, "secret": name, "version": row.version}

    def secret_audit(self, who: str, session: str) -> dict[str, Any]:
        self._authorised(who, session, update=False)
        return {"session": session, "releases": self.secrets.audit(session)}

    def _platform(self, declared: object, evidence: object) -> Platform:
        found = platform_of(evidence)
        if declared is None:
            return found
        try:
            p = Platform(declared) if isinstance(declared, str) else Platform("?")
        except ValueError:
            raise _bad(
                f'"platform" must be one of sev-snp, tdx, sgx, sim; found {str(declared)[:20]!r}'
            ) from None
        if p is Platform.SGX and found is Platform.TDX:
            return p  # both carry {"quote"}; the verifier tells them apart by header
        if p is not found:
            raise MeshError(
                Reason.EVIDENCE_MALFORMED,
                f"request says platform {p.value} but the evidence has the shape of "
                f"{found.value} evidence; send evidence from the declared platform",
            )
        return p

    def _check_binding(self, claims: Claims, nonce: bytes, key: ec.EllipticCurvePublicKey) -> None:
        want = expected_report_data(nonce, spki_der(key))
        if not secrets.compare_digest(want, claims.report_data):
            raise MeshError(
                Reason.REPORT_DATA_MISMATCH,
                f"evidence report_data is {claims.report_data.hex()[:32]}…, expected "
                f"{want.hex()[:32]}… = SHA-512(\"meshshield/v1\" || nonce || SPKI of the CSR "
                "key); the evidence was made for another nonce or key: obtain fresh evidence "
                "over this nonce and the CSR's key",
            )

    def _issue(
        self,
        s: LoadedSession,
        service: str,
        dns: tuple[str, ...],
        ttl_seconds: int,
        claims: Claims,
        evidence: object,
        key: ec.EllipticCurvePublicKey,
        now: datetime,
        *,
        use: tuple[bytes, datetime, int],
        embed_evidence: bool = False,
    ) -> dict[str, Any] | None:
        """Sign and record a certificate with its attestation's `use` (nonce, its expiry,
        the epoch decided on; `Store.record_issuance`); None (the view was stale, and is
        now refreshed) or a refusal when that fails."""
        ttl = float(ttl_seconds)
        if self.config.max_cert_ttl is not None:
            ttl = min(ttl, self.config.max_cert_ttl)
        not_after = now + timedelta(seconds=ttl)
        session = s.record.name
        sid = spiffe_id(self.config.trust_domain, session, service)
        evidence_json = json.dumps(evidence, sort_keys=True, separators=(",", ":")).encode()
        evidence_hash = hashlib.sha256(evidence_json).hexdigest()
        if embed_evidence and len(evidence_json) > MAX_EMBEDDED_EVIDENCE_BYTES:
            raise MeshError(
                Reason.BODY_TOO_LARGE,
                f"service {service} has embed_evidence: true, but its evidence is "
                f"{len(evidence_json)} bytes and at most {MAX_EMBEDDED_EVIDENCE_BYTES} fit "
                "in a certificate; send the evidence without extra fields, or turn "
                "embed_evidence off",
            )
        cert_claims = certificate_claims(
            claims, session=session, service=service, policy_hash=s.record.policy_hash,
            evidence_sha256=evidence_hash, attested_at=now,
        )
        signer = self.ca.signing(now)
        cert = issue_leaf(
            signer,
            key,
            spiffe_id=sid,
            dns=list(dns),
            not_before=now - timedelta(seconds=60),
            not_after=not_after,
            claims=cert_claims,
            evidence=evidence_json if embed_evidence else None,
        )
        serial = serial_hex(cert)
        leaf_pem = cert_pem(cert)
        record = IssuedCertificate(
            serial=serial,
            session=session,
            service=service,
            spiffe_id=sid,
            issuer_fingerprint=signer.fingerprint,
            not_before=now - timedelta(seconds=60),
            not_after=cert.not_valid_after_utc,
            # The verified claims too (workload fields, advisories): a policy
            # change judges the certificate again by them (cas/standing.py).
            claims_json=json.dumps({**cert_claims, "verified": claims.to_json()},
                                   sort_keys=True, default=_json_default),
            cert_pem=leaf_pem,
            issued_at=now,
        )
        nonce, nonce_expires, seen = use
        outcome, epoch = self.store.record_issuance(record, nonce, nonce_expires, seen)
        if outcome == "stale":
            self.refresh(epoch=epoch)
            return None
        if outcome != "issued":
            raise _nonce_used()
        log.info(
            "issued %s serial %s platform %s%s until %s",
            sid, serial, claims.platform.value, " (SIMULATED)" if claims.simulated else "",
            rfc3339(cert.not_valid_after_utc),
        )
        return {
            "certificate": leaf_pem + cert_pem(signer.cert),
            "bundle": self.ca.bundle_pem(now),
            "spiffe_id": sid,
            "serial": serial,
            "expires_at": rfc3339(cert.not_valid_after_utc),
            "claims": cert_claims,
            "trust": self.trust_snapshot(session),
        }

    # -- CA rotation & housekeeping ------------------------------------------------------
    def rotate_ca(self, who: str, activate_after_seconds: float,
                  force: bool = False) -> dict[str, Any]:
        """Plan a rotation, or with `force` (key compromise) replace the CA at once."""
        self.require_admin(who, "rotate the CA")
        now = self.clock.now()
        with self._write:
            try:
                if force:
                    epoch = self.ca.force_rotate(now, who)
                else:
                    epoch = self.ca.rotate(now, timedelta(seconds=activate_after_seconds), who)
            except ValueError as e:
                raise MeshError(Reason.CONFLICT, str(e)) from None
            self._changed(epoch)
        return {"epoch": epoch, "forced": force, "cas": self.ca.describe(now)}

    def tick(self) -> None:
        """Periodic housekeeping: promote a due CA, drop expired nonces, follow replicas."""
        now = self.clock.now()
        # A nonce's use is kept past its expiry by the most replica clocks may differ.
        self.store.purge_nonces(now - NONCE_PURGE_MARGIN)
        self.store.purge_request_nonces(now)
        self._prune_expired(now)
        with self._write:
            if self.ca.tick(now):
                self._changed(self.store.epoch())
                self._bundle_seen = self.ca.bundle_pem(now)
                return
        if self.refresh() or self.ca.bundle_pem(now) != self._bundle_seen:
            # A retired CA leaving the bundle changes trust without a new epoch: the
            # listeners (event streams, the CAS's own TLS) must hear of it all the same.
            self._notify(self._epoch)
        self._bundle_seen = self.ca.bundle_pem(now)

    def _prune_expired(self, now: datetime) -> None:
        """Forget revocations of certificates that expired: later snapshots omit them."""
        with self._write:
            revoked = self._revoked_serials
            kept = {s: not_after for s, not_after in revoked.items() if not_after > now}
            failing = self._failing.pruned(now)
            if failing is None and len(kept) == len(revoked):
                return
            self._revoked_serials = kept
            if failing is not None:
                self._failing = failing
            self._revoked_list = None
            self._snapshots = {}

    # -- reports & edges ------------------------------------------------------------------
    def visible_sessions(self, who: str) -> set[str] | None:
        """None = every session (a CAS admin); else the sessions `who` may read."""
        if self.is_admin(who):
            return None
        return {
            n for n, s in self._sessions.items() if who in s.policy.readers(s.record.creator)
        }

    def own_connections(
        self, session: str, service: str, conns: list[Mapping[str, Any]]
    ) -> list[Mapping[str, Any]]:
        """The entries of session/service's report it can vouch for (cas.edges). Does
        store I/O (one certificate lookup per distinct serial)."""
        issued: dict[str, str | None] = {}

        def issued_to(serial: str) -> str | None:
            if serial not in issued:
                cert = self.store.get_certificate(serial)
                revoked = cert is None or serial in self._revoked_serials
                issued[serial] = None if revoked or cert is None else cert.spiffe_id
            return issued[serial]

        def admits(server: tuple[str, str], client: tuple[str, str]) -> bool:
            s = self._sessions.get(server[0])
            svc = None if s is None else s.policy.service(server[1])
            return svc is not None and allows_inbound(svc, server[0], *client)

        return own_connections(
            (session, service), conns, trust_domain=self.config.trust_domain,
            issued_to=issued_to, admits=admits,
        )
