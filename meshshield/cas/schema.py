"""The CAS database's schema versions, shared by both engines.

Each engine (SQLite, PostgreSQL) keeps an ordered list of forward migrations, version 1
being the first schema. The versions a database has had are rows of its
`schema_version` table (`version`, `description`, `applied_at`); its version is the
highest. A CAS opens:

- an empty database: it applies every migration (a first start initialises);
- a database at its own version: it serves;
- an older one: it refuses, naming `meshshield cas migrate`, which applies the missing
  migrations in one transaction, holding a lock so that two migrating processes do not
  both apply them (back up first: `meshshield cas backup`);
- a newer one (written by a later release): it refuses, whatever the command; a
  release never guesses at a schema it does not know.

The SQLite databases written before this table existed carry their version in
`meta.schema` (always 1); they are read as version 1, and migrating them records it.

`TABLES` names every durable table and its columns with their kinds, in one place:
the backup format (`meshshield.cas.backup`) and both stores' export and import use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshshield.cas.store import StoreUnavailable


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


def split_sql(script: str) -> tuple[str, ...]:
    """A script's statements (the schema scripts hold no ';' inside a statement)."""
    return tuple(s.strip() for s in script.split(";") if s.strip())


def latest(migrations: tuple[Migration, ...]) -> int:
    return migrations[-1].version if migrations else 0


def pending(current: int, migrations: tuple[Migration, ...]) -> list[Migration]:
    return [m for m in migrations if m.version > current]


def check_version(
    found: int, migrations: tuple[Migration, ...], where: str, *, migrate_hint: str,
    migrating: bool,
) -> None:
    """Refuse a schema newer than this release knows, and (unless `migrating`) an older
    one that `cas migrate` must bring forward first."""
    known = latest(migrations)
    if found > known:
        raise StoreUnavailable(
            f"{where}: the database has schema version {found}, but this meshshield release "
            f"knows versions up to {known}: a later release wrote it. Run the release that "
            "wrote it (or a later one); an older CAS never serves a newer schema"
        )
    if 0 < found < known and not migrating:
        raise StoreUnavailable(
            f"{where}: the database has schema version {found}, this release needs "
            f"{known}. Back it up (`meshshield cas backup ... --out FILE`), then run "
            f"`meshshield cas migrate {migrate_hint}` and start the CAS again"
        )


# -- the durable tables, for backup and restore ------------------------------------------

TEXT, BYTES, INT, TIME = "text", "bytes", "int", "time"


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # text | bytes | int | time
    nullable: bool = False


def _cols(*spec: str) -> tuple[Column, ...]:
    out = []
    for s in spec:
        name, _, kind = s.partition(":")
        out.append(Column(name, kind.rstrip("?"), kind.endswith("?")))
    return tuple(out)


TABLES: dict[str, tuple[Column, ...]] = {
    "ca": _cols("fingerprint:text", "cert_pem:text", "sealed_key:bytes", "state:text",
                "activate_at:time?", "retire_after:time?", "created_at:time"),
    "sessions": _cols("name:text", "policy:bytes", "policy_hash:text", "creator:text",
                      "created_at:time", "updated_at:time"),
    "policy_history": _cols("id:int", "session:text", "policy_hash:text", "predecessor:text?",
                            "policy:bytes?", "author:text", "at:time", "action:text"),
    "certificates": _cols("serial:text", "session:text", "service:text", "spiffe_id:text",
                          "issuer:text", "not_before:time", "not_after:time", "claims:text",
                          "cert_pem:text", "issued_at:time"),
    "revocations": _cols("id:int", "session:text", "kind:text", "value:text", "actor:text",
                         "at:time"),
    "reports": _cols("reporter:text", "body:text", "at:time"),
    "jwt_keys": _cols("kid:text", "sealed_key:bytes", "created_at:time"),
    "audit": _cols("id:int", "at:time", "actor:text", "action:text", "session:text?",
                   "detail:text"),
    "nonces": _cols("nonce:bytes", "expires_at:time"),
    "admin_request_nonces": _cols("fingerprint:text", "nonce:text", "expires_at:time"),
    # Schema version 2: the key-encryption key wrapped for each holder (cas/kekstore.py).
    "kek_wraps": _cols("kind:text", "key_id:text", "blob:bytes", "detail:text",
                       "created_at:time"),
    # Schema version 3: secrets (sealed values) and their releases.
    "secrets": _cols("session:text", "name:text", "version:int", "kind:text", "sealed:bytes",
                     "actor:text", "created_at:time"),
    "secret_releases": _cols("id:int", "at:time", "session:text", "service:text",
                             "measurement:text", "serial:text", "secrets:text"),
}

# Tables added after version 1, by the version that added them: a backup written by an
# older schema lacks them and restores with them empty.
ADDED_IN: dict[str, int] = {"kek_wraps": 2, "secrets": 3, "secret_releases": 3}

# Tables whose integer `id` comes from a sequence the import must move past.
ID_TABLES = ("policy_history", "revocations", "audit", "secret_releases")
