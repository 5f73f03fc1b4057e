"""The CAS as operators and sidecars meet it: a real subprocess on a loopback port."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import CasProcess, HttpResult, run_cli

from meshshield.adminauth import write_admin_key
from meshshield.pki.claims_ext import CLAIMS_OID, decode_claims_extension

NONCE_TTL = 4.0


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasProcess]:
    c = CasProcess.start(tmp_path_factory.mktemp("cas"), "--nonce-ttl", f"{NONCE_TTL:g}s",
                         "--dns", "cas.mesh.test")
    r = c.apply_policy(c.sim_policy("shop"))
    assert r.returncode == 0, r.stderr
    yield c
    c.stop()


def _write_attested(cas: CasProcess, out: Path, service: str = "backend") -> x509.Certificate:
    key, body = cas.attest_body("shop", service)
    r = cas.post_json("/v1/attest", body)
    assert r.status == 200, r.body
    out.mkdir(parents=True, exist_ok=True)
    (out / "cert.pem").write_text(r.json()["certificate"])
    (out / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return x509.load_pem_x509_certificate(r.json()["certificate"].encode())


def _refused(r: HttpResult, code: str, status: int = 403) -> str:
    assert r.status == status, (r.status, r.body)
    err = r.json()["error"]
    assert err["code"] == code, err
    assert "Traceback" not in r.body.decode()
    return str(err["message"])


# -- admins and sessions ---------------------------------------------------------------


def test_admin_creates_session_and_non_admin_is_forbidden(cas: CasProcess, tmp_path: Path) -> None:
    other, _fp = write_admin_key(tmp_path / "other")
    policy = cas.sim_policy("admins").encode()
    r = cas.request("POST", "/v1/sessions", policy, admin=other)
    _refused(r, "forbidden")
    r = cas.request("POST", "/v1/sessions", policy)
    _refused(r, "unauthenticated", 401)
    r = cas.request("POST", "/v1/sessions", policy, admin=True)
    assert r.status == 201, r.body
    assert r.json()["session"] == "admins"
    # the creator may read it; a stranger may not, even knowing its name
    assert cas.get("/v1/sessions/admins", admin=True).body == policy
    _refused(cas.get("/v1/sessions/admins", admin=other), "forbidden")
    # creating it again is a conflict, not an overwrite
    _refused(cas.request("POST", "/v1/sessions", policy, admin=True), "conflict", 409)


def test_update_needs_the_current_hash_as_predecessor(cas: CasProcess) -> None:
    text = cas.sim_policy("chain")
    assert cas.apply_policy(text).returncode == 0
    got = cas.get("/v1/sessions/chain", admin=True)
    current = got.headers["X-Policy-Hash"]
    assert got.headers["ETag"] == f'"{current}"'
    wrong = text.replace("predecessor: null", f"predecessor: \"{'0' * 64}\"")
    r = cas.request("PUT", "/v1/sessions/chain", wrong.encode(), admin=True)
    msg = _refused(r, "predecessor_mismatch", 409)
    assert current in msg
    cli = cas.apply_policy(wrong)
    assert cli.returncode == 1 and "predecessor_mismatch" in cli.stderr
    right = text.replace("predecessor: null", f'predecessor: "{current}"').replace(
        "cert_ttl: 30m", "cert_ttl: 20m")
    cli = cas.apply_policy(right)
    assert cli.returncode == 0, cli.stderr
    assert "updated session chain" in cli.stdout
    # the old hash no longer works: the chain moved on
    _refused(cas.request("PUT", "/v1/sessions/chain", right.encode(), admin=True),
             "predecessor_mismatch", 409)


def test_policy_get_prints_the_exact_bytes(cas: CasProcess) -> None:
    r = cas.cli("policy", "get", "shop")
    assert r.returncode == 0, r.stderr
    assert r.stdout == cas.sim_policy("shop")


def test_invalid_policy_upload_lists_every_problem(cas: CasProcess) -> None:
    bad = cas.sim_policy("bad").replace("tolerate: [simulation]", "tolerate: []").replace(
        "dns: [backend,", "dns: [cas.mesh.test,")
    r = cas.request("POST", "/v1/sessions", bad.encode(), admin=True)
    _refused(r, "policy_invalid", 400)
    problems = r.json()["error"]["problems"]
    assert len(problems) >= 3, problems  # two sim entries without tolerance + the dns name
    assert any("dns" in p and "cas.mesh.test" in p for p in problems)


# -- issuance --------------------------------------------------------------------------


def test_certificate_carries_identity_and_claims(cas: CasProcess, tmp_path: Path) -> None:
    before = datetime.now(UTC)
    key, body = cas.attest_body("shop", "backend")
    r = cas.post_json("/v1/attest", body)
    assert r.status == 200, r.body
    resp = r.json()
    assert resp["spiffe_id"] == "spiffe://meshshield.local/shop/backend"
    chain = x509.load_pem_x509_certificates(resp["certificate"].encode())
    leaf = chain[0]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [resp["spiffe_id"]]
    assert san.get_values_for_type(x509.DNSName) == ["backend", "backend.shop.svc.cluster.local"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = leaf.not_valid_after_utc - before
    assert timedelta(minutes=29) < lifetime <= timedelta(minutes=30, seconds=5)  # cert_ttl 30m
    ext = leaf.extensions.get_extension_for_oid(CLAIMS_OID)
    assert not ext.critical
    record = json.loads(ext.value.value[4:])  # type: ignore[attr-defined]  # DER UTF8String
    assert record[0] == "application/vnd.meshshield.claims+json" and record[2] == 8
    raw = base64.urlsafe_b64decode(record[1] + "=" * (-len(record[1]) % 4))
    claims = json.loads(raw)
    assert raw == json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    assert decode_claims_extension(ext.value.value).claims == claims  # type: ignore[attr-defined]
    assert set(claims) == {"platform", "measurement", "signer", "product_id", "svn", "debug",
                           "tcb_status", "session", "service", "policy_hash",
                           "evidence_sha256", "attested_at", "simulated"}
    assert claims["platform"] == "sim" and claims["simulated"] is True
    assert claims["measurement"] == cas.measurement()
    assert claims["session"] == "shop" and claims["service"] == "backend"
    assert claims == resp["claims"]
    assert claims["attested_at"].endswith("Z")
    # the chain verifies against the published bundle, and the trust snapshot rides along
    bundle = x509.load_pem_x509_certificates(cas.bundle.read_bytes())
    issuer = next(c for c in bundle if c.subject == leaf.issuer)
    leaf.verify_directly_issued_by(issuer)
    trust = resp["trust"]
    assert trust["session"] == "shop" and trust["services"]["backend"]["allow_from"] == [
        "frontend"]
    assert trust["tolerate"] == ["simulation"]
    assert {"epoch", "policy_hash", "revoked_serials", "revoked_measurements"} <= set(trust)

    # the same certificate as openssl sees it
    pem = tmp_path / "leaf.pem"
    pem.write_text(resp["certificate"].split("-----END CERTIFICATE-----")[0]
                   + "-----END CERTIFICATE-----\n")
    text = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "URI:spiffe://meshshield.local/shop/backend" in text
    assert "DNS:backend, DNS:backend.shop.svc.cluster.local" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "1.3.6.1.5.5.7.1.35" in text  # id-pe-cmw
    assert "application/vnd.meshshield.claims+json" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(cas.bundle), str(pem)],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and ": OK" in verify.stdout, verify.stdout + verify.stderr


def test_attest_cli_writes_private_files(cas: CasProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run_cli("attest", "--cas", cas.url, "--cas-bundle", str(cas.bundle),
                  "--session", "shop", "--service", "frontend", "--platform", "sim",
                  "--workload", str(cas.workload),
                  "--sim-key", str(cas.sim_dir / "sim-platform.key"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "SIMULATED" in res.stdout
    for name in ("key.pem", "cert.pem", "bundle.pem", "claims.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o600
    assert json.loads((out / "claims.json").read_text())["service"] == "frontend"


# -- refusals, each with its reason code ------------------------------------------------


def test_changed_workload_byte_is_measurement_not_allowed(cas: CasProcess, tmp_path: Path) -> None:
    tampered = tmp_path / "app"
    tampered.mkdir()
    original = (cas.workload / "server.py").read_bytes()
    (tampered / "server.py").write_bytes(original[:-2] + b"?" + original[-1:])
    msg = _refused(cas.attest("shop", "backend", workload=tampered), "measurement_not_allowed")
    assert cas.measurement(tampered) in msg  # says what it found
    assert cas.measurement()[:12] in msg  # and what it expected


def test_reused_nonce_is_refused(cas: CasProcess) -> None:
    nonce = cas.post_json("/v1/attest/nonce", {}).json()["nonce"]
    assert cas.attest("shop", "backend", nonce=nonce).status == 200
    msg = _refused(cas.attest("shop", "backend", nonce=nonce), "nonce_invalid")
    assert "single use" in msg or "already used" in msg


def test_expired_nonce_is_refused(cas: CasProcess) -> None:
    n = cas.post_json("/v1/attest/nonce", {}).json()
    expires = datetime.fromisoformat(n["expires_at"].replace("Z", "+00:00"))
    assert timedelta(0) < expires - datetime.now(UTC) <= timedelta(seconds=NONCE_TTL + 1)
    deadline = time.monotonic() + NONCE_TTL + 5
    while datetime.now(UTC) <= expires + timedelta(milliseconds=300):
        assert time.monotonic() < deadline
        time.sleep(0.1)  # waiting for the clock, not for a server
    msg = _refused(cas.attest("shop", "backend", nonce=n["nonce"]), "nonce_invalid")
    assert "expired" in msg


def test_unknown_nonce_is_refused(cas: CasProcess) -> None:
    import base64
    import os

    _refused(cas.attest("shop", "backend", nonce=base64.b64encode(os.urandom(32)).decode()),
             "nonce_invalid")


def test_evidence_bound_to_another_key_is_report_data_mismatch(cas: CasProcess) -> None:
    _key, body = cas.attest_body("shop", "backend")
    _other, other_body = cas.attest_body("shop", "backend")
    body["csr"] = other_body["csr"]  # evidence binds key A, CSR carries key B
    msg = _refused(cas.post_json("/v1/attest", body), "report_data_mismatch")
    assert "expected" in msg


def test_platform_not_allowed(cas: CasProcess) -> None:
    extra = """  - name: vm-only
    tee:
      - platform: sev-snp
        measurement: "{m}"
        host_data: "{h}"
