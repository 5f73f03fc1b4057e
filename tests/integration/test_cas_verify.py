"""Issue 11 acceptance: `meshshield cas verify` against a real, self-attesting sim CAS.

- the right --expect: exit 0, the bundle written (and it is the CAS's bundle);
- another measurement: exit 1 measurement_not_allowed, no bundle written;
- a man-in-the-middle (a TLS proxy presenting its own key, relaying the CAS's evidence):
  refused, because the TLS key is not the attested one;
- a CAS started without --platform: refused, the CAS is not attested;
- a malformed expect file: FILE:LINE: PATH: MESSAGE and exit 1; bad flags: exit 2.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from harness import CasProcess, run_cli

from meshshield.attestation.measure import measure_paths
from meshshield.pki.keys import generate_p256


def cas_workload(root: Path) -> Path:
    app = root / "cas-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "cas.bin").write_text("the CAS build\n")
    return app


def start_attested_cas(root: Path, *extra: str) -> CasProcess:
    app = cas_workload(root)
    sim = root / "sim"
    return CasProcess.start(root, "--platform", "sim", "--workload", str(app),
                            "--sim-key", str(sim / "sim-platform.key"), *extra)


def write_expect(path: Path, measurement: str) -> Path:
    path.write_text(f'tee:\n  - platform: sim\n    measurement: "{measurement}"\n'
                    "security:\n  attestation:\n    tolerate: [simulation]\n")
    return path


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasProcess]:
    c = start_attested_cas(tmp_path_factory.mktemp("casverify"))
    yield c
    c.stop()


def verify(cas: CasProcess, *args: str, url: str | None = None):  # type: ignore[no-untyped-def]
    return run_cli("cas", "verify", "--cas", url or cas.url, "--trust-sim-platform",
                   str(cas.sim_dir / "sim-platform.pub.pem"), *args)


def test_the_right_expect_file_writes_the_bundle(cas: CasProcess, tmp_path: Path) -> None:
    m = measure_paths([cas.root / "cas-app"])
    out = tmp_path / "bundle.pem"
    r = verify(cas, "--expect", str(write_expect(tmp_path / "e.yaml", m)), "--out", str(out),
               "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verified"] and doc["platform"] == "sim" and doc["simulated"] is True
    assert doc["measurement"] == m and doc["tcb_status"] == "unknown"
    assert out.read_text() == cas.bundle.read_text()
    human = verify(cas, "--expect", str(tmp_path / "e.yaml"))
    assert human.returncode == 0 and "SIMULATED" in human.stdout


def test_another_measurement_is_refused_and_nothing_written(cas: CasProcess,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "bundle.pem"
    r = verify(cas, "--expect", str(write_expect(tmp_path / "e.yaml", "0" * 64)),
               "--out", str(out))
    assert r.returncode == 1
    assert "measurement_not_allowed" in r.stderr and measure_paths([cas.root / "cas-app"]) in (
        r.stderr)
    assert not out.exists()


def test_without_trusting_the_sim_key_it_is_refused(cas: CasProcess, tmp_path: Path) -> None:
    m = measure_paths([cas.root / "cas-app"])
    r = run_cli("cas", "verify", "--cas", cas.url, "--expect",
                str(write_expect(tmp_path / "e.yaml", m)))
    assert r.returncode == 1 and "signature_invalid" in r.stderr


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = generate_p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mitm")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    c, k = tmp / "mitm.pem", tmp / "mitm.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


class TlsProxy:
    """Terminates TLS with its own key and relays the bytes to the CAS over TLS."""

    def __init__(self, upstream: tuple[str, int], cert: Path, key: Path) -> None:
        self.upstream = upstream
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(str(cert), str(key))
        self.client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_ctx.check_hostname = False
        self.client_ctx.verify_mode = ssl.CERT_NONE
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.relayed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            down = self.server_ctx.wrap_socket(raw, server_side=True)
            up = self.client_ctx.wrap_socket(socket.create_connection(self.upstream))
        except OSError:
            raw.close()
            return
        self.relayed += 1
        # One thread per connection moves both directions: an SSL socket read in one
        # thread and written in another at once is not safe (OpenSSL), which made this
        # proxy lose bytes now and then. Non-blocking reads, so that a TLS record with
        # no application data (a session ticket) never blocks the other direction.
        for s in (down, up):
            s.setblocking(False)
        try:
            while True:
                readable, _, _ = select.select((down, up), (), (), 30)
                if not readable:
                    return
                for a in readable:
                    b = up if a is down else down
                    while True:
                        try:
                            data = a.recv(65536)
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                            break
                        if not data:
                            return
                        b.setblocking(True)
                        b.sendall(data)
                        b.setblocking(False)
        except OSError:
            pass
        finally:
            for s in (down, up):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_man_in_the_middle_is_refused(cas: CasProcess, tmp_path: Path) -> None:
    host, port = cas.url.removeprefix("https://").rsplit(":", 1)
    proxy = TlsProxy((host, int(port)), *_self_signed(tmp_path))
    try:
        m = measure_paths([cas.root / "cas-app"])
        out = tmp_path / "bundle.pem"
        r = verify(cas, "--expect", str(write_expect(tmp_path / "e.yaml", m)), "--out",
                   str(out), url=f"https://127.0.0.1:{proxy.port}")
        assert proxy.relayed >= 1
        assert r.returncode == 1, r.stdout
        assert "report_data_mismatch" in r.stderr and "terminates TLS" in r.stderr
        assert not out.exists()
    finally:
        proxy.close()


def test_an_unattested_cas_is_refused(tmp_path: Path) -> None:
    cas = CasProcess.start(tmp_path / "plain")
    try:
        r = cas.post_json("/v1/cas/attestation", {"nonce": "A" * 43 + "="})
        assert r.status == 404 and r.code == "cas_not_attested"
        v = verify(cas, "--expect", str(write_expect(tmp_path / "e.yaml", "0" * 64)))
        assert v.returncode == 1 and "cas_not_attested" in v.stderr
        assert "not attested" in v.stderr
    finally:
        cas.stop()


def test_the_endpoint_refuses_bad_nonces(cas: CasProcess) -> None:
    assert cas.post_json("/v1/cas/attestation", {"nonce": "short"}).code == "nonce_invalid"
    assert cas.post_json("/v1/cas/attestation", {"x": 1}).code == "bad_request"
    r = cas.post_json("/v1/cas/attestation", {"nonce": "A" * 43 + "="})
    assert r.status == 200
    doc = r.json()
    assert doc["platform"] == "sim" and doc["simulated"] is True
    assert doc["self_reported"]["measurement"] == measure_paths([cas.root / "cas-app"])
    assert set(doc) >= {"platform", "evidence", "tls_spki_sha256", "bundle"}


def test_expect_file_problems_and_usage_errors(cas: CasProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tee:\n  - platform: sim\n    measurement: \"zz\"\n")
    r = verify(cas, "--expect", str(bad))
    assert r.returncode == 1
    assert f"{bad}:3: tee[0].measurement: expected 64 hex digits" in r.stderr
    assert verify(cas, "--expect", str(tmp_path / "missing.yaml")).returncode == 2
    assert verify(cas, "--expect", str(bad), url="http://x").returncode == 2


def test_status_shows_what_the_cas_runs(cas: CasProcess) -> None:
    r = cas.cli("status")
    assert r.returncode == 0, r.stderr
    m = measure_paths([cas.root / "cas-app"])
    assert f"CAS: platform sim SIMULATED (no hardware guarantee), measurement {m}" in r.stdout
    doc = json.loads(cas.cli("status", "--json").stdout)
    assert doc["cas_attestation"]["simulated"] is True
    assert doc["cas_attestation"]["tcb_status"] == "unknown"
    assert doc["cas_attestation"]["kek"]["source"] == "file"  # started with --kek-file
    assert "CAS key-encryption key: from file" in r.stdout
