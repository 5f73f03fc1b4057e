"""The CA key lives only in attested CAS processes: real CAS replicas (sim attestation,
each on its own sim "chip") on a real PostgreSQL, none with a KEK file.

- the first replica initialises the KEK (sealed to its chip and measurement, and wrapped
  to a recovery key); the second and third get it by peer recovery over attested TLS
  and serve the same CA; the audit log records each release (to whom, which evidence);
- a replica whose measurement fails --expect is refused the KEK (the audit log says so)
  and does not start; one with no --peer on a new chip does not start either and names
  the recovery paths;
- two replicas starting at the same instant on an empty database: one initialises, the
  other recovers from it;
- all replicas gone: a CAS on a new chip refuses to start naming the recovery options;
  `cas recover --recovery-key-private` restores service with the same CA fingerprint,
  and from then on that chip starts from its own sealed KEK.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import CasProcess, run_cli

from meshshield.adminauth import write_admin_key
from meshshield.attestation.measure import measure_paths
from meshshield.attestation.sim import generate_sim_platform_key, write_sim_platform_key
from meshshield.cas.pg_store import PostgresStore
from meshshield.cas.recoverykey import write_recovery_key

CHIPS = ("a", "b", "c", "d", "evil")


@dataclass
class Mesh:
    root: Path
    url: str
    admin_dir: Path
    admin_fp: str
    app: Path
    evil_app: Path
    expect: Path
    recovery_dir: Path
    recovery_fp: str

    def chip(self, name: str) -> Path:
        return self.root / "chips" / name

    def flags(self, chip: str, app: Path | None = None) -> list[str]:
        trust = [x for c in CHIPS for x in
                 ("--trust-sim-platform", str(self.chip(c) / "sim-platform.pub.pem"))]
        return ["--database", self.url, "--platform", "sim", "--workload",
                str(app or self.app), "--sim-key", str(self.chip(chip) / "sim-platform.key"),
                "--expect", str(self.expect), "--recovery-key",
                str(self.recovery_dir / "recovery.pub.pem"), "--peer-timeout", "20s", *trust]

    def replica(self, name: str, chip: str, *extra: str, command: str = "serve"
                ) -> CasProcess:
        root = self.root / name
        root.mkdir(parents=True, exist_ok=True)
        cas = CasProcess(root, root / "data", self.admin_dir, self.admin_fp, self.chip(chip),
                         self.app, extra_args=(*self.flags(chip), *extra), kek_file=False,
                         command=command)
        cas.launch()
        return cas

    def serve_until_exit(self, name: str, chip: str, *extra: str, app: Path | None = None
                         ) -> tuple[int, str]:
        data = self.root / name / "data"
        r = run_cli("cas", "serve", "--data", str(data), "--listen", "127.0.0.1:0",
                    *self.flags(chip, app), *extra, timeout=90)
        return r.returncode, r.stdout + r.stderr

    def audit(self) -> list[tuple[str, str]]:
        store = PostgresStore(self.url)
        try:
            return [(a.action, a.detail) for a in store.audit_log(500)]
        finally:
            store.close()


@pytest.fixture
def mesh(tmp_path: Path, pg_url: str) -> Mesh:
    for c in CHIPS:
        write_sim_platform_key(generate_sim_platform_key(), tmp_path / "chips" / c)
    _, fp = write_admin_key(tmp_path / "admin")
    app, evil = tmp_path / "cas-app", tmp_path / "cas-app-evil"
    app.mkdir()
    evil.mkdir()
    (app / "cas.bin").write_text("the CAS build\n")
    (evil / "cas.bin").write_text("the CAS build, patched\n")
    expect = tmp_path / "cas.expect.yaml"
    expect.write_text(f'tee:\n  - platform: sim\n    measurement: "{measure_paths([app])}"\n'
                      "security:\n  attestation:\n    tolerate: [simulation]\n")
    _, _, rfp = write_recovery_key(tmp_path / "recovery")
    return Mesh(tmp_path, pg_url, tmp_path / "admin", fp, app, evil, expect,
                tmp_path / "recovery", rfp)


@pytest.fixture
def replicas(mesh: Mesh) -> Iterator[list[CasProcess]]:
    started: list[CasProcess] = []
    yield started
    for c in started:
        c.stop()


def self_reported(cas: CasProcess) -> dict[str, object]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    body = json.dumps({"nonce": base64.b64encode(os.urandom(32)).decode()}).encode()
    req = urllib.request.Request(cas.url + "/v1/cas/attestation", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:  # noqa: S310 - https
        doc = json.loads(r.read())
    out: dict[str, object] = doc["self_reported"]
    return out


def test_three_replicas_peer_recovery_refusal_and_disaster_recovery(
    mesh: Mesh, replicas: list[CasProcess]
) -> None:
    m = measure_paths([mesh.app])
    a = mesh.replica("a", "a")
    replicas.append(a)
    assert any(line.startswith("kek initialised") for line in a.stdout_lines), a.stdout_lines
    assert not list(mesh.root.rglob("*.kek"))  # no KEK file anywhere
    b = mesh.replica("b", "b", "--peer", a.url)
    replicas.append(b)
    c = mesh.replica("c", "c", "--peer", b.url, "--peer", a.url)
    replicas.append(c)
    assert a.ca_fingerprint == b.ca_fingerprint == c.ca_fingerprint
    assert any(line.startswith(f"kek peer {a.url}") for line in b.stdout_lines)
    assert any(line.startswith("kek peer ") for line in c.stdout_lines)
    kek = self_reported(b)["kek"]
    assert isinstance(kek, dict) and kek["source"] == f"peer {a.url}"
    assert "SIMULATED" in str(kek["sealing"])
    st = b.cli("status")
    assert st.returncode == 0, st.stderr
    assert f"CAS: platform sim SIMULATED (no hardware guarantee), measurement {m}" in st.stdout
    assert f"CAS key-encryption key: from peer {a.url}; sealing key: SIMULATED" in st.stdout
    # every replica serves the one CA: attestation works through each of them
    for cas in (a, b, c):
        cas.bundle.read_text()
        assert cas.get("/v1/ready").status == 200
    audit = mesh.audit()
    releases = [d for act, d in audit if act == "kek-release"]
    assert len(releases) == 2, audit
    for d in releases:
        assert f"measurement {m}" in d and "evidence sha256:" in d and "SIMULATED" in d
        assert "key sha256:" in d and "127.0.0.1" in d
    assert ("kek-init", ) == tuple(act for act, _ in audit if act == "kek-init")
    sealed = [d for act, d in audit if act == "kek-wrap" and "tee-sealed" in d]
    assert len(sealed) == 2  # b's and c's chips; a's is part of kek-init

    # a replica running other code: refused the KEK, audited, does not start
    rc, out = mesh.serve_until_exit("evil", "evil", "--peer", a.url, app=mesh.evil_app)
    assert rc == 1, out
    assert "measurement_not_allowed" in out and "ca-fingerprint" not in out
    assert "listening" not in out
    refusals = [d for act, d in mesh.audit() if act == "kek-refused"]
    assert len(refusals) == 1 and "measurement_not_allowed" in refusals[0]
    assert measure_paths([mesh.evil_app]) in refusals[0] and "evidence sha256:" in refusals[0]
    assert len([d for act, d in mesh.audit() if act == "kek-release"]) == 2

    # a new chip with no peer to ask: refuses, naming every recovery path
    rc, out = mesh.serve_until_exit("lonely", "d")
    assert rc == 1 and "listening" not in out
    assert "--peer" in out and "cas recover --recovery-key-private" in out
    assert f"sha256:{mesh.recovery_fp}" in out

    # all replicas gone
    for cas in replicas:
        assert cas.stop() == 0
    fp = a.ca_fingerprint
    rc, out = mesh.serve_until_exit("d", "d", "--peer", a.url, "--peer-timeout", "2s")
    assert rc == 1, out
    assert "peer recovery failed within 2s" in out and "cannot reach" in out
    assert "cas recover --recovery-key-private" in out
    d = mesh.replica("d", "d", "--recovery-key-private", str(mesh.recovery_dir),
                     command="recover")
    replicas.append(d)
    assert d.ca_fingerprint == fp
    assert any(line.startswith(f"kek recovery-key sha256:{mesh.recovery_fp}")
               for line in d.stdout_lines)
    assert d.get("/v1/ready").status == 200
    assert any(act == "kek-recover" and mesh.recovery_fp in det for act, det in mesh.audit())
    # that chip now starts on its own sealed KEK, no recovery key needed
    d.stop()
    d2 = mesh.replica("d", "d")
    replicas.append(d2)
    assert d2.ca_fingerprint == fp
    assert any(line.startswith("kek tee-sealed") for line in d2.stdout_lines)


def test_replicas_starting_together_on_an_empty_database_share_one_kek(
    mesh: Mesh, replicas: list[CasProcess]
) -> None:
    """Two replicas on two chips start at the same instant, each naming the other as its
    peer: one initialises, the other recovers from it; both serve one CA."""
    import threading

    from harness import free_port

    ports = {"a": free_port(), "b": free_port()}
    procs: dict[str, CasProcess] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def start(name: str, other: str) -> None:
        barrier.wait()
        try:
            procs[name] = mesh.replica(name, name, "--listen", f"127.0.0.1:{ports[name]}",
                                       "--peer", f"https://127.0.0.1:{ports[other]}")
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=start, args=p) for p in (("a", "b"), ("b", "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    replicas.extend(procs.values())
    assert errors == [] and len(procs) == 2
    a, b = procs["a"], procs["b"]
    assert a.ca_fingerprint == b.ca_fingerprint
    sources = sorted(next(x.split(";")[0] for x in c.stdout_lines if x.startswith("kek "))
                     for c in (a, b))
    assert sources[0] == "kek initialised" and sources[1].startswith("kek peer https://")
    assert [act for act, _ in mesh.audit()].count("kek-init") == 1
