"""The data path: real clients through the frontend's outbound listener, mutual TLS between
the sidecars, real backends behind the backend's inbound listener.

One CAS (certificates capped at 10 s, so the sidecars renew every ~5 s throughout) and
one pair of sidecars serve the whole module, one route per backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from harness import CasProcess, SidecarProcess, env_without_proxies
from meshpeers import (
    DATAPLANES,
    LOOPBACK,
    HttpFileServer,
    LoopThread,
    Mesh,
    TcpBackend,
    UploadServer,
    apply,
    connect,
    echo,
    echo_after_eof,
    free_ports,
    no_traceback,
    recv_all,
    recv_exact,
    roundtrip,
    sha256_file,
    start_mesh,
    status,
    wait_until,
)

MiB = 1024 * 1024
REDIS = shutil.which("redis-server") and shutil.which("redis-benchmark")
REDIS_MISSING = ("redis-server/redis-benchmark not installed "
                 "(apt-get install redis-server; .ci/run should install it)")


@dataclass
class DataPath:
    cas: CasProcess
    mesh: Mesh
    files: Path
    redis: subprocess.Popen[bytes] | None
    server_first: list[tuple[int, str]]


def _start_redis(root: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", "",
         "--appendonly", "no", "--dir", str(root), "--protected-mode", "no"],
        stdout=(root / "redis.log").open("wb"), stderr=subprocess.STDOUT,
    )

    def pong() -> bool:
        assert proc.poll() is None, (root / "redis.log").read_text()
        try:
            with connect(port, timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(pong, 20, "redis-server to answer PING")
    return proc


@pytest.fixture(scope="module", params=DATAPLANES)
def dp(request: pytest.FixtureRequest,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataPath]:
    root = tmp_path_factory.mktemp("datapath")
    files = root / "www"
    files.mkdir()
    with (files / "1mib.bin").open("wb") as f:
        f.write(os.urandom(MiB))
    with (files / "100mib.bin").open("wb") as f:
        for _ in range(100):
            f.write(os.urandom(MiB))
    cas = CasProcess.start(root / "mesh", "--max-cert-ttl", "10s")
    closers: list[object] = [cas]
    lt = LoopThread()
    try:
        apply(cas, cas.sim_policy("shop"))
        http_port, redis_port = free_ports(2)
        http = HttpFileServer(files, http_port)
        upload = UploadServer()
        eof_echo = TcpBackend(lt, echo_after_eof)
        echo_srv = TcpBackend(lt, echo)
        received: list[tuple[int, str]] = []

        async def server_first(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"banner\n")
            await w.drain()
            w.write_eof()
            data = await r.read()
            received.append((len(data), hashlib.sha256(data).hexdigest()))

        first = TcpBackend(lt, server_first)
        redis = _start_redis(root, redis_port) if REDIS else None
        closers += [http, upload, eof_echo, echo_srv, first]
        mesh = start_mesh(cas, "shop", {
            "http": http.port, "upload": upload.port, "eof": eof_echo.port,
            "echo": echo_srv.port, "redis": redis_port, "server_first": first.port,
        }, dataplane=request.param)
        yield DataPath(cas, mesh, files, redis, received)
        mesh.stop()
        no_traceback(mesh.backend, mesh.frontend)
        if redis is not None:
            redis.terminate()
            redis.wait(10)
    finally:
        for c in reversed(closers):
            c.stop() if isinstance(c, CasProcess) else c.close()  # type: ignore[attr-defined]
        lt.close()


def _bytes_to_app(mesh: Mesh) -> float:
    """Bytes the backend's sidecar carried from its app back to mesh peers."""
    text = mesh.backend.get("/metrics").body.decode()
    m = re.search(r'^meshshield_sidecar_bytes_total\{direction="inbound",way="out"\} (\S+)$',
                  text, re.M)
    return float(m.group(1)) if m else 0.0


def _curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--fail", "--noproxy", "*", "--max-time",
                           str(int(timeout)), *args],
                          capture_output=True, timeout=timeout + 10, env=env_without_proxies())


