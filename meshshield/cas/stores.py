"""Opening the CAS store named on the command line: SQLite in the data folder by
default, PostgreSQL with `--database postgresql://...`."""

from __future__ import annotations

from pathlib import Path

from meshshield.cas.sqlite_store import SqliteStore
from meshshield.cas.store import Store, StoreUnavailable

DB_FILE = "cas.db"


def is_postgres(database: str | None) -> bool:
    return bool(database) and str(database).startswith(("postgresql://", "postgres://"))


def check_database_flag(database: str | None) -> str | None:
    """The usage problem with a --database value, or None if it is usable."""
    if not database or database.startswith("sqlite") or is_postgres(database):
        return None
    scheme = database.split(":", 1)[0][:20]
    return (f"--database {scheme}: expected postgresql://USER@HOST[:PORT]/DBNAME, or omit "
            "--database to use SQLite in --data DIR (cas.db)")


def where(database: str | None, data_dir: Path) -> str:
    """The store's location for messages (a PostgreSQL URL without its password)."""
    if is_postgres(database):
        from meshshield.cas.pg_store import redact

        return redact(str(database))
    return str(data_dir / DB_FILE)


def open_store(
    database: str | None, data_dir: Path, *, migrate: bool = False, create: bool = True
) -> Store:
    """The store `--database` (PostgreSQL) or `--data` (SQLite DIR/cas.db) names.

    A new, empty database is initialised at the current schema; an existing one must be
    at it (`migrate=True` brings an older one forward). `create=False`: a missing SQLite
    file is refused instead of created (backup, migrate)."""
    if is_postgres(database):
        try:
            from meshshield.cas.pg_store import PostgresStore
        except ImportError as e:
            raise StoreUnavailable(
                f"--database postgresql:// needs the psycopg driver ({e.name} is not "
                "installed, though meshshield depends on it): reinstall meshshield, or "
                "pip install 'psycopg[binary]>=3.1' 'psycopg-pool>=3.2'"
            ) from None
        return PostgresStore(str(database), migrate=migrate)
    problem = check_database_flag(database)
    if problem:
        raise StoreUnavailable(problem)
    path = data_dir / DB_FILE
    if not create and not path.is_file():
        raise StoreUnavailable(
            f"no CAS database at {path}: expected the --data folder of a CAS (holding "
            f"{DB_FILE}); check the path"
        )
    return SqliteStore(path, migrate=migrate)
