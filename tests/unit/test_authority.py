"""The CAS's decisions in-process, with a clock the test moves (no sockets)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from meshshield.attestation.measure import measure_paths
from meshshield.attestation.sim import generate_sim_platform_key
from meshshield.attestclient import AttestRequest, build_attest_body
from meshshield.cas.authority import Authority, CasConfig
from meshshield.cas.store import IssuedCertificate
from meshshield.cas.stores import open_store
from meshshield.clock import FixedClock
from meshshield.errors import MeshError, Reason
from meshshield.pki.keys import generate_p256, spki_fingerprint

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ADMIN = "a" * 64


@pytest.fixture
def world(tmp_path: Path, store_location: str) -> Iterator[tuple[Authority, FixedClock, Path]]:
    sim = generate_sim_platform_key()
    from meshshield.attestation.sim import write_sim_platform_key

    write_sim_platform_key(sim, tmp_path / "sim")
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("print(1)\n")
    clock = FixedClock(T0)
    cfg = CasConfig(
        data_dir=tmp_path / "data", admin_fingerprints=frozenset({ADMIN}),
        sim_platform_keys=(sim.public_key(),), nonce_ttl=30, kek=b"k" * 32, clock=clock,
    )
    cfg.data_dir.mkdir()
    a = Authority(cfg, open_store(store_location or None, cfg.data_dir))
    a.start()
    m = measure_paths([app])
    a.create_session(ADMIN, f"""name: shop
version: "1"
predecessor: null
services:
  - name: api
    tee: [{{platform: sim, measurement: "{m}"}}]
    allow_from: [web]
    cert_ttl: 1h
  - name: web
    tee: [{{platform: sim, measurement: "{m}"}}]
