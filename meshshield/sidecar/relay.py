"""The byte relay between two connected sockets, as asyncio protocols.

Once a connection has passed the peer check, its two sockets (the TLS one, still
driven through its `SSLObject` and memory BIOs, and the plaintext one) are handed to
transports, and bytes flow from `data_received` straight into the other transport's
`write`: no task switch per chunk, and each TLS receive decrypts every record it holds
in one go.

Backpressure: when one side's write buffer passes its high-water mark, the other side
stops reading (`pause_reading`) until it drains, so a slow reader never makes the
sidecar buffer without bound (at most the high-water mark plus one read per direction).
How a connection ends (half-close, resets carried as resets, a FIN without close_notify
as truncation, TLS errors after the handshake) is decided by the pure rules in
`meshshield.sidecar.relayrules`; this module only reports events to them and carries out
the actions they answer with.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import cast

from meshshield.sidecar.relayrules import (
    Action,
    Close,
    Ending,
    RelayRules,
    Reset,
    SendEof,
    Side,
)
from meshshield.sidecar.streams import PlainStream, TlsStream, reset_on_close

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
_RECORD = 16 * 1024 + 256  # the largest TLS 1.3 plaintext record, with room to spare
_DECRYPT_VIEW = memoryview(bytearray(512 * 1024))


class _End(asyncio.Protocol):
    def __init__(self, relay: Relay, tls: TlsStream | None) -> None:
        self.relay = relay
        self.tls = tls
        self.side = Side.APP if tls is None else Side.MESH
        self.transport: asyncio.Transport | None = None
        self.peer: _End
        self.eof_out = False  # we sent this side EOF
        # What the other side sent before this side's transport existed (the two
        # transports start one after the other; the first may already be reading).
        self.pending: list[bytes] = []
        self.pending_eof = False

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        if self.relay.rules.ended:
            # The other side ended the connection while this transport was being made.
            self.relay.apply(self.relay.rules.final())
            return
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if self.tls is not None:
            self.flush_tls()
        for data in self.pending:
            self.transport.write(data)
        self.pending.clear()
        if self.pending_eof:
            self.send_eof()

    def data_received(self, data: bytes) -> None:
        if self.relay.rules.ended:
            return
        if self.tls is None:
            self.relay.forward(self, data)
            return
        self.tls.incoming.write(data)
        self.drain_tls()

    def eof_received(self) -> bool:
        if self.tls is None:
            self.got_eof()
        else:
            self.tls.incoming.write_eof()
            self.drain_tls()
        return True  # keep the transport open: the way back may still carry data

    def pause_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None and not self.relay.rules.eof_in[self.peer.side]:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        error = None if exc is None else (str(exc) or type(exc).__name__)
        self.relay.apply(self.relay.rules.lost(self.side, error))
        self.relay.check_done()

    # -- relay side ----------------------------------------------------------------------
    def drain_tls(self) -> None:
        """Decrypt every complete record the BIO holds and pass the bytes on."""
        assert self.tls is not None
        obj = self.tls.obj
        # Decrypt into one shared buffer (the loop is single-threaded and the bytes are
        # copied out before anything else runs), then hand on one bytes object: no
        # allocation per 16 KiB record.
        view = _DECRYPT_VIEW
        filled = 0
        eof: bool | None = None  # True: close_notify; False: TCP FIN without it
        while not self.relay.rules.ended:
            if len(view) - filled < _RECORD:
                self.relay.forward(self, bytes(view[:filled]))
                filled = 0
            try:
                # With a buffer, read() returns the byte count (typeshed says bytes).
                n = cast(int, obj.read(len(view) - filled, view[filled:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLEOFError:
                eof = False
                break
            except ssl.SSLError as e:
                if filled:
                    self.relay.forward(self, bytes(view[:filled]))
                self.relay.apply(self.relay.rules.tls_error(_tls_error_text(e)))
                self.relay.check_done()
                return
            if not n:
                eof = True
                break
            filled += n
        self.flush_tls()  # e.g. the answer to a key update
        if filled and not self.relay.rules.ended:
            self.relay.forward(self, bytes(view[:filled]))
        if eof is not None:
            self.got_eof(clean=eof)

    def flush_tls(self) -> None:
        assert self.tls is not None
        out = self.tls.outgoing
        if out.pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out.read())

    def got_eof(self, *, clean: bool = True) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()
        self.relay.apply(self.relay.rules.eof(self.side, clean=clean))
        self.relay.check_done()

    def send(self, data: bytes) -> None:
        if self.transport is not None and self.transport.is_closing():
            return
        if self.tls is None:
            if self.transport is None:
                self.pending.append(data)
            else:
                self.transport.write(data)
            return
        view = memoryview(data)
        while view:
            n = self.tls.obj.write(view)
            view = view[n:]
        self.flush_tls()

    def send_eof(self) -> None:
        if self.transport is None:
            self.pending_eof = True
            return
        if self.eof_out or self.transport.is_closing():
            return
        self.eof_out = True
        if self.tls is not None:
            with contextlib.suppress(ssl.SSLError):
                self.tls.obj.unwrap()  # close_notify; TLS 1.3 lets the peer keep sending
            self.flush_tls()
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flush what is buffered, then close

    def reset(self) -> None:
        """An RST now: SO_LINGER 0 then abort; on the mesh side, no close_notify."""
        self.pending.clear()
        self.pending_eof = False
        t = self.transport
        if t is None:
            return
        if not t.is_closing():
            reset_on_close(t.get_extra_info("socket"))
        t.abort()


class Relay:
    """Carries bytes both ways between two ends; `done` resolves when it has ended, and
    `ending` then says how (`meshshield.sidecar.relayrules.Ending`)."""

    def __init__(self, mesh: TlsStream, app: PlainStream) -> None:
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.bytes_in = 0  # from the mesh peer towards the app
        self.bytes_out = 0
        self._mesh, self._app = mesh, app
        self.rules = RelayRules()
        self.a = _End(self, mesh)
        self.b = _End(self, None)
        self.a.peer, self.b.peer = self.b, self.a
        self._ends = {Side.MESH: self.a, Side.APP: self.b}

    @property
    def ending(self) -> Ending | None:
        return self.rules.ending

    @property
    def detail(self) -> str:
        return self.rules.detail

    @property
    def failed(self) -> bool:
        return self.rules.ending not in (None, Ending.CLOSED)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: self.a, _detach(self._mesh.sock))
        await loop.connect_accepted_socket(lambda: self.b, _detach(self._app.sock))
        if self.rules.ended:
            return
        # Bytes that arrived with the handshake, and session tickets queued by it.
        self.a.flush_tls()
        self.a.drain_tls()

    def forward(self, src: _End, data: bytes) -> None:
        if not data:
            return
        if src is self.a:
            self.bytes_in += len(data)
        else:
            self.bytes_out += len(data)
        src.peer.send(data)

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            end = self._ends[action.side]
            if isinstance(action, SendEof):
                end.send_eof()
            elif isinstance(action, Close):
                end.close()
            elif isinstance(action, Reset):
                end.reset()

    def check_done(self) -> None:
        if self.rules.ended:
            self._finish()

    def shutdown(self) -> None:
        """After `done` (or on cancellation): no transport of this relay stays open, even
        one that was still being created when the other side went away."""
        self.apply(self.rules.final())
        self._finish()

    def close(self) -> None:
        self.apply([Close(Side.MESH), Close(Side.APP)])
        self._finish()

    def abort(self, detail: str = "aborted") -> None:
        """Cut both sides now (a revoked peer, a timer): a TCP reset each way, nothing
        more forwarded, no close_notify."""
        self.apply(self.rules.abort(detail))
        self.apply(self.rules.final())
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _tls_error_text(e: ssl.SSLError) -> str:
    """The peer's alert or OpenSSL's reason, without the library's location suffix."""
    reason = getattr(e, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else (str(e) or "TLS error")


def _detach(sock: socket.socket) -> socket.socket:
    """A socket object the transport may own; the stream's object is left closed-safe."""
    return socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
