"""Sockets before the relay: the TLS handshake over a memory BIO, and closing.

asyncio's own TLS transports cannot half-close (`can_write_eof()` is False), but a
byte-transparent proxy must carry a half-close through. So a connection's TLS runs on
an `ssl.SSLObject` over memory BIOs that meshshield drives itself: here for the
handshake (before the peer check, on the raw non-blocking socket), then in
`meshshield.sidecar.relay`, which takes over the socket and the same `SSLObject` and
moves the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

CHUNK = 64 * 1024


class PlainStream:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close with a TCP reset, so the peer sees the refusal as an error."""
        reset_on_close(self.sock)
        self.close()


def reset_on_close(sock: object) -> None:
    """Make closing `sock` send a TCP reset (SO_LINGER 0) rather than a FIN. A socket
    already closed (uvloop's stand-in then raises ValueError) is left as it is."""
    with contextlib.suppress(OSError, AttributeError, TypeError, ValueError):
        sock.setsockopt(  # type: ignore[attr-defined]
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )


class TlsStream(PlainStream):
    """TLS over a socket via SSLObject + MemoryBIO; the relay later drives the same BIOs."""

    def __init__(
        self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__(sock)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side,
            server_hostname=server_hostname,
        )
        self.bytes_received = 0

    async def _flush(self) -> None:
        if self.outgoing.pending:
            await self.loop.sock_sendall(self.sock, self.outgoing.read())

    async def _fill(self) -> bool:
        data = await self.loop.sock_recv(self.sock, CHUNK)
        if not data:
            self.incoming.write_eof()
            return False
        self.bytes_received += len(data)
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError(
                        "peer closed the connection during the handshake"
                    ) from None
                continue
            await self._flush()
            return

    def peer_certificate_der(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)

    def version(self) -> str | None:
        return self.obj.version()

    def cipher(self) -> str | None:
        c = self.obj.cipher()
        return c[0] if c else None
