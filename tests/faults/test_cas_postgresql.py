"""The CAS on PostgreSQL, with real processes: a PostgreSQL server of the tests' own
(tests/pgserver.py), CAS subprocesses, sidecars and clients.

- `cas serve --database postgresql://...` serves a mesh; `--data` holds only bundle.pem;
  a restart, or a second replica, serves the same CA.
- Replicas started at the same instant on an empty database make one CA.
- A schema newer than the release knows is refused at start (exit 1, no traceback).
- PostgreSQL stopped and started again (by its pid) under load: 503 store_unavailable
  while it is down (never a 500 or a traceback), /v1/ready 503, the mesh keeps
  serving, and full service within 5 s of its return.
- `cas backup` / `cas restore`: PostgreSQL into a fresh database, and a SQLite CAS
  moved to PostgreSQL that keeps serving its mesh (its sidecars renew against it).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from faultlib import warm_up
from harness import MESHSHIELD, CasProcess, run_cli
from meshpeers import LOOPBACK, Mesh, apply, connect, free_ports, roundtrip, status, wait_until
from pgserver import PgServer
from replicas import launch_all, start_pg_cas, store_state

from meshshield.adminauth import write_admin_key
from meshshield.attestation.sim import generate_sim_platform_key, write_sim_platform_key
from meshshield.cas import pg_store
from meshshield.cas.schema import latest
from meshshield.pki.seal import load_or_create_kek

if TYPE_CHECKING:
    from conftest import LeakCheck

# Leak checks: the outage scenario watches the CAS and both sidecars across the
# database's outage, the SQLite-to-PostgreSQL move watches the sidecars across the CAS's
# restart; the other scenarios have no process that outlives a fault (each CAS is
# restarted, refused or relaunched on another store as the scenario's last step).


@pytest.fixture
def pg_cas(tmp_path: Path, pg_url: str) -> Iterator[CasProcess]:
    cas = start_pg_cas(tmp_path / "mesh", pg_url)
    try:
        yield cas
    finally:
        cas.stop()


def _serve_until_exit(args: list[str]) -> tuple[int, str, str]:
    import subprocess

    proc = subprocess.run([*MESHSHIELD, "cas", "serve", *args], capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def test_cas_on_postgresql_serves_a_mesh_and_keeps_its_ca(pg_cas: CasProcess,
                                                         pg_url: str) -> None:
    cas = pg_cas
    assert sorted(p.name for p in cas.data.iterdir()) == ["bundle.pem"]
    apply(cas, cas.sim_policy("shop"))
    assert cas.attest("shop", "backend").status == 200
    fingerprint = cas.ca_fingerprint
    cas.restart()
    assert cas.ca_fingerprint == fingerprint
    assert cas.attest("shop", "backend").status == 200
    # A second replica: its own --data, the same KEK and database: the same CA, the same
    # sessions.
    (port,) = free_ports(1)
    replica = CasProcess(cas.root, cas.root / "data-2", cas.admin_dir, cas.admin_fp,
                         cas.sim_dir, cas.workload,
                         extra_args=("--listen", f"{LOOPBACK}:{port}", "--database", pg_url))
    replica.launch()
    try:
        assert replica.ca_fingerprint == fingerprint
        assert replica.bundle.read_bytes() == cas.bundle.read_bytes()
        assert replica.attest("shop", "backend").status == 200
    finally:
        replica.stop()
    # A replica without the KEK the database's CA key is sealed under is refused.
    rc, out, err = _serve_until_exit(["--data", str(cas.root / "data-3"), "--listen",
                                      f"{LOOPBACK}:0", "--database", pg_url])
    assert rc == 1 and "Traceback" not in err, err
    assert "holds CAS state" in err and "key-encryption secret" in err, err


def test_replicas_started_at_once_on_an_empty_database_make_one_ca(
        tmp_path: Path, pg_url: str) -> None:
    admin_dir = tmp_path / "admin"
    _, fp = write_admin_key(admin_dir)
    sim_dir = tmp_path / "sim"
    write_sim_platform_key(generate_sim_platform_key(), sim_dir)
    workload = tmp_path / "app"
    workload.mkdir()
    (workload / "server.py").write_text("print(1)\n")
    load_or_create_kek(tmp_path / "cas.kek")  # provisioned, shared by every replica
    replicas = []
    for i, port in enumerate(free_ports(3)):
        root = tmp_path / f"r{i}"
        root.mkdir()
        (root / "cas.kek").write_bytes((tmp_path / "cas.kek").read_bytes())
        replicas.append(CasProcess(root, root / "data", admin_dir, fp, sim_dir, workload,
                                   extra_args=("--listen", f"{LOOPBACK}:{port}",
                                               "--database", pg_url)))
    try:
        launch_all(replicas)
        assert len({c.ca_fingerprint for c in replicas}) == 1
        bundles = {c.get("/v1/bundle").json()["bundle"] for c in replicas}
        assert len(bundles) == 1
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT COUNT(*) FROM ca").fetchone() == (1,)
    finally:
        for c in replicas:
            c.stop()


def test_a_schema_newer_than_the_release_is_refused_at_start(pg_cas: CasProcess,
                                                             pg_url: str) -> None:
    cas = pg_cas
    assert cas.stop() == 0
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version (version, description) VALUES (99, 'x')")
    rc, out, err = _serve_until_exit(["--data", str(cas.data), "--listen", f"{LOOPBACK}:0",
                                      "--kek-file", str(cas.kek), "--database", pg_url])
    assert rc == 1, (out, err)
    assert "Traceback" not in err and "ca-fingerprint" not in out
    assert ("schema version 99, but this meshshield release knows versions up to "
            f"{latest(pg_store.MIGRATIONS)}") in err
    r = run_cli("cas", "migrate", "--database", pg_url)
    assert r.returncode == 1 and "schema version 99" in r.stderr, r.stderr


class Load:
    """Clients in threads: nonce + attest, and /v1/ready, every answer recorded."""

    def __init__(self, cas: CasProcess, threads: int = 2) -> None:
        self.cas = cas
        self.answers: list[tuple[float, str, int, str | None]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def record(self, what: str, r: object) -> None:
        self.answers.append((time.monotonic(), what, r.status, r.code))  # type: ignore[attr-defined]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                n = self.cas.post_json("/v1/attest/nonce", {}, timeout=10)
                self.record("nonce", n)
                if n.status == 200:
                    _key, body = self.cas.attest_body("shop", "backend", nonce=n.json()["nonce"])
                    self.record("attest", self.cas.post_json("/v1/attest", body, timeout=10))
                self.record("ready", self.cas.get("/v1/ready", timeout=10))
            except OSError as e:
                self.answers.append((time.monotonic(), f"error {e}", 0, None))
            self.stop.wait(0.01)

    def since(self, t: float) -> list[tuple[float, str, int, str | None]]:
        return [a for a in self.answers if a[0] >= t]

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_postgresql_stopped_and_restarted_under_load(
        own_pg_server: PgServer, tmp_path: Path, echo_port: int,
        meshes: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    url = own_pg_server.create_database()
    cas = start_pg_cas(tmp_path / "mesh", url)
    load: Load | None = None
    try:
        apply(cas, cas.sim_policy("shop"))
        m = meshes(cas, "shop", {"echo": echo_port})
        load = Load(cas)
        wait_until(lambda: sum(a[1] == "attest" and a[2] == 200 for a in load.answers) >= 5,
                   20, "attestations before the outage")
        warm_up(m.outbound["echo"])
        for p in (cas, m.backend, m.frontend):  # the load's connections are in the baseline
            leak_check.watch(p)
        with connect(m.outbound["echo"]) as conn:
            assert roundtrip(conn, b"before\n") == b"before\n"

            own_pg_server.stop()  # by pid: fast shutdown, every connection ended
            down = time.monotonic()
            wait_until(lambda: cas.get("/v1/ready").status == 503, 5, "/v1/ready to turn 503")
            wait_until(lambda: sum(a[2] == 503 for a in load.since(down)) >= 5, 10,
                       "503s while the database is down")
            r = cas.post_json("/v1/attest/nonce", {})
            assert (r.status, r.code) == (503, "store_unavailable"), r.body
            # The mesh keeps serving on the certificates it holds.
            assert roundtrip(conn, b"during\n") == b"during\n"
            with connect(m.outbound["echo"]) as fresh:
                assert roundtrip(fresh, b"new\n") == b"new\n"
            for sc in (m.backend, m.frontend):
                assert sc.get("/ready").status == 200

            own_pg_server.launch()
            up = time.monotonic()

            def serving() -> bool:
                return (cas.get("/v1/ready").status == 200
                        and cas.attest("shop", "backend").status == 200)

            wait_until(serving, 5, "full service within 5 s of the database's return",
                       interval=0.1)
            assert time.monotonic() - up <= 5.5

            def listening_again() -> bool:
                changes = cas.get("/v1/ready").json().get("changes", {})
                return bool(changes.get("listening")) and changes.get("connects", 0) >= 2

            wait_until(listening_again, 10, "the change notifications' connection back")
            back = time.monotonic()
            wait_until(lambda: sum(a[1] == "attest" and a[2] == 200
                                   for a in load.since(back)) >= 3, 10,
                       "the load to succeed again")
            assert roundtrip(conn, b"after\n") == b"after\n"
        load.finish()
        statuses = {(a[2], a[3]) for a in load.answers if a[2] != 200}
        assert statuses <= {(503, "store_unavailable")}, statuses
        assert not [a for a in load.answers if a[2] == 0], "a request failed without an answer"
        for sc in (m.backend, m.frontend):
            assert status(sc)["identity"]["serial"]
        leak_check.verify()  # the pool's connections to the old server included
    finally:
        if load is not None:
            load.finish()
        cas.stop()
    err = cas.stderr()
    assert "Traceback" not in err, err[-3000:]
    assert "internal error" not in err


def test_backup_and_restore_into_a_fresh_database(pg_cas: CasProcess, pg_url: str,
                                                  pg_server: PgServer, tmp_path: Path) -> None:
    cas = pg_cas
    apply(cas, cas.sim_policy("shop"))
    r = cas.attest("shop", "backend")
    assert r.status == 200
    serial = r.json()["serial"]
    assert cas.cli("revoke", "shop", "--serial", serial).returncode == 0
    policy = cas.root / "v2.yaml"
    h = cas.get("/v1/sessions/shop", admin=True).headers["X-Policy-Hash"]
    policy.write_text(cas.sim_policy("shop").replace("predecessor: null",
                                                     f"predecessor: {h}"))
    assert cas.cli("policy", "apply", str(policy)).returncode == 0, "update"
    before = store_state(pg_url)
    out = tmp_path / "backup.json"
    b = run_cli("cas", "backup", "--database", pg_url, "--out", str(out))
    assert b.returncode == 0, b.stderr
    assert out.stat().st_mode & 0o077 == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "meshshield-cas-backup" and doc["version"] == 1
    assert doc["ca_fingerprints"] == [cas.ca_fingerprint]
    assert "PRIVATE KEY" not in out.read_text()
    fresh = pg_server.create_database()
    r2 = run_cli("cas", "restore", "--in", str(out), "--database", fresh)
    assert r2.returncode == 0, r2.stderr
    assert store_state(fresh) == before
    # Never over a store that holds records.
    again = run_cli("cas", "restore", "--in", str(out), "--database", fresh)
    assert again.returncode == 1 and "refusing to restore" in again.stderr, again.stderr
    # A CAS on the restored database: the same CA, the revocation, the new policy.
    cas.stop()
    cas.extra_args = tuple(fresh if a == pg_url else a for a in cas.extra_args)
    cas.launch()
    assert cas.ca_fingerprint == doc["ca_fingerprints"][0]
    assert cas.get("/v1/sessions/shop", admin=True).headers["X-Policy-Hash"] != h
    assert cas.attest("shop", "backend").status == 200


@pytest.mark.cas_args("--max-cert-ttl", "20s")
def test_a_sqlite_cas_restored_into_postgresql_keeps_serving_its_mesh(
        fault_cas: CasProcess, echo_port: int, meshes: Callable[..., Mesh], pg_url: str,
        tmp_path: Path, leak_check: LeakCheck) -> None:
    cas = fault_cas
    apply(cas, cas.sim_policy("shop"))
    extra = cas.attest("shop", "backend").json()["serial"]
    assert cas.cli("revoke", "shop", "--serial", extra).returncode == 0
    m = meshes(cas, "shop", {"echo": echo_port})
    sidecars = (m.frontend, m.backend)
    wait_until(lambda: all(status(sc)["cas"]["reachable"] for sc in sidecars), 10,
               "both sidecars following CAS events")
    warm_up(m.outbound["echo"])
    for sc in sidecars:
        leak_check.watch(sc)
    fingerprint = cas.ca_fingerprint
    assert cas.stop() == 0
    before = store_state(cas.data / "cas.db")
    serials = {sc.name: status(sc)["identity"]["serial"] for sc in sidecars}
    backup = tmp_path / "sqlite.json"
    assert run_cli("cas", "backup", "--data", str(cas.data), "--out",
                   str(backup)).returncode == 0
    r = run_cli("cas", "restore", "--in", str(backup), "--database", pg_url)
    assert r.returncode == 0, r.stderr
    assert store_state(pg_url) == before
    cas.extra_args = (*cas.extra_args, "--database", pg_url)
    cas.launch()  # same port, same KEK, now on PostgreSQL
    assert cas.ca_fingerprint == fingerprint
    wait_until(lambda: all(status(sc)["identity"]["serial"] != serials[sc.name]
                           for sc in sidecars), 40,
               "both sidecars to renew against the CAS on PostgreSQL", interval=0.2)
    for sc in sidecars:
        assert status(sc)["last_attest_error"] is None
    with connect(m.outbound["echo"]) as conn:
        assert roundtrip(conn, b"moved\n") == b"moved\n"
    with psycopg.connect(pg_url) as conn:
        issued = conn.execute("SELECT COUNT(*) FROM certificates").fetchone()
    assert issued is not None and issued[0] > before["certificates"]  # type: ignore[operator]
    leak_check.verify()
    assert cas.stop(signal.SIGTERM) == 0
