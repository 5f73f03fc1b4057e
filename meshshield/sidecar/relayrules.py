"""How a relayed connection ends: the half-close, reset and truncation rules, pure.

The relay (`meshshield.sidecar.relay`) feeds this machine what happened on its two
sides and carries out the actions it answers with; no sockets here, so every rule is
tested as a table (tests/unit/test_relay_rules.py), the shape of mitmproxy's TCPLayer.

The rules (SPEC §7):
- A clean end of one direction (the app's FIN; the peer's TLS close_notify) becomes a
  clean end towards the other side (FIN; close_notify then FIN) while the way back stays
  open. When both directions have ended, the connection closes cleanly.
- A reset on either side (a TCP RST, a failed write) is carried as a reset: the other
  side is reset too (SO_LINGER 0 then close: an RST, and no close_notify on the mesh).
- A TCP FIN on the mesh side without a TLS close_notify before it is truncation (an
  on-path host can forge a FIN): both sides are reset, never a clean end to the app.
- A TLS error after the handshake (the peer's alert, a record that fails to
  authenticate) resets both sides.
- An abort from outside (a revoked peer, a timer) resets both sides.
The first way a connection ends is the one it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Side(StrEnum):
    MESH = "mesh"  # the TLS side, towards the peer sidecar
    APP = "app"  # the plaintext side, towards the local app

    @property
    def other(self) -> Side:
        return Side.APP if self is Side.MESH else Side.MESH


class Ending(StrEnum):
    """How a connection ended; the label of `meshshield_sidecar_connections_closed_total`."""

    CLOSED = "closed"  # both directions ended cleanly
    RESET = "reset"  # one side reset the connection
    TRUNCATED = "truncated"  # TCP FIN on the mesh side without TLS close_notify
    TLS_ERROR = "tls_error"  # an alert or a bad record after the handshake
    ABORTED = "aborted"  # cut from outside (revocation, a timer, shutdown)


@dataclass(frozen=True)
class SendEof:
    """End the direction towards `side`: FIN (app) or close_notify then FIN (mesh)."""

    side: Side


@dataclass(frozen=True)
class Reset:
    """Reset `side` now: SO_LINGER 0 then close, nothing more written."""

    side: Side


@dataclass(frozen=True)
class Close:
    """Close `side` after what is buffered for it has been written."""

    side: Side


Action = SendEof | Reset | Close


class RelayRules:
    def __init__(self) -> None:
        self.eof_in = {Side.MESH: False, Side.APP: False}
        self.ending: Ending | None = None
        self.detail = ""

    @property
    def ended(self) -> bool:
        return self.ending is not None

    def eof(self, side: Side, *, clean: bool = True) -> list[Action]:
        """`side` ended its direction; `clean` is False for a mesh FIN without
        close_notify."""
        if self.ended or self.eof_in[side]:
            return []
        if side is Side.MESH and not clean:
            return self._reset(Ending.TRUNCATED, "TCP FIN from the peer without TLS "
                                                 "close_notify (truncation)")
        self.eof_in[side] = True
        if all(self.eof_in.values()):
            self.ending = Ending.CLOSED
            return [SendEof(side.other), Close(Side.MESH), Close(Side.APP)]
        return [SendEof(side.other)]

    def reset(self, side: Side, detail: str = "") -> list[Action]:
        """`side` reset the connection (or its transport was lost before its EOF)."""
        return self._reset(Ending.RESET, detail or f"{side.value} side reset")

    def tls_error(self, detail: str) -> list[Action]:
        return self._reset(Ending.TLS_ERROR, detail)

    def abort(self, detail: str = "aborted") -> list[Action]:
        return self._reset(Ending.ABORTED, detail)

    def lost(self, side: Side, error: str | None) -> list[Action]:
        """`side`'s transport is gone: after the connection ended, nothing to do; before,
        an error or a close without its EOF is a reset."""
        if self.ended:
            return []
        if error is not None or not self.eof_in[side]:
            return self.reset(side, f"{side.value} side: {error or 'closed without EOF'}")
        # It ended its direction, then went away without reading ours: the way back
        # can carry nothing more, so close the other side cleanly.
        self.ending = Ending.CLOSED
        return [SendEof(side.other), Close(side.other)]

    def _reset(self, ending: Ending, detail: str) -> list[Action]:
        if self.ended:
            return []
        self.ending, self.detail = ending, detail
        return [Reset(Side.MESH), Reset(Side.APP)]

    def final(self) -> list[Action]:
        """What to do with every side still open once the relay is torn down."""
        if self.ending is None:
            return self.abort("relay torn down")
        if self.ending is Ending.CLOSED:
            return [Close(Side.MESH), Close(Side.APP)]
        return [Reset(Side.MESH), Reset(Side.APP)]
