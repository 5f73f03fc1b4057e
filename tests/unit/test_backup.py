"""`cas backup` / `cas restore` at the store level, between every pair of engines: every
row comes back as it was, the CA key stays sealed, a restore never writes over
records, and a damaged or foreign backup is refused saying what is wrong."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import run_cli
from pgserver import PgServer

from meshshield.cas.backup import BackupError, make_backup, parse_backup, restore, write_backup
from meshshield.cas.schema import latest
from meshshield.cas.sqlite_store import MIGRATIONS
from meshshield.cas.store import (
    CaStoredRecord,
    IssuedCertificate,
    KekWrapRecord,
    SecretRelease,
    Store,
    StoredSecret,
)
from meshshield.cas.stores import open_store
from meshshield.errors import MeshError, Reason

LATEST = latest(MIGRATIONS)

T0 = datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=UTC)
NOW = datetime(2026, 3, 2, tzinfo=UTC)


def _fill(s: Store) -> None:
    s.save_cas([CaStoredRecord("ca1", "PEM1", b"\x00sealed\xff", "active", None,
                               T0 + timedelta(days=9), T0)], "cas", T0)
    s.create_session("shop", b"name: shop\n", "h1", "admin", T0)
    s.update_session("shop", b"name: shop\n#2\n", "h2", "h1", "other", T0 + timedelta(1))
    s.create_session("gone", b"x", "hg", "admin", T0)
    s.delete_session("gone", "admin", T0)
    s.record_certificate(IssuedCertificate("0a", "shop", "api", "spiffe://d/shop/api", "ca1",
                                           T0, T0 + timedelta(hours=1), "{}", "PEM", T0))
    s.add_revocation("shop", "serial", "0a", "admin", T0)
    s.put_report("spiffe://d/shop/api", "{}", T0)
    s.use_nonce(b"n" * 32, T0)
    s.remember_request_nonce("fp", "nonce-1", T0 + timedelta(minutes=5), T0)
    s.add_jwt_key("kid1", b"\x01sealed-jwt", T0)
    s.put_kek_wrap(KekWrapRecord("tee-sealed", "sim:ab:cd", b"MSKEKW\x01\x01w", "sim", T0),
                   "cas")
    s.create_secret(StoredSecret("shop", "db-password", 1, "ascii", b"\x02sealed", "cas", T0))
    s.replace_secret(StoredSecret("shop", "db-password", 0, "ascii", b"\x03sealed", "admin",
                                  T0 + timedelta(1)), "secret.rotate")
    s.record_secret_release(SecretRelease(0, T0, "shop", "api", "ab" * 32, "0a",
                                          '[{"name":"db-password","version":2}]'))


def _open(kind: str, tmp: Path, pg: PgServer | None) -> Store:
    if kind == "sqlite":
        tmp.mkdir(parents=True, exist_ok=True)
        return open_store(None, tmp)
    assert pg is not None
    return open_store(pg.create_database(), tmp)


@pytest.mark.parametrize("source,target", [("sqlite", "sqlite"), ("sqlite", "postgresql"),
                                           ("postgresql", "postgresql"),
                                           ("postgresql", "sqlite")])
def test_every_row_survives_a_backup_and_restore(source: str, target: str, tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    pg = request.getfixturevalue("pg_server") if "postgresql" in (source, target) else None
    src = _open(source, tmp_path / "a", pg)
    _fill(src)
    doc = make_backup(src, NOW)  # type: ignore[arg-type]
    epoch, before = src.export_tables()  # type: ignore[attr-defined]
    src.close()
    path = tmp_path / "backup.json"
    write_backup(doc, path)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_backup(doc, path)
    parsed, rows = parse_backup(path.read_bytes(), "backup.json")
    assert parsed["source"] == {"engine": source, "schema_version": LATEST}
    dst = _open(target, tmp_path / "b", pg)
    restored_epoch = restore(dst, parsed, rows, NOW)  # type: ignore[arg-type]
    assert restored_epoch == int(NOW.timestamp() * 1000) > epoch
    assert dst.epoch() == restored_epoch
    _, after = dst.export_tables()  # type: ignore[attr-defined]
    assert after["audit"][:-1] == before["audit"]
    assert after["audit"][-1][3] == "restore"
    assert {k: v for k, v in after.items() if k != "audit"} == {
        k: v for k, v in before.items() if k != "audit"}
    assert dst.load_cas()[0].sealed_key == b"\x00sealed\xff"
    # The restored store goes on from there: new ids after the restored ones.
    dst.add_revocation("shop", "measurement", "ab" * 32, "admin", NOW)
    assert [r.id for r in dst.revocations()] == [1, 2]
    with pytest.raises(MeshError) as e:
        restore(dst, parsed, rows, NOW)  # type: ignore[arg-type]
    assert e.value.reason is Reason.CONFLICT and "refusing to restore" in e.value.message
    dst.close()


def test_a_backup_of_an_older_schema_restores_without_the_later_tables(
        tmp_path: Path) -> None:
    """A version-1 backup has no kek_wraps table: it restores, with none."""
    doc = _doc(tmp_path)
    doc["source"]["schema_version"] = 1
    doc["tables"].pop("kek_wraps")
    parsed, rows = parse_backup(json.dumps(doc).encode(), "old.json")
    assert rows["kek_wraps"] == []
    dst = _open("sqlite", tmp_path / "dst", None)
    restore(dst, parsed, rows, NOW)  # type: ignore[arg-type]
    assert dst.kek_wraps() == [] and dst.load_cas()[0].fingerprint == "ca1"
    dst.close()
    # a store where a first start stored its KEK wrap (and went no further) is not empty
    half = _open("sqlite", tmp_path / "half", None)
    half.put_kek_wrap(KekWrapRecord("tee-sealed", "x", b"w", "t", T0), "cas", first=True,
                      audit=False)
    with pytest.raises(MeshError, match="1 KEK wrap"):
        restore(half, parsed, rows, NOW)  # type: ignore[arg-type]
    half.close()


def _doc(tmp_path: Path) -> dict[str, Any]:
    s = _open("sqlite", tmp_path / "src", None)
    _fill(s)
    doc = make_backup(s, NOW)  # type: ignore[arg-type]
    s.close()
    return json.loads(json.dumps(doc))  # type: ignore[no-any-return]


@pytest.mark.parametrize("spoil,expect", [
    (lambda d: d.update(format="other"), "expected a meshshield-cas-backup document"),
    (lambda d: d.update(version=2), "backup format version 2"),
    (lambda d: d["tables"].pop("sessions"), "table sessions is missing"),
    (lambda d: d["tables"].pop("kek_wraps"), "table kek_wraps is missing"),
    (lambda d: d["tables"]["ca"]["columns"].reverse(), "table ca has columns"),
    (lambda d: d["tables"]["ca"]["rows"][0].__setitem__(2, "!!"), "not standard base64"),
    (lambda d: d["tables"]["ca"]["rows"][0].__setitem__(6, "yesterday"), "RFC 3339"),
    (lambda d: d["tables"]["ca"]["rows"][0].__setitem__(0, None), "null, but"),
    (lambda d: d["tables"]["ca"].update(rows=[]), "holds no CA"),
    (lambda d: d["tables"].update(extra={}), "unknown tables"),
    (lambda d: d.update(epoch=-1), "epoch"),
])
def test_a_damaged_backup_is_refused_saying_what_is_wrong(
        tmp_path: Path, spoil: Any, expect: str) -> None:
    doc = _doc(tmp_path)
    spoil(doc)
    with pytest.raises(BackupError) as e:
        parse_backup(json.dumps(doc).encode(), "b.json")
    assert expect in e.value.message


def test_cli_backup_restore_and_migrate_on_sqlite(tmp_path: Path) -> None:
    s = _open("sqlite", tmp_path / "data", None)
    _fill(s)
    s.close()
    m = run_cli("cas", "migrate", "--data", str(tmp_path / "data"))
    assert m.returncode == 0 and f"schema version {LATEST} (already current)" in m.stdout, m.stderr
    missing = run_cli("cas", "migrate", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no CAS database at" in missing.stderr
    out = tmp_path / "b.json"
    b = run_cli("cas", "backup", "--data", str(tmp_path / "data"), "--out", str(out))
    assert b.returncode == 0 and "sha256:ca1" in b.stdout, b.stderr
    again = run_cli("cas", "backup", "--data", str(tmp_path / "data"), "--out", str(out))
    assert again.returncode == 1 and "exists" in again.stderr
    r = run_cli("cas", "restore", "--in", str(out), "--data", str(tmp_path / "new"))
    assert r.returncode == 0, r.stderr
    assert "--kek-file" in r.stdout
    over = run_cli("cas", "restore", "--in", str(out), "--data", str(tmp_path / "data"))
    assert over.returncode == 1 and "refusing to restore" in over.stderr
    assert "Traceback" not in over.stderr
    (tmp_path / "empty").mkdir()
    open_store(None, tmp_path / "empty").close()
    nothing = run_cli("cas", "backup", "--data", str(tmp_path / "empty"), "--out",
                      str(tmp_path / "e.json"))
    assert nothing.returncode == 1 and "holds no CA" in nothing.stderr, nothing.stderr
    assert not (tmp_path / "e.json").exists()
    bad = run_cli("cas", "backup", "--database", "mysql://x/y", "--out", str(tmp_path / "c"))
    assert bad.returncode == 2 and "expected postgresql://" in bad.stderr


def test_sqlite_newer_schema_is_refused_by_serve(tmp_path: Path) -> None:
    import sqlite3

    s = _open("sqlite", tmp_path / "data", None)
    s.close()
    db = sqlite3.connect(tmp_path / "data" / "cas.db")
    db.execute("UPDATE meta SET value='7' WHERE key='schema'")
    db.commit()
    db.close()
    from meshshield.pki.seal import load_or_create_kek

    load_or_create_kek(tmp_path / "kek")
    r = run_cli("cas", "serve", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
                "--kek-file", str(tmp_path / "kek"), timeout=60)
    assert r.returncode == 1, r.stdout
    assert "Traceback" not in r.stderr
    assert f"schema version 7, but this meshshield release knows versions up to {LATEST}" in (
        r.stderr)
