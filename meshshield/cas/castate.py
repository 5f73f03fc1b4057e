"""The CAS's CA set as stored: sealed keys in the store, unsealed only in memory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.cas.store import CaSetChanged, CaStoredRecord, Store
from meshshield.clock import rfc3339
from meshshield.errors import MeshError, Reason
from meshshield.pki.ca import CaRecord, CaSet, cert_pem, generate_ca
from meshshield.pki.seal import seal_private_key, unseal_private_key

log = logging.getLogger("meshshield.cas")


class CaSetConflict(ValueError):
    """The CA set changed in the store since this process read it (another replica
    created or rotated a CA); the set has been reloaded: decide again."""


def _context(fingerprint: str) -> bytes:
    # Binds each sealed key to its CA: a key blob copied onto another CA row won't open.
    return b"ca:" + fingerprint.encode()


class CaState:
    def __init__(self, store: Store, kek: bytes, trust_domain: str) -> None:
        self._store = store
        self._kek = kek
        self._trust_domain = trust_domain
        self._set: CaSet | None = None
        self._created: dict[str, datetime] = {}
        self._bundle_cache: tuple[CaSet | None, datetime, datetime, str] | None = None
        # Unsealed keys by CA fingerprint, and what the stored rows said when the set was
        # last built: a reload after a policy change or a revocation unseals nothing.
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._loaded: tuple[tuple[Any, ...], ...] | None = None
        self.keys_unsealed = 0

    @property
    def set(self) -> CaSet:
        if self._set is None:
            raise RuntimeError("CA not loaded")
        return self._set

    def ensure(self, now: datetime, found: Sequence[str] = (), where: str = "the store") -> bool:
        """Create the first CA, but only in empty state. True if one was created.

        `found` names state seen outside the store (e.g. a bundle.pem). A store or a data
        folder that holds anything but no CA lost its CA: making a new one would silently
        replace the mesh's trust, so the CAS refuses to start instead."""
        if self._store.load_cas():
            self.reload(now)
            return False
        counts = self._store.record_counts()
        if counts.get("CA"):  # another replica made the first CA just now
            self.reload(now)
            return False
        found = [*found, *(
            f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in counts.items() if n
        )]
        if found:
            raise MeshError(
                Reason.INTERNAL,
                f"the CAS state in {where} has no CA: found {', '.join(found)}, but no CA "
                "record in the database (was cas.db deleted, truncated or emptied?). "
                "Refusing to create a new CA, which would silently replace the mesh's trust "
                "and lose its sessions, history and revocations. Stop the CAS and restore "
                "cas.db from a backup of the data folder (or the database with `meshshield "
                "cas restore`); to start a new mesh on purpose, move the data folder aside "
                "and start with an empty one (and an empty database)",
            )
        cert, key = generate_ca(self._trust_domain, now)
        try:
            self._save([CaRecord(cert, key, "active")], now, "cas")
        except CaSetConflict:
            # Replicas starting at once on an empty database: another one's CA was
            # stored first (the store serialises CA writes), so this one serves that CA.
            return False
        return True

    def reload(self, now: datetime) -> bool:
        """Rebuild the CA set from the store if its rows changed; True if they did.
        Only a CA not seen before is unsealed."""
        stored = self._store.load_cas()
        shape = tuple(
            (s.fingerprint, s.state, s.activate_at, s.retire_after) for s in stored
        )
        if self._set is not None and shape == self._loaded:
            return False
        records = []
        for s in stored:
            cert = x509.load_pem_x509_certificate(s.cert_pem.encode())
            key = self._keys.get(s.fingerprint)
            if key is None:
                key = unseal_private_key(s.sealed_key, self._kek, _context(s.fingerprint))
                self._keys[s.fingerprint] = key
                self.keys_unsealed += 1
            records.append(CaRecord(cert, key, s.state, s.activate_at, s.retire_after))  # type: ignore[arg-type]
            self._created[s.fingerprint] = s.created_at
        self._set = CaSet(records)
        self._loaded = shape
        return True

    def _save(self, records: list[CaRecord], now: datetime, actor: str) -> int:
        rows = []
        for r in records:
            if r.key is None:
                raise RuntimeError("cannot store a CA without its key")
            rows.append(
                CaStoredRecord(
                    fingerprint=r.fingerprint,
                    cert_pem=cert_pem(r.cert),
                    sealed_key=seal_private_key(r.key, self._kek, _context(r.fingerprint)),
                    state=r.state,
                    activate_at=r.activate_at,
                    retire_after=r.retire_after,
                    created_at=self._created.get(r.fingerprint, now),
                )
            )
        try:
            epoch = self._store.save_cas(rows, actor, now)
        except CaSetChanged:
            self.reload(now)
            raise CaSetConflict(
                "the CA set changed meanwhile (a CA was created or rotated through another "
                "CAS replica); nothing was changed here: see GET /v1/bundle and decide again"
            ) from None
        self._keys.update({r.fingerprint: r.key for r in records if r.key is not None})
        self._set = CaSet(records)
        self._loaded = None  # the next reload rebuilds from the rows, unsealing nothing
        return epoch

    def _maybe_promote(self, now: datetime) -> None:
        """Once a planned CA is due, make it active and retire the old one."""
        s = self.set
        if s.next is None or s.next.activate_at is None or s.next.activate_at > now:
            return
        last = self._store.last_not_after(s.active.fingerprint) or now
        # The CAS's own serving certificate is signed by the old CA too; it is re-issued
        # at start and rotation, so the leaves bound how long the old CA must stay.
        self._save(s.promote(now, max(last, now + timedelta(minutes=5))), now, "cas")
        log.info("CA %s is now the signer", self.set.active.fingerprint[:16])

    def rotate(self, now: datetime, activate_after: timedelta, actor: str) -> int:
        cert, key = generate_ca(self._trust_domain, now)
        return self._save(self.set.plan_rotation(now, cert, key, activate_after), now, actor)

    def force_rotate(self, now: datetime, actor: str) -> int:
        """A new CA signs at once; every other CA leaves the bundle now (key compromise)."""
        cert, key = generate_ca(self._trust_domain, now)
        epoch = self._save(self.set.force_rotation(now, cert, key), now, actor)
        log.warning("CA %s replaced every other CA at once (forced rotation by %s)",
                    self.set.active.fingerprint[:16], actor[:16])
        return epoch

    def signing(self, now: datetime) -> CaRecord:
        # A due "next" signs even before tick() has promoted it (CaSet invariant 2).
        return self.set.signing_ca(now)

    def tick(self, now: datetime) -> bool:
        """Promote a due CA; True if the CA set changed."""
        before = self.set.active.fingerprint
        try:
            self._maybe_promote(now)
        except CaSetConflict:
            pass  # reloaded: another replica changed the set; the next tick decides again
        return self.set.active.fingerprint != before

    def bundle_pem(self, now: datetime) -> str:
        """The bundle at `now`, cached until the CA set or a time boundary changes it."""
        cached = self._bundle_cache
        if cached is not None and cached[0] is self._set and cached[1] <= now < cached[2]:
            return cached[3]
        pem = self.set.bundle_pem(now)
        edges = [t for r in self.set.records for t in (r.activate_at, r.retire_after)
                 if t is not None and t > now]
        until = min(edges) if edges else datetime.max.replace(tzinfo=now.tzinfo)
        self._bundle_cache = (self._set, now, until, pem)
        return pem

    def fingerprint(self) -> str:
        return self.set.active.fingerprint

    def describe(self, now: datetime) -> list[dict[str, Any]]:
        signer = self.set.signing_ca(now).fingerprint
        out = []
        for r in self.set.records:
            if r.state == "retired" and r.retire_after is not None and r.retire_after <= now:
                continue
            out.append(
                {
                    "fingerprint": r.fingerprint,
                    "state": r.state,
                    "signing": r.fingerprint == signer,
                    "not_after": rfc3339(r.cert.not_valid_after_utc),
                    "activate_at": None if r.activate_at is None else rfc3339(r.activate_at),
                    "retire_after": None if r.retire_after is None else rfc3339(r.retire_after),
                }
            )
        return out
