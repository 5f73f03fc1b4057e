"""A captured signed admin request is accepted once, across restarts, and a key that
may do nothing cannot fill the replay guard (issue 9, item 17).

Real CAS processes; requests signed once and sent verbatim, as an attacker who
captured them would.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from harness import CasProcess, HttpResult

from meshshield.adminauth import load_admin_key, sign_request, write_admin_key

if TYPE_CHECKING:
    from conftest import LeakCheck


@pytest.fixture
def cas(fault_cas: CasProcess, leak_check: LeakCheck) -> CasProcess:
    """The fault CAS, warmed up by one admin request and watched for leaks from here."""
    assert fault_cas.get("/v1/edges", admin=True).status == 200
    leak_check.watch(fault_cas)
    return fault_cas


def send(cas: CasProcess, method: str, path: str, header: str, body: bytes = b"") -> HttpResult:
    return cas.request(method, path, body, headers={"Authorization": header})


def assert_replay_refused(r: HttpResult) -> None:
    assert r.status == 401, (r.status, r.body)
    err = r.json()["error"]
    assert err["code"] == "unauthenticated", err
    assert "request already seen" in err["message"], err


def test_signed_request_replayed_after_restart_is_refused(
        cas: CasProcess, leak_check: LeakCheck) -> None:
    assert cas.apply_policy(cas.sim_policy("shop")).returncode == 0
    path = "/v1/sessions/shop"
    delete = sign_request(load_admin_key(cas.admin_dir), "DELETE", path, b"")
    assert send(cas, "DELETE", path, delete).status == 200
    assert_replay_refused(send(cas, "DELETE", path, delete))

    # The admin re-creates the session; the CAS restarts (or crashes) within the window.
    assert cas.apply_policy(cas.sim_policy("shop")).returncode == 0
    leak_check.verify()
    cas.restart()
    leak_check.watch(cas)  # a new process: a new baseline
    assert_replay_refused(send(cas, "DELETE", path, delete))
    assert cas.get(path, admin=True).status == 200, "the replayed DELETE took effect"


def test_replay_guard_survives_sigkill(cas: CasProcess, leak_check: LeakCheck) -> None:
    path = "/v1/edges"
    header = sign_request(load_admin_key(cas.admin_dir), "GET", path, b"")
    assert send(cas, "GET", path, header).status == 200
    leak_check.verify()
    cas.stop(signal.SIGKILL)
    cas.launch()
    leak_check.watch(cas)  # a new process: a new baseline
    assert_replay_refused(send(cas, "GET", path, header))


def test_key_that_may_do_nothing_cannot_fill_the_replay_guard(
    cas: CasProcess, tmp_path: Path
) -> None:
    stranger, stranger_fp = write_admin_key(tmp_path / "stranger")
    assert cas.apply_policy(cas.sim_policy("shop")).returncode == 0
    for method, path in [("GET", "/v1/sessions/shop"), ("GET", "/v1/edges"),
                         ("DELETE", "/v1/sessions/shop"), ("GET", "/v1/sessions/nope")]:
        header = sign_request(stranger, method, path, b"")
        # Refused before the guard: sent twice, it is forbidden twice, never "seen".
        for _ in range(2):
            r = send(cas, method, path, header)
            assert r.status == 403 and r.code == "forbidden", (method, path, r.body)
    with sqlite3.connect(f"file:{cas.data / 'cas.db'}?mode=ro", uri=True) as db:
        kept = db.execute(
            "SELECT COUNT(*) FROM admin_request_nonces WHERE fingerprint=?", (stranger_fp,)
        ).fetchone()[0]
        admins = db.execute("SELECT COUNT(*) FROM admin_request_nonces").fetchone()[0]
    assert kept == 0, "a key that may do nothing left nonces in the replay guard"
    assert admins >= 1  # the admin's own apply was counted


def test_key_named_in_an_access_policy_is_guarded_too(cas: CasProcess, tmp_path: Path) -> None:
    reader, reader_fp = write_admin_key(tmp_path / "reader")
    extra = f'access_policy:\n  read: [CREATOR, "{reader_fp}"]\n  update: [CREATOR]\n'
    assert cas.apply_policy(cas.sim_policy("shop", extra=extra)).returncode == 0
    path = "/v1/sessions/shop"
    header = sign_request(reader, "GET", path, b"")
    assert send(cas, "GET", path, header).status == 200
    assert_replay_refused(send(cas, "GET", path, header))
