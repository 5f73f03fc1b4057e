"""Secrets reach the app without persistent disk: the sidecar's tmpfs folder (mode 0400,
replaced atomically on renewal after a rotation) and `meshshield run` (environment, then
exec). Real CAS, sidecar and programs; the folders are on /dev/shm (tmpfs)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import MESHSHIELD, CasProcess, SidecarProcess, run_cli

SHM = Path("/dev/shm")
# A renewal every few seconds: the CAS caps every certificate at this lifetime.
CAS_ARGS = ("--max-cert-ttl", "8s")


def policy(cas: CasProcess) -> str:
    m = cas.measurement()
    return f"""name: shop
version: "1"
predecessor: null
services:
  - name: db
    tee: [{{platform: sim, measurement: "{m}"}}]
    secrets:
      - {{name: db-password, env: DB_PASSWORD, file: /run/secrets/db-password}}
      - {{name: salt, env: SALT, file: /run/secrets/salt}}
security: {{attestation: {{tolerate: [simulation]}}}}
secrets:
  - {{name: db-password, kind: ascii, size: 24}}
  - {{name: salt, kind: random, size: 16}}
"""


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[CasProcess]:
    if not SHM.is_dir():
        pytest.fail("/dev/shm (tmpfs) is needed for the secrets folder")
    c = CasProcess.start(tmp_path / "cas", *CAS_ARGS)
    r = c.apply_policy(policy(c))
    assert r.returncode == 0, r.stderr
    yield c
    c.stop()


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    d = SHM / f"meshshield-test-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir(mode=0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_flags(cas: CasProcess, workload: Path | None = None) -> list[str]:
    return ["--cas", cas.url, "--cas-bundle", str(cas.bundle), "--session", "shop",
            "--service", "db", "--platform", "sim", "--workload", str(workload or cas.workload),
            "--sim-key", str(cas.sim_dir / "sim-platform.key")]


PRINT_ENV = "import os; print(os.environ['DB_PASSWORD']); print(os.environ['SALT'])"


def run_printing_env(cas: CasProcess, workload: Path | None = None
                     ) -> tuple[int, str, str]:
    r = run_cli("run", *run_flags(cas, workload), "--", sys.executable, "-c", PRINT_ENV)
    return r.returncode, r.stdout, r.stderr


def wait_for(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s")


def test_run_execs_the_program_with_its_secrets_in_the_environment(cas: CasProcess) -> None:
    rc, out, err = run_printing_env(cas)
    assert rc == 0, err
    password, salt = out.splitlines()
    assert len(password) == 24 and password.isprintable() and " " not in password
    assert len(bytes.fromhex(salt)) == 16  # random bytes reach the environment as hex
    rc, again, _ = run_printing_env(cas)
    assert again == out  # made once, the same at every attestation
    assert password not in err and password not in cas.stderr()


def test_run_with_a_tampered_build_is_refused_and_runs_nothing(cas: CasProcess,
                                                               tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(cas.workload, tampered)
    (tampered / "server.py").write_text("print('send the password elsewhere')\n")
    marker = tmp_path / "ran"
    r = run_cli("run", *run_flags(cas, tampered), "--", sys.executable, "-c",
                f"open({str(marker)!r}, 'w').write(repr(dict(__import__('os').environ)))")
    assert r.returncode == 1
    assert "measurement_not_allowed" in r.stderr
    assert not marker.exists()  # the program was never started, so it was given nothing
    rc, out, _ = run_printing_env(cas)
    assert rc == 0 and out.splitlines()[0] not in r.stderr + r.stdout


def test_run_needs_a_program_and_refuses_a_folder_on_disk(cas: CasProcess,
                                                          tmp_path: Path) -> None:
    r = run_cli("run", *run_flags(cas))
    assert r.returncode == 2 and "name the program to run after --" in r.stderr
    r = run_cli("run", *run_flags(cas), "--secrets-dir", str(tmp_path), "--",
                sys.executable, "-c", "pass")
    assert r.returncode == 1 and "not in memory (tmpfs or ramfs)" in r.stderr


def test_the_sidecar_writes_files_to_tmpfs_and_replaces_them_on_renewal_after_rotate(
    cas: CasProcess, shm_dir: Path
) -> None:
    sc = SidecarProcess.start(cas, "shop", "db", inbound=["127.0.0.1:0=127.0.0.1:9"],
                              extra=("--secrets-dir", str(shm_dir)))
    try:
        password_file, salt_file = shm_dir / "db-password", shm_dir / "salt"
        wait_for(lambda: password_file.exists() and salt_file.exists())
        for f in (password_file, salt_file):
            st = f.stat()
            assert stat.S_IMODE(st.st_mode) == 0o400 and stat.S_ISREG(st.st_mode)
        rc, out, _ = run_printing_env(cas)
        password, salt_hex = out.splitlines()
        assert password_file.read_bytes() == password.encode()
        assert salt_file.read_bytes() == bytes.fromhex(salt_hex)  # files hold the raw bytes
        status = sc.get("/status").json()["secrets"]
        assert status["filesystem"] == "tmpfs" and status["on_disk"] is False
        assert status["files"] == {"db-password": 1, "salt": 1}
        inode = password_file.stat().st_ino

        r = cas.cli("secret", "rotate", "shop", "db-password")
        assert r.returncode == 0 and "version 2" in r.stdout, r.stderr
        rc, out, _ = run_printing_env(cas)  # the next attestation sees the new value
        new_password = out.splitlines()[0]
        assert new_password != password
        wait_for(lambda: password_file.read_bytes() == new_password.encode())
        assert password_file.stat().st_ino != inode  # a new file renamed over the old one
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o400
        assert salt_file.read_bytes() == bytes.fromhex(salt_hex)
        assert [p.name for p in shm_dir.iterdir() if p.name.startswith(".")] == []
        assert password not in sc.log() and new_password not in sc.log()
    finally:
        sc.stop()


def test_the_sidecar_refuses_a_secrets_folder_on_disk_unless_told(
    cas: CasProcess, tmp_path: Path
) -> None:
    disk = tmp_path / "secrets"
    disk.mkdir()
    import subprocess

    args = [*MESHSHIELD, "sidecar", "--cas", cas.url, "--cas-bundle", str(cas.bundle),
            "--session", "shop", "--service", "db", "--platform", "sim",
            "--workload", str(cas.workload), "--sim-key", str(cas.sim_dir / "sim-platform.key"),
            "--admin-listen", "127.0.0.1:0", "--secrets-dir", str(disk)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "not in memory (tmpfs or ramfs)" in r.stderr and "--secrets-dir-on-disk" in r.stderr
    assert list(disk.iterdir()) == []
    sc = SidecarProcess.start(cas, "shop", "db", inbound=["127.0.0.1:0=127.0.0.1:9"],
                              extra=("--secrets-dir", str(disk), "--secrets-dir-on-disk"))
    try:
        wait_for(lambda: (disk / "db-password").exists())
        assert "NOT in memory" in sc.log()
        assert sc.get("/status").json()["secrets"]["on_disk"] is True
    finally:
        sc.stop()
