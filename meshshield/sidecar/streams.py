"""Byte streams over non-blocking sockets: plaintext, and TLS through a memory BIO.

asyncio's own TLS transports cannot half-close (`can_write_eof()` is False), but a
byte-transparent proxy must carry a half-close through: a client that shuts down its
sending side and then waits for the answer (HTTP/1.0, `redis-cli` pipes, `nc -N`) only
works if the far side sees EOF while the way back stays open. So the TLS layer here
drives an `ssl.SSLObject` over a memory BIO itself: `write_eof()` sends close_notify
and shuts down the TCP sending side, after which TLS 1.3 lets the peer keep sending.

Every operation awaits the socket, so at most one chunk per direction is in flight:
a slow reader stalls its writer (backpressure) instead of growing a buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

CHUNK = 64 * 1024


class StreamClosed(Exception):
    pass


class PlainStream:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._eof_sent = False

    async def read(self, n: int = CHUNK) -> bytes:
        return await self.loop.sock_recv(self.sock, n)

    async def write(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def write_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close with a TCP reset, so the peer sees the refusal as an error."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


class TlsStream(PlainStream):
    """TLS over a socket via SSLObject + MemoryBIO (supports half-close)."""

    def __init__(
        self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._read_eof = False
        self.bytes_received = 0

    async def _flush(self) -> None:
        if self._out.pending:
            await self.loop.sock_sendall(self.sock, self._out.read())

    async def _fill(self) -> bool:
        data = await self.loop.sock_recv(self.sock, CHUNK)
        if not data:
            self._in.write_eof()
            return False
        self.bytes_received += len(data)
        self._in.write(data)
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

    async def read(self, n: int = CHUNK) -> bytes:
        while True:
            if self._read_eof:
                return b""
            try:
                data = self.obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. the answer to a key update
                await self._fill()  # on TCP EOF the next read raises SSLEOFError
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._read_eof = True
                return b""
            if not data:
                self._read_eof = True
            return data

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.obj.write(view)
            view = view[n:]
            await self._flush()

    async def write_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        with contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()  # queues close_notify; TLS 1.3 lets the peer keep sending
        with contextlib.suppress(OSError):
            await self._flush()
            self.sock.shutdown(socket.SHUT_WR)