security: {{attestation: {{tolerate: [simulation]}}}}
""".encode())
    yield a, clock, tmp_path
    a.store.close()


def _req(root: Path, service: str) -> AttestRequest:
    return AttestRequest("shop", service, "sim", (str(root / "app"),),
                         root / "sim" / "sim-platform.key")


def _attest(a: Authority, root: Path, service: str = "api") -> dict[str, object]:
    key = generate_p256()
    nonce = a.new_nonce()["nonce"]
    body = build_attest_body(
        _req(root, service),
        key, nonce)
    return a.attest(body)


def test_nonce_expires_by_the_injected_clock(world: tuple[Authority, FixedClock, Path]) -> None:
    a, clock, root = world
    key = generate_p256()
    n = a.new_nonce()
    assert n["expires_at"] == "2026-03-01T12:00:30Z"
    body = build_attest_body(
        _req(root, "api"),
        key, n["nonce"])
    clock.advance(30)
    with pytest.raises(MeshError) as e:
        a.attest(body)
    assert e.value.reason is Reason.NONCE_INVALID and "expired" in e.value.message


def test_certificate_lifetime_follows_the_clock(world: tuple[Authority, FixedClock, Path]) -> None:
    a, _clock, root = world
    r = _attest(a, root)
    assert r["expires_at"] == "2026-03-01T13:00:00Z"
    assert r["claims"]["attested_at"] == "2026-03-01T12:00:00Z"  # type: ignore[index]


def test_max_cert_ttl_caps_the_policy(world: tuple[Authority, FixedClock, Path]) -> None:
    a, _clock, root = world
    a.config.max_cert_ttl = 10
    assert _attest(a, root)["expires_at"] == "2026-03-01T12:00:10Z"


def test_every_trust_change_bumps_the_epoch(world: tuple[Authority, FixedClock, Path]) -> None:
    a, _clock, root = world
    e0 = a.epoch
    serial = str(_attest(a, root)["serial"])
    assert a.epoch == e0  # issuing changes no one's trust
    a.revoke(ADMIN, "shop", {"serial": serial})
    assert a.epoch == e0 + 1
    snap = a.trust_snapshot("shop")
    assert snap["revoked_serials"] == [serial] and snap["epoch"] == e0 + 1
    assert snap["services"]["api"]["allow_from"] == ["web"]


def test_revoking_a_serial_of_another_session_is_not_found(
    world: tuple[Authority, FixedClock, Path]
) -> None:
    a, _clock, _root = world
    with pytest.raises(MeshError) as e:
        a.revoke(ADMIN, "shop", {"serial": "abcdef"})
    assert e.value.reason is Reason.NOT_FOUND


def test_ca_rotation_publishes_first_signs_later_and_retires_after_last_leaf(
    world: tuple[Authority, FixedClock, Path]
) -> None:
    a, clock, root = world
    old = a.ca.fingerprint()
    leaf_old = x509.load_pem_x509_certificate(str(_attest(a, root)["certificate"]).encode())
    a.rotate_ca(ADMIN, 600)
    bundle = x509.load_pem_x509_certificates(a.bundle()["bundle"].encode())
    assert len(bundle) == 2  # the next CA is trusted before it signs anything
    leaf = x509.load_pem_x509_certificate(str(_attest(a, root)["certificate"]).encode())
    assert leaf.issuer == leaf_old.issuer  # still the old CA signing
    clock.advance(601)
    a.tick()
    assert a.ca.fingerprint() != old
    leaf_new = x509.load_pem_x509_certificate(str(_attest(a, root)["certificate"]).encode())
    assert leaf_new.issuer != leaf_old.issuer
    states = {c["fingerprint"]: c["state"] for c in a.bundle()["cas"]}
    assert states[old] == "retired"
    # the old CA stays until the last leaf it signed has expired, then leaves the bundle
    # (both old leaves were issued at T0 with a 1 h lifetime)
    clock.advance(3600 - 601 - 5)
    assert len(x509.load_pem_x509_certificates(a.bundle()["bundle"].encode())) == 2
    clock.advance(10)
    assert len(x509.load_pem_x509_certificates(a.bundle()["bundle"].encode())) == 1


def test_only_cas_admins_rotate(world: tuple[Authority, FixedClock, Path]) -> None:
    a, _clock, _root = world
    with pytest.raises(MeshError) as e:
        a.rotate_ca("b" * 64, 600)
    assert e.value.reason is Reason.FORBIDDEN


def test_access_policy_names_readers(world: tuple[Authority, FixedClock, Path]) -> None:
    a, _clock, _root = world
    other = spki_fingerprint(generate_p256().public_key())
    with pytest.raises(MeshError) as e:
        a.read_session(other, "shop")
    assert e.value.reason is Reason.FORBIDDEN
    assert a.read_session(ADMIN, "shop").name == "shop"


def test_a_dns_name_belongs_to_one_session(world: tuple[Authority, FixedClock, Path]) -> None:
    a, _clock, _root = world
    first = a.read_session(ADMIN, "shop").policy.decode()
    taken = first.replace("name: shop", "name: other").replace(
        "allow_from: [web]", "allow_from: [web]\n    dns: [api.shop.example]")
    a.create_session(ADMIN, taken.encode())
    thief = first.replace("name: shop", "name: thief").replace(
        "allow_from: [web]", "allow_from: [web]\n    dns: [api.shop.example]")
    with pytest.raises(MeshError) as e:
        a.create_session(ADMIN, thief.encode())
    assert e.value.reason is Reason.POLICY_INVALID
    assert "other/api" in e.value.message


def test_a_change_parses_only_the_changed_policy_and_unseals_nothing(
    world: tuple[Authority, FixedClock, Path],
) -> None:
    a, _clock, _root = world
    for i in range(5):
        a.create_session(ADMIN, f"""name: t{i}
version: "1"
predecessor: null
services:
  - name: api
    tee: [{{platform: sim, measurement: "{'ab' * 32}"}}]
security: {{attestation: {{tolerate: [simulation]}}}}
""".encode())
    parsed, unsealed = a.stats.policies_parsed, a.ca.keys_unsealed
    rec = a.read_session(ADMIN, "t0")
    a.update_session(ADMIN, "t0", rec.policy.replace(
        b"predecessor: null", f"predecessor: {rec.policy_hash}".encode()) + b"# v2\n")
    a.delete_session(ADMIN, "t1")
    a.revoke(ADMIN, "t2", {"measurement": "cd" * 32})
    assert a.stats.policies_parsed - parsed == 1  # the update's own body, nothing stored
    assert a.ca.keys_unsealed == unsealed
    # Another writer (a replica, the CLI) changed the store: only its session is read.
    other = a.store
    other.update_session("t3", b"""name: t3
