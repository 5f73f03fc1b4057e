"""SQLite implementation of the CAS store: one file, WAL, every write one transaction.

Durability: WAL with `synchronous=NORMAL` makes a committed transaction survive the
death of the CAS process (SIGKILL, OOM kill) because the commit has been written to the
WAL file before the call returns; only an operating-system crash or power loss can roll
back the last few commits. `--sqlite-sync full` trades throughput for that last case.

Schema versions and migrations: `meshshield.cas.schema`; version 1 is the schema every
earlier release wrote (`meta.schema` = 1), read as such without a rewrite.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshshield.cas.schema import (
    ID_TABLES,
    TABLES,
    TIME,
    Migration,
    check_version,
    latest,
    pending,
    split_sql,
)
from meshshield.cas.store import (
    AlreadyExists,
    AuditRecord,
    CaSetChanged,
    CaStoredRecord,
    HistoryRecord,
    IssuedCertificate,
    KekWrapRecord,
    NotFound,
    PredecessorMismatch,
    Report,
    Revocation,
    SecretRelease,
    SessionCheck,
    SessionRecord,
    StoredSecret,
    StoreUnavailable,
)

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ca (
    fingerprint TEXT PRIMARY KEY, cert_pem TEXT NOT NULL, sealed_key BLOB NOT NULL,
    state TEXT NOT NULL, activate_at REAL, retire_after REAL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY, policy BLOB NOT NULL, policy_hash TEXT NOT NULL,
    creator TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS policy_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT NOT NULL, policy_hash TEXT NOT NULL,
    predecessor TEXT, policy BLOB, author TEXT NOT NULL, at REAL NOT NULL, action TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS policy_history_session ON policy_history(session, id);
CREATE TABLE IF NOT EXISTS nonces (nonce BLOB PRIMARY KEY, expires_at REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS admin_request_nonces (
    fingerprint TEXT NOT NULL, nonce TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (fingerprint, nonce)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS admin_request_nonces_expiry ON admin_request_nonces(expires_at);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY, session TEXT NOT NULL, service TEXT NOT NULL,
    spiffe_id TEXT NOT NULL, issuer TEXT NOT NULL, not_before REAL NOT NULL,
    not_after REAL NOT NULL, claims TEXT NOT NULL, cert_pem TEXT NOT NULL,
    issued_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS certificates_issuer ON certificates(issuer, not_after);
CREATE INDEX IF NOT EXISTS certificates_session ON certificates(session, not_after);
CREATE TABLE IF NOT EXISTS revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT NOT NULL, kind TEXT NOT NULL,
    value TEXT NOT NULL, actor TEXT NOT NULL, at REAL NOT NULL, UNIQUE(kind, value));
CREATE TABLE IF NOT EXISTS reports (
    reporter TEXT PRIMARY KEY, body TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jwt_keys (
    kid TEXT PRIMARY KEY, sealed_key BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, session TEXT, detail TEXT NOT NULL);
INSERT INTO meta VALUES ('epoch', '0') ON CONFLICT(key) DO NOTHING
"""

# Forward migrations, in order. Append only: a released migration never changes.
_SCHEMA_V2 = """
CREATE TABLE kek_wraps (
    kind TEXT NOT NULL, key_id TEXT NOT NULL, blob BLOB NOT NULL, detail TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (kind, key_id))
"""

