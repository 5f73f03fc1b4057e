"""Issue 11 acceptance: a sidecar with --cas-expect trusts the CAS only once verified.

- a CAS started with another workload (another measurement) is refused: no
  certificate, /ready 503 saying why, /status cas.verification refused with the reason;
- the right CAS is accepted, with no --cas-bundle at all;
- after the CAS restarts (a new TLS key), the sidecar verifies it again before it
  renews, and pins the new key.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import CasProcess, SidecarProcess
from meshpeers import LOOPBACK, free_ports, wait_until

from meshshield.attestation.measure import measure_paths


def _cas(root: Path, workload_text: str, *extra: str) -> CasProcess:
    app = root / "cas-app"
    app.mkdir(parents=True)
    (app / "cas.bin").write_text(workload_text)
    return CasProcess.start(root, "--platform", "sim", "--workload", str(app),
                            "--sim-key", str(root / "sim" / "sim-platform.key"), *extra)


def _expect(cas: CasProcess, path: Path, measurement: str) -> tuple[str, ...]:
    path.write_text(f'tee: [{{platform: sim, measurement: "{measurement}"}}]\n'
                    "security: {attestation: {tolerate: [simulation]}}\n")
    return ("--cas-expect", str(path), "--cas-trust-sim-platform",
            str(cas.sim_dir / "sim-platform.pub.pem"), "--inbound", f"{LOOPBACK}:0=127.0.0.1:9")


def _verification(sc: SidecarProcess) -> dict[str, object]:
    doc = json.loads(sc.get("/status").body)
    v = doc["cas"]["verification"]
    assert isinstance(v, dict)
    return {**v, "attestations": doc["attestations"]}


def _served_spki(cas: CasProcess) -> str:
    host, port = cas.url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    import socket

    with socket.create_connection((host, int(port))) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der
    key = x509.load_der_x509_certificate(der).public_key()
    return hashlib.sha256(key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                          ).hexdigest()


def test_a_cas_running_another_workload_is_refused(tmp_path: Path) -> None:
    expected = tmp_path / "approved"
    expected.mkdir()
    (expected / "cas.bin").write_text("the approved CAS build\n")
    cas = _cas(tmp_path / "mesh", "a modified CAS build\n")
    try:
        assert cas.apply_policy(cas.sim_policy("shop")).returncode == 0
        sc = SidecarProcess.start(cas, "shop", "backend", wait_ready=False, cas_bundle=False,
                                  extra=_expect(cas, tmp_path / "e.yaml",
                                                measure_paths([expected])))
        try:
            v = wait_until(lambda: (x := _verification(sc))["state"] == "refused" and x, 20,
                           "the sidecar to refuse the CAS")
            assert "measurement_not_allowed" in str(v["last_error"])
            assert v["attestations"] == 0
            ready = sc.get("/ready")
            assert ready.status == 503 and "failed verification" in ready.json()["reason"]
            metrics = sc.get("/metrics").body.decode()
            want = "meshshield_sidecar_cas_verifications_total{result=\"measurement_not_allowed\"}"
            assert want in (
                metrics)
        finally:
            sc.stop()
    finally:
        cas.stop()


def test_the_right_cas_is_accepted_and_verified_again_after_a_restart(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    cas = _cas(tmp_path / "mesh", "the approved CAS build\n", "--listen", f"{LOOPBACK}:{port}",
               "--max-cert-ttl", "6s")
    try:
        assert cas.apply_policy(cas.sim_policy("shop")).returncode == 0
        sc = SidecarProcess.start(cas, "shop", "backend", cas_bundle=False,
                                  extra=_expect(cas, tmp_path / "e.yaml",
                                                measure_paths([cas.root / "cas-app"])))
        try:
            first = _verification(sc)
            assert first["state"] == "verified" and first["simulated"] is True
            assert first["tls_spki_sha256"] == _served_spki(cas)
            cas.restart()
            new_key = _served_spki(cas)
            assert new_key != first["tls_spki_sha256"]
            after = wait_until(
                lambda: (x := _verification(sc))["attestations"] > first["attestations"]
                and x["tls_spki_sha256"] == new_key and x, 30,
                "a renewal from the restarted CAS, verified first")
            assert after["state"] == "verified"
            assert sc.get("/ready").status == 200
        finally:
            sc.stop()
    finally:
        cas.stop()
