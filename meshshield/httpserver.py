"""aiohttp runner whose protocol-level errors are JSON too.

Requests that aiohttp's HTTP parser rejects (a bad request line, an over-long header,
a malformed Content-Length…) never reach the application's middleware: aiohttp answers
them itself with text/plain that echoes the input, and logs a traceback. An API whose
contract is "every error is {"error": {"code", "message"}}" and "never a stack trace"
needs those answered in the same shape and logged as one line, which this does by
swapping aiohttp's per-connection handler class for one with a JSON `handle_error`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from meshshield.errors import Reason

_REASONS = {413: Reason.BODY_TOO_LARGE, 500: Reason.INTERNAL}


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        what = type(exc).__name__ if exc is not None else "error"
        self.logger.info("rejected malformed HTTP from %s: %s (%d)", request.remote, what, status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        reason = _REASONS.get(status, Reason.BAD_REQUEST)
        text = (
            "internal error; the server logged the details" if status >= 500
            else f"malformed HTTP request ({what}); send a well-formed HTTP/1.1 request"
        )
        body = json.dumps({"error": {"code": reason.value, "message": text}})
        resp = web.Response(status=status, text=body, content_type="application/json")
        resp.force_close()
        return resp


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server


def bound_port(site: web.TCPSite, requested: int) -> int:
    """The port a site listens on (the kernel's choice for port 0). aiohttp exposes no
    public accessor for it."""
    sockets = getattr(site._server, "sockets", None)  # noqa: SLF001
    return int(sockets[0].getsockname()[1]) if sockets else requested


def runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    return JsonErrorAppRunner(app, access_log=None, handle_signals=False, **kwargs)
