"""Real peers for the sidecar end-to-end tests, on loopback only.

Built on tests/harness.py (a CAS subprocess, `meshshield sidecar` subprocesses): here
are the backends the sidecars carry traffic to (asyncio servers in a thread of the test
process, `python -m http.server`, an upload sink), a two-sidecar mesh builder, and
`wait_until`, the one way these tests wait: poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import CasProcess, SidecarProcess

T = TypeVar("T")
LOOPBACK = "127.0.0.1"


def wait_until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `pred` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                 f"(last: {last!r})")
        time.sleep(interval)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (sockets held open together, so no repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def can_connect(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- asyncio backends in a thread ---------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LoopThread:
    """An asyncio event loop in a daemon thread; servers and clients run on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class TcpBackend:
    """A TCP server on a free loopback port; every connection goes to `handler`."""

    def __init__(self, lt: LoopThread, handler: Handler) -> None:
        self.lt = lt
        self.connections = 0

        async def counted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await handler(r, w)
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(counted, LOOPBACK, 0, backlog=4096)

        self.server = lt.run(start())
        self.port = int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()

        with contextlib.suppress(Exception):
            self.lt.run(stop(), timeout=10)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """An `echo` TCP backend on its own loop thread, for the block; yields its port."""
    lt = LoopThread()
    app = TcpBackend(lt, echo)
    try:
        yield app.port
    finally:
        app.close()
        lt.close()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Echo every byte back as it arrives; pass EOF back."""
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    if w.can_write_eof():
        w.write_eof()


async def echo_after_eof(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Answer only once the client's EOF arrived: `<len> <sha256>\\n` then the bytes back."""
    data = await r.read()  # until EOF
    w.write(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode() + data)
    await w.drain()


