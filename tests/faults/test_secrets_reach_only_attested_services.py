"""Acceptance of attested secrets, with real processes throughout.

A PostgreSQL server takes its password from an `ascii` secret through `meshshield run`;
a client in another session imports that secret and logs in through the mesh; tampered
builds of either are refused and given nothing; the CAS's database, WAL, backups and
logs, the sidecars' logs and an attest answer read by a TLS-terminating hop hold none of
the values; rotation shows at the next attestation; the audit lists every release; an
upload from a key that may not update the session is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from casfront import CasFront
from harness import MESHSHIELD, CasProcess, SidecarProcess, run_cli
from meshpeers import LOOPBACK, free_ports, wait_until

from meshshield.adminauth import write_admin_key

PGSERVER = Path(__file__).resolve().parent.parent / "pgserver.py"
CLIENT = """import os, sys
import psycopg
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="meshshield",
                     dbname="postgres", password=os.environ["PGPASSWORD"],
                     sslmode="disable", connect_timeout=10) as conn:
    print("logged in as", conn.execute("SELECT current_user").fetchone()[0])
"""
# The program's environment as it was given, raw: NAME=VALUE entries separated by NUL.
DUMP = ("import os, sys; open(sys.argv[1], 'wb').write(b'\\0'.join("
        "k + b'=' + v for k, v in os.environb.items()))")


def shop_policy(db_m: str, reader: str) -> str:
    return f"""name: shop
version: "1"
predecessor: null
services:
  - name: db
    tee: [{{platform: sim, measurement: "{db_m}"}}]
    allow_from: [billing/client]
    secrets:
      - {{name: db-password, env: DB_PASSWORD}}
security: {{attestation: {{tolerate: [simulation]}}}}
access_policy: {{read: [CREATOR, "{reader}"], update: [CREATOR]}}
secrets:
  - {{name: db-password, kind: ascii, size: 24, export: [billing]}}
  - {{name: api-key, kind: value}}
"""


def billing_policy(client_m: str) -> str:
    return f"""name: billing
version: "1"
predecessor: null
services:
  - name: client
    tee: [{{platform: sim, measurement: "{client_m}"}}]
    secrets:
      - {{name: shop-db, env: PGPASSWORD}}
security: {{attestation: {{tolerate: [simulation]}}}}
secrets:
  - {{name: shop-db, import: {{session: shop, secret: db-password}}}}
"""


class World:
    def __init__(self, cas: CasProcess, root: Path) -> None:
        self.cas, self.root = cas, root
        self.db_app = cas.workload
        self.client_app = root / "client-app"
        self.client_app.mkdir()
        (self.client_app / "client.py").write_text(CLIENT)
        self.tampered_client = root / "client-tampered"
        shutil.copytree(self.client_app, self.tampered_client)
        (self.tampered_client / "client.py").write_text(CLIENT + "print('and elsewhere')\n")
        self.tampered_db = root / "db-tampered"
        shutil.copytree(self.db_app, self.tampered_db)
        (self.tampered_db / "server.py").write_text("print('a backdoor')\n")

    def run_flags(self, session: str, service: str, workload: Path,
                  cas: CasProcess | None = None, bundle: Path | None = None) -> list[str]:
        c = cas or self.cas
        return ["--cas", c.url, "--cas-bundle", str(bundle or c.bundle), "--session", session,
                "--service", service, "--platform", "sim", "--workload", str(workload),
                "--sim-key", str(self.cas.sim_dir / "sim-platform.key")]

    def env_of(self, session: str, service: str, workload: Path, **kw: object
               ) -> tuple[subprocess.CompletedProcess[str], dict[str, str] | None]:
        """What a program started by `meshshield run` was given (None: never started)."""
        out = self.root / f"env-{os.urandom(4).hex()}"
        r = run_cli("run", *self.run_flags(session, service, workload, **kw),  # type: ignore[arg-type]
                    "--", sys.executable, "-c", DUMP, str(out))
        if not out.exists():
            return r, None
        entries = (e.partition(b"=") for e in out.read_bytes().split(b"\0"))
        return r, {k.decode(): v.decode() for k, _, v in entries}


@pytest.fixture
def world(fault_cas: CasProcess, tmp_path: Path) -> World:
    return World(fault_cas, tmp_path)


@pytest.fixture
def postgres(world: World) -> Iterator[Callable[[], tuple[int, Path]]]:
    """Start PostgreSQL under `meshshield run` (shop/db); its port and log."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start() -> tuple[int, Path]:
        # Outside tmp_path: PostgreSQL runs unprivileged and must reach its folder.
        root = Path(tempfile.mkdtemp(prefix="meshshield-pgsecret-"))
        root.chmod(0o755)
        (port,) = free_ports(1)
        log = world.root / "postgres.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [*MESHSHIELD, "run", *world.run_flags("shop", "db", world.db_app), "--",
                 sys.executable, str(PGSERVER), "serve-with-password", "--root",
                 str(root / "pg"), "--port", str(port), "--password-env", "DB_PASSWORD"],
                stdout=f, stderr=f)
        started.append((proc, root))
        import psycopg

        def accepting() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                psycopg.connect(host="127.0.0.1", port=port, user="meshshield",
                                dbname="postgres", password="wrong", connect_timeout=2,
                                sslmode="disable").close()
            except psycopg.OperationalError as e:
                return "password authentication failed" in str(e)
            raise AssertionError("a wrong password was accepted")

        wait_until(accepting, 90, "PostgreSQL accepting logins")
        return port, log

    yield start
    for proc, root in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # by its pid: meshshield run became postgres
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
        for p in root.rglob("*") if root.is_dir() else ():
            if p.is_file() and not p.is_symlink():
                yield p


