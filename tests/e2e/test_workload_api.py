"""The SPIFFE Workload API of the sidecar, driven by the PyPI `spiffe` client.

A CAS that caps every certificate at 10 s, so the sidecars renew every ~5 s; two
sidecars (backend, frontend), each with `--workload-api unix:///...` in a folder of the
test's own. py-spiffe's X509Source gets the SVID and bundle and follows renewals on
its one stream; a raw gRPC call without the security header is refused; a JWT-SVID
fetched by the frontend validates at the backend for the audience it named only.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf import json_format
from harness import MESHSHIELD, CasProcess, SidecarProcess
from meshpeers import LOOPBACK, apply, free_ports, make_workload, mesh_policy, status, wait_until
from spiffe import JwtSvid, SpiffeId, WorkloadApiClient, X509Source
from spiffe.workloadapi.errors import ValidateJwtSvidError

from meshshield.sidecar.spiffe_workload import workload_pb2, workload_pb2_grpc

TD = "meshshield.local"


@dataclass
class Env:
    cas: CasProcess
    backend: SidecarProcess
    frontend: SidecarProcess
    backend_sock: Path
    frontend_sock: Path


def _sidecar(cas: CasProcess, service: str, sock: Path, workload: Path | None,
             route: str) -> SidecarProcess:
    extra = ("--workload-api", f"unix://{sock}")
    if service == "backend":
        return SidecarProcess.start(cas, "wl", service, inbound=[route], workload=workload,
                                    extra=extra)
    return SidecarProcess.start(cas, "wl", service, outbound=[route], workload=workload,
                                extra=extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("wlapi")
    cas = CasProcess.start(root / "mesh", "--max-cert-ttl", "10s")
    started: list[SidecarProcess] = []
    try:
        front_wl = make_workload(cas, "frontend-app")
        apply(cas, mesh_policy("wl", backend_m=cas.measurement(),
                               frontend_m=cas.measurement(front_wl)))
        app, inbound, outbound = free_ports(3)
        backend_sock = root / "backend-wl" / "agent.sock"
        frontend_sock = root / "frontend-wl" / "agent.sock"
        backend = _sidecar(cas, "backend", backend_sock, None,
                           f"{LOOPBACK}:{inbound}={LOOPBACK}:{app}")
        started.append(backend)
        frontend = _sidecar(cas, "frontend", frontend_sock, front_wl,
                            f"{LOOPBACK}:{outbound}=backend@{LOOPBACK}:{inbound}")
        started.append(frontend)
        yield Env(cas, backend, frontend, backend_sock, frontend_sock)
    finally:
        for sc in started:
            sc.stop()
        cas.stop()


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def test_socket_is_private_to_the_sidecar(env: Env) -> None:
    st = os.lstat(env.backend_sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(env.backend_sock.parent).st_mode) == 0o700
    assert status(env.backend)["workload_api"]["listening"] == f"unix://{env.backend_sock}"


def test_x509_source_gets_the_svid_and_follows_renewals_on_one_stream(env: Env) -> None:
    source = X509Source(socket_path=f"unix://{env.backend_sock}", timeout_in_seconds=10)
    try:
        svid = source.get_x509_context().default_svid
        assert str(svid.spiffe_id) == f"spiffe://{TD}/wl/backend"
        first = _serial(svid.leaf)
        held = status(env.backend)["identity"]
        assert held["serial"].lstrip("0") == first.lstrip("0")
        bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None and bundle.x509_authorities
        assert any(svid.leaf.issuer == ca.subject for ca in bundle.x509_authorities)
        calls = status(env.backend)["workload_api"]["calls"]
        # The CAS caps certificates at 10 s: the sidecar renews within ~5 s, and the
        # source hears of it on the stream it opened (no new call).
        wait_until(lambda: _serial(source.get_x509_context().default_svid.leaf) != first, 20,
                   "a renewed SVID")
        renewed = source.get_x509_context().default_svid
        assert renewed.leaf.public_key() != svid.leaf.public_key()  # a fresh key each time
        after = status(env.backend)["workload_api"]
        assert after["calls"] == calls, "the source reconnected instead of being pushed to"
        assert after["x509_pushes"] >= 2
    finally:
        source.close()


def test_x509_bundles_stream(env: Env) -> None:
    with WorkloadApiClient(socket_path=f"unix://{env.frontend_sock}") as client:
        bundles = client.fetch_x509_bundles(timeout=10)
        td_bundle = bundles.get_bundle_for_trust_domain(SpiffeId(f"spiffe://{TD}/x").trust_domain)
        assert td_bundle is not None and td_bundle.x509_authorities


def test_a_call_without_the_security_header_is_refused(env: Env) -> None:
    # A raw gRPC call (no SPIFFE client library, hence no workload.spiffe.io header).
    with grpc.insecure_channel(f"unix:{env.backend_sock}") as channel:
        call = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID")(b"", timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(call))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header" in (info.value.details() or "")
        # With the header, the same raw call gets an answer.
        ok = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID")(
            b"", timeout=10, metadata=(("workload.spiffe.io", "true"),))
        assert len(next(iter(ok))) > 100
    assert status(env.backend)["workload_api"]["refused"] >= 1


def test_jwt_svid_validates_for_its_audience_only(env: Env) -> None:
    with WorkloadApiClient(socket_path=f"unix://{env.frontend_sock}") as front, \
            WorkloadApiClient(socket_path=f"unix://{env.backend_sock}") as back:
        token = front.fetch_jwt_svid(audience={"backend-api"}, timeout=10).token
        ok = back.validate_jwt_svid(token, "backend-api", timeout=10)
        assert str(ok.spiffe_id) == f"spiffe://{TD}/wl/frontend"
        with pytest.raises(ValidateJwtSvidError):
            back.validate_jwt_svid(token, "someone-else", timeout=10)
        tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
        with pytest.raises(ValidateJwtSvidError):
            back.validate_jwt_svid(tampered, "backend-api", timeout=10)
        # The library's own verifier agrees, with the JWT bundle from FetchJWTBundles.
        bundles = back.fetch_jwt_bundles(timeout=10)
        jwt_bundle = bundles.get_bundle_for_trust_domain(ok.spiffe_id.trust_domain)
        assert jwt_bundle is not None
        checked = JwtSvid.parse_and_validate(token, jwt_bundle, {"backend-api"})
        assert checked.expiry > time.time()
    # The claims ValidateJWTSVID answers (py-spiffe reads only the token's own): the
    # attestation, as the frontend's certificate carries it.
    with grpc.insecure_channel(f"unix:{env.backend_sock}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        resp = stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="backend-api", svid=token),
            metadata=(("workload.spiffe.io", "true"),), timeout=10)
    claims = json_format.MessageToDict(resp.claims)
    assert resp.spiffe_id == f"spiffe://{TD}/wl/frontend"
    assert claims["simulated"] is True and claims["service"] == "frontend"
    assert claims["session"] == "wl" and len(claims["measurement"]) == 64
    assert claims["aud"] == ["backend-api"] and claims["exp"] - claims["iat"] <= 300


def test_jwt_needs_a_mesh_certificate(env: Env) -> None:
    r = env.cas.post_json("/v1/jwt", {"audience": ["x"]})
    assert r.status == 401 and r.code == "certificate_missing"


def test_unsafe_socket_directories_are_refused(env: Env, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    not_a_socket = tmp_path / "mine"
    not_a_socket.mkdir(mode=0o700)
    (not_a_socket / "agent.sock").write_text("keep me")
    for sock, expect in ((shared / "agent.sock", "writable by others"),
                         (not_a_socket / "agent.sock", "is not a socket")):
        r = subprocess.run(
            [*MESHSHIELD, "sidecar", "--cas", env.cas.url, "--cas-bundle", str(env.cas.bundle),
             "--session", "wl", "--service", "backend", "--platform", "sim",
             "--workload", str(env.cas.workload),
             "--sim-key", str(env.cas.sim_dir / "sim-platform.key"),
             "--admin-listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0=127.0.0.1:1",
             "--workload-api", f"unix://{sock}"],
            capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, r.stderr
        assert expect in r.stderr and "Traceback" not in r.stderr
    assert (not_a_socket / "agent.sock").read_text() == "keep me"
