"""What a caller without standing learns, and what a workload may claim (issue 9,
item 19): session and service names stay hidden from unauthenticated callers and from
keys that may not read them, and a sidecar's report speaks only for its own
connections. Real CAS processes and real mesh certificates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from attested_peer import attested_peer
from faultlib import warm_up
from harness import CasProcess, HttpResult
from meshpeers import DATAPLANES, Mesh, connect, roundtrip, wait_until

from meshshield.adminauth import write_admin_key
from meshshield.attestation.sim import generate_sim_platform_key, write_sim_platform_key
from meshshield.attestclient import AttestRequest, build_attest_body
from meshshield.pki.keys import generate_p256

if TYPE_CHECKING:
    from conftest import LeakCheck

TD = "meshshield.local"


@pytest.fixture
def cas(fault_cas: CasProcess, leak_check: LeakCheck) -> CasProcess:
    """The fault CAS with session shop, warmed up by one attestation and watched for
    leaks from here."""
    assert fault_cas.apply_policy(fault_cas.sim_policy("shop")).returncode == 0
    assert fault_cas.attest("shop", "backend").status == 200
    leak_check.watch(fault_cas)
    return fault_cas


def error(r: HttpResult) -> tuple[int, str, str]:
    err = r.json()["error"]
    return r.status, str(err["code"]), str(err["message"])


# -- admin keys that may not read a session ---------------------------------------------


def test_unauthorised_key_cannot_tell_existing_sessions(cas: CasProcess, tmp_path: Path) -> None:
    # A key that may act (it is named in its own session's access_policy), but not on shop.
    tenant, tenant_fp = write_admin_key(tmp_path / "tenant")
    keys = f'[CREATOR, "{tenant_fp}"]'
    extra = f"access_policy:\n  read: {keys}\n  update: {keys}\n"
    assert cas.apply_policy(cas.sim_policy("mine", extra=extra)).returncode == 0
    assert cas.get("/v1/sessions/mine", admin=tenant).status == 200

    for method, suffix, body in [
        ("GET", "", b""),
        ("PUT", "", b"name: x\n"),
        ("DELETE", "", b""),
        ("POST", "/revocations", b'{"serial": "01"}'),
    ]:
        answers = []
        for name in ("shop", "nope"):
            r = cas.request(method, f"/v1/sessions/{name}{suffix}", body, admin=tenant)
            status, code, message = error(r)
            answers.append((status, code, message.replace(name, "NAME")))
        assert answers[0] == answers[1], (method, answers)
        assert answers[0][:2] == (403, "forbidden"), (method, answers)
    # A CAS admin, who may create any session, still hears which ones are missing.
    assert error(cas.get("/v1/sessions/nope", admin=True))[1] == "session_unknown"


# -- attestation without valid evidence ---------------------------------------------------


def forged_body(cas: CasProcess, tmp_path: Path, session: str, service: str) -> dict[str, Any]:
    """A well-formed attest body signed by a sim platform key the CAS does not trust."""
    rogue = tmp_path / "rogue-sim"
    if not rogue.exists():
        write_sim_platform_key(generate_sim_platform_key(), rogue)
    nonce = cas.post_json("/v1/attest/nonce", {}).json()["nonce"]
    req = AttestRequest(session=session, service=service, platform="sim",
                        workload=(str(cas.workload),), sim_key=rogue / "sim-platform.key")
    return build_attest_body(req, generate_p256(), nonce)


def test_attest_without_valid_evidence_reveals_no_session_or_service(
    cas: CasProcess, tmp_path: Path
) -> None:
    answers = {}
    for session, service in [("shop", "backend"), ("shop", "database"), ("nope", "backend")]:
        r = cas.post_json("/v1/attest", forged_body(cas, tmp_path, session, service))
        status, code, message = error(r)
        assert "frontend" not in message and "backend" not in message, message
        answers[(session, service)] = (status, code)
        # A nonce that was never issued: refused on the nonce, whatever is named.
        body = forged_body(cas, tmp_path, session, service)
        body["nonce"] = "A" * 43 + "="
        assert error(cas.post_json("/v1/attest", body))[1] == "nonce_invalid"
    assert len(set(answers.values())) == 1, answers
    assert next(iter(answers.values()))[1] not in ("session_unknown", "service_unknown")

    # With valid evidence, an unknown service is named as such, but the others are not listed.
    status, code, message = error(cas.attest("shop", "database"))
    assert code == "service_unknown" and "frontend" not in message, message


def test_metrics_do_not_name_sessions(cas: CasProcess) -> None:
    assert cas.apply_policy(cas.sim_policy("secret-tenant")).returncode == 0
    assert cas.attest("secret-tenant", "backend").status == 200
    cas.attest("secret-tenant", "database")
    text = cas.get("/metrics").body.decode()
    assert "secret-tenant" not in text
    assert 'meshshield_cas_certificates_issued_total{platform="sim",simulated="True"}' in text


# -- reports ---------------------------------------------------------------------------------


def identity(cas: CasProcess, session: str, service: str) -> tuple[Path, Path, str]:
    peer = attested_peer(cas, session, service)
    return peer.cert, peer.key, peer.serial


def entry(direction: str, session: str, service: str, serial: str, **kw: Any) -> dict[str, Any]:
    return {"direction": direction, "peer_spiffe_id": f"spiffe://{TD}/{session}/{service}",
            "peer_service": f"{session}/{service}", "cert_serial": serial, "platform": "sim",
            "simulated": True, "bytes_in": 10, "bytes_out": 10,
            "opened_at": "2026-01-01T00:00:00Z", **kw}


def test_report_cannot_fabricate_other_sidecars_edges(cas: CasProcess) -> None:
    assert cas.apply_policy(cas.sim_policy("evil")).returncode == 0
    _, _, shop_frontend_serial = identity(cas, "shop", "frontend")
    _, _, shop_backend_serial = identity(cas, "shop", "backend")
    _, _, evil_frontend_serial = identity(cas, "evil", "frontend")
    cert, key, _ = identity(cas, "evil", "backend")
    conns = [
        # Fabricated: shop's services never connected to evil/backend (no policy allows it).
        entry("inbound", "shop", "frontend", shop_frontend_serial),
        entry("outbound", "shop", "backend", shop_backend_serial),
        # Fabricated: a peer with a certificate this CAS never issued.
        entry("inbound", "evil", "frontend", "deadbeef"),
        # Fabricated: a connection to itself.
        entry("outbound", "evil", "backend", evil_frontend_serial),
        # Its own, real-looking connection: allowed by policy, a certificate the CAS issued.
        entry("inbound", "evil", "frontend", evil_frontend_serial),
    ]
    r = cas.request("POST", "/v1/reports", json.dumps({"connections": conns}).encode(),
                    ctx=cas.ssl_context(cert, key))
    assert r.status == 202, r.body
    assert r.json()["accepted"] == 1 and r.json()["dropped"] == 4, r.json()

    edges = cas.get("/v1/edges", admin=True).json()["edges"]
    assert [(e["src"], e["dst"]) for e in edges] == [
        (f"spiffe://{TD}/evil/frontend", f"spiffe://{TD}/evil/backend")], edges


@pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)
def test_real_sidecars_reports_still_make_their_edge(
        cas: CasProcess, echo_port: int, meshes: Callable[..., Mesh],
        leak_check: LeakCheck) -> None:
    """The filter keeps what real sidecars report: a live frontend -> backend connection."""
    fast = cas.root / "fast-reports.yaml"
    fast.write_text("report_interval: 1s\n")
    mesh = meshes(cas, "shop", {"echo": echo_port}, backend_extra=("--config", str(fast)),
                  frontend_extra=("--config", str(fast)))
    warm_up(mesh.outbound["echo"])
    # The CAS's baseline again, now that the sidecars hold their event streams.
    for p in (cas, mesh.backend, mesh.frontend):
        leak_check.watch(p)
    with connect(mesh.outbound["echo"]) as s:
        assert roundtrip(s, b"ping") == b"ping"

        def edge() -> list[Any] | None:
            found = cas.get("/v1/edges", admin=True).json()["edges"]
            return found or None

        edges = wait_until(edge, 20, "the live connection's edge in /v1/edges")
    assert [(e["src"], e["dst"], e["attested"]) for e in edges] == [
        (f"spiffe://{TD}/shop/frontend", f"spiffe://{TD}/shop/backend", True)], edges
    leak_check.verify()  # here: the sidecars started after the fixture's leak check
