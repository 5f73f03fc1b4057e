"""Peers for byte-level fault scenarios, on loopback only.

`OnPath` is the on-path host of the threat model: a TCP forwarder between two sidecars
that can forge what such a host can forge (a TCP FIN without TLS close_notify, a record
of garbage). `EndRecorder` is an app that echoes and records how each of its
connections ended: a clean EOF or a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from pathlib import Path
from typing import Any

from faultlib import metric
from harness import CasProcess, SidecarProcess
from meshpeers import (
    DEFAULT_DATAPLANE,
    LOOPBACK,
    LoopThread,
    TcpBackend,
    apply,
    connect,
    free_ports,
    plane_args,
    roundtrip,
    status,
    wait_until,
)


def linger_zero(s: socket.socket) -> None:
    """Closing `s` sends a TCP reset, not a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def how_it_ends(s: socket.socket) -> str:
    """Read until the connection ends: 'eof' for a clean FIN, 'reset' for an RST."""
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


class EndRecorder:
    """Echo every byte; record 'eof' or 'reset' for each connection as it ends.
    `reset_after(n)`: the app itself resets the connection once it has echoed n bytes."""

    def __init__(self, lt: LoopThread) -> None:
        self.ends: list[str] = []
        self.reset_at: int | None = None
        self.backend = TcpBackend(lt, self._handle)
        self.port = self.backend.port

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen = 0
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
                seen += len(data)
                if self.reset_at is not None and seen >= self.reset_at:
                    linger_zero(w.get_extra_info("socket"))
                    w.transport.abort()
                    self.ends.append("app reset")
                    return
        except ConnectionResetError:
            self.ends.append("reset")
            return
        self.ends.append("eof")

    def close(self) -> None:
        self.backend.close()


class OnPath:
    """A TCP forwarder on a free loopback port to `target`; the latest connection's two
    sockets can be made to carry forged bytes or a forged FIN."""

    def __init__(self, lt: LoopThread, target: int) -> None:
        self.lt = lt
        self.target = target
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.server = lt.run(asyncio.start_server(self._handle, LOOPBACK, 0))
        self.port = int(self.server.sockets[0].getsockname()[1])
        self._hold: dict[int, bool] = {}

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(LOOPBACK, self.target)
        self.pairs.append((cw, sw))

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    if self._hold.get(id(w)):
                        continue  # the on-path host swallows what follows its forgery
                    w.write(data)
                    await w.drain()
                if not self._hold.get(id(w)) and w.can_write_eof():
                    w.write_eof()
            except ConnectionResetError:
                # A plain TCP hop carries a reset as a reset.
                with contextlib.suppress(OSError):
                    linger_zero(w.get_extra_info("socket"))
                w.transport.abort()
            except OSError:
                w.transport.abort()

        await asyncio.gather(pump(cr, sw), pump(sr, cw))

    def _side(self, towards: str) -> asyncio.StreamWriter:
        cw, sw = self.pairs[-1]
        return sw if towards == "server" else cw

    def forge_fin(self, towards: str) -> None:
        """A TCP FIN towards 'server' or 'client' with no close_notify before it; bytes
        that way are dropped from now on."""
        w = self._side(towards)

        async def go() -> None:
            self._hold[id(w)] = True
            w.write_eof()

        self.lt.run(go())

    def inject(self, towards: str, data: bytes) -> None:
        w = self._side(towards)

        async def go() -> None:
            w.write(data)
            await w.drain()

        self.lt.run(go())

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for cw, sw in self.pairs:
                cw.transport.abort()
                sw.transport.abort()

        with contextlib.suppress(Exception):
            self.lt.run(stop(), timeout=10)


class OnPathMesh:
    """A CAS, a backend sidecar in front of an `EndRecorder` app, and a frontend sidecar
    whose outbound route reaches the backend's inbound listener through an `OnPath`."""

    def __init__(self, root: Path, dataplane: str = DEFAULT_DATAPLANE) -> None:
        self.extra = plane_args(dataplane)
        self.cas = CasProcess.start(root / "mesh")
        self.lt = LoopThread()
        self.app = EndRecorder(self.lt)
        self.sidecars: list[SidecarProcess] = []
        self.onpath: OnPath | None = None
        try:
            apply(self.cas, self.cas.sim_policy("shop"))
            inbound, outbound = free_ports(2)
            self.backend = self._start("backend", inbound=[
                f"{LOOPBACK}:{inbound}={LOOPBACK}:{self.app.port}"])
            self.onpath = OnPath(self.lt, inbound)
            self.frontend = self._start("frontend", outbound=[
                f"{LOOPBACK}:{outbound}=backend@{LOOPBACK}:{self.onpath.port}"])
            self.outbound = outbound
        except BaseException:
            self.close()
            raise

    def _start(self, service: str, **routes: list[str]) -> SidecarProcess:
        sc = SidecarProcess.start(self.cas, "shop", service, extra=self.extra, **routes)
        self.sidecars.append(sc)
        return sc

    def connect(self) -> socket.socket:
        """An app connection through both sidecars, proven to carry bytes both ways."""
        s = connect(self.outbound)
        assert roundtrip(s, b"hello\n") == b"hello\n"
        return s

    def watch(self, leak_check: Any) -> None:
        """Warm up (one connection end to end), then `leak_check.watch` the CAS and both
        sidecars."""
        self.connect().close()
        self.no_live_connections()
        for p in (self.cas, self.backend, self.frontend):
            leak_check.watch(p)

    def no_live_connections(self) -> None:
        for sc in (self.frontend, self.backend):
            wait_until(lambda sc=sc: status(sc)["connections"] == 0
                       and metric(sc, "meshshield_sidecar_active_connections") == 0,
                       10, f"{sc.name} to hold no live connection")

    def close(self) -> None:
        for sc in reversed(self.sidecars):
            sc.stop()
        if self.onpath is not None:
            self.onpath.close()
        self.app.close()
        self.lt.close()
        self.cas.stop()
