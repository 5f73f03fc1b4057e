"""One harness of real peers for integration tests: a CAS as a subprocess on a random
loopback port, admin and sim keys, workloads, and clients (the meshshield CLI, a Python
HTTPS client, curl, openssl).

    cas = CasProcess.start(tmp_path)           # keys made, CAS started and ready
    cas.apply_policy(cas.sim_policy("shop"))   # via `meshshield policy apply`
    r = cas.attest("shop", "backend")          # nonce -> sim evidence -> CSR -> cert
    cas.stop()

Nothing here sleeps to wait for a server: readiness is polled with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.adminauth import load_admin_key, sign_request, write_admin_key
from meshshield.attestation.measure import measure_paths
from meshshield.attestation.sim import generate_sim_platform_key, write_sim_platform_key
from meshshield.attestclient import AttestRequest, build_attest_body
from meshshield.pki.keys import generate_p256

MESHSHIELD = [sys.executable, "-m", "meshshield.cli"]
START_TIMEOUT = 30.0


def run_cli(
    *args: str, timeout: float = 60.0, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHSHIELD, *args], capture_output=True, text=True, timeout=timeout,
        input=None if input is None else input.decode(),
    )


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        try:
            return str(self.json()["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class CasProcess:
    root: Path
    data: Path
    admin_dir: Path
    admin_fp: str
    sim_dir: Path
    workload: Path
    url: str = ""
    ca_fingerprint: str = ""
    proc: subprocess.Popen[str] | None = None
    extra_args: tuple[str, ...] = ()
    stdout_lines: list[str] = field(default_factory=list)
    stderr_path: Path | None = None
    # False: no --kek-file (an attested CAS keeps its KEK in the store, sealed)
    kek_file: bool = True
    command: str = "serve"  # or "recover" (cas recover takes serve's flags)

    # -- lifecycle ---------------------------------------------------------------------
    @classmethod
    def start(cls, root: Path, *extra_args: str) -> CasProcess:
        root.mkdir(parents=True, exist_ok=True)
        admin_dir = root / "admin"
        _, fp = write_admin_key(admin_dir)
        sim_dir = root / "sim"
        write_sim_platform_key(generate_sim_platform_key(), sim_dir)
        workload = root / "app"
        workload.mkdir()
        (workload / "server.py").write_text("print('hello from the backend')\n")
        cas = cls(root, root / "data", admin_dir, fp, sim_dir, workload,
                  extra_args=tuple(extra_args))
        cas.launch()
        return cas

    @property
    def bundle(self) -> Path:
        return self.data / "bundle.pem"

    @property
    def kek(self) -> Path:
        return self.root / "cas.kek"

    def launch(self) -> None:
        self.stderr_path = self.root / "cas.stderr"
        args = [
            *MESHSHIELD, "cas", self.command, "--data", str(self.data), "--listen",
            "127.0.0.1:0",
            "--admin-fingerprint", self.admin_fp,
            "--trust-sim-platform", str(self.sim_dir / "sim-platform.pub.pem"),
            *(["--kek-file", str(self.kek)] if self.kek_file else []), *self.extra_args,
        ]
        err = self.stderr_path.open("a")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
        err.close()
        self.stdout_lines = []
        deadline = time.monotonic() + START_TIMEOUT
        assert self.proc.stdout is not None
        lines: list[str] = []

        def reader() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line.rstrip("\n"))

        threading.Thread(target=reader, daemon=True).start()
        while time.monotonic() < deadline:
            if any(line.startswith("listening ") for line in lines):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"CAS exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.02)
        else:
            raise RuntimeError(f"CAS did not start in {START_TIMEOUT}s: {self.stderr()}")
        self.stdout_lines = lines
        self.ca_fingerprint = next(
            x.split("sha256:")[1] for x in lines if x.startswith("ca-fingerprint ")
        )
        self.url = next(x.split()[1] for x in lines if x.startswith("listening "))
        while time.monotonic() < deadline:
            if self.get("/v1/ready").status == 200:
                return
            time.sleep(0.02)
        raise RuntimeError("CAS never became ready")

    def stderr(self) -> str:
        p = self.stderr_path
        return p.read_text() if p and p.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=5)
        self.proc = None
        return rc

    def restart(self) -> None:
        self.stop()
        self.launch()

    # -- HTTP ----------------------------------------------------------------------------
    def ssl_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        admin: ec.EllipticCurvePrivateKey | bool = False,
        ctx: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> HttpResult:
        h = {"Content-Type": "application/json", **(headers or {})}
        if admin:
            key = load_admin_key(self.admin_dir) if admin is True else admin
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            h["Authorization"] = sign_request(key, method, path, body)
        req = urllib.request.Request(
            self.url + path, data=body if method != "GET" else None, method=method, headers=h
        )
        try:
            ctx = ctx or self.ssl_context()
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
                return HttpResult(r.status, dict(r.headers.items()), r.read())
        except urllib.error.HTTPError as e:
            return HttpResult(e.code, dict(e.headers.items()), e.read())

    def get(self, path: str, **kw: Any) -> HttpResult:
        return self.request("GET", path, **kw)

    def post_json(self, path: str, obj: Any, **kw: Any) -> HttpResult:
        return self.request("POST", path, json.dumps(obj).encode(), **kw)

    # -- CLI -------------------------------------------------------------------------------
    def cas_flags(self) -> list[str]:
        return ["--cas", self.url, "--cas-bundle", str(self.bundle),
                "--admin-key", str(self.admin_dir)]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, *self.cas_flags())

    # -- policies & attestation -----------------------------------------------------------
    def measurement(self, path: Path | None = None) -> str:
        return measure_paths([path or self.workload])

    def sim_policy(self, name: str, *, measurement: str | None = None, extra: str = "") -> str:
        m = measurement or self.measurement()
        return f"""name: {name}