_SCHEMA_V3 = """
CREATE TABLE secrets (
    session TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL,
    sealed BLOB NOT NULL, actor TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (session, name));
CREATE TABLE secret_releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, session TEXT NOT NULL,
    service TEXT NOT NULL, measurement TEXT NOT NULL, serial TEXT NOT NULL,
    secrets TEXT NOT NULL);
CREATE INDEX secret_releases_session ON secret_releases(session, id)
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", split_sql(_SCHEMA_V1)),
    Migration(2, "kek_wraps: the key-encryption key sealed to TEEs and recovery keys",
              split_sql(_SCHEMA_V2)),
    Migration(3, "secrets and their releases", split_sql(_SCHEMA_V3)),
)

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
    " description TEXT NOT NULL, applied_at REAL NOT NULL)"
)


def _ts(t: datetime) -> float:
    return t.timestamp()


def _dt(x: float | None) -> datetime | None:
    return None if x is None else datetime.fromtimestamp(x, UTC)


def _dt_req(x: float) -> datetime:
    return datetime.fromtimestamp(x, UTC)


class SqliteStore:
    """The default store: `DIR/cas.db` under `--data`."""

    def __init__(
        self, path: Path, *, synchronous: str = "NORMAL", migrate: bool = False
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = path
        self._synchronous = synchronous.upper()
        # One connection per thread: the CAS calls the store from worker threads (never
        # from its event loop), and SQLite in WAL mode lets readers on their own
        # connections proceed while one writer commits. A shared connection would mix
        # one thread's reads into another's open transaction.
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        try:
            db = self._connect()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot open the CAS database {path}: {e}") from None
        try:
            self._adopt(db)
            self._open(migrate)
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreUnavailable(
                f"{path} cannot be read as the CAS database ({e}): expected the SQLite "
                "file a CAS wrote, found a corrupt or foreign file; stop the CAS and restore "
                f"cas.db from a backup of {path.parent}, or move that folder aside to start "
                "a new mesh"
            ) from None
        except StoreUnavailable:
            self.close()
            raise

    engine = "sqlite"

    def _open(self, migrate: bool) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        found = self.schema_version()
        check_version(found, MIGRATIONS, str(self.path),
                      migrate_hint=f"--data {self.path.parent}", migrating=migrate)
        self.applied: list[int] = []
        if found == 1:
            # Version 1 grew while it was the only one (admin_request_nonces, jwt_keys,
            # an index): its statements are idempotent and every release until the
            # version table ran them at each open, so a file written by any of them
            # gets what it lacks (before any later migration). Later changes are
            # numbered migrations.
            with self._tx() as c:
                for stmt in MIGRATIONS[0].statements:
                    c.execute(stmt)
        if found == 0 or (migrate and found < latest(MIGRATIONS)):
            self.applied = self._migrate()

    def _tables(self) -> set[str]:
        return {
            r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }

    def schema_version(self) -> int:
        """The database's schema version; 0 for an empty file."""
        c = self._db
        tables = self._tables() - {"sqlite_sequence"}
        found = 0
        if "schema_version" in tables:
            row = c.execute("SELECT MAX(version) FROM schema_version").fetchone()
            found = int(row[0] or 0)
        if "meta" in tables:
            # Kept equal to the table's version; a release that predates the table (or a
            # later one) may have written only this.
            row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is not None:
                try:
                    found = max(found, int(row[0]))
                except (TypeError, ValueError):
                    raise StoreUnavailable(
                        f"{self.path}: database schema version {str(row[0])[:20]!r} is not a "
                        "number; expected the SQLite file a CAS wrote: restore cas.db from "
                        "a backup"
                    ) from None
        if found:
            return found
        if tables - {"schema_version"}:
            raise StoreUnavailable(
                f"{self.path} holds tables ({', '.join(sorted(tables)[:5])}) but no CAS "
                "schema version: it is not a CAS database; point --data at the CAS's "
                "folder, or move this file aside"
            )
        return 0

    def _migrate(self) -> list[int]:
        """Apply every migration this database lacks, in one transaction; the versions
        applied (none if another process did meanwhile)."""
        with self._tx() as c:
            found = self.schema_version()
            check_version(found, MIGRATIONS, str(self.path), migrate_hint="",
                          migrating=True)
            todo = pending(found, MIGRATIONS)
            if not todo:
                return []
            now = datetime.now(UTC).timestamp()
            c.execute(_VERSION_TABLE)
            if found and c.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                # A database from before the version table: record the version it has.
                c.execute("INSERT INTO schema_version VALUES (?, ?, ?)",
                          (found, "recorded from meta.schema", now))
            for m in todo:
                for stmt in m.statements:
                    c.execute(stmt)
                c.execute("INSERT INTO schema_version VALUES (?, ?, ?)",
                          (m.version, m.description, now))
                # Releases before the version table read meta.schema: a newer number
                # there makes them refuse this database instead of misreading it.
                c.execute("INSERT INTO meta VALUES ('schema', ?) ON CONFLICT(key) DO UPDATE"
                          " SET value=excluded.value", (str(m.version),))
            return [m.version for m in todo]

    _COUNTED = {
        "CA": "ca", "session": "sessions", "policy version": "policy_history",
        "certificate": "certificates", "revocation": "revocations", "audit record": "audit",
        "report": "reports", "secret": "secrets", "secret release": "secret_releases",
    }

    def record_counts(self) -> dict[str, int]:
        return {
            kind: int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608 - fixed names
            for kind, table in self._COUNTED.items()
        }

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a transaction's
        # reads and writes are serialised against other writers (another thread, or
        # another CAS process on the same file, waits on the busy timeout instead of
        # failing half-way).
        return sqlite3.connect(
            str(self.path), isolation_level=None, timeout=10.0, check_same_thread=False
        )

    def _adopt(self, db: sqlite3.Connection) -> None:
        """Make `db` this thread's connection (closed by close() if the pragmas fail)."""
        self._local.db = db
        with self._all_lock:
            self._all.append(db)
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute("PRAGMA foreign_keys=ON")

    @property
    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            self._adopt(db)
        return db

    def unavailable(self) -> str | None:
        return None  # a local file: every call finds out for itself

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for db in conns:
            db.close()
        self._local = threading.local()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    @staticmethod
    def _bump(c: sqlite3.Cursor) -> int:
        c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='epoch'")
        row = c.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        return int(row[0])

    @staticmethod
    def _audit(
        c: sqlite3.Cursor, at: datetime, actor: str, action: str, session: str | None, detail: str
    ) -> None:
        c.execute(
            "INSERT INTO audit (at, actor, action, session, detail) VALUES (?,?,?,?,?)",
            (_ts(at), actor, action, session, detail),
        )

    # -- epoch ----------------------------------------------------------------
    def epoch(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        return int(row[0])

    # -- CA -------------------------------------------------------------------
    def load_cas(self) -> list[CaStoredRecord]:
        rows = self._db.execute(
            "SELECT fingerprint, cert_pem, sealed_key, state, activate_at, retire_after,"
            " created_at FROM ca ORDER BY created_at"
        ).fetchall()
        return [
            CaStoredRecord(r[0], r[1], bytes(r[2]), r[3], _dt(r[4]), _dt(r[5]), _dt_req(r[6]))
            for r in rows
        ]

    def save_cas(self, records: Sequence[CaStoredRecord], actor: str, at: datetime) -> int:
        with self._tx() as c:
            stored = {r[0] for r in c.execute("SELECT fingerprint FROM ca")}
            if stored - {r.fingerprint for r in records}:
                raise CaSetChanged("the stored CA set changed meanwhile")
            for r in records:
                c.execute(
                    "INSERT INTO ca (fingerprint, cert_pem, sealed_key, state, activate_at,"
                    " retire_after, created_at) VALUES (?,?,?,?,?,?,?)"
                    " ON CONFLICT(fingerprint) DO UPDATE SET state=excluded.state,"
                    " activate_at=excluded.activate_at, retire_after=excluded.retire_after",
                    (
                        r.fingerprint,
                        r.cert_pem,
                        r.sealed_key,
                        r.state,
                        None if r.activate_at is None else _ts(r.activate_at),
                        None if r.retire_after is None else _ts(r.retire_after),
                        _ts(r.created_at),
                    ),
                )
            states = ", ".join(f"{r.fingerprint[:16]}={r.state}" for r in records)
            self._audit(c, at, actor, "ca", None, states)
            return self._bump(c)

    # -- JWT-SVID signing keys -----------------------------------------------------
    def load_jwt_keys(self) -> list[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT kid, sealed_key FROM jwt_keys ORDER BY created_at, kid").fetchall()
        return [(str(r[0]), bytes(r[1])) for r in rows]

    def add_jwt_key(self, kid: str, sealed_key: bytes, at: datetime) -> bool:
        with self._tx() as c:
            if c.execute("SELECT 1 FROM jwt_keys LIMIT 1").fetchone() is not None:
                return False
            c.execute("INSERT INTO jwt_keys (kid, sealed_key, created_at) VALUES (?,?,?)",
                      (kid, sealed_key, _ts(at)))
            self._audit(c, at, "cas", "jwt-key", None, f"created JWT signing key {kid[:16]}")
            return True

    # -- the key-encryption key's wraps (cas/kekstore.py) ----------------------------
    def kek_wraps(self) -> list[KekWrapRecord]:
        rows = self._db.execute(
            "SELECT kind, key_id, blob, detail, created_at FROM kek_wraps"
            " ORDER BY created_at, kind, key_id").fetchall()
        return [KekWrapRecord(r[0], r[1], bytes(r[2]), r[3], _dt_req(r[4])) for r in rows]

    def put_kek_wrap(self, wrap: KekWrapRecord, actor: str, *, first: bool = False,
                     audit: bool = True) -> bool:
        with self._tx() as c:
            if first and (c.execute("SELECT 1 FROM kek_wraps LIMIT 1").fetchone()
                          or c.execute("SELECT 1 FROM ca LIMIT 1").fetchone()):
                return False
            c.execute(
                "INSERT INTO kek_wraps (kind, key_id, blob, detail, created_at)"
                " VALUES (?,?,?,?,?) ON CONFLICT(kind, key_id) DO UPDATE SET"
                " blob=excluded.blob, detail=excluded.detail, created_at=excluded.created_at",
                (wrap.kind, wrap.key_id, wrap.blob, wrap.detail, _ts(wrap.created_at)))
            if audit:
                self._audit(c, wrap.created_at, actor, "kek-wrap", None,
                            f"stored the KEK {wrap.kind} for {wrap.key_id[:120]}"
                            f" ({wrap.detail[:200]})")
            return True

    def add_audit(self, actor: str, action: str, detail: str, at: datetime) -> None:
        with self._tx() as c:
            self._audit(c, at, actor[:200], action, None, detail[:2000])

    # -- sessions ---------------------------------------------------------------
    def create_session(
        self, name: str, policy: bytes, policy_hash: str, creator: str, at: datetime,
        check: SessionCheck | None = None,
    ) -> int:
        with self._tx() as c:
            if check is not None:
                self._run_check(c, check)
            if c.execute("SELECT 1 FROM sessions WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(name)
            c.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?)",
                (name, policy, policy_hash, creator, _ts(at), _ts(at)),
            )
            c.execute(
                "INSERT INTO policy_history (session, policy_hash, predecessor, policy, author,"
                " at, action) VALUES (?,?,?,?,?,?, 'create')",
                (name, policy_hash, None, policy, creator, _ts(at)),
            )
            self._audit(c, at, creator, "session.create", name, policy_hash)
            return self._bump(c)

    def _session_row(
        self, c: sqlite3.Cursor | sqlite3.Connection, name: str
    ) -> SessionRecord | None:
        r = c.execute(
            "SELECT name, policy, policy_hash, creator, created_at, updated_at FROM sessions"
            " WHERE name=?",
            (name,),
        ).fetchone()
        if r is None:
            return None
        return SessionRecord(r[0], bytes(r[1]), r[2], r[3], _dt_req(r[4]), _dt_req(r[5]))

    def _run_check(self, c: sqlite3.Cursor, check: SessionCheck) -> None:
        # BEGIN IMMEDIATE already lets one writer at a time through.
        hashes = dict(c.execute("SELECT name, policy_hash FROM sessions").fetchall())
        check(hashes, lambda n: self._session_row(c, n))

    def get_session(self, name: str) -> SessionRecord | None:
        return self._session_row(self._db, name)

    def list_sessions(self) -> list[SessionRecord]:
        names = [r[0] for r in self._db.execute("SELECT name FROM sessions ORDER BY name")]
        out = []
        for n in names:
            rec = self._session_row(self._db, n)
            if rec is not None:
                out.append(rec)
        return out

    def session_hashes(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, policy_hash FROM sessions").fetchall())

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
        with self._tx() as c:
            if check is not None:
                self._run_check(c, check)
            cur = self._session_row(c, name)
            if cur is None:
                raise NotFound(name)
            if predecessor != cur.policy_hash:
                raise PredecessorMismatch(cur.policy_hash)
            c.execute(
                "UPDATE sessions SET policy=?, policy_hash=?, updated_at=? WHERE name=?",
                (policy, policy_hash, _ts(at), name),
            )
            c.execute(
                "INSERT INTO policy_history (session, policy_hash, predecessor, policy, author,"
                " at, action) VALUES (?,?,?,?,?,?, 'update')",
                (name, policy_hash, predecessor, policy, actor, _ts(at)),
            )
            self._audit(c, at, actor, "session.update", name, f"{predecessor} -> {policy_hash}")
            return self._bump(c)

    def delete_session(self, name: str, actor: str, at: datetime,
                       check: SessionCheck | None = None) -> int:
        with self._tx() as c:
            if check is not None:
                self._run_check(c, check)
            cur = self._session_row(c, name)
            if cur is None:
                raise NotFound(name)
            c.execute("DELETE FROM sessions WHERE name=?", (name,))
            # A session made again under this name starts with values of its own.
            c.execute("DELETE FROM secrets WHERE session=?", (name,))
            c.execute(
                "INSERT INTO policy_history (session, policy_hash, predecessor, policy, author,"
                " at, action) VALUES (?,?,?,NULL,?,?, 'delete')",
                (name, cur.policy_hash, cur.policy_hash, actor, _ts(at)),
            )
            self._audit(c, at, actor, "session.delete", name, cur.policy_hash)
            return self._bump(c)

    def history(self, name: str) -> list[HistoryRecord]:
        rows = self._db.execute(
            "SELECT session, policy_hash, predecessor, author, at, action FROM policy_history"
            " WHERE session=? ORDER BY id",
            (name,),
        ).fetchall()
        return [HistoryRecord(r[0], r[1], r[2], r[3], _dt_req(r[4]), r[5]) for r in rows]

    def last_session(self, name: str) -> SessionRecord | None:
        current = self.get_session(name)
        if current is not None:
            return current
        rows = self._db.execute(
            "SELECT policy_hash, policy, author, at, action FROM policy_history"
            " WHERE session=? ORDER BY id",
            (name,),
        ).fetchall()
        last = next((r for r in reversed(rows) if r[1] is not None), None)
        created = next((r for r in reversed(rows) if r[4] == "create"), None)
        if last is None or created is None:
            return None
        return SessionRecord(name, bytes(last[1]), last[0], created[2], _dt_req(created[3]),
                             _dt_req(last[3]))

    # -- nonces -----------------------------------------------------------------
    def use_nonce(self, nonce: bytes, expires_at: datetime) -> bool:
        with self._tx() as c:
            return c.execute("INSERT INTO nonces VALUES (?, ?) ON CONFLICT DO NOTHING",
                             (nonce, _ts(expires_at))).rowcount == 1

    def record_issuance(self, cert: IssuedCertificate, nonce: bytes, nonce_expires: datetime,
                        epoch: int) -> tuple[str, int]:
        with self._tx() as c:
            found = int(c.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])
            if found != epoch:
                return "stale", found
            if c.execute("INSERT INTO nonces VALUES (?, ?) ON CONFLICT DO NOTHING",
                         (nonce, _ts(nonce_expires))).rowcount != 1:
                return "nonce_used", found
            self._insert_certificate(c, cert)
        return "issued", found

    def purge_nonces(self, now: datetime) -> int:
        with self._tx() as c:
            return c.execute("DELETE FROM nonces WHERE expires_at <= ?", (_ts(now),)).rowcount

    # -- admin request nonces ---------------------------------------------------------
    def remember_request_nonce(
        self, fingerprint: str, nonce: str, expires_at: datetime, now: datetime
    ) -> bool:
        with self._tx() as c:
            c.execute(
                "DELETE FROM admin_request_nonces WHERE fingerprint=? AND nonce=?"
                " AND expires_at <= ?",
                (fingerprint, nonce, _ts(now)),
            )
            return c.execute(
                "INSERT INTO admin_request_nonces VALUES (?,?,?) ON CONFLICT DO NOTHING",
                (fingerprint, nonce, _ts(expires_at)),
            ).rowcount == 1

    def purge_request_nonces(self, now: datetime) -> int:
        with self._tx() as c:
            return c.execute(
                "DELETE FROM admin_request_nonces WHERE expires_at <= ?", (_ts(now),)
            ).rowcount

    # -- certificates -------------------------------------------------------------
    def record_certificate(self, cert: IssuedCertificate) -> None:
        with self._tx() as c:
            self._insert_certificate(c, cert)

    @staticmethod
    def _insert_certificate(c: sqlite3.Cursor, cert: IssuedCertificate) -> None:
        c.execute(
                "INSERT INTO certificates VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    cert.serial,
                    cert.session,
                    cert.service,
                    cert.spiffe_id,
                    cert.issuer_fingerprint,
                    _ts(cert.not_before),
                    _ts(cert.not_after),
                    cert.claims_json,
                    cert.cert_pem,
                    _ts(cert.issued_at),
                ),
            )

    def get_certificate(self, serial: str) -> IssuedCertificate | None:
        r = self._db.execute(
            "SELECT serial, session, service, spiffe_id, issuer, not_before, not_after, claims,"
            " cert_pem, issued_at FROM certificates WHERE serial=?",
            (serial,),
        ).fetchone()
        if r is None:
            return None
        return IssuedCertificate(
            r[0], r[1], r[2], r[3], r[4], _dt_req(r[5]), _dt_req(r[6]), r[7], r[8], _dt_req(r[9])
        )

    def certificates_of(self, session: str, now: datetime) -> list[IssuedCertificate]:
        rows = self._db.execute(
            "SELECT serial, session, service, spiffe_id, issuer, not_before, not_after, claims,"
            " cert_pem, issued_at FROM certificates WHERE session=? AND not_after > ?",
            (session, _ts(now)),
        ).fetchall()
        return [
            IssuedCertificate(r[0], r[1], r[2], r[3], r[4], _dt_req(r[5]), _dt_req(r[6]), r[7],
                              r[8], _dt_req(r[9]))
            for r in rows
        ]

    def certificate_sessions(self, now: datetime) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT session FROM certificates WHERE not_after > ? ORDER BY session",
            (_ts(now),),
        )
        return [r[0] for r in rows]

    def count_certificates(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0])

    def last_not_after(self, issuer_fingerprint: str) -> datetime | None:
        r = self._db.execute(
            "SELECT MAX(not_after) FROM certificates WHERE issuer=?", (issuer_fingerprint,)
        ).fetchone()
        return _dt(r[0])

    # -- revocations ----------------------------------------------------------------
    def add_revocation(self, session: str, kind: str, value: str, actor: str, at: datetime) -> int:
        with self._tx() as c:
            c.execute(
                "INSERT INTO revocations (session, kind, value, actor, at) VALUES (?,?,?,?,?)"
                " ON CONFLICT(kind, value) DO NOTHING",
                (session, kind, value, actor, _ts(at)),
            )
            self._audit(c, at, actor, "revoke", session, f"{kind}={value}")
            return self._bump(c)

    def revocations(self) -> list[Revocation]:
        rows = self._db.execute(
            "SELECT id, session, kind, value, actor, at FROM revocations ORDER BY id"
        ).fetchall()
        return [Revocation(r[0], r[1], r[2], r[3], r[4], _dt_req(r[5])) for r in rows]

    def revoked_serials(self, now: datetime) -> dict[str, datetime]:
        rows = self._db.execute(
            "SELECT r.value, c.not_after FROM revocations r JOIN certificates c"
            " ON c.serial = r.value WHERE r.kind = 'serial' AND c.not_after > ?",
            (_ts(now),),
        )
        return {r[0]: _dt_req(r[1]) for r in rows}

    # -- reports & audit --------------------------------------------------------------
    def put_report(self, reporter: str, body_json: str, at: datetime) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO reports VALUES (?,?,?) ON CONFLICT(reporter) DO UPDATE SET"
                " body=excluded.body, at=excluded.at",
                (reporter, body_json, _ts(at)),
            )

    def reports(self) -> list[Report]:
        rows = self._db.execute("SELECT reporter, body, at FROM reports ORDER BY reporter")
        return [Report(r[0], r[1], _dt_req(r[2])) for r in rows]

    def audit_log(self, limit: int = 100) -> list[AuditRecord]:
        rows = self._db.execute(
            "SELECT id, at, actor, action, session, detail FROM audit ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [AuditRecord(r[0], _dt_req(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    # -- secrets ----------------------------------------------------------------------
    _VAULT_COLUMNS = "session, name, version, kind, sealed, actor, created_at"

    @staticmethod
    def _secret(r: Sequence[Any]) -> StoredSecret:
        return StoredSecret(r[0], r[1], int(r[2]), r[3], bytes(r[4]), r[5], _dt_req(r[6]))

    def get_secret(self, session: str, name: str) -> StoredSecret | None:
        r = self._db.execute(
            f"SELECT {self._VAULT_COLUMNS} FROM secrets WHERE session=? AND name=?",  # noqa: S608 - fixed names
            (session, name),
        ).fetchone()
        return None if r is None else self._secret(r)

    def create_secret(self, secret: StoredSecret) -> StoredSecret:
        with self._tx() as c:
            c.execute(
                "INSERT INTO secrets VALUES (?,?,1,?,?,?,?) ON CONFLICT(session, name) DO NOTHING",
                (secret.session, secret.name, secret.kind, secret.sealed, secret.actor,
                 _ts(secret.created_at)),
            )
            if c.rowcount:
                self._audit(c, secret.created_at, secret.actor, "secret.create",
                            secret.session, f"{secret.name} version 1")
            r = c.execute(
                f"SELECT {self._VAULT_COLUMNS} FROM secrets WHERE session=? AND name=?",  # noqa: S608 - fixed names
                (secret.session, secret.name),
            ).fetchone()
        return self._secret(r)

    def replace_secret(self, secret: StoredSecret, action: str) -> StoredSecret:
        with self._tx() as c:
            r = c.execute(
                "SELECT version FROM secrets WHERE session=? AND name=?",
                (secret.session, secret.name),
            ).fetchone()
            version = 1 if r is None else int(r[0]) + 1
            c.execute(
                "INSERT INTO secrets VALUES (?,?,?,?,?,?,?) ON CONFLICT(session, name) DO UPDATE"
                " SET version=excluded.version, kind=excluded.kind, sealed=excluded.sealed,"
                " actor=excluded.actor, created_at=excluded.created_at",
                (secret.session, secret.name, version, secret.kind, secret.sealed, secret.actor,
                 _ts(secret.created_at)),
            )
            self._audit(c, secret.created_at, secret.actor, action, secret.session,
                        f"{secret.name} version {version}")
        return StoredSecret(secret.session, secret.name, version, secret.kind, secret.sealed,
                            secret.actor, secret.created_at)

    def record_secret_release(self, release: SecretRelease) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO secret_releases (at, session, service, measurement, serial,"
                " secrets) VALUES (?,?,?,?,?,?)",
                (_ts(release.at), release.session, release.service, release.measurement,
                 release.serial, release.secrets_json),
            )

    def secret_releases(self, session: str, limit: int = 1000) -> list[SecretRelease]:
        rows = self._db.execute(
            "SELECT id, at, session, service, measurement, serial, secrets FROM"
            " secret_releases WHERE session=? ORDER BY id DESC LIMIT ?",
            (session, limit),
        ).fetchall()
        return [SecretRelease(int(r[0]), _dt_req(r[1]), r[2], r[3], r[4], r[5], r[6])
                for r in rows]

    # -- backup & restore ---------------------------------------------------------------
    def export_tables(self) -> tuple[int, dict[str, list[tuple[Any, ...]]]]:
        """(epoch, rows of every table in `schema.TABLES`), read in one transaction."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        self._db.execute("BEGIN")
        try:
            epoch = self.epoch()
            for table, cols in TABLES.items():
                names = ", ".join(c.name for c in cols)
                order = "id" if table in ID_TABLES else cols[0].name
                rows = self._db.execute(f"SELECT {names} FROM {table} ORDER BY {order}")  # noqa: S608 - fixed names
                out[table] = [
                    tuple(
                        _dt(v) if c.kind == TIME else bytes(v) if isinstance(v, bytes) else v
                        for c, v in zip(cols, r, strict=True)
                    )
                    for r in rows
                ]
        finally:
            self._db.execute("COMMIT")
        return epoch, out

    def import_tables(self, tables: Mapping[str, Sequence[tuple[Any, ...]]], epoch: int) -> None:
        """Write a backup's rows into this empty store, in one transaction, and set the
        epoch. Refuses (`AlreadyExists`) if the store holds any record."""
        with self._tx() as c:
            held = {k: n for k, n in self.record_counts().items() if n}
            wraps = c.execute("SELECT COUNT(*) FROM kek_wraps").fetchone()
            if wraps is not None and wraps[0]:
                held["KEK wrap"] = int(wraps[0])  # a first start got this far
            if held:
                raise AlreadyExists(", ".join(f"{n} {k}(s)" for k, n in held.items()))
            for table, cols in TABLES.items():
                marks = ", ".join("?" for _ in cols)
                names = ", ".join(col.name for col in cols)
                c.executemany(
                    f"INSERT INTO {table} ({names}) VALUES ({marks})",  # noqa: S608 - fixed names
                    [
                        tuple(
                            None if v is None else _ts(v) if col.kind == TIME else v
                            for col, v in zip(cols, row, strict=True)
                        )
                        for row in tables.get(table, ())
                    ],
                )
            c.execute("UPDATE meta SET value=? WHERE key='epoch'", (str(epoch),))
