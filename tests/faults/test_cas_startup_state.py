"""A CAS that finds state but not its CA, or cannot open its key, refuses to start.

Only an empty data folder initialises (SPEC §6). Each scenario damages the data of a
real CAS that served a session, starts `meshshield cas serve` again on it and checks
that it exits 1 with a message naming what is missing and how to restore, without a
traceback, and without writing a new CA, bundle or key-encryption secret.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import MESHSHIELD, START_TIMEOUT, CasProcess

# No leak check here: no process outlives its fault (each CAS is stopped before the
# damage and then refuses to start, or only starts for the check that it can).


@pytest.fixture
def served(tmp_path: Path) -> Iterator[CasProcess]:
    """A CAS that created its CA, a session and a certificate, then stopped cleanly."""
    cas = CasProcess.start(tmp_path)
    try:
        assert cas.apply_policy(cas.sim_policy("shop")).returncode == 0
        assert cas.attest("shop", "backend").status == 200
    finally:
        assert cas.stop() == 0
    yield cas


def serve_until_exit(cas: CasProcess) -> tuple[int, str, str]:
    """Start `cas serve` on the CAS's data; (exit code, stdout, stderr) once it exits.

    A CAS that starts serving instead is stopped and the test fails."""
    args = [
        *MESHSHIELD, "cas", "serve", "--data", str(cas.data), "--listen", "127.0.0.1:0",
        "--admin-fingerprint", cas.admin_fp, "--kek-file", str(cas.kek),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    out = []
    for line in proc.stdout:  # ends at exit (EOF) or at the first sign of serving
        out.append(line)
        if line.startswith("listening "):
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(f"the CAS started on damaged state: {''.join(out)}")
    rc = proc.wait(timeout=START_TIMEOUT)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return rc, "".join(out), err


def assert_refused(cas: CasProcess, *fragments: str) -> str:
    bundle_before = cas.bundle.read_bytes() if cas.bundle.exists() else None
    kek_before = cas.kek.read_bytes() if cas.kek.exists() else None
    rc, out, err = serve_until_exit(cas)
    assert rc == 1, (rc, out, err)
    assert "Traceback" not in err, err
    assert "ca-fingerprint" not in out, "a CA was loaded or created"
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"
    # Nothing was initialised: the bundle and the KEK are as they were.
    assert (cas.bundle.read_bytes() if cas.bundle.exists() else None) == bundle_before
    assert (cas.kek.read_bytes() if cas.kek.exists() else None) == kek_before
    return err


def remove_db(cas: CasProcess) -> None:
    for suffix in ("", "-wal", "-shm"):
        (cas.data / f"cas.db{suffix}").unlink(missing_ok=True)


def test_cas_refuses_to_start_when_the_database_is_deleted_but_bundle_remains(
    served: CasProcess,
) -> None:
    remove_db(served)
    err = assert_refused(served, "bundle.pem", "no CA", "restore")
    assert str(served.data) in err


def test_cas_refuses_to_start_when_ca_rows_are_gone(served: CasProcess) -> None:
    with sqlite3.connect(served.data / "cas.db") as db:
        db.execute("DELETE FROM ca")
    err = assert_refused(served, "no CA", "restore")
    assert "1 session" in err, err  # says what it did find


def test_cas_refuses_to_start_when_the_database_is_truncated(served: CasProcess) -> None:
    remove_db(served)
    (served.data / "cas.db").write_bytes(b"")
    assert_refused(served, "bundle.pem", "no CA", "restore")


def test_cas_refuses_to_start_on_a_garbage_database(served: CasProcess) -> None:
    remove_db(served)
    (served.data / "cas.db").write_bytes(b"this is not sqlite\n" * 512)
    assert_refused(served, "cas.db", "not a database", "restore")


def test_missing_kek_is_never_recreated(served: CasProcess) -> None:
    served.kek.unlink()
    err = assert_refused(served, str(served.kek), "restore")
    assert "missing" in err, err
    assert not served.kek.exists(), "a new key-encryption secret was created"


def test_cas_refuses_to_start_with_the_wrong_kek(served: CasProcess) -> None:
    served.kek.write_text("A" * 43 + "=\n")  # 32 bytes, but not the secret sealing the CA
    assert_refused(served, "unseal", str(served.kek), "restore")


def test_empty_data_folder_with_a_provisioned_kek_initialises(tmp_path: Path) -> None:
    """The Kubernetes first start: the KEK secret is mounted, the volume is empty."""
    cas = CasProcess.start(tmp_path)
    fp = cas.ca_fingerprint
    assert cas.stop() == 0
    kek = cas.kek.read_bytes()
    remove_db(cas)
    cas.bundle.unlink()
    started = time.monotonic()
    cas.launch()
    try:
        assert cas.ca_fingerprint != fp and cas.kek.read_bytes() == kek
        assert time.monotonic() - started < START_TIMEOUT
    finally:
        cas.stop()


def test_lost_data_folder_beside_the_kek_the_cas_made_is_refused(tmp_path: Path) -> None:
    """Without --kek-file the CAS makes its KEK beside the data folder; if the folder is
    then lost, a start must not quietly make a new mesh under the surviving KEK."""
    data = tmp_path / "data"
    args = [*MESHSHIELD, "cas", "serve", "--data", str(data), "--listen", "127.0.0.1:0"]
    env = {k: v for k, v in os.environ.items() if k != "MESHSHIELD_CAS_KEK_FILE"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env)
    assert first.stdout is not None
    for line in first.stdout:  # bounded by the process: it serves or exits
        if line.startswith("listening "):
            break
    first.terminate()
    first.wait(timeout=START_TIMEOUT)
    first.stdout.close()
    kek = tmp_path / ".data.kek"
    assert kek.is_file() and (data / "bundle.pem").is_file()
    before = kek.read_bytes()
    shutil.rmtree(data)
    second = subprocess.run(args, capture_output=True, text=True, env=env,
                            timeout=START_TIMEOUT)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "Traceback" not in second.stderr
    assert str(kek) in second.stderr and "restore" in second.stderr.lower(), second.stderr
    assert not (data / "bundle.pem").exists() and kek.read_bytes() == before
