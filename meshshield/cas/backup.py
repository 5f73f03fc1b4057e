"""`meshshield cas backup` and `cas restore`: the CAS's durable state as one JSON file.

The format (version 1), the same from either engine and into either engine:

    {
      "format": "meshshield-cas-backup",
      "version": 1,
      "created_at": "2026-03-01T12:00:00.123456Z",
      "source": {"engine": "sqlite" | "postgresql", "schema_version": 1},
      "epoch": 42,
      "ca_fingerprints": ["<sha256 hex>", ...],
      "tables": {
        "<table>": {"columns": ["<name>", ...], "rows": [[<value>, ...], ...]},
        ...
      }
    }

Every table of `meshshield.cas.schema.TABLES` is present with exactly its columns, in
that order: `ca`, `sessions`, `policy_history`, `certificates`, `revocations`,
`reports`, `jwt_keys` (the JWT-SVID signing key, sealed like the CA's), `audit`,
`nonces`, `admin_request_nonces` (the replay guard, so a signed request captured
before the backup stays refused after a restore). Values by column
kind: text as a JSON string, int as a JSON number, bytes as standard base64, times as
RFC 3339 in UTC with microseconds (`...T12:00:00.123456Z`); a missing value is null.

The CA private keys are in `ca.sealed_key` (and the JWT signing key in
`jwt_keys.sealed_key`) as the store holds them: encrypted under
the CAS's key-encryption secret (KEK) and bound to their CA's fingerprint. The backup
never holds a plain key, and a restored store serves only under the KEK it was sealed
with: keep the KEK's backup apart from this file. The file holds the policies and the
audit log too: it is written readable by its owner only.

A backup is read in one snapshot of the store (a running CAS may keep serving). A
restore writes into an empty store only, in one transaction, and moves the trust epoch
forward to at least the restore time in milliseconds, so sidecars that saw changes made
after the backup do not ignore the restored CAS's trust snapshots as older ones. It
appends a `restore` audit record.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from meshshield.cas.schema import ADDED_IN, BYTES, INT, TABLES, TEXT, TIME, Column
from meshshield.cas.store import AlreadyExists
from meshshield.errors import MeshError, Reason

FORMAT = "meshshield-cas-backup"
VERSION = 1
MAX_BACKUP_BYTES = 4 << 30


class BackupError(MeshError):
    def __init__(self, message: str) -> None:
        super().__init__(Reason.BAD_REQUEST, message)


class Exportable(Protocol):
    engine: str

    def schema_version(self) -> int: ...

    def export_tables(self) -> tuple[int, dict[str, list[tuple[Any, ...]]]]: ...

    def import_tables(
        self, tables: Mapping[str, Sequence[tuple[Any, ...]]], epoch: int
    ) -> None: ...


def _time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _encode(col: Column, v: Any) -> Any:
    if v is None:
        return None
    if col.kind == BYTES:
        return base64.b64encode(bytes(v)).decode()
    if col.kind == TIME:
        return _time(v)
    if col.kind == INT:
        return int(v)
    return str(v)


def _decode(table: str, col: Column, v: Any, row: int) -> Any:
    where = f"tables.{table}.rows[{row}].{col.name}"
    if v is None:
        if not col.nullable:
            raise BackupError(f"{where}: null, but this column always has a value")
        return None
    if col.kind == INT:
        if not isinstance(v, int) or isinstance(v, bool):
            raise BackupError(f"{where}: expected an integer, found {type(v).__name__}")
        return v
    if not isinstance(v, str):
        raise BackupError(f"{where}: expected a string, found {type(v).__name__}")
    if col.kind == BYTES:
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise BackupError(f"{where}: not standard base64") from None
    if col.kind == TIME:
        try:
            t = datetime.strptime(v, "%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            raise BackupError(f"{where}: expected RFC 3339 UTC with microseconds "
                              f"(2026-03-01T12:00:00.000000Z), found {v[:40]!r}") from None
        return t.replace(tzinfo=UTC)
    assert col.kind == TEXT
    return v


def make_backup(store: Exportable, now: datetime) -> dict[str, Any]:
    epoch, tables = store.export_tables()
    doc_tables = {}
    for name, cols in TABLES.items():
        doc_tables[name] = {
            "columns": [c.name for c in cols],
            "rows": [[_encode(c, v) for c, v in zip(cols, r, strict=True)]
                     for r in tables[name]],
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_at": _time(now),
        "source": {"engine": store.engine, "schema_version": store.schema_version()},
        "epoch": epoch,
        "ca_fingerprints": [r[0] for r in tables["ca"]],
        "tables": doc_tables,
    }


def write_backup(doc: Mapping[str, Any], path: Path) -> None:
    """Write the backup readable by its owner only; an existing file is not replaced."""
    data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


Rows = dict[str, list[tuple[Any, ...]]]


def parse_backup(data: bytes, label: str) -> tuple[dict[str, Any], Rows]:
    """(the document, its rows decoded per table), or BackupError saying what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BackupError(f"{label} is not a JSON backup ({str(e)[:80]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BackupError(f"{label}: expected a {FORMAT} document (from `meshshield cas "
                          "backup`), found something else")
    if doc.get("version") != VERSION:
        raise BackupError(f"{label}: backup format version {str(doc.get('version'))[:20]}, "
                          f"this release reads version {VERSION}; restore with the release "
                          "that wrote it or a later one")
    epoch = doc.get("epoch")
    tables = doc.get("tables")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise BackupError(f"{label}: \"epoch\" must be a non-negative integer")
    if not isinstance(tables, dict):
        raise BackupError(f"{label}: \"tables\" must be an object")
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise BackupError(f"{label}: unknown tables {unknown[:5]}; expected {list(TABLES)}")
    rows: dict[str, list[tuple[Any, ...]]] = {}
    source = doc.get("source")
    written = source.get("schema_version") if isinstance(source, dict) else None
    for name, cols in TABLES.items():
        t = tables.get(name)
        if t is None and isinstance(written, int) and written < ADDED_IN.get(name, 1):
            rows[name] = []  # the schema that wrote the backup had no such table
            continue
        if not isinstance(t, dict) or not isinstance(t.get("rows"), list):
            raise BackupError(f"{label}: table {name} is missing or has no \"rows\" list")
        want = [c.name for c in cols]
        if t.get("columns") != want:
            raise BackupError(f"{label}: table {name} has columns {t.get('columns')}, "
                              f"expected {want}")
        decoded = []
        for i, r in enumerate(t["rows"]):
            if not isinstance(r, list) or len(r) != len(cols):
                raise BackupError(f"{label}: tables.{name}.rows[{i}] must be a list of "
                                  f"{len(cols)} values")
            decoded.append(tuple(_decode(name, c, v, i) for c, v in zip(cols, r, strict=True)))
        rows[name] = decoded
    if not rows["ca"]:
        raise BackupError(f"{label}: the backup holds no CA, so a CAS could not serve it; "
                          "back up the store of a CAS that has started")
    return doc, rows


def restore(store: Exportable, doc: Mapping[str, Any],
            rows: dict[str, list[tuple[Any, ...]]], now: datetime) -> int:
    """Write a parsed backup into an empty store; the restored epoch."""
    epoch = max(int(doc["epoch"]) + 1, int(now.timestamp() * 1000))
    audit = list(rows["audit"])
    next_id = max((int(r[0]) for r in audit), default=0) + 1
    source = doc.get("source")
    src: Mapping[str, Any] = source if isinstance(source, dict) else {}
    audit.append((next_id, now, "cas restore", "restore", None,
                  f"backup of {str(doc.get('created_at'))[:40]} from "
                  f"{str(src.get('engine'))[:20]}, epoch {doc['epoch']} -> {epoch}"))
    try:
        store.import_tables({**rows, "audit": audit}, epoch)
    except AlreadyExists as e:
        raise MeshError(
            Reason.CONFLICT,
            f"refusing to restore into a store that holds records ({e}): a restore never "
            "overwrites or merges. Restore into an empty database (createdb) or an empty "
            "--data folder",
        ) from None
    return epoch
