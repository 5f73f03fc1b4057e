"""A PostgreSQL server of the tests' own: `initdb` into a temporary folder, `postgres` on a
free loopback port with its unix socket in that folder, stopped by its pid afterwards.
No system service is assumed or touched.

PostgreSQL refuses to run as root, so under root (CI) the server runs as an
unprivileged user (`nobody`, or MESHSHIELD_PG_USER), its folder chowned to that user.
The binaries are found on PATH, else under /usr/lib/postgresql/<version>/bin (where
Debian's `postgresql` package puts them).

When no server can be started, tests that need one fail under CI=true (a broken setup,
never a silent skip) and are skipped elsewhere, saying why.

    server = PgServer.start()          # or the `pg_server` fixture (one per test session)
    url = server.create_database()     # a fresh, empty database per test
    server.stop(); server.restart()    # outages on demand
    server.close()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 30.0


def _required() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(message: str) -> None:
    if _required():
        pytest.fail(f"{message} (CI is set: PostgreSQL is required, not skipped)",
                    pytrace=False)
    pytest.skip(message)


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    root: Path
    port: int
    user: str | None  # the OS user the server runs as (None: the current one)
    postgres: str
    proc: subprocess.Popen[bytes] | None = None
    databases: list[str] = field(default_factory=list)
    _serial: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @classmethod
    def start(cls, unavailable: Callable[[str], None] = unavailable) -> PgServer:
        """A running server. When none can be started, `unavailable(why)` is called and
        must raise (by default: fail under CI, else skip; bench/ raises its own error)."""
        initdb, postgres = _binary("initdb"), _binary("postgres")
        if not initdb or not postgres:
            unavailable("PostgreSQL server binaries (initdb, postgres) not found on PATH or "
                        "under /usr/lib/postgresql/*/bin; install Debian's `postgresql` "
                        "package (.ci/run does)")
        assert initdb and postgres
        user: str | None = None
        root = Path(tempfile.mkdtemp(prefix="meshshield-pg-"))
        if os.geteuid() == 0:
            user = os.environ.get("MESHSHIELD_PG_USER", "nobody")
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                shutil.rmtree(root, ignore_errors=True)
                unavailable(f"no user {user!r} to run PostgreSQL as (it refuses root); set "
                            "MESHSHIELD_PG_USER to an unprivileged user")
                raise
            os.chown(root, pw.pw_uid, pw.pw_gid)
        root.chmod(0o700)
        server = cls(root, _free_port(), user, postgres)
        r = server._run([initdb, "-D", str(server.data), "-U", "meshshield", "--auth=trust",
                         "-E", "UTF8", "--locale=C", "--no-sync"])
        if r.returncode != 0:
            server.close()
            unavailable(f"initdb failed ({r.returncode}): {r.stderr.decode()[-800:]}")
        try:
            server.launch()
        except RuntimeError as e:
            server.close()
            unavailable(str(e))
        return server

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(args, capture_output=True, timeout=120, cwd=self.root,
                              **self._as_user())

    def _as_user(self) -> dict[str, object]:
        if self.user is None:
            return {}
        pw = pwd.getpwnam(self.user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def launch(self) -> None:
        """Start `postgres` (again) on this folder and port; returns once it accepts."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.postgres, "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=log, stderr=log, cwd=self.root, start_new_session=True, **self._as_user(),
        )
        log.close()
        self.wait_accepting()

    def wait_accepting(self, timeout: float = START_TIMEOUT) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-1500:]}")
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.05)
        raise RuntimeError(f"postgres did not accept connections in {timeout}s: "
                           f"{self.log_path.read_text()[-1500:]}")

    def url(self, database: str) -> str:
        return f"postgresql://meshshield@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._serial += 1
        name = f"t{os.getpid()}_{self._serial}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        self.databases.append(name)
        return self.url(name)

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Stop the server by its pid (SIGINT: PostgreSQL's fast shutdown, which ends
        every client connection) and wait for it to exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.launch()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole test session (never stopped by a test)."""
    server = PgServer.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for one test, which may stop and restart it."""
    server = PgServer.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.create_database()


ENGINES = ("sqlite", "postgresql")


@pytest.fixture(params=ENGINES)
def store_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_location(store_engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where a store of `store_engine` lives: a sqlite:// path or a fresh PostgreSQL
    database URL. Open it with `meshshield.cas.stores.open_store(location, data_dir)`."""
    if store_engine == "sqlite":
        return ""
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database()



# -- a server whose password comes from the environment ---------------------------------
#
# `python tests/pgserver.py serve-with-password --root DIR --port P --password-env NAME`
# makes a cluster whose superuser `meshshield` logs in with the password in $NAME
# (SCRAM over TCP; no trust), then execs `postgres` in place of itself: the way a
# program started by `meshshield run` takes a secret from its environment. The password
# reaches initdb through a file in a memory folder (/dev/shm) that is removed at once.


def serve_with_password(root: Path, port: int, password: str) -> None:
    initdb, postgres = _binary("initdb"), _binary("postgres")
    if not initdb or not postgres:
        raise SystemExit("initdb/postgres not found")
    root.mkdir(parents=True, exist_ok=True)
    user = os.environ.get("MESHSHIELD_PG_USER", "nobody") if os.geteuid() == 0 else None
    ids = (pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid) if user else None
    if ids:
        os.chown(root, *ids)
    root.chmod(0o700)
    shm = Path(tempfile.mkdtemp(prefix="meshshield-pgpw-", dir="/dev/shm"))
    try:
        pwfile = shm / "pw"
        pwfile.write_text(password)
        pwfile.chmod(0o400)
        if ids:
            os.chown(shm, *ids)
            os.chown(pwfile, *ids)
        as_user: dict[str, object] = (
            {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {})
        r = subprocess.run(  # noqa: S603 - the test's own binaries
            [initdb, "-D", str(root / "data"), "-U", "meshshield", "--auth-local=trust",
             "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
             "--no-sync"], capture_output=True, timeout=120, cwd=root, **as_user)  # type: ignore[arg-type]
        if r.returncode != 0:
            raise SystemExit(f"initdb failed: {r.stderr.decode()[-800:]}")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    if ids:
        os.setgroups([])
        os.setgid(ids[1])
        os.setuid(ids[0])
    os.execv(postgres, [postgres, "-D", str(root / "data"), "-p", str(port), "-k", str(root),  # noqa: S606
                        "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                        "-c", "password_encryption=scram-sha-256"])


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve-with-password"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password-env", required=True)
    a = parser.parse_args()
    secret = os.environ.get(a.password_env)
    if not secret:
        print(f"${a.password_env} is not set: no password to start with", file=sys.stderr)
        raise SystemExit(1)
    serve_with_password(Path(a.root), a.port, secret)