@pytest.mark.parametrize("name", ["1mib.bin", "100mib.bin"])
def test_curl_get_through_the_mesh_is_byte_exact(dp: DataPath, tmp_path: Path,
                                                 name: str) -> None:
    out = tmp_path / name
    carried = _bytes_to_app(dp.mesh)
    started = time.monotonic()
    r = _curl("-o", str(out), f"http://{LOOPBACK}:{dp.mesh.outbound['http']}/{name}")
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr.decode()
    assert out.stat().st_size == (dp.files / name).stat().st_size
    assert sha256_file(out) == sha256_file(dp.files / name)
    size = out.stat().st_size
    # It went through the backend's sidecar, not around it.
    assert _bytes_to_app(dp.mesh) - carried >= size
    print(f"GET {name}: {size / MiB:.0f} MiB in {elapsed:.2f} s "
          f"({size / MiB / elapsed:.0f} MiB/s through two sidecars)")


def test_curl_post_upload_through_the_mesh_is_byte_exact(dp: DataPath, tmp_path: Path) -> None:
    body = tmp_path / "upload.bin"
    body.write_bytes(os.urandom(16 * MiB + 17))
    r = _curl("-H", "Expect:", "-H", "Content-Type: application/octet-stream",
              "--data-binary", f"@{body}", f"http://{LOOPBACK}:{dp.mesh.outbound['upload']}/up")
    assert r.returncode == 0, r.stderr.decode()
    got = json.loads(r.stdout)
    assert got == {"length": body.stat().st_size, "sha256": sha256_file(body)}


def test_half_close_passes_through(dp: DataPath) -> None:
    """The client shuts down its sending side; the backend answers only after that EOF,
    and the answer still comes back whole over the open return direction."""
    request = os.urandom(3 * MiB) + b"GET / HTTP/1.0\r\n\r\n"
    with connect(dp.mesh.outbound["eof"], timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s)
    header, _, echoed = answer.partition(b"\n")
    assert header == f"{len(request)} {hashlib.sha256(request).hexdigest()}".encode()
    assert echoed == request


def test_half_close_from_the_server_side_passes_through(dp: DataPath) -> None:
    """The backend speaks first and shuts down its sending side; the client sees the
    banner and EOF, and can still send everything the backend then reads."""
    dp.server_first.clear()
    payload = os.urandom(2 * MiB)
    with connect(dp.mesh.outbound["server_first"], timeout=30) as s:
        assert recv_all(s) == b"banner\n"
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        wait_until(lambda: dp.server_first, 20, "the backend to read the client's EOF")
    assert dp.server_first == [(len(payload), hashlib.sha256(payload).hexdigest())]