version: "1"
predecessor: null
services:
  - name: backend
    tee:
      - platform: sim
        measurement: "{m}"
    dns: [backend, backend.{name}.svc.cluster.local]
    allow_from: [frontend]
    cert_ttl: 30m
  - name: frontend
    tee:
      - platform: sim
        measurement: "{m}"
    allow_from: []
{extra}security:
  attestation:
    tolerate: [simulation]
"""

    def apply_policy(self, text: str) -> subprocess.CompletedProcess[str]:
        path = self.root / f"policy-{time.monotonic_ns()}.yaml"
        path.write_text(text)
        return self.cli("policy", "apply", str(path))

    def attest_body(
        self,
        session: str,
        service: str,
        *,
        workload: Path | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        nonce: str | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
        key = key or generate_p256()
        if nonce is None:
            nonce = self.post_json("/v1/attest/nonce", {}).json()["nonce"]
        req = AttestRequest(
            session=session, service=service, platform="sim",
            workload=(str(workload or self.workload),),
            sim_key=self.sim_dir / "sim-platform.key",
        )
        return key, build_attest_body(req, key, nonce)

    def attest(self, session: str, service: str, **kw: Any) -> HttpResult:
        _key, body = self.attest_body(session, service, **kw)
        return self.post_json("/v1/attest", body)


def env_without_proxies() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


@dataclass
class SidecarProcess:
    """A `meshshield sidecar` subprocess; listeners on port 0, bound ports parsed."""

    name: str
    proc: subprocess.Popen[str]
    lines: list[str]
    log_path: Path
    admin: str = ""
    bound: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(
        cls, cas: CasProcess, session: str, service: str, *,
        inbound: list[str] = (), outbound: list[str] = (),  # type: ignore[assignment]
        workload: Path | None = None, extra: tuple[str, ...] = (), wait_ready: bool = True,
        cas_bundle: bool = True,
    ) -> SidecarProcess:
        # cas_bundle=False: the CAS is trusted only through --cas-expect (in `extra`).
        trust = ["--cas-bundle", str(cas.bundle)] if cas_bundle else []
        args = [*MESHSHIELD, "sidecar", "--cas", cas.url, *trust,
                "--session", session, "--service", service, "--platform", "sim",
                "--workload", str(workload or cas.workload),
                "--sim-key", str(cas.sim_dir / "sim-platform.key"),
                "--admin-listen", "127.0.0.1:0", *extra]
        for i in inbound:
            args += ["--inbound", i]
        for o in outbound:
            args += ["--outbound", o]
        log_path = cas.root / f"sidecar-{service}-{time.monotonic_ns()}.log"
        err = log_path.open("w")
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
        err.close()
        lines: list[str] = []

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))

        threading.Thread(target=reader, daemon=True).start()
        sc = cls(service, proc, lines, log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if any(x.startswith("admin http://") for x in lines):
                sc.admin = next(x.split()[1] for x in lines if x.startswith("admin http://"))
                break
            if proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {proc.returncode}: {log_path.read_text()}")
            time.sleep(0.02)
        if wait_ready:
            sc.wait_ready()
        return sc

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready" in self.lines:
                for x in self.lines:
                    if " listening " in x:
                        route, _, addr = x.partition(" listening ")
                        self.bound[route] = addr
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.log_path.read_text()}")
            time.sleep(0.02)
        raise RuntimeError(f"sidecar not ready: {self.log_path.read_text()}")

    def port(self, route_prefix: str) -> int:
        """Bound port of the first route whose name starts with e.g. 'inbound'."""
        addr = next(v for k, v in self.bound.items() if k.startswith(route_prefix))
        return int(addr.rsplit(":", 1)[1])

    def get(self, path: str) -> HttpResult:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=10) as r:
                return HttpResult(r.status, dict(r.headers.items()), r.read())
        except urllib.error.HTTPError as e:
            return HttpResult(e.code, dict(e.headers.items()), e.read())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
