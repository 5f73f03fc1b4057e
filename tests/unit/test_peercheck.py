"""The peer check as a table: certificate + trust view in, decision out (no sockets)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from meshshield.errors import MeshError
from meshshield.pki.ca import CaRecord, generate_ca, issue_leaf, serial_hex
from meshshield.pki.keys import generate_p256
from meshshield.policy import PeerRef, Tolerance
from meshshield.sidecar.peercheck import TrustView, check_peer

NOW = datetime.now(UTC)
CA_CERT, CA_KEY = generate_ca("mesh.test", NOW)
CA = CaRecord(CA_CERT, CA_KEY, "active")
M1 = "11" * 32
M2 = "22" * 32


def leaf(session: str = "shop", service: str = "web", *, td: str = "mesh.test",
         **claims: Any) -> x509.Certificate:
    c = {"platform": "sim", "measurement": M1, "signer": None, "product_id": None,
         "svn": None, "debug": False, "tcb_status": "unknown", "session": session,
         "service": service, "policy_hash": "ab" * 32, "evidence_sha256": "cd" * 32,
         "attested_at": "2026-01-01T00:00:00Z", "simulated": True, **claims}
    ca = CA
    if td != "mesh.test":
        cert, key = generate_ca(td, NOW)
        ca = CaRecord(cert, key, "active")
    return issue_leaf(ca, generate_p256().public_key(),
                      spiffe_id=f"spiffe://{td}/{session}/{service}", dns=[],
                      not_before=NOW - timedelta(minutes=1), not_after=NOW + timedelta(hours=1),
                      claims=c)


def view(**kw: Any) -> TrustView:
    base: dict[str, Any] = dict(
        trust_domain="mesh.test", session="shop", epoch=3, exists=True,
        allow_from={"api": (PeerRef.from_text("web"), PeerRef.from_text("ops/admin"))},
        tolerate=frozenset({Tolerance.SIMULATION}), ignore_advisories=(),
        revoked_serials=frozenset(), revoked_measurements=frozenset(),
    )
    base.update(kw)
    return TrustView(**base)


REVOKED_LEAF = leaf()

CASES: list[tuple[str, x509.Certificate | None, TrustView, str, tuple[str, str] | None,
                  str | None]] = [
    ("allowed inbound", leaf(), view(), "inbound", None, None),
    ("allowed cross-session", leaf("ops", "admin"), view(), "inbound", None, None),
    ("no certificate", None, view(), "inbound", None, "certificate_missing"),
    ("not in allow_from", leaf("shop", "batch"), view(), "inbound", None, "peer_not_allowed"),
    ("other session same name", leaf("other", "web"), view(), "inbound", None,
     "peer_not_allowed"),
    ("other trust domain", leaf(td="evil.test"), view(), "inbound", None, "peer_not_allowed"),
    ("serial revoked", REVOKED_LEAF, view(revoked_serials=frozenset({serial_hex(REVOKED_LEAF)})),
     "inbound", None, "revoked"),
    ("measurement revoked", leaf(), view(revoked_measurements=frozenset({M1})), "inbound", None,
     "revoked"),
    ("other measurement revoked", leaf(), view(revoked_measurements=frozenset({M2})),
     "inbound", None, None),
    ("simulation not tolerated locally", leaf(), view(tolerate=frozenset()), "inbound", None,
     "simulation_not_tolerated"),
    ("debug peer", leaf(debug=True), view(), "inbound", None, "debug_not_tolerated"),
    ("debug tolerated", leaf(debug=True),
     view(tolerate=frozenset({Tolerance.SIMULATION, Tolerance.DEBUG_MODE})), "inbound", None,
     None),
    ("session deleted", leaf(), view(exists=False), "inbound", None, "peer_not_allowed"),
    ("outbound expected peer", leaf("shop", "api"), view(), "outbound", ("shop", "api"), None),
    ("outbound wrong peer", leaf("shop", "web"), view(), "outbound", ("shop", "api"),
     "peer_not_allowed"),
]


@pytest.mark.parametrize(("name", "cert", "tv", "direction", "expected", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_peer_check(name: str, cert: x509.Certificate | None, tv: TrustView, direction: str,
                    expected: tuple[str, str] | None, reason: str | None) -> None:
    if reason is None:
        info = check_peer(cert, tv, local_service="api", direction=direction, expected=expected)
        assert cert is not None and info.serial == serial_hex(cert)
        return
    with pytest.raises(MeshError) as e:
        check_peer(cert, tv, local_service="api", direction=direction, expected=expected)
    assert e.value.reason.value == reason, e.value.message
    assert e.value.message


def test_snapshot_round_trip() -> None:
    snap = {"epoch": 7, "trust_domain": "mesh.test", "session": "shop", "exists": True,
            "policy_hash": "ab", "services": {"api": {"allow_from": ["web", "*"]}},
            "tolerate": ["simulation"], "ignore_advisories": "*",
            "revoked_serials": ["ff"], "revoked_measurements": [M1], "bundle": ""}
    v = TrustView.from_snapshot(snap)
    assert v.epoch == 7 and v.ignore_advisories == "*"
    assert [str(r) for r in v.allow_from["api"]] == ["web", "*"]
    with pytest.raises(ValueError, match="malformed"):
        TrustView.from_snapshot({"epoch": "x"})