version: "1"
predecessor: null
services:
  - name: web
    tee: [{platform: sim, measurement: "%s"}]
security: {attestation: {tolerate: [simulation]}}
""" % (b"ab" * 32), "h-new", a.read_session(ADMIN, "t3").policy_hash, ADMIN, T0)
    assert a.refresh()
    assert a.stats.policies_parsed - parsed == 2
    svc = a.trust_snapshot("t3")["services"]
    assert list(svc) == ["web"]
    assert a.ca.keys_unsealed == unsealed


def test_expired_revocations_leave_the_snapshot_but_stay_in_the_store(
    world: tuple[Authority, FixedClock, Path]
) -> None:
    a, clock, root = world
    serial = str(_attest(a, root)["serial"])  # valid for 1 h
    a.revoke(ADMIN, "shop", {"serial": serial})
    assert a.trust_snapshot("shop")["revoked_serials"] == [serial]
    clock.advance(3600)
    a.tick()
    assert a.trust_snapshot("shop")["revoked_serials"] == []
    assert [r.value for r in a.store.revocations()] == [serial]


def test_a_policy_update_lists_certificates_that_no_longer_pass(
    world: tuple[Authority, FixedClock, Path]
) -> None:
    a, _clock, root = world
    api = str(_attest(a, root, "api")["serial"])
    web = str(_attest(a, root, "web")["serial"])
    rec = a.read_session(ADMIN, "shop")
    text = rec.policy.decode().replace("predecessor: null", f'predecessor: "{rec.policy_hash}"')
    head, _, _ = text.partition("  - name: web\n")
    head = head.replace("allow_from: [web]", "allow_from: []")
    a.update_session(ADMIN, "shop", (head + "security: {attestation: {tolerate: [simulation]}}\n"
                                     ).encode())
    assert a.trust_snapshot("shop")["revoked_serials"] == [web]  # web was removed
    assert a.is_revoked_serial(web) and not a.is_revoked_serial(api)
    a.delete_session(ADMIN, "shop")
    assert a.trust_snapshot("other")["revoked_serials"] == sorted([api, web])  # mesh-wide
    # Serials of the deleted session stay revocable; a stranger may not.
    assert a.revoke(ADMIN, "shop", {"serial": api})["serial"] == api
    with pytest.raises(MeshError) as e:
        a.revoke("b" * 64, "shop", {"serial": web})
    assert e.value.reason is Reason.FORBIDDEN


def test_a_measurement_revoked_in_a_session_stays_in_it(
    world: tuple[Authority, FixedClock, Path]
) -> None:
    a, _clock, root = world
    m = measure_paths([root / "app"])
    serial = str(_attest(a, root)["serial"])
    r = a.revoke(ADMIN, "shop", {"measurement": m})
    assert r["scope"] == "session"
    snap = a.trust_snapshot("shop")
    assert snap["revoked_measurements"] == [] and snap["revoked_serials"] == [serial]
    with pytest.raises(MeshError) as e:
        _attest(a, root)
    assert e.value.reason is Reason.REVOKED
    with pytest.raises(MeshError) as e:
        a.revoke("b" * 64, "shop", {"measurement": m, "mesh_wide": True})
    assert e.value.reason is Reason.FORBIDDEN
    assert a.revoke(ADMIN, "shop", {"measurement": m, "mesh_wide": True})["scope"] == "mesh-wide"
    assert a.trust_snapshot("shop")["revoked_measurements"] == [m]


def test_spiffe_sequence_grows_when_a_retired_ca_leaves_the_bundle_by_time(
        world: tuple[Authority, FixedClock, Path]) -> None:
    """Within one epoch the bundle changes when a CA's activate_at or retire_after
    passes; the SPIFFE bundle's sequence must change with it."""
    a, clock, _ = world
    a.rotate_ca(ADMIN, 60)
    seqs = [a.spiffe_bundle()["spiffe_sequence"]]
    keys = [len(a.spiffe_bundle()["keys"])]
    for _ in range(3):  # the next CA activates, then the old one's leaves run out
        clock.advance(3 * 3600)
        a.tick()
        seqs.append(a.spiffe_bundle()["spiffe_sequence"])
        keys.append(len(a.spiffe_bundle()["keys"]))
    assert seqs == sorted(seqs) and len(set(seqs)) > 1, seqs
    assert keys[-1] < keys[0], keys  # the retired CA did leave
    # Wherever the contents changed, so did the sequence.
    for i in range(1, len(seqs)):
        if keys[i] != keys[i - 1]:
            assert seqs[i] > seqs[i - 1], (seqs, keys)