@dataclass
class Recorder:
    """What a raw TCP backend received: every connection and every byte."""

    connections: int = 0
    chunks: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def reset(self) -> None:
        self.connections = 0
        self.chunks.clear()

    async def handler(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await r.read(65536):
            self.chunks.append(data)
        w.write(b"recorded\n")
        await w.drain()


# -- HTTP backends ------------------------------------------------------------------------

class HttpFileServer:
    """`python -m http.server` serving a directory on a free loopback port."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self.log = (directory.parent / f"http-{port}.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", LOOPBACK, str(port),
             "--directory", str(directory)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.proc.poll() is not None or can_connect(port), 20,
                   "python -m http.server to listen")
        assert self.proc.poll() is None, "python -m http.server exited"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


class _UploadHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        left = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        n = 0
        while left:
            block = self.rfile.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            n += len(block)
            left -= len(block)
        body = json.dumps({"length": n, "sha256": h.hexdigest()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class UploadServer:
    """An HTTP sink in a thread: a POST answers with the length and SHA-256 it received."""

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), _UploadHandler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- data planes --------------------------------------------------------------------------

NATIVE_BUILT = importlib.util.find_spec("meshshield._native") is not None

# The sidecar's default data plane (`--dataplane`); the Python relay is the fallback.
DEFAULT_DATAPLANE = "native"

# Parameters for a fixture that starts sidecars: each test runs on both data planes.
# Without the extension the native runs are skipped, except under CI=true, where they
# fail (require_dataplane).
DATAPLANES = [
    pytest.param("native", id="native"),
    pytest.param("python", id="python"),
]


def require_dataplane(dataplane: str) -> None:
    """Skip (or, under CI=true, fail) a test on the native plane when the extension
    meshshield._native is not built."""
    if dataplane == "native" and not NATIVE_BUILT:
        why = "meshshield._native is not built (make install builds it with cargo)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def plane_args(dataplane: str) -> tuple[str, ...]:
    """The sidecar flags that select `dataplane`; checks the extension is built."""
    require_dataplane(dataplane)
    return ("--dataplane", dataplane)


# -- policies and the mesh ----------------------------------------------------------------

def mesh_policy(name: str, *, backend_m: str, frontend_m: str, extra_services: str = "",
                cert_ttl: str = "30m", frontend_allow_from: str = "[]") -> str:
    """backend [allow_from: frontend] and frontend [allow_from: `frontend_allow_from`],
    each with its own sim measurement."""
    return f"""name: {name}
version: "1"
predecessor: null
services:
  - name: backend
    tee:
      - platform: sim
        measurement: "{backend_m}"
    allow_from: [frontend]
    cert_ttl: {cert_ttl}
  - name: frontend
    tee:
      - platform: sim
        measurement: "{frontend_m}"
    allow_from: {frontend_allow_from}
    cert_ttl: {cert_ttl}
{extra_services}security:
  attestation:
    tolerate: [simulation]
"""


def sim_service(name: str, measurement: str, allow_from: str = "[]") -> str:
    """A policy `services:` entry for an extra sim service."""
    return (f"  - name: {name}\n    tee:\n      - platform: sim\n"
            f"        measurement: \"{measurement}\"\n    allow_from: {allow_from}\n")


def apply(cas: CasProcess, policy: str) -> None:
    r = cas.apply_policy(policy)
    assert r.returncode == 0, f"policy apply failed: {r.stdout}{r.stderr}"


def make_workload(cas: CasProcess, name: str) -> Path:
    """A second workload folder, hence a second measurement."""
    d = cas.root / name
    d.mkdir(exist_ok=True)
    (d / "server.py").write_text(f"print('hello from {name}')\n")
    return d


@dataclass
class Mesh:
    """A backend sidecar (inbound routes to apps) and a frontend sidecar (outbound routes
    to the backend's inbound listeners), one route per named app."""

    backend: SidecarProcess
    frontend: SidecarProcess
    app_port: dict[str, int]
    inbound: dict[str, int]  # the backend sidecar's mTLS listener for each app
    outbound: dict[str, int]  # the frontend sidecar's plaintext listener for each app

    def stop(self) -> None:
        for sc in (self.frontend, self.backend):
            sc.stop()


def start_mesh(cas: CasProcess, session: str, apps: dict[str, int], *,
               backend_workload: Path | None = None, frontend_workload: Path | None = None,
               backend_extra: tuple[str, ...] = (),
               frontend_extra: tuple[str, ...] = (),
               dataplane: str = DEFAULT_DATAPLANE) -> Mesh:
    backend_extra = (*backend_extra, *plane_args(dataplane))
    frontend_extra = (*frontend_extra, *plane_args(dataplane))
    names = list(apps)
    ports = free_ports(2 * len(names))
    inbound = dict(zip(names, ports[: len(names)], strict=True))
    outbound = dict(zip(names, ports[len(names):], strict=True))
    backend = SidecarProcess.start(
        cas, session, "backend", workload=backend_workload, extra=backend_extra,
        inbound=[f"{LOOPBACK}:{inbound[n]}={LOOPBACK}:{apps[n]}" for n in names],
    )
    try:
        frontend = SidecarProcess.start(
            cas, session, "frontend", workload=frontend_workload, extra=frontend_extra,
            outbound=[f"{LOOPBACK}:{outbound[n]}=backend@{LOOPBACK}:{inbound[n]}"
                      for n in names],
        )
    except BaseException:
        backend.stop()
        raise
    return Mesh(backend, frontend, dict(apps), inbound, outbound)


def status(sc: SidecarProcess) -> dict[str, Any]:
    r = sc.get("/status")
    assert r.status == 200, r.body
    return dict(r.json())


def refusals(sc: SidecarProcess) -> list[dict[str, Any]]:
    r = sc.get("/connections?refused=1")
    assert r.status == 200, r.body
    return list(r.json()["refused"])


def wait_refusal(sc: SidecarProcess, reason: str, *, after: int = 0, timeout: float = 10.0,
                 **match: str) -> dict[str, Any]:
    """The first refusal (past the first `after`) with `reason` and the `match` fields.

    The sidecar keeps only its latest 256 refusals: after a flood, match on `peer`
    (the client's address) rather than on a position."""

    def find() -> dict[str, Any] | None:
        for r in refusals(sc)[after:]:
            if r["reason"] == reason and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    return wait_until(find, timeout, f"{sc.name} refusal {reason} {match or ''}".strip())


def no_traceback(*scs: SidecarProcess) -> None:
    for sc in scs:
        assert "Traceback" not in sc.log(), f"{sc.name} logged a traceback:\n{sc.log()}"


# -- clients ------------------------------------------------------------------------------

def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (a handshake record), as a client sends it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="backend")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    assert hello[:1] == b"\x16", hello[:8]
    return hello


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        block = s.recv(n - len(buf))
        if not block:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += block
    return bytes(buf)


def recv_all(s: socket.socket, limit: int = 1 << 30) -> bytes:
    buf = bytearray()
    while block := s.recv(1 << 20):
        buf += block
        assert len(buf) <= limit
    return bytes(buf)


def roundtrip(s: socket.socket, msg: bytes) -> bytes:
    """Send `msg` on an echo connection and read the same number of bytes back."""
    s.sendall(msg)
    return recv_exact(s, len(msg))


def closed_by_peer(s: socket.socket) -> bool:
    """True when the peer has closed (EOF or reset); False if data or nothing arrived."""
    try:
        return s.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


class EofWatch:
    """Blocks in recv() on a thread and notes the moment the connection ends."""

    def __init__(self, s: socket.socket) -> None:
        self.at: float | None = None
        self.how = ""
        s.settimeout(15)

        def run() -> None:
            try:
                data = s.recv(65536)
                self.how = "EOF" if not data else f"unexpected data {data[:40]!r}"
            except ConnectionResetError:
                self.how = "RST"
            except TimeoutError:
                self.how = "timeout"
                return
            self.at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def refused_on_connect(port: int, data: bytes, timeout: float = 10.0) -> bool:
    """True when the sidecar closes a new connection to `port` (EOF or reset) without
    answering `data`. A plane that refuses fast may reset it before connect() has
    returned (Linux then reports the reset from connect()): a refusal too."""
    try:
        with connect(port) as s:
            s.sendall(data)
            s.settimeout(timeout)
            return closed_by_peer(s)
    except (ConnectionResetError, BrokenPipeError):
        return True


def closed_with_at_most_an_alert(s: socket.socket) -> bool:
    """True when the peer has closed (EOF or reset) having sent nothing but TLS alert
    records (rustls answers a malformed handshake with a fatal alert, as RFC 8446
    asks; OpenSSL closes silently); False if anything else or nothing arrived."""
    data = b""
    try:
        while block := s.recv(65536):
            data += block
            if len(data) > 64:
                return False
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    while data:
        # An alert record: type 21, version 3.x, length 2, level and description.
        if len(data) < 7 or data[0] != 21 or data[1] != 3 or data[3:5] != b"\x00\x02":
            return False
        data = data[7:]
    return True


@contextlib.contextmanager
def closing_all(items: list[Any]) -> Iterator[list[Any]]:
    try:
        yield items
    finally:
        for x in reversed(items):
            with contextlib.suppress(Exception):
                x.close()
