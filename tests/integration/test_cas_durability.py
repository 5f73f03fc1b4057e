"""The CAS keeps its state across restarts and crashes (issue 2, acceptance point 3).

Every test runs a real CAS subprocess (tests/harness.py) on a random loopback port and
inspects its SQLite file directly, opened read-only, the way an operator would.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import CasProcess

from meshshield.pki.seal import load_or_create_kek, unseal_private_key

# PKCS#8 PrivateKeyInfo header of an EC P-256 key: SEQUENCE, version 0,
# AlgorithmIdentifier {id-ecPublicKey, prime256v1}.
PKCS8_P256_PREFIX = bytes.fromhex(
    "308187020100301306072a8648ce3d020106082a8648ce3d030107"
)


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[CasProcess]:
    c = CasProcess.start(tmp_path)
    yield c
    c.stop()


def open_db_readonly(cas: CasProcess) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{cas.data / 'cas.db'}?mode=ro", uri=True, timeout=10.0)


def write_identity(cas: CasProcess, name: str) -> tuple[Path, Path, str]:
    """Attest `backend` of session shop; write its key and chain; (cert, key, serial)."""
    key, body = cas.attest_body("shop", "backend")
    r = cas.post_json("/v1/attest", body)
    assert r.status == 200, r.body
    cert_path = cas.root / f"{name}.crt"
    key_path = cas.root / f"{name}.key"
    cert_path.write_text(r.json()["certificate"])
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, str(r.json()["serial"])


def first_trust_event(cas: CasProcess, cert: Path, key: Path) -> dict[str, Any]:
    """Open /v1/events with a mesh certificate and return the first event's data."""
    host, port = cas.url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(
        host, int(port), context=cas.ssl_context(cert, key), timeout=10
    )
    try:
        conn.request("GET", "/v1/events", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read(4096)
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        event = ""
        for _ in range(200):  # a handful of lines make the first event
            line = resp.readline(1 << 20).decode()
            assert line, "the event stream closed before the first event"
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            if line.startswith("data:"):
                assert event == "trust"
                data: dict[str, Any] = json.loads(line.split(":", 1)[1])
                return data
        raise AssertionError("no data line in the first 200 lines of /v1/events")
    finally:
        conn.close()


def policy_get(cas: CasProcess, name: str) -> bytes:
    r = cas.cli("policy", "get", name)
    assert r.returncode == 0, r.stderr
    return r.stdout.encode()


def test_restart_keeps_ca_sessions_history_and_revocations(cas: CasProcess) -> None:
    fp_line = next(x for x in cas.stdout_lines if x.startswith("ca-fingerprint "))
    bundle_before = cas.bundle.read_text()

    first = cas.sim_policy("shop")
    assert cas.apply_policy(first).returncode == 0
    h1 = cas.get("/v1/sessions/shop", admin=True).headers["X-Policy-Hash"]
    second = first.replace("predecessor: null", f'predecessor: "{h1}"').replace(
        "cert_ttl: 30m", "cert_ttl: 20m"
    )
    r = cas.apply_policy(second)
    assert r.returncode == 0 and "updated session shop" in r.stdout, r.stderr
    h2 = cas.get("/v1/sessions/shop", admin=True).headers["X-Policy-Hash"]
    assert h2 != h1
    policy_before = policy_get(cas, "shop")
    assert policy_before == second.encode()

    _, _, revoked_serial = write_identity(cas, "doomed")
    r = cas.cli("revoke", "shop", "--serial", revoked_serial)
    assert r.returncode == 0, r.stderr
    cert, key, _ = write_identity(cas, "live")

    cas.restart()

    # The CA: same fingerprint line on stdout, same bundle on disk.
    assert fp_line in cas.stdout_lines
    assert cas.bundle.read_text() == bundle_before
    # The session: the same bytes back.
    assert policy_get(cas, "shop") == policy_before
    # The history: create then update, chained by predecessor.
    with open_db_readonly(cas) as db:
        rows = db.execute(
            "SELECT action, policy_hash, predecessor, policy FROM policy_history"
            " WHERE session='shop' ORDER BY id"
        ).fetchall()
    assert [(a, h, p) for a, h, p, _ in rows] == [("create", h1, None), ("update", h2, h1)]
    assert bytes(rows[0][3]) == first.encode() and bytes(rows[1][3]) == second.encode()
    # The revocation: in the snapshot a mesh client receives on connect, after restart.
    snap = first_trust_event(cas, cert, key)
    assert snap["session"] == "shop" and snap["policy_hash"] == h2
    assert revoked_serial in snap["revoked_serials"]
    # The certificate issued before the restart still chains to the (same) CA.
    assert cas.attest("shop", "backend").status == 200


def _files_under(folder: Path) -> list[Path]:
    return [Path(d) / f for d, _, files in os.walk(folder) for f in files]


def assert_no_plaintext_key(cas: CasProcess, ca_key: ec.EllipticCurvePrivateKey) -> list[str]:
    scalar = ca_key.private_numbers().private_value.to_bytes(32, "big")
    kek_secret = cas.kek.read_bytes().strip()
    seen = []
    for path in _files_under(cas.data):
        blob = path.read_bytes()
        seen.append(path.name)
        assert b"PRIVATE KEY" not in blob, path
        assert PKCS8_P256_PREFIX not in blob, path
        assert scalar not in blob, f"{path} holds the CA's private scalar"
        assert kek_secret not in blob, f"{path} holds the key-encryption secret"
    return seen


def test_no_private_key_in_plaintext_in_the_data_folder(cas: CasProcess) -> None:
    assert cas.apply_policy(cas.sim_policy("shop")).returncode == 0
    for _ in range(3):
        assert cas.attest("shop", "backend").status == 200

    # The key-encryption secret lives outside --data.
    data = cas.data.resolve()
    assert cas.kek.exists()
    assert data not in cas.kek.resolve().parents
    assert not any(p.read_bytes() == cas.kek.read_bytes() for p in _files_under(data))

    # Positively: the sealed blob opens with the KEK and is the CA certificate's key.
    with open_db_readonly(cas) as db:
        fingerprint, cert_pem, sealed = db.execute(
            "SELECT fingerprint, cert_pem, sealed_key FROM ca WHERE state='active'"
        ).fetchone()
    assert fingerprint == cas.ca_fingerprint
    sealed = bytes(sealed)
    assert sealed.startswith(b"MSSEALK")
    ca_key = unseal_private_key(
        sealed, load_or_create_kek(cas.kek), b"ca:" + fingerprint.encode()
    )
    ca_cert = x509.load_pem_x509_certificate(cert_pem.encode())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert ca_key.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        ca_cert.public_key().public_bytes(serialization.Encoding.DER, spki)
    )

    # While running (WAL and shared-memory files present) and after a clean stop.
    running = assert_no_plaintext_key(cas, ca_key)
    assert "cas.db" in running and "cas.db-wal" in running, running
    cas.stop()
    assert_no_plaintext_key(cas, ca_key)


