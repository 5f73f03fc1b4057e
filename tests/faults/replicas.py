"""CAS replicas on one PostgreSQL database, for the scenarios that need several.

    url = pg_server.create_database()
    a = start_pg_cas(tmp_path / "a", url)                 # one CAS on PostgreSQL, started
    b, c = replicas_of(a, url, 2)                   # more, sharing its keys, not started
    launch_all([b, c])                              # at the same instant, on threads
    store_state(url)                                # sessions, history, revocations, CAs

A replica shares the first one's admin key, sim platform key, workload and KEK (the
provisioned secret every replica of a deployment holds) but has a root, a --data folder,
a port and a log of its own.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from harness import CasProcess
from meshpeers import LOOPBACK, free_ports

from meshshield.cas.pg_store import PostgresStore
from meshshield.cas.sqlite_store import SqliteStore


def start_pg_cas(root: Path, url: str, *extra: str) -> CasProcess:
    """A CAS on database `url`, with fresh keys under `root`, started and ready."""
    (port,) = free_ports(1)
    return CasProcess.start(root, "--listen", f"{LOOPBACK}:{port}", "--database", url, *extra)


def replicas_of(first: CasProcess, url: str, n: int, *extra: str) -> list[CasProcess]:
    """`n` more replicas of `first` on database `url` (not started: `launch_all`)."""
    out = []
    for i, port in enumerate(free_ports(n)):
        root = first.root.parent / f"{first.root.name}-replica-{i + 1}"
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first.kek, root / "cas.kek")
        (root / "cas.kek").chmod(0o600)
        out.append(CasProcess(root, root / "data", first.admin_dir, first.admin_fp,
                              first.sim_dir, first.workload,
                              extra_args=("--listen", f"{LOOPBACK}:{port}", "--database", url,
                                          *extra)))
    return out


def launch_all(replicas: list[CasProcess], timeout: float = 60.0) -> None:
    """Launch every replica at once (each on a thread); fail with the first error."""
    errors: list[BaseException] = []

    def start(c: CasProcess) -> None:
        try:
            c.launch()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(c,)) for c in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not [t for t in threads if t.is_alive()], f"a replica did not start in {timeout} s"
    if errors:
        raise errors[0]


def store_state(url_or_path: str | Path) -> dict[str, object]:
    """Sessions, history, revocations and CAs as a store reads them."""
    store = (SqliteStore(url_or_path) if isinstance(url_or_path, Path)
             else PostgresStore(url_or_path))
    try:
        sessions = store.list_sessions()
        return {
            "cas": [(c.fingerprint, c.state, c.sealed_key) for c in store.load_cas()],
            "sessions": [(s.name, s.policy, s.policy_hash, s.creator) for s in sessions],
            "history": {s.name: [(h.policy_hash, h.predecessor, h.author, h.action)
                                 for h in store.history(s.name)] for s in sessions},
            "revocations": [(r.session, r.kind, r.value, r.actor) for r in store.revocations()],
            "certificates": store.count_certificates(),
        }
    finally:
        store.close()
