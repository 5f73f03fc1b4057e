"""Every method of the Store protocol behaves the same on SQLite and on PostgreSQL: one
transaction each, the epoch bumped by every change of trust, the refusals
(already exists, not found, predecessor mismatch, a CA set that changed meanwhile)
leaving nothing behind; plus schema versions and migrations on both engines."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from pgserver import PgServer

from meshshield.cas import pg_store, sqlite_store
from meshshield.cas.schema import Migration, latest
from meshshield.cas.store import (
    AlreadyExists,
    CaSetChanged,
    CaStoredRecord,
    IssuedCertificate,
    NotFound,
    PredecessorMismatch,
    SessionRecord,
    Store,
    StoreUnavailable,
)
from meshshield.cas.stores import open_store
from meshshield.errors import Reason

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def store(store_location: str, tmp_path: Path) -> Iterator[Store]:
    s = open_store(store_location or None, tmp_path)
    yield s
    s.close()


def _ca(fp: str, state: str = "active") -> CaStoredRecord:
    return CaStoredRecord(fp, f"PEM {fp}", b"sealed" + fp.encode(), state, None, None, T0)


def _cert(serial: str, issuer: str = "ca1", hours: int = 1) -> IssuedCertificate:
    return IssuedCertificate(serial, "shop", "api", "spiffe://d/shop/api", issuer,
                             T0, T0 + timedelta(hours=hours), "{}", "PEM", T0)


def test_a_fresh_store_is_empty_at_epoch_zero(store: Store) -> None:
    assert store.epoch() == 0
    assert set(store.record_counts().values()) == {0}
    assert store.load_cas() == [] and store.list_sessions() == []


def test_sessions_history_and_predecessors(store: Store) -> None:
    assert store.create_session("shop", b"v1", "h1", "admin", T0) == 1
    with pytest.raises(AlreadyExists):
        store.create_session("shop", b"again", "hx", "admin", T0)
    got = store.get_session("shop")
    assert got is not None and got.policy == b"v1" and got.created_at == T0
    with pytest.raises(PredecessorMismatch) as e:
        store.update_session("shop", b"v2", "h2", "wrong", "admin", T0)
    assert e.value.current == "h1"
    with pytest.raises(NotFound):
        store.update_session("nope", b"v2", "h2", "h1", "admin", T0)
    assert store.update_session("shop", b"v2", "h2", "h1", "other", T0 + timedelta(1)) == 2
    assert store.get_session("shop").policy_hash == "h2"  # type: ignore[union-attr]
    store.create_session("blog", b"b", "hb", "admin", T0)
    assert [s.name for s in store.list_sessions()] == ["blog", "shop"]
    assert store.session_hashes() == {"blog": "hb", "shop": "h2"}
    assert store.delete_session("shop", "admin", T0) == 4
    with pytest.raises(NotFound):
        store.delete_session("shop", "admin", T0)
    assert store.get_session("shop") is None
    hist = store.history("shop")
    assert [(h.action, h.policy_hash, h.predecessor, h.author) for h in hist] == [
        ("create", "h1", None, "admin"), ("update", "h2", "h1", "other"),
        ("delete", "h2", "h2", "admin"),
    ]
    assert store.epoch() == 4
    counts = store.record_counts()
    assert counts["session"] == 1 and counts["policy version"] == 4
    assert [a.action for a in store.audit_log()][:2] == ["session.delete", "session.create"]


def test_the_ca_set_and_a_stale_view_of_it(store: Store) -> None:
    assert store.save_cas([_ca("ca1")], "cas", T0) == 1
    # A second first CA (another replica's) names not the stored one: refused, nothing kept.
    with pytest.raises(CaSetChanged):
        store.save_cas([_ca("ca2")], "cas", T0)
    assert [c.fingerprint for c in store.load_cas()] == ["ca1"]
    nxt = CaStoredRecord("ca2", "PEM", b"k2", "next", T0 + timedelta(hours=1), None,
                         T0 + timedelta(seconds=1))
    assert store.save_cas([_ca("ca1"), nxt], "admin", T0) == 2
    got = {c.fingerprint: c for c in store.load_cas()}
    assert got["ca2"].activate_at == T0 + timedelta(hours=1) and got["ca2"].sealed_key == b"k2"
    assert store.epoch() == 2 and store.record_counts()["CA"] == 2


def test_unexpired_certificates_revoked_serials_deleted_sessions_and_jwt_keys(
        store: Store) -> None:
    store.record_certificate(_cert("0a", hours=1))
    store.record_certificate(_cert("0b", hours=3))
    later = T0 + timedelta(hours=2)
    assert [c.serial for c in store.certificates_of("shop", later)] == ["0b"]
    assert store.certificates_of("blog", T0) == []
    assert store.certificate_sessions(later) == ["shop"]
    assert store.certificate_sessions(T0 + timedelta(hours=4)) == []
    store.add_revocation("shop", "serial", "0a", "admin", T0)
    store.add_revocation("shop", "serial", "0b", "admin", T0)
    assert store.revoked_serials(later) == {"0b": T0 + timedelta(hours=3)}
    store.create_session("shop", b"v1", "h1", "admin", T0)
    store.update_session("shop", b"v2", "h2", "h1", "other", T0 + timedelta(1))
    store.delete_session("shop", "admin", T0 + timedelta(2))
    last = store.last_session("shop")
    assert last is not None and (last.policy, last.policy_hash, last.creator) == (
        b"v2", "h2", "admin")
    assert store.last_session("never") is None
    assert store.load_jwt_keys() == []
    assert store.add_jwt_key("kid1", b"sealed1", T0)
    assert not store.add_jwt_key("kid2", b"sealed2", T0)
    assert store.load_jwt_keys() == [("kid1", b"sealed1")]


def test_a_nonce_is_used_once_and_its_use_purged_after_expiry(store: Store) -> None:
    assert store.use_nonce(b"n" * 32, T0 + timedelta(seconds=30))
    assert not store.use_nonce(b"n" * 32, T0 + timedelta(seconds=30))
    assert not store.use_nonce(b"n" * 32, T0 + timedelta(seconds=99))  # the expiry given
    assert store.use_nonce(b"m" * 32, T0)
    assert store.purge_nonces(T0) == 1  # m's use is forgotten, n's (later) kept
    assert not store.use_nonce(b"n" * 32, T0 + timedelta(seconds=30))
    assert store.use_nonce(b"m" * 32, T0)


def test_an_issuance_is_recorded_with_its_nonce_only_at_the_epoch_it_was_decided_on(
        store: Store) -> None:
    exp = T0 + timedelta(seconds=30)
    before = store.epoch()
    bumped = store.create_session("s", b"name: s\n", "h1", "admin", T0)
    assert bumped == before + 1
    # Decided on the older view: nothing written, neither the nonce's use nor the cert.
    assert store.record_issuance(_cert("0a"), b"n" * 32, exp, before) == ("stale", bumped)
    assert store.get_certificate("0a") is None
    assert store.record_issuance(_cert("0a"), b"n" * 32, exp, bumped) == ("issued", bumped)
    got = store.get_certificate("0a")
    assert got is not None and got.serial == "0a"
    # The same nonce again, for another certificate: refused, and that one not written.
    assert store.record_issuance(_cert("0b"), b"n" * 32, exp, bumped) == (
        "nonce_used", bumped)
    assert store.get_certificate("0b") is None
    assert not store.use_nonce(b"n" * 32, exp)  # one record of uses for both paths
    assert store.use_nonce(b"m" * 32, exp)
    assert store.record_issuance(_cert("0c"), b"m" * 32, exp, bumped) == (
        "nonce_used", bumped)
    assert store.count_certificates() == 1


def test_certificates_revocations_and_reports(store: Store) -> None:
    store.record_certificate(_cert("0a"))
    store.record_certificate(_cert("0b", hours=5))
    store.record_certificate(_cert("0c", issuer="ca2"))
    assert store.count_certificates() == 3
    got = store.get_certificate("0b")
    assert got is not None and got.not_after == T0 + timedelta(hours=5)
    assert store.get_certificate("ff") is None
    assert store.last_not_after("ca1") == T0 + timedelta(hours=5)
    assert store.last_not_after("none") is None
    assert store.add_revocation("shop", "serial", "0a", "admin", T0) == 1
    assert store.add_revocation("shop", "serial", "0a", "admin", T0) == 2  # idempotent row
    store.add_revocation("shop", "measurement", "ab" * 32, "admin", T0)
    revs = store.revocations()
    assert [(r.kind, r.value) for r in revs] == [("serial", "0a"), ("measurement", "ab" * 32)]
    assert revs[0].id < revs[1].id
    store.put_report("spiffe://d/shop/api", '{"connections": []}', T0)
    store.put_report("spiffe://d/shop/api", '{"connections": [1]}', T0 + timedelta(1))
    store.put_report("spiffe://d/shop/web", "{}", T0)
    reps = store.reports()
    assert [(r.reporter, r.body_json) for r in reps] == [
        ("spiffe://d/shop/api", '{"connections": [1]}'), ("spiffe://d/shop/web", "{}")]
    assert len(store.audit_log(limit=2)) == 2


def test_concurrent_writers_each_get_their_own_epoch(store_location: str,
                                                     tmp_path: Path) -> None:
    """Two stores (two processes) writing at once: every change bumps the epoch once."""
    open_store(store_location or None, tmp_path).close()
    epochs: list[int] = []
    lock = threading.Lock()

    def work(who: str) -> None:
        s = open_store(store_location or None, tmp_path)
        for i in range(20):
            e = s.add_revocation("shop", "measurement", f"{who}{i:02d}".ljust(64, "0"), who, T0)
            with lock:
                epochs.append(e)
        s.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(epochs) == list(range(1, 41))
    s = open_store(store_location or None, tmp_path)
    assert len(s.revocations()) == 40
    s.close()


def test_two_replicas_racing_on_a_predecessor_exactly_one_wins(pg_url: str) -> None:
    a = pg_store.PostgresStore(pg_url)
    b = pg_store.PostgresStore(pg_url)
    a.create_session("shop", b"v1", "h1", "admin", T0)
    results: list[str] = []
    barrier = threading.Barrier(2)

    def update(s: Store, h: str) -> None:
        barrier.wait()
        try:
            s.update_session("shop", b"v", h, "h1", "admin", T0)
            results.append("ok")
        except PredecessorMismatch:
            results.append("mismatch")

    ts = [threading.Thread(target=update, args=(s, h)) for s, h in ((a, "hA"), (b, "hB"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(results) == ["mismatch", "ok"]
    assert len(a.history("shop")) == 2
    a.close()
    b.close()


LATEST = latest(sqlite_store.MIGRATIONS)
assert LATEST == latest(pg_store.MIGRATIONS)
def test_a_session_write_check_sees_the_stored_sessions_and_refuses_whole(
        store: Store) -> None:
    store.create_session("blog", b"b", "hb", "admin", T0)
    seen: list[tuple[dict[str, str], bytes | None]] = []

    def look(hashes: Mapping[str, str], read: Callable[[str], SessionRecord | None]) -> None:
        rec = read("blog")
        seen.append((dict(hashes), None if rec is None else rec.policy))

    assert store.create_session("shop", b"v1", "h1", "admin", T0, check=look) == 2
    assert seen == [({"blog": "hb"}, b"b")]

    def refuse(_h: Mapping[str, str], _r: Callable[[str], SessionRecord | None]) -> None:
        raise ValueError("no")

    for write in (lambda: store.create_session("cafe", b"c", "hc", "admin", T0, check=refuse),
                  lambda: store.update_session("shop", b"v2", "h2", "h1", "admin", T0,
                                               check=refuse),
                  lambda: store.delete_session("shop", "admin", T0, check=refuse)):
        with pytest.raises(ValueError, match="no"):
            write()
    assert store.epoch() == 2
    assert store.session_hashes() == {"blog": "hb", "shop": "h1"}
    assert [h.action for h in store.history("shop")] == ["create"]
    assert store.history("cafe") == []
    assert store.update_session("shop", b"v2", "h2", "h1", "admin", T0, check=look) == 3
    assert seen[-1] == ({"blog": "hb", "shop": "h1"}, b"b")


def test_checked_session_writes_of_two_replicas_take_turns(pg_url: str) -> None:
    """Each check sees what the write before it committed: of two replicas creating
    sessions at once, the second's check sees the first's session."""
    stores = [pg_store.PostgresStore(pg_url) for _ in range(2)]
    seen: dict[str, set[str]] = {}
    barrier = threading.Barrier(2)

    def create(s: Store, name: str) -> None:
        def check(hashes: Mapping[str, str], _read: Callable[[str], SessionRecord | None]
                  ) -> None:
            seen[name] = set(hashes)
            time.sleep(0.3)  # a slow check: the other write would overtake it, if it could

        barrier.wait()
        s.create_session(name, b"p", "h" + name, "admin", T0, check=check)

    ts = [threading.Thread(target=create, args=(s, n)) for s, n in zip(stores, "ab", strict=True)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(map(len, seen.values())) == [0, 1], seen
    for s in stores:
        s.close()


def test_every_change_notifies_its_epoch_at_commit_and_a_refusal_none(pg_url: str) -> None:
    store = pg_store.PostgresStore(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {pg_store.NOTIFY_CHANNEL}".encode())
        epochs = [store.create_session("shop", b"v1", "h1", "admin", T0),
                  store.add_revocation("shop", "measurement", "ab" * 32, "admin", T0),
                  store.update_session("shop", b"v2", "h2", "h1", "admin", T0)]
        with pytest.raises(PredecessorMismatch):
            store.update_session("shop", b"v3", "h3", "h1", "admin", T0)
        epochs.append(store.delete_session("shop", "admin", T0))
        got = [n.payload for n in listener.notifies(timeout=1.0)]
    assert got == [str(e) for e in epochs] == ["1", "2", "3", "4"]
    store.close()


# -- schema versions & migrations ------------------------------------------------------


def test_sqlite_files_of_earlier_releases_open_as_version_1(tmp_path: Path) -> None:
    """A cas.db written before the schema_version table (meta.schema = 1, and even
    before admin_request_nonces) is read as version 1, migrates, keeps its rows, and
    gains the missing tables."""
    db = sqlite3.connect(tmp_path / "cas.db")
    for stmt in sqlite_store.MIGRATIONS[0].statements:
        if "admin_request_nonces" not in stmt:
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.execute("INSERT INTO sessions VALUES ('old', x'00', 'h', 'me', 1.0, 1.0)")
    db.commit()
    db.close()
    if LATEST > 1:  # a later schema: refused until migrated, then migrated in place
        with pytest.raises(StoreUnavailable, match="meshshield cas migrate"):
            open_store(None, tmp_path)
    s = open_store(None, tmp_path, migrate=True)
    assert s.schema_version() == LATEST  # type: ignore[attr-defined]
    assert s.get_session("old") is not None
    assert s.get_secret("old", "x") is None  # the secrets table is there
    assert s.remember_request_nonce("fp", "n", T0, T0)
    s.close()


def _extra_migration(monkeypatch: pytest.MonkeyPatch, module: object, sql: str) -> None:
    migrations = module.MIGRATIONS  # type: ignore[attr-defined]
    monkeypatch.setattr(module, "MIGRATIONS",
                        (*migrations, Migration(LATEST + 1, "test: a new table", (sql,))))


def test_an_older_schema_is_refused_until_migrated_and_a_newer_one_always(
    store_engine: str, store_location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loc = store_location or None
    open_store(loc, tmp_path).close()  # this release's version
    module = sqlite_store if store_engine == "sqlite" else pg_store
    _extra_migration(monkeypatch, module, "CREATE TABLE extra (x INTEGER)")
    with pytest.raises(StoreUnavailable) as e:
        open_store(loc, tmp_path)
    assert f"schema version {LATEST}, this release needs {LATEST + 1}" in e.value.message
    assert "meshshield cas migrate" in e.value.message
    assert e.value.reason is Reason.STORE_UNAVAILABLE
    s = open_store(loc, tmp_path, migrate=True)
    assert s.applied == [LATEST + 1]  # type: ignore[attr-defined]
    assert s.schema_version() == LATEST + 1  # type: ignore[attr-defined]
    s.close()
    open_store(loc, tmp_path).close()  # current now
    monkeypatch.undo()  # this release again: it knows only up to LATEST
    with pytest.raises(StoreUnavailable) as e:
        open_store(loc, tmp_path, migrate=True)
    assert (f"schema version {LATEST + 1}, but this meshshield release knows versions up "
            f"to {LATEST}") in (
        e.value.message)


def test_replicas_initialising_one_empty_database_at_once(pg_url: str) -> None:
    """Five processes' stores opening an empty database together: one schema, once."""
    errors: list[BaseException] = []
    stores: list[Store] = []
    barrier = threading.Barrier(5)

    def opener() -> None:
        barrier.wait()
        try:
            stores.append(pg_store.PostgresStore(pg_url))
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    ts = [threading.Thread(target=opener) for _ in range(5)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    import psycopg

    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (v,) for v in range(1, LATEST + 1)]
    for s in stores:
        s.close()


