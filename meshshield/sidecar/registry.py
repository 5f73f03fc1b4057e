"""Every live connection of a sidecar, and its recent refusals."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from meshshield.clock import rfc3339
from meshshield.errors import MeshError, Reason
from meshshield.pki.ca import issued_by_bundle
from meshshield.sidecar.peercheck import PeerInfo, TrustView, check_peer

MAX_REFUSALS = 256


@dataclass
class Connection:
    id: int
    direction: str  # inbound | outbound
    local: str
    peer: str
    info: PeerInfo
    cert: x509.Certificate
    tls_version: str | None
    cipher: str | None
    opened_at: float
    expected: tuple[str, str] | None = None
    bytes_in: int = 0  # from the mesh peer towards the app (inbound) / from the peer (outbound)
    bytes_out: int = 0
    task: asyncio.Task[Any] | None = field(default=None, repr=False)
    relay: Any = field(default=None, repr=False)  # the live Relay, for its byte counts
    closed_reason: str | None = None
    # How a connection carried by the native data plane is ended (it has no task).
    closer: Callable[[], object] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """End the connection now: a reset each way, nothing more forwarded."""
        if self.task is not None:
            self.task.cancel()
        elif self.closer is not None:
            self.closer()

    def to_json(self) -> dict[str, Any]:
        c = self.info.claims
        return {
            "id": self.id,
            "direction": self.direction,
            "local": self.local,
            "peer": self.peer,
            "peer_spiffe_id": self.info.spiffe_id,
            "peer_service": f"{self.info.session}/{self.info.service}",
            "platform": c.get("platform"),
            "measurement": c.get("measurement"),
            "tcb_status": c.get("tcb_status"),
            "debug": c.get("debug"),
            "simulated": c.get("simulated"),
            "cert_serial": self.info.serial,
            "cert_not_after": self.info.not_after,
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "bytes_in": self.relay.bytes_in if self.relay is not None else self.bytes_in,
            "bytes_out": self.relay.bytes_out if self.relay is not None else self.bytes_out,
            "opened_at": rfc3339_from(self.opened_at),
        }


def rfc3339_from(ts: float) -> str:
    from datetime import UTC, datetime

    return rfc3339(datetime.fromtimestamp(ts, UTC))


@dataclass(frozen=True)
class Refusal:
    direction: str
    local: str
    peer: str
    reason: str
    message: str
    at: float
    peer_spiffe_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "local": self.local,
            "peer": self.peer,
            "peer_spiffe_id": self.peer_spiffe_id,
            "reason": self.reason,
            "message": self.message,
            "at": rfc3339_from(self.at),
        }


class ConnectionRegistry:
    def __init__(self, on_refusal: Callable[[Refusal], None] | None = None) -> None:
        self._ids = itertools.count(1)
        self.live: dict[int, Connection] = {}
        self.refusals: deque[Refusal] = deque(maxlen=MAX_REFUSALS)
        self._on_refusal = on_refusal

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, conn: Connection) -> None:
        self.live[conn.id] = conn

    def remove(self, conn: Connection) -> None:
        self.live.pop(conn.id, None)

    def refuse(
        self, direction: str, local: str, peer: str, err: MeshError,
        peer_spiffe_id: str | None = None,
    ) -> Refusal:
        r = Refusal(direction, local, peer, err.reason.value, err.message, time.time(),
                    peer_spiffe_id)
        self.refusals.append(r)
        if self._on_refusal is not None:
            self._on_refusal(r)
        return r

    def recheck(self, view: TrustView, local_service: str) -> list[tuple[Connection, MeshError]]:
        """Close every live connection whose peer no longer passes under `view`,
        including peers whose certificate's CA has left the trust bundle."""
        closed = []
        for conn in list(self.live.values()):
            try:
                if view.bundle_pem and not issued_by_bundle(conn.cert, view.bundle_pem):
                    raise MeshError(
                        Reason.CHAIN_INVALID,
                        f"peer {conn.info.session}/{conn.info.service}: the CA of its "
                        f"certificate {conn.info.serial} was removed from the trust bundle; "
                        "it must attest again for a certificate of the current CA",
                    )
                check_peer(conn.cert, view, local_service=local_service,
                           direction=conn.direction, expected=conn.expected)
            except MeshError as e:
                conn.closed_reason = e.reason.value
                self.refuse(conn.direction, conn.local, conn.peer, e, conn.info.spiffe_id)
                conn.cancel()
                closed.append((conn, e))
        return closed

    def snapshot(self, refused: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"connections": [c.to_json() for c in self.live.values()]}
        if refused:
            out["refused"] = [r.to_json() for r in self.refusals]
        return out
