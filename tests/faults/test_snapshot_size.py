"""Trust snapshots do not grow without bound: a revoked serial leaves every snapshot once
its certificate has expired (no handshake accepts it any more); its revocation row stays
in the CAS's database for audit."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime
from typing import TYPE_CHECKING

import pytest
from harness import CasProcess
from meshpeers import wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck


def _trust(cas: CasProcess) -> dict[str, object]:
    r = cas.attest("shop", "backend")
    assert r.status == 200, r.body
    return dict(r.json()["trust"])


@pytest.mark.cas_args("--max-cert-ttl", "3s")
def test_revocations_of_expired_certificates_leave_the_snapshot(
        fault_cas: CasProcess, leak_check: LeakCheck) -> None:
    cas = fault_cas
    r = cas.apply_policy(cas.sim_policy("shop"))
    assert r.returncode == 0, r.stderr
    _trust(cas)  # warm-up: one attestation
    leak_check.watch(cas)
    revoked, last_expiry = [], 0.0
    for _ in range(20):
        doc = cas.attest("shop", "backend").json()
        last_expiry = max(last_expiry,
                          datetime.fromisoformat(doc["expires_at"]).timestamp())
        rv = cas.request("POST", "/v1/sessions/shop/revocations",
                         json.dumps({"serial": doc["serial"]}).encode(), admin=True)
        assert rv.status == 201, rv.body
        revoked.append(doc["serial"])
    assert set(revoked) <= set(_trust(cas)["revoked_serials"])  # type: ignore[arg-type]

    wait_until(lambda: time.time() > last_expiry + 0.5, 10, "the certificates to expire")
    left = wait_until(
        lambda: not set(revoked) & set(_trust(cas)["revoked_serials"]),  # type: ignore[arg-type]
        10, "the expired certificates' serials to leave the snapshot", interval=0.2)
    assert left
    with sqlite3.connect(f"file:{cas.data / 'cas.db'}?mode=ro", uri=True) as db:
        rows = {r[0] for r in db.execute("SELECT value FROM revocations WHERE kind='serial'")}
    assert set(revoked) <= rows  # kept for audit