def test_a_database_that_is_not_a_cas_database_is_refused(pg_server: PgServer,
                                                          tmp_path: Path) -> None:
    import psycopg

    url = pg_server.create_database()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE ca (x INTEGER)")
    with pytest.raises(StoreUnavailable) as e:
        open_store(url, tmp_path)
    assert "not a CAS database" in e.value.message
    (tmp_path / "cas.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    with pytest.raises(StoreUnavailable):
        open_store(None, tmp_path)


def test_an_unreachable_database_is_store_unavailable(tmp_path: Path) -> None:
    from harness import free_port

    url = f"postgresql://meshshield:secret@127.0.0.1:{free_port()}/none"
    with pytest.raises(StoreUnavailable) as e:
        open_store(url, tmp_path)
    assert "secret" not in e.value.message
    assert "cannot use the CAS database postgresql://meshshield@127.0.0.1" in e.value.message


def test_a_write_failing_half_way_leaves_nothing_on_postgresql(pg_url: str) -> None:
    """The pool's connections are in autocommit mode (a single statement is sent alone);
    a method of several statements still commits all of them or none: a revocation whose
    audit row the database refuses (a trigger, standing in for any failure after the
    first statement) leaves no revocation and the same epoch."""
    import psycopg

    store = pg_store.PostgresStore(pg_url)
    try:
        store.add_revocation("shop", "serial", "aa", "admin", T0)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$BEGIN RAISE EXCEPTION 'audit refused'; END$$")
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit FOR EACH ROW"
                         " WHEN (NEW.actor = 'refused') EXECUTE FUNCTION refuse()")
        with pytest.raises(psycopg.errors.RaiseException):
            store.add_revocation("shop", "serial", "bb", "refused", T0)
        assert [r.value for r in store.revocations()] == ["aa"]
        assert store.epoch() == 1
        # The connection that failed went back to the pool usable, out of any transaction.
        for _ in range(10):
            assert store.epoch() == 1
        assert store.add_revocation("shop", "serial", "cc", "admin", T0) == 2
    finally:
        store.close()