""".format(m="ab" * 48, h="cd" * 32)
    assert cas.apply_policy(cas.sim_policy("snp", extra="").replace(
        "security:", extra + "security:")).returncode == 0
    msg = _refused(cas.attest("snp", "vm-only"), "platform_not_allowed")
    assert "sev-snp" in msg and "sim" in msg


def test_unknown_session_and_service(cas: CasProcess) -> None:
    msg = _refused(cas.attest("nope", "backend"), "session_unknown")
    assert "nope" in msg
    msg = _refused(cas.attest("shop", "database"), "service_unknown")
    assert "database" in msg
    assert "backend" not in msg and "frontend" not in msg  # never lists the others


def test_csr_that_is_not_p256_is_refused(cas: CasProcess) -> None:
    key, body = cas.attest_body("shop", "backend")
    p384 = ec.generate_private_key(ec.SECP384R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backend")])).sign(p384, hashes.SHA256())
    body["csr"] = csr.public_bytes(serialization.Encoding.PEM).decode()
    msg = _refused(cas.post_json("/v1/attest", body), "csr_invalid", 400)
    assert "P-256" in msg


# -- revocation reaches subscribers ------------------------------------------------------


class EventStream:
    """A raw SSE client over TLS with a client certificate (what a sidecar does)."""

    def __init__(self, cas: CasProcess, cert: Path, key: Path) -> None:
        ctx = cas.ssl_context(cert, key)
        u = urllib.parse.urlsplit(cas.url)
        raw = socket.create_connection((u.hostname, u.port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname=u.hostname)
        self.sock.sendall(f"GET /v1/events HTTP/1.1\r\nHost: {u.hostname}\r\n"
                          "Accept: text/event-stream\r\n\r\n".encode())
        self.buf = b""
        self.events: list[tuple[float, dict[str, object]]] = []
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                self.buf += chunk
                while b"\n\n" in self.buf:
                    block, self.buf = self.buf.split(b"\n\n", 1)
                    for line in block.split(b"\n"):
                        if line.startswith(b"data: "):
                            with self.lock:
                                self.events.append((time.monotonic(), json.loads(line[6:])))
                                self.lock.notify_all()
        except (OSError, ssl.SSLError, ValueError):
            return

    def wait_for(self, pred: object, timeout: float) -> tuple[float, dict[str, object]] | None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for t, ev in self.events:
                    if pred(ev):  # type: ignore[operator]
                        return t, ev
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.lock.wait(left)

    def close(self) -> None:
        # Shut down and join the reader before closing: closing under a thread blocked in
        # recv() frees the fd number, and the next socket opened would be read by it.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


def test_revocation_reaches_event_subscriber_within_one_second(
    cas: CasProcess, tmp_path: Path
) -> None:
    _write_attested(cas, tmp_path / "sub", "frontend")
    victim = _write_attested(cas, tmp_path / "victim", "backend")
    serial = format(victim.serial_number, "x")
    stream = EventStream(cas, tmp_path / "sub" / "cert.pem", tmp_path / "sub" / "key.pem")
    try:
        first = stream.wait_for(lambda ev: True, 10)
        assert first is not None, "no trust event on connect"
        assert first[1]["session"] == "shop"
        assert serial not in first[1]["revoked_serials"]  # type: ignore[operator]
        sent = time.monotonic()
        r = cas.cli("revoke", "shop", "--serial", serial)
        assert r.returncode == 0, r.stderr
        got = stream.wait_for(lambda ev: serial in ev["revoked_serials"], 5)  # type: ignore[operator]
        assert got is not None, "revocation never reached the subscriber"
        # measured from before the CLI process started, so this bounds the whole path
        assert got[0] - sent < 1.0 + _cli_startup_allowance(), got[0] - sent
    finally:
        stream.close()


def _cli_startup_allowance() -> float:
    # `meshshield revoke` is a fresh Python process; its start-up is not the CAS's delay.
    return 2.0


def test_revocation_event_latency_from_the_api(cas: CasProcess, tmp_path: Path) -> None:
    _write_attested(cas, tmp_path / "sub", "frontend")
    victim = _write_attested(cas, tmp_path / "victim", "backend")
    serial = format(victim.serial_number, "x")
    stream = EventStream(cas, tmp_path / "sub" / "cert.pem", tmp_path / "sub" / "key.pem")
    try:
        assert stream.wait_for(lambda ev: True, 10) is not None
        sent = time.monotonic()
        r = cas.post_json("/v1/sessions/shop/revocations", {"serial": serial}, admin=True)
        assert r.status == 201, r.body
        got = stream.wait_for(lambda ev: serial in ev["revoked_serials"], 5)  # type: ignore[operator]
        assert got is not None
        assert got[0] - sent < 1.0, got[0] - sent
    finally:
        stream.close()
    # a revoked certificate can no longer subscribe
    ctx = cas.ssl_context(tmp_path / "victim" / "cert.pem", tmp_path / "victim" / "key.pem")
    _refused(cas.get("/v1/events", ctx=ctx), "revoked")


def test_revoked_measurement_blocks_issuance(cas: CasProcess, tmp_path: Path) -> None:
    other = tmp_path / "app2"
    other.mkdir()
    (other / "server.py").write_text("print('v2')\n")
    m2 = cas.measurement(other)
    text = cas.sim_policy("revm", measurement=m2)
    assert cas.apply_policy(text).returncode == 0
    assert cas.attest("revm", "backend", workload=other).status == 200
    r = cas.cli("revoke", "revm", "--measurement", m2)
    assert r.returncode == 0, r.stderr
    _refused(cas.attest("revm", "backend", workload=other), "revoked")


def test_events_need_a_mesh_certificate(cas: CasProcess) -> None:
    _refused(cas.get("/v1/events"), "certificate_missing", 401)


def test_metrics_label_refusals_by_reason(cas: CasProcess) -> None:
    cas.attest("shop", "database")
    text = cas.get("/metrics").body.decode()
    assert 'meshshield_cas_attestations_total{result="service_unknown"}' in text
    assert 'meshshield_cas_attestations_total{result="issued"}' in text
