"""`POST /v1/cas/kek` on a real, self-attesting sim CAS (SQLite, its KEK from a file, and
`--expect`: a CAS with a KEK file may hand it to attested replicas), driven by the
requesting side's own code (`kekstore.recover_from_peer`) and by hand:

- the right evidence gets the KEK (encrypted to the key it bound), and it is the CAS's;
- evidence bound to another key, a used nonce, another measurement: refused, audited;
- a malformed request: 400, counted in /metrics, not audited;
- a CAS started without --expect releases to no one;
- a TLS proxy in front of the replica: the requester refuses it (not the attested key);
- `--peer` beside `--kek-file` is a usage error.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import CasProcess, run_cli
from test_cas_verify import TlsProxy, _self_signed, cas_workload, write_expect

from meshshield.attestation.claims import Platform
from meshshield.attestation.measure import measure_paths
from meshshield.attestation.sim import load_sim_private_key, load_sim_public_key, make_sim_evidence
from meshshield.attestation.verify import VerifierConfig
from meshshield.cas.kekstore import (
    PeerRefused,
    parse_recovery_answer,
    peer_report_data,
    recover_from_peer,
)
from meshshield.cas.kekwrap import unwrap_with_key
from meshshield.casverify import load_expectation
from meshshield.pki.keys import generate_p256, spki_der
from meshshield.pki.seal import load_kek


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasProcess]:
    root = tmp_path_factory.mktemp("kekrelease")
    app = cas_workload(root)
    expect = write_expect(root / "cas.expect.yaml", measure_paths([app]))
    c = CasProcess.start(root, "--platform", "sim", "--workload", str(app), "--sim-key",
                         str(root / "sim" / "sim-platform.key"), "--expect", str(expect))
    yield c
    c.stop()


def _audit(cas: CasProcess) -> list[tuple[str, str]]:
    db = sqlite3.connect(cas.data / "cas.db")
    try:
        return [(str(a), str(d)) for a, d in db.execute(
            "SELECT action, detail FROM audit WHERE action LIKE 'kek-%' ORDER BY id")]
    finally:
        db.close()


def _requester(cas: CasProcess, measurement: str | None = None,
               bind: Callable[[bytes], bytes] = lambda rd: rd) -> Callable[[bytes], object]:
    key = load_sim_private_key(cas.sim_dir / "sim-platform.key")
    m = measurement or measure_paths([cas.root / "cas-app"])
    return lambda rd: make_sim_evidence(key, m, bind(rd))


def _verifier(cas: CasProcess) -> VerifierConfig:
    return VerifierConfig(sim_platform_keys=(
        load_sim_public_key(cas.sim_dir / "sim-platform.pub.pem"),))


def _expect(cas: CasProcess):  # type: ignore[no-untyped-def]
    return load_expectation(str(cas.root / "cas.expect.yaml"))


def test_the_right_evidence_gets_the_cas_kek(cas: CasProcess) -> None:
    kek, peer = recover_from_peer(cas.url, _requester(cas), Platform.SIM, _expect(cas),
                                  _verifier(cas))
    assert kek == load_kek(cas.kek)
    assert peer.claims.measurement == measure_paths([cas.root / "cas-app"])
    release = [d for a, d in _audit(cas) if a == "kek-release"][-1]
    assert "127.0.0.1 key sha256:" in release and "evidence sha256:" in release


def test_evidence_bound_to_another_key_is_refused_and_audited(cas: CasProcess) -> None:
    with pytest.raises(PeerRefused) as e:
        recover_from_peer(cas.url, _requester(cas, bind=lambda rd: bytes(64)), Platform.SIM,
                          _expect(cas), _verifier(cas))
    assert e.value.reason.value == "report_data_mismatch"
    assert "report_data_mismatch" in _audit(cas)[-1][1] and _audit(cas)[-1][0] == "kek-refused"


def test_another_measurement_is_refused_and_audited(cas: CasProcess) -> None:
    with pytest.raises(PeerRefused) as e:
        recover_from_peer(cas.url, _requester(cas, "ee" * 32), Platform.SIM, _expect(cas),
                          _verifier(cas))
    assert e.value.reason.value == "measurement_not_allowed"
    action, detail = _audit(cas)[-1]
    assert action == "kek-refused" and "ee" * 32 in detail


def test_a_nonce_is_good_for_one_release(cas: CasProcess) -> None:
    nonce = cas.post_json("/v1/attest/nonce", {}).json()["nonce"]
    key = generate_p256()
    spki = spki_der(key.public_key())
    rd = peer_report_data(base64.b64decode(nonce), hashlib.sha256(spki).digest())
    body = {"nonce": nonce, "platform": "sim", "evidence": _requester(cas)(rd),
            "key": base64.b64encode(spki).decode()}
    first = cas.post_json("/v1/cas/kek", body)
    assert first.status == 200, first.body
    blob, fp = parse_recovery_answer(first.body, "the CAS")
    assert fp == cas.ca_fingerprint
    assert unwrap_with_key(blob, key, b"peer:" + base64.b64decode(nonce)) == load_kek(cas.kek)
    again = cas.post_json("/v1/cas/kek", body)
    assert again.status == 403 and again.code == "nonce_invalid"
    assert _audit(cas)[-1][0] == "kek-refused" and "nonce_invalid" in _audit(cas)[-1][1]


def test_malformed_requests_are_counted_not_audited(cas: CasProcess) -> None:
    before = len(_audit(cas))
    for body in ({"nonce": "x"}, {"nonce": "x", "platform": "sim", "evidence": {},
                                  "key": "AAAA"}, [1]):
        r = cas.post_json("/v1/cas/kek", body)
        assert r.status == 400 and r.code == "bad_request", r.body
    r = cas.request("POST", "/v1/cas/kek", b"x" * 600_000,
                    headers={"Content-Type": "application/json"})
    assert r.status == 413 and r.code == "body_too_large"
    assert len(_audit(cas)) == before
    metrics = cas.get("/metrics").body.decode()
    assert 'meshshield_cas_kek_requests_total{result="malformed"} 3.0' in metrics
    assert 'meshshield_cas_kek_requests_total{result="released"}' in metrics


def test_a_cas_without_expect_releases_to_no_one(tmp_path: Path) -> None:
    app = cas_workload(tmp_path)
    c = CasProcess.start(tmp_path, "--platform", "sim", "--workload", str(app), "--sim-key",
                         str(tmp_path / "sim" / "sim-platform.key"))
    try:
        expect = load_expectation(str(write_expect(tmp_path / "e.yaml",
                                                   measure_paths([app]))))
        with pytest.raises(PeerRefused) as e:
            recover_from_peer(c.url, _requester(c), Platform.SIM, expect, _verifier(c))
        assert e.value.reason.value == "forbidden" and "without --expect" in e.value.message
    finally:
        c.stop()


def test_a_tls_proxy_in_front_of_the_replica_is_refused(cas: CasProcess,
                                                        tmp_path: Path) -> None:
    host, port = cas.url.removeprefix("https://").rsplit(":", 1)
    proxy = TlsProxy((host, int(port)), *_self_signed(tmp_path))
    released = len([a for a, _ in _audit(cas) if a == "kek-release"])
    try:
        with pytest.raises(PeerRefused) as e:
            recover_from_peer(f"https://127.0.0.1:{proxy.port}", _requester(cas),
                              Platform.SIM, _expect(cas), _verifier(cas))
        assert e.value.reason.value == "report_data_mismatch"
        assert "terminates TLS" in e.value.message and proxy.relayed >= 1
    finally:
        proxy.close()
    assert len([a for a, _ in _audit(cas) if a == "kek-release"]) == released


def test_peer_with_a_kek_file_is_a_usage_error(tmp_path: Path) -> None:
    r = run_cli("cas", "serve", "--data", str(tmp_path / "d"), "--kek-file",
                str(tmp_path / "k"), "--peer", "https://127.0.0.1:1")
    assert r.returncode == 2 and "attested CAS" in r.stderr


def test_refusals_are_audited_at_a_bounded_rate(cas: CasProcess) -> None:
    """Anyone may ask: the audit log takes at most REFUSAL_AUDITS refusals a minute, the
    metrics count them all."""
    from meshshield.cas.kekstore import REFUSAL_AUDITS

    evidence = _requester(cas)(bytes(64))  # bound to nothing we send: refused
    before = len([a for a, _ in _audit(cas) if a == "kek-refused"])
    spki = base64.b64encode(spki_der(generate_p256().public_key())).decode()
    for _ in range(REFUSAL_AUDITS + 5):
        nonce = cas.post_json("/v1/attest/nonce", {}).json()["nonce"]
        r = cas.post_json("/v1/cas/kek", {"nonce": nonce, "platform": "sim",
                                          "evidence": evidence, "key": spki})
        assert r.code == "report_data_mismatch"
    after = len([a for a, _ in _audit(cas) if a == "kek-refused"])
    # the earlier tests' refusals opened this minute's window: it is full now
    assert after - before < REFUSAL_AUDITS + 5 and after <= 2 * REFUSAL_AUDITS
    metrics = cas.get("/metrics").body.decode()
    line = next(x for x in metrics.splitlines()
                if x.startswith('meshshield_cas_kek_requests_total{result="refused"}'))
    assert float(line.split()[-1]) >= REFUSAL_AUDITS + 5