def test_a_version_1_database_migrates_to_the_secrets_schema_keeping_its_rows(
    store_engine: str, store_location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written by a release that knew only version 1 (monkeypatched here)
    is refused until `cas migrate`, which adds the secrets tables and keeps every row."""
    from meshshield.cas.store import SecretRelease, StoredSecret

    loc = store_location or None
    module = sqlite_store if store_engine == "sqlite" else pg_store
    monkeypatch.setattr(module, "MIGRATIONS", module.MIGRATIONS[:1])
    old = open_store(loc, tmp_path)
    old.create_session("shop", b"name: shop\n", "h1", "admin", T0)
    old.close()
    monkeypatch.undo()
    with pytest.raises(StoreUnavailable) as e:
        open_store(loc, tmp_path)
    assert f"schema version 1, this release needs {LATEST}" in e.value.message
    s = open_store(loc, tmp_path, migrate=True)
    assert s.applied == [m.version for m in module.MIGRATIONS[1:]]  # type: ignore[attr-defined]
    assert s.get_session("shop") is not None
    row = s.create_secret(StoredSecret("shop", "pw", 1, "ascii", b"sealed", "cas", T0))
    assert row.version == 1
    assert s.create_secret(StoredSecret("shop", "pw", 1, "ascii", b"other", "cas", T0)
                           ).sealed == b"sealed"  # the first value stays
    assert s.replace_secret(StoredSecret("shop", "pw", 0, "ascii", b"new", "a", T0),
                            "secret.rotate").version == 2
    s.record_secret_release(SecretRelease(0, T0, "shop", "db", "ab" * 32, "0a", "[]"))
    (rel,) = s.secret_releases("shop")
    assert (rel.service, rel.serial, rel.measurement) == ("db", "0a", "ab" * 32)
    assert s.secret_releases("other") == []
    s.delete_session("shop", "admin", T0)
    assert s.get_secret("shop", "pw") is None  # a deleted session's values go with it
    s.close()
