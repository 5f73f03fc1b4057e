"""Refusals: who may not talk to whom, proved on the backend's side by what it received.

The apps behind the sidecars are raw TCP recorders that keep every byte they are sent.
`openssl s_client` plays the peers that are not (or not allowed) mesh sidecars; every
refusal must leave the app untouched and appear at `/connections?refused=1` with its
reason code. A positive control with the same tools shows the recorders do see bytes
when the peer is allowed.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import CasProcess, SidecarProcess
from meshpeers import (
    DATAPLANES,
    LOOPBACK,
    LoopThread,
    Recorder,
    TcpBackend,
    apply,
    closed_by_peer,
    connect,
    free_ports,
    no_traceback,
    plane_args,
    refusals,
    sim_service,
    wait_refusal,
    wait_until,
)

PAYLOAD = b"GET /secret HTTP/1.0\r\n\r\n"


@dataclass
class Refusals:
    cas: CasProcess
    backend: SidecarProcess
    rogue: SidecarProcess
    frontend: SidecarProcess
    backend_in: int  # backend sidecar's mTLS listener -> backend_app
    rogue_in: int  # rogue sidecar's mTLS listener -> rogue_app
    to_backend: int  # frontend outbound: backend@backend_in (the right address)
    misrouted: int  # frontend outbound: backend@rogue_in (the wrong service there)
    backend_app: Recorder
    rogue_app: Recorder
    certs: Path


@pytest.fixture(scope="module", params=DATAPLANES)
def env(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Refusals]:
    root = tmp_path_factory.mktemp("refusals")
    cas = CasProcess.start(root / "mesh")
    lt = LoopThread()
    backend_app, rogue_app = Recorder(), Recorder()
    servers = [TcpBackend(lt, backend_app.handler), TcpBackend(lt, rogue_app.handler)]
    started: list[SidecarProcess] = []
    try:
        # rogue is a mesh service in good standing, just not in backend's allow_from.
        apply(cas, cas.sim_policy(
            "shop", extra=sim_service("rogue", cas.measurement(), "[frontend]")))
        backend_in, rogue_in, to_backend, misrouted = free_ports(4)
        for service, listen, app in (("backend", backend_in, servers[0].port),
                                     ("rogue", rogue_in, servers[1].port)):
            started.append(SidecarProcess.start(
                cas, "shop", service, inbound=[f"{LOOPBACK}:{listen}={LOOPBACK}:{app}"],
                extra=plane_args(request.param)))
        started.append(SidecarProcess.start(cas, "shop", "frontend", extra=plane_args(
            request.param), outbound=[
            f"{LOOPBACK}:{to_backend}=backend@{LOOPBACK}:{backend_in}",
            f"{LOOPBACK}:{misrouted}=backend@{LOOPBACK}:{rogue_in}",
        ]))
        certs = root / "certs"
        certs.mkdir()
        yield Refusals(cas, *started, backend_in, rogue_in, to_backend, misrouted,  # type: ignore[misc]
                       backend_app, rogue_app, certs)
        no_traceback(*started)
    finally:
        for sc in reversed(started):
            sc.stop()
        for s in servers:
            s.close()
        lt.close()
        cas.stop()


@pytest.fixture(autouse=True)
def fresh_recorders(env: Refusals) -> None:
    env.backend_app.reset()
    env.rogue_app.reset()


def _write_key_cert(out: Path, key: ec.EllipticCurvePrivateKey, chain_pem: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (out / "cert.pem").write_text(chain_pem)
    return ["-cert", str(out / "cert.pem"), "-key", str(out / "key.pem")]


def _mesh_cert(env: Refusals, service: str) -> list[str]:
    """A genuine attested certificate of `service`, written out as s_client flags."""
    key, body = env.cas.attest_body("shop", service)
    r = env.cas.post_json("/v1/attest", body)
    assert r.status == 200, r.body
    return _write_key_cert(env.certs / service, key, r.json()["certificate"])


def _foreign_cert(env: Refusals) -> list[str]:
    """A certificate claiming to be shop/frontend, from a CA the mesh never heard of."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "frontend")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                "spiffe://meshshield.local/shop/frontend")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in (leaf, ca))
    return _write_key_cert(env.certs / "foreign", key, pem)