def _one_service_session(name: str, measurement: str) -> bytes:
    return f"""name: {name}
version: "1"
predecessor: null
services:
  - name: x
    tee: [{{platform: sim, measurement: "{measurement}"}}]
security: {{attestation: {{tolerate: [simulation]}}}}
""".encode()


def _race_before_record(a: Authority, change: Callable[[], object]) -> list[str]:
    """Make `change` (through another replica) happen between this CAS's first decision
    and its record; answers the outcome of every record_issuance, in order."""
    real = a.store.record_issuance
    outcomes: list[str] = []

    def racing(cert: IssuedCertificate, nonce: bytes, nonce_expires: datetime,
               epoch: int) -> tuple[str, int]:
        if not outcomes:
            change()
        got = real(cert, nonce, nonce_expires, epoch)
        outcomes.append(got[0])
        return got

    a.store.record_issuance = racing  # type: ignore[method-assign]
    return outcomes


def _second_replica(a: Authority, root: Path, store_location: str) -> Authority:
    """Another CAS process's Authority on the same store (a replica, or the CLI)."""
    b = Authority(a.config, open_store(store_location or None, a.config.data_dir))
    b.start()
    return b


def test_a_change_committed_between_decision_and_record_is_decided_again(
        world: tuple[Authority, FixedClock, Path], store_location: str) -> None:
    """The measurement is revoked (through another replica) after this CAS decided on its
    view but before it recorded the certificate: the record is refused as stale, the
    view caught up, and the attestation refused on the new view. Nothing is recorded."""
    a, _clock, root = world
    b = _second_replica(a, root, store_location)
    m = measure_paths([root / "app"])
    outcomes = _race_before_record(
        a, lambda: b.revoke(ADMIN, "shop", {"measurement": m}))
    certs = a.store.count_certificates()
    try:
        with pytest.raises(MeshError) as e:
            _attest(a, root)
    finally:
        b.store.close()
    assert e.value.reason is Reason.REVOKED, e.value
    assert outcomes == ["stale"]  # the second decision refused before signing
    assert a.store.count_certificates() == certs


def test_an_unrelated_change_in_between_costs_one_more_decision(
        world: tuple[Authority, FixedClock, Path], store_location: str) -> None:
    a, _clock, root = world
    b = _second_replica(a, root, store_location)
    outcomes = _race_before_record(
        a, lambda: b.create_session(ADMIN, _one_service_session("other", "0" * 64)))
    try:
        r = _attest(a, root)
    finally:
        b.store.close()
    assert outcomes == ["stale", "issued"]
    assert a.store.get_certificate(str(r["serial"])) is not None


def test_a_nonce_is_single_use_even_when_attestations_race(
        world: tuple[Authority, FixedClock, Path]) -> None:
    a, _clock, root = world
    key = generate_p256()
    body = build_attest_body(_req(root, "api"), key, a.new_nonce()["nonce"])
    a.attest(body)
    with pytest.raises(MeshError) as e:
        a.attest(body)
    assert e.value.reason is Reason.NONCE_INVALID and "already used" in e.value.message


def test_a_refusal_is_decided_on_the_newest_view(
        world: tuple[Authority, FixedClock, Path], store_location: str) -> None:
    """A session created a moment ago through another replica, before this CAS's view
    caught up: its service is not refused as unknown."""
    a, _clock, root = world
    b = _second_replica(a, root, store_location)
    m = measure_paths([root / "app"])
    try:
        b.create_session(ADMIN, _one_service_session("fresh", m))
    finally:
        b.store.close()
    assert "fresh" not in a._sessions  # noqa: SLF001 - this CAS has not caught up yet
    req = AttestRequest("fresh", "x", "sim", (str(root / "app"),),
                        root / "sim" / "sim-platform.key")
    r = a.attest(build_attest_body(req, generate_p256(), a.new_nonce()["nonce"]))
    assert r["spiffe_id"] == "spiffe://meshshield.local/fresh/x"