@pytest.mark.skipif(not REDIS, reason=REDIS_MISSING)
def test_redis_benchmark_through_the_mesh(dp: DataPath) -> None:
    r = subprocess.run(
        ["redis-benchmark", "-h", LOOPBACK, "-p", str(dp.mesh.outbound["redis"]),
         "-n", "20000", "-c", "20", "-t", "get,set", "-q"],
        capture_output=True, text=True, timeout=120,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "error" not in out.lower(), out
    # -q prints progress lines separated by \r, then "SET: N requests per second, ...".
    results = {m.group(1): float(m.group(2))
               for m in re.finditer(r"(SET|GET): ([0-9.]+) requests per second", out)}
    assert set(results) == {"SET", "GET"}, out
    print(f"redis-benchmark through the mesh: {results}")


def test_long_lived_connection_survives_a_renewal_and_ends_at_expiry(dp: DataPath) -> None:
    """Certificates live 10 s here: while one TCP connection through the mesh stays open
    and busy, a sidecar renews; it carries on through the renewal, a new connection
    presents the renewed certificate, and the old one ends when the certificate it
    negotiated expires (a connection never outlives its peer's certificate)."""
    fe, be = dp.mesh.frontend, dp.mesh.backend
    seen = {"frontend": [status(fe)["identity"]["serial"]],
            "backend": [status(be)["identity"]["serial"]]}
    deadline = time.monotonic() + 30
    exchanged = 0
    with connect(dp.mesh.outbound["echo"], timeout=10) as s:
        old_conn = wait_until(lambda: be.get("/connections").json()["connections"], 5,
                              "the connection in the backend's /connections")[0]
        expiry = datetime.fromisoformat(old_conn["cert_not_after"]).timestamp()
        # A held certificate renews with about half its life left, so the first renewal
        # on either side comes seconds before the earlier certificate expires.
        while max(len(v) for v in seen.values()) < 2:
            assert time.monotonic() < deadline, f"no renewal in 30 s: {seen}"
            msg = f"ping {exchanged}\n".encode()
            assert roundtrip(s, msg) == msg
            exchanged += 1
            for name, sc in (("frontend", fe), ("backend", be)):
                serial = status(sc)["identity"]["serial"]
                if serial != seen[name][-1]:
                    seen[name].append(serial)
            time.sleep(0.5)  # the pace of the conversation, not a wait for a server
        assert all(len(set(v)) == len(v) for v in seen.values()), seen
        # Renewed: the old connection carries on with what it negotiated.
        assert roundtrip(s, b"still here\n") == b"still here\n"
        with connect(dp.mesh.outbound["echo"], timeout=10) as s2:
            assert roundtrip(s2, b"new one\n") == b"new one\n"
            conns = sorted(be.get("/connections").json()["connections"], key=lambda c: c["id"])
            assert len(conns) == 2, conns
            assert conns[0]["cert_serial"] == seen["frontend"][0], (conns, seen)
            current = status(fe)["identity"]["serial"]
            assert conns[1]["cert_serial"] in (seen["frontend"][-1], current), (conns, seen)
        assert expiry - time.time() < 11
        s.settimeout(max(1.0, expiry - time.time() + 3))
        try:
            ended = s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            ended = True
        except TimeoutError:
            ended = False
        assert ended, "the connection outlived the certificate it negotiated"
    assert exchanged >= 1
    print(f"renewals seen: {seen}; {exchanged} exchanges on one connection")


def _metric(sc: SidecarProcess, name: str) -> float | None:
    text = sc.get("/metrics").body.decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_the_chosen_data_plane_carries_the_connections(dp: DataPath,
                                                       request: pytest.FixtureRequest) -> None:
    """With --dataplane native, the Rust plane asked the Python peer check once per
    handshake (on both sides); its GIL cost per handshake is printed."""
    with connect(dp.mesh.outbound["echo"], timeout=10) as s:
        assert roundtrip(s, b"which plane\n") == b"which plane\n"
    native = request.node.callspec.params["dp"] == "native"
    for sc in (dp.mesh.frontend, dp.mesh.backend):
        checks = _metric(sc, "meshshield_sidecar_native_peer_checks_total")
        if not native:
            assert checks is None
            continue
        assert checks is not None and checks >= 1, sc.name
        wait = _metric(sc, "meshshield_sidecar_native_peer_check_gil_wait_seconds_total")
        held = _metric(sc, "meshshield_sidecar_native_peer_check_seconds_total")
        assert wait is not None and held is not None
        print(f"{sc.name}: {checks:.0f} peer checks, per handshake {wait / checks * 1e6:.0f} µs "
              f"waiting for the GIL, {held / checks * 1e6:.0f} µs holding it")


def _bytes_metric(sc: SidecarProcess, direction: str, way: str) -> float:
    text = sc.get("/metrics").body.decode()
    m = re.search(rf'^meshshield_sidecar_bytes_total\{{direction="{direction}",way="{way}"\}} '
                  r"(\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_byte_counts_are_exact_in_connections_and_metrics(dp: DataPath) -> None:
    """A live connection's record in /connections counts every byte each way on both
    sidecars; once it ends, /metrics has counted exactly as many more."""
    sides = ((dp.mesh.frontend, "outbound"), (dp.mesh.backend, "inbound"))
    before = {(sc.name, way): _bytes_metric(sc, d, way) for sc, d in sides
              for way in ("in", "out")}
    sent = 0
    with connect(dp.mesh.outbound["echo"], timeout=10) as s:
        for n in (1, 300_000, 4321):
            data = os.urandom(n)
            s.sendall(data)
            assert recv_exact(s, n) == data  # the echo: the same bytes back
            sent += n

        def live(sc: SidecarProcess) -> list[dict[str, Any]]:
            r = sc.get("/connections")
            assert r.status == 200, r.body
            return [c for c in r.json()["connections"]
                    if c["bytes_in"] == sent and c["bytes_out"] == sent]

        for sc, _ in sides:
            wait_until(lambda sc=sc: live(sc), 10,  # type: ignore[misc]
                       f"{sc.name}'s record to count {sent} bytes each way")
    for sc, direction in sides:
        for way in ("in", "out"):
            wait_until(lambda sc=sc, d=direction, w=way:  # type: ignore[misc]
                       _bytes_metric(sc, d, w) - before[(sc.name, w)] == sent, 10,
                       f"{sc.name}'s {direction} bytes {way} to grow by {sent}")
        wait_until(lambda sc=sc: status(sc)["connections"] == 0, 10,  # type: ignore[misc]
                   f"{sc.name} to hold no live connection")