def _s_client(port: int, cert_flags: list[str], *, wait_for_close: bool = True) -> str:
    """Connect with TLS 1.3, send PAYLOAD; with wait_for_close, keep reading until the
    sidecar ends the connection (it must: a refused peer is reset)."""
    args = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-tls1_3",
            "-servername", "backend", *cert_flags]
    if wait_for_close:
        args.append("-ign_eof")
    try:
        r = subprocess.run(args, input=PAYLOAD, capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the sidecar kept a refused s_client connection open for 20 s")
    return (r.stdout + r.stderr).decode("utf-8", "replace")


def _assert_backend_untouched(env: Refusals) -> None:
    assert env.backend_app.connections == 0, "the sidecar connected to the app"
    assert env.backend_app.data == b"", f"bytes reached the app: {env.backend_app.data!r}"


def test_allowed_peer_reaches_the_app_positive_control(env: Refusals) -> None:
    """The same client, with a frontend certificate: the payload does arrive."""
    _s_client(env.backend_in, _mesh_cert(env, "frontend"), wait_for_close=False)
    wait_until(lambda: env.backend_app.data == PAYLOAD, 10, "the payload at the backend app")


def test_no_client_certificate_is_refused(env: Refusals) -> None:
    n = len(refusals(env.backend))
    out = _s_client(env.backend_in, [])
    r = wait_refusal(env.backend, "certificate_missing", after=n)
    assert r["direction"] == "inbound" and r["message"], r
    _assert_backend_untouched(env)
    assert "recorded" not in out


def test_certificate_from_another_ca_is_refused(env: Refusals) -> None:
    n = len(refusals(env.backend))
    out = _s_client(env.backend_in, _foreign_cert(env))
    r = wait_refusal(env.backend, "tls_handshake_failed", after=n)
    assert r["direction"] == "inbound", r
    _assert_backend_untouched(env)
    assert "recorded" not in out


def test_mesh_service_not_in_allow_from_is_refused(env: Refusals) -> None:
    n = len(refusals(env.backend))
    out = _s_client(env.backend_in, _mesh_cert(env, "rogue"))
    r = wait_refusal(env.backend, "peer_not_allowed", after=n,
                     peer_spiffe_id="spiffe://meshshield.local/shop/rogue")
    assert "allow_from" in r["message"], r
    _assert_backend_untouched(env)
    assert "recorded" not in out
    assert env.backend.get("/connections").json()["connections"] == []


def test_outbound_route_to_the_wrong_service_is_refused(env: Refusals) -> None:
    """The route names backend, but the sidecar at that address is rogue's: the frontend
    refuses it before forwarding a byte and closes the app's connection."""
    n = len(refusals(env.frontend))
    with connect(env.misrouted, timeout=10) as s:
        s.sendall(PAYLOAD)
        wait_until(lambda: closed_by_peer(s), 10, "the app connection to be closed")
    r = wait_refusal(env.frontend, "peer_not_allowed", after=n,
                     peer_spiffe_id="spiffe://meshshield.local/shop/rogue")
    assert r["direction"] == "outbound" and "backend" in r["message"], r
    assert env.rogue_app.data == b"", env.rogue_app.data
    # The correctly routed connection still works.
    with connect(env.to_backend, timeout=10) as s:
        s.sendall(PAYLOAD)
        s.shutdown(1)
        wait_until(lambda: env.backend_app.data == PAYLOAD, 10, "payload via the right route")


def test_refusals_are_counted_by_reason_in_metrics(env: Refusals) -> None:
    for flags, reason in (([], "certificate_missing"),
                          (_foreign_cert(env), "tls_handshake_failed"),
                          (_mesh_cert(env, "rogue"), "peer_not_allowed")):
        n = len(refusals(env.backend))
        _s_client(env.backend_in, flags)
        wait_refusal(env.backend, reason, after=n)
    with connect(env.misrouted, timeout=10) as s:
        wait_until(lambda: closed_by_peer(s), 10, "the misrouted connection to be closed")
    text = env.backend.get("/metrics").body.decode()
    for reason in ("certificate_missing", "tls_handshake_failed", "peer_not_allowed"):
        assert re.search(rf'^meshshield_sidecar_refusals_total\{{direction="inbound",'
                         rf'reason="{reason}"\}} [1-9]', text, re.M), (reason, text)
    assert 'reason="peer_not_allowed"' in env.frontend.get("/metrics").body.decode()