def test_secrets_reach_only_attested_services_and_nothing_else_holds_them(
    fault_cas: CasProcess, world: World, postgres: Callable[[], tuple[int, Path]],
    sidecar: Callable[..., SidecarProcess], cas_front: Callable[..., CasFront],
    tmp_path: Path,
) -> None:
    cas = fault_cas
    reader_dir = tmp_path / "reader"
    _, reader_fp = write_admin_key(reader_dir)
    assert cas.apply_policy(shop_policy(cas.measurement(world.db_app), reader_fp)
                            ).returncode == 0
    r = cas.apply_policy(billing_policy(cas.measurement(world.client_app)))
    assert r.returncode == 0, r.stderr

    # PostgreSQL gets its password from the ascii secret, through meshshield run.
    pg_port, pg_log = postgres()
    db_sidecar = sidecar(cas, "shop", "db", inbound=[f"{LOOPBACK}:0=127.0.0.1:{pg_port}"])
    client_sidecar = sidecar(
        cas, "billing", "client", workload=world.client_app,
        outbound=[f"{LOOPBACK}:0=shop/db@{LOOPBACK}:{db_sidecar.port('inbound')}"])
    outbound = client_sidecar.port("outbound")

    # The client, in another session, imports the secret and logs in through the mesh.
    login = run_cli("run", *world.run_flags("billing", "client", world.client_app), "--",
                    sys.executable, str(world.client_app / "client.py"), str(outbound))
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip() == "logged in as meshshield"
    r_ok, given = world.env_of("billing", "client", world.client_app)
    assert given is not None, r_ok.stderr
    password = given["PGPASSWORD"]
    assert len(password) == 24
    r_db, db_given = world.env_of("shop", "db", world.db_app)
    assert db_given is not None and db_given["DB_PASSWORD"] == password

    # Tampered builds of either are refused and never started: given nothing.
    for session, service, tampered in (("billing", "client", world.tampered_client),
                                       ("shop", "db", world.tampered_db)):
        r, env = world.env_of(session, service, tampered)
        assert r.returncode == 1 and "measurement_not_allowed" in r.stderr, r.stderr
        assert env is None
        assert password not in r.stdout + r.stderr

    # A TLS-terminating hop in front of the CAS reads the answer, not the secrets.
    front = cas_front(cas)
    r, env = world.env_of("billing", "client", world.client_app, cas=front.as_cas(),  # type: ignore[arg-type]
                          bundle=front.bundle)
    assert env is not None and env["PGPASSWORD"] == password, r.stderr
    (answer,) = front.answers
    assert "BEGIN CERTIFICATE" in answer["certificate"]  # the hop saw the answer whole
    assert answer["secrets"]["media_type"].startswith("application/vnd.meshshield.secrets")
    assert password not in json.dumps(answer)

    # The audit lists every release, with serial and measurement; none for the refused.
    audit = json.loads(cas.cli("secret", "audit", "shop", "--json").stdout)["releases"]
    billing = json.loads(cas.cli("secret", "audit", "billing", "--json").stdout)["releases"]
    # shop: postgres, the db sidecar, the env dump; billing: the client sidecar, the
    # login, the env dump, the one through the front.
    assert len(audit) == 3 and len(billing) == 4
    for rel in audit:
        assert rel["service"] == "db" and rel["measurement"] == cas.measurement(world.db_app)
        assert rel["secrets"] == [{"name": "db-password", "from": "shop/db-password",
                                   "version": 1}]
    for rel in billing:
        assert rel["service"] == "client"
        assert rel["measurement"] == cas.measurement(world.client_app)
    serials = [rel["serial"] for rel in audit + billing]
    assert len(set(serials)) == 7 and all(serials)
    assert db_sidecar.get("/status").json()["identity"]["serial"] in serials
    table = cas.cli("secret", "audit", "billing")
    assert table.returncode == 0 and all(rel["serial"] in table.stdout for rel in billing)

    # Uploads: only an updater of the session; a reader and a stranger are refused.
    value_file = tmp_path / "api-key"
    value_file.write_text("sk-live-0123456789")
    for key_dir in (reader_dir, world.root / "stranger"):
        if not key_dir.exists():
            write_admin_key(key_dir)
        r = run_cli("secret", "put", "shop", "api-key", "--from-file", str(value_file),
                    "--cas", cas.url, "--cas-bundle", str(cas.bundle),
                    "--admin-key", str(key_dir))
        assert r.returncode == 1 and "forbidden" in r.stderr, r.stderr
    r = cas.cli("secret", "put", "shop", "api-key", "--from-file", str(value_file))
    assert r.returncode == 0 and "version 1" in r.stdout, r.stderr
    uploaded = "sk-live-0123456789"

    # Rotation: the next attestation sees a new value.
    r = cas.cli("secret", "rotate", "shop", "db-password")
    assert r.returncode == 0, r.stderr
    _, after = world.env_of("billing", "client", world.client_app)
    assert after is not None and after["PGPASSWORD"] not in (password, "")
    rotated = after["PGPASSWORD"]

    # Nothing at rest or in a log holds a value: the CAS's data folder (cas.db, -wal,
    # -shm, bundle), a backup, its stderr and stdout, the sidecars' logs, PostgreSQL's.
    backup = tmp_path / "cas-backup.json"
    r = run_cli("cas", "backup", "--data", str(cas.data), "--out", str(backup))
    assert r.returncode == 0, r.stderr
    # Everything this test's processes wrote: the CAS's folder and the sidecars' logs are
    # under it, and so are PostgreSQL's log and the backup.
    files = list(files_under(tmp_path))
    assert {cas.data / "cas.db", backup, pg_log, db_sidecar.log_path,
            client_sidecar.log_path} <= set(files)
    assert any(p.name.endswith("-wal") for p in files), [p.name for p in files]
    stdout_text = "\n".join(cas.stdout_lines).encode()
    dumps = [p for p in files if p.name.startswith("env-")]
    assert any(password.encode() in p.read_bytes() for p in dumps)  # the search finds it
    for value in (password, rotated, uploaded):
        forms = {value.encode(), json.dumps(value)[1:-1].encode()}  # as is, JSON-escaped
        for path in files:
            if path.name.startswith("env-") or path == value_file:
                continue  # what the test's own programs wrote, and the upload's source
            data = path.read_bytes()
            assert not any(f in data for f in forms), f"{value!r} found in {path}"
        assert not any(f in stdout_text for f in forms)
