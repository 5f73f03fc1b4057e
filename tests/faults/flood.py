"""A flood of TLS handshakes that never finish, from chosen loopback source addresses,
and the measures of what it does to a sidecar: app calls served meanwhile, and RSS
(faultlib.rss_kib).

Used by tests/faults/test_handshake_flood.py and bench/handshake_flood.py."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from faultlib import rss_kib
from harness import CasProcess, SidecarProcess
from meshpeers import (
    DEFAULT_DATAPLANE,
    LOOPBACK,
    apply,
    client_hello,
    free_ports,
    mesh_policy,
    plane_args,
    roundtrip,
)

__all__ = ["FloodMesh", "call", "client_hello_prefix", "handshake_flood", "rss_kib"]


def client_hello_prefix() -> bytes:
    """The first half of a real ClientHello: the sidecar must wait for the rest."""
    hello = client_hello()
    return hello[: len(hello) // 2]


@contextlib.contextmanager
def handshake_flood(port: int, sources: list[str],
                    per_source: int) -> Iterator[list[socket.socket]]:
    """`per_source` connections from each source address to `port`, each sending half a
    ClientHello and then nothing. Connections the sidecar refuses at once are kept too
    (the flooder does not care); all are closed on exit."""
    hello = client_hello_prefix()
    held: list[socket.socket] = []
    try:
        for src in sources:
            for _ in range(per_source):
                s = socket.socket()
                s.bind((src, 0))
                s.settimeout(5)
                try:
                    s.connect((LOOPBACK, port))
                    s.sendall(hello)
                except OSError:
                    pass
                held.append(s)
        yield held
    finally:
        for s in held:
            s.close()


def call(port: int, tag: str, timeout: float = 5.0) -> bool:
    """One app call on a new connection: True if the echo came back whole in time."""
    msg = f"legitimate call {tag}\n".encode()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            return roundtrip(s, msg) == msg
    except OSError:
        return False


@dataclass
class FloodMesh:
    """`target` (the flooded sidecar) has an inbound route to an echo app and an outbound
    route to `other`; `other` has the same the other way. Legitimate inbound calls to
    `target` come from `other` on 127.0.0.1; outbound calls go out of `target`."""

    target: SidecarProcess
    other: SidecarProcess
    target_inbound: int
    inbound_call: int  # app port whose calls reach `target` as inbound connections
    outbound_call: int  # app port whose calls leave `target` as outbound connections

    @classmethod
    def start(cls, cas: CasProcess, app_port: int,
              target_extra: tuple[str, ...] = (),
              dataplane: str = DEFAULT_DATAPLANE) -> FloodMesh:
        """Both sidecars of session "shop" on `cas` (on `dataplane`), in front of the
        echo app at `app_port`; the caller stops them (`stop`), then the CAS and the app."""
        m = cas.measurement()
        apply(cas, mesh_policy("shop", backend_m=m, frontend_m=m,
                               frontend_allow_from="[backend]"))
        t_in, t_out, o_in, o_out = free_ports(4)
        plane = plane_args(dataplane)
        target = SidecarProcess.start(
            cas, "shop", "backend", extra=(*plane, *target_extra),
            inbound=[f"{LOOPBACK}:{t_in}={LOOPBACK}:{app_port}"],
            outbound=[f"{LOOPBACK}:{t_out}=frontend@{LOOPBACK}:{o_in}"])
        try:
            other = SidecarProcess.start(
                cas, "shop", "frontend", extra=plane,
                inbound=[f"{LOOPBACK}:{o_in}={LOOPBACK}:{app_port}"],
                outbound=[f"{LOOPBACK}:{o_out}=backend@{LOOPBACK}:{t_in}"])
        except BaseException:
            target.stop()
            raise
        return cls(target, other, t_in, o_out, t_out)

    def served(self, n: int, tag: str) -> tuple[int, int]:
        """(inbound calls served, outbound calls served) of n each."""
        inbound = sum(call(self.inbound_call, f"{tag} in {i}") for i in range(n))
        outbound = sum(call(self.outbound_call, f"{tag} out {i}") for i in range(n))
        return inbound, outbound

    def stop(self) -> None:
        self.other.stop()
        self.target.stop()