BURST_THREADS = 16
BURST_MAX_ATTEMPTS = 400
BURST_SECONDS = 30.0
KILL_AFTER = 100


def test_sigkill_during_a_burst_loses_no_issued_certificate(cas: CasProcess) -> None:
    assert cas.apply_policy(cas.sim_policy("shop")).returncode == 0
    received: dict[str, str] = {}  # serial -> leaf PEM the client got
    statuses: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    killed = threading.Event()
    attempts = [0]
    deadline = time.monotonic() + BURST_SECONDS

    def client() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if attempts[0] >= BURST_MAX_ATTEMPTS:
                    return
                attempts[0] += 1
            try:
                _key, body = cas.attest_body("shop", "backend")
                r = cas.post_json("/v1/attest", body, timeout=10)
            except Exception:  # noqa: BLE001 - connections die when the CAS is killed
                if killed.is_set():
                    return
                continue
            with lock:
                statuses.append(r.status)
                if r.status == 200:
                    body = r.json()
                    received[body["serial"]] = body["certificate"]

    threads = [threading.Thread(target=client, daemon=True) for _ in range(BURST_THREADS)]
    for t in threads:
        t.start()
    while time.monotonic() < deadline:
        with lock:
            if len(received) >= KILL_AFTER:
                break
        time.sleep(0.02)  # lets the burst progress; not waiting for a server
    assert cas.proc is not None
    pid = cas.proc.pid
    killed.set()
    os.kill(pid, signal.SIGKILL)
    assert cas.proc.wait(timeout=10) == -signal.SIGKILL
    with lock:
        at_kill = len(received)
        in_flight = attempts[0] - len(statuses)
    stop.set()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)

    assert at_kill >= KILL_AFTER, f"only {at_kill} issued before the deadline"
    assert in_flight > 0, "the kill did not land during the burst"
    assert set(statuses) == {200}, f"a live CAS refused a valid attestation: {set(statuses)}"
    with lock:
        got = dict(received)
    with open_db_readonly(cas) as db:
        stored = dict(db.execute("SELECT serial, cert_pem FROM certificates").fetchall())
    missing = sorted(set(got) - set(stored))
    assert not missing, f"{len(missing)} of {len(got)} certificates a client received are lost"
    for serial, chain in got.items():
        assert chain.startswith(stored[serial]), serial

    cas.restart()
    r = cas.attest("shop", "backend")
    assert r.status == 200, r.body
    with open_db_readonly(cas) as db:
        (n,) = db.execute("SELECT COUNT(*) FROM certificates").fetchone()
    assert n >= len(got) + 1
