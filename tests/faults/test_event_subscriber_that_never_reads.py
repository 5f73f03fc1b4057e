"""An event subscriber that stops reading is cut, never holds a buffer forever.

A real aiohttp server on loopback streams with the CAS's own `_write_within` to a real
TCP client that connects and then reads nothing: the write is bounded by its deadline,
the connection is aborted, and the server's handler ends.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from meshshield.cas import http as cas_http

# No leak check here: no long-lived process; the server runs on this test's own event
# loop, and the scenario itself proves its handler ends.


def test_subscriber_that_never_reads_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cas_http, "EVENT_WRITE_SECONDS", 0.5)
    outcome: list[bool] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"x" * (1 << 20)
        for _ in range(64):  # 64 MiB: far beyond any socket buffer
            if not await cas_http._write_within(request, resp, chunk):
                outcome.append(False)
                return resp
        outcome.append(True)
        return resp

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/", stream)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            async with asyncio.timeout(20):
                while not outcome:
                    await asyncio.sleep(0.05)
        finally:
            client.close()
            await runner.cleanup()

    asyncio.run(scenario())
    assert outcome == [False], "a subscriber that never reads was written to without bound"
