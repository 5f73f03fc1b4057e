"""The aiohttp runner and site that the CAS, the webhook and the sidecar admin API share:
bounded connections, and protocol-level errors that are JSON too.

Bounded: a server that anyone can reach must stay available to legitimate clients while
strangers open connections and never use them. `BoundedSite` accepts the TCP connection
itself, so a stranger costs nothing before the server decides: a cap on open
connections and one on TLS handshakes in progress; when a cap is reached the *oldest*
idle connection (or stalled handshake) is closed to make room, so a new client, which
finishes its handshake and sends its request within milliseconds, always gets in, and a
flood only churns through its own connections. Only a connection that is serving a
request is never closed for room; when every one is, a newcomer is refused at once.
Each phase has a deadline: the TLS handshake, the request headers (from the first
byte), the request body, and the keep-alive idle time between requests.

JSON errors: requests that aiohttp's HTTP parser rejects (a bad request line, an
over-long header, a malformed Content-Length…) never reach the application's
middleware: aiohttp answers them itself with text/plain that echoes the input, and logs
a traceback. An API whose contract is "every error is {"error": {"code", "message"}}"
and "never a stack trace" needs those answered in the same shape and logged as one
line, which the per-connection handler below does.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import json
import logging
import math
import resource
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meshshield.errors import Reason

log = logging.getLogger("meshshield.http")

_REASONS = {413: Reason.BODY_TOO_LARGE, 500: Reason.INTERNAL}
# Descriptors kept free under the process's limit for everything that is not a client
# connection: the listening sockets, the database and its journal files per worker
# thread, logs, outbound connections.
FD_RESERVE = 128
WARN_EVERY = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on a server's client connections (seconds, counts)."""

    max_connections: int = 4096
    max_handshakes: int = 128
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_handshakes < 1:
            raise ValueError("connection and handshake caps must be at least 1")
        for name in ("handshake_timeout", "header_timeout", "body_timeout", "idle_timeout"):
            v = getattr(self, name)
            if not v > 0 or v == float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, found {v}")

    def within_fd_limit(self) -> ConnectionLimits:
        """These limits with the connection cap lowered to fit the process's descriptor
        limit: past it, accept() fails and nobody at all is served."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= self.max_connections:
            return self
        cap = max(16, soft - FD_RESERVE)
        log.warning(
            "connection cap lowered from %d to %d to fit the open-file limit of %d; raise "
            "the limit (ulimit -n, LimitNOFILE=) to serve more clients at once",
            self.max_connections, cap, soft,
        )
        return replace(self, max_connections=cap, max_handshakes=min(self.max_handshakes, cap))


# -- the budget ---------------------------------------------------------------------------

HANDSHAKE, IDLE, BUSY = "handshake", "idle", "busy"


class _Conn:
    __slots__ = ("state", "since", "transport")

    def __init__(self, transport: asyncio.Transport, state: str) -> None:
        self.transport = transport
        self.state = state
        self.since = time.monotonic()


class ConnectionBudget:
    """Open connections by state, oldest first; makes room by closing the oldest idle
    connection or stalled handshake. `counts` says what happened, for metrics."""

    def __init__(self, limits: ConnectionLimits, name: str) -> None:
        self.limits = limits
        self.name = name
        self._by_state: dict[str, dict[_Conn, None]] = {HANDSHAKE: {}, IDLE: {}, BUSY: {}}
        self.counts: Counter[str] = Counter()
        self._warned = 0.0

    @property
    def open(self) -> int:
        return sum(len(d) for d in self._by_state.values())

    def in_state(self, state: str) -> int:
        return len(self._by_state[state])

    def admit(self, conn: _Conn) -> bool:
        if conn.state == HANDSHAKE and self.in_state(HANDSHAKE) >= self.limits.max_handshakes:
            self._evict(self._oldest(HANDSHAKE), "handshakes")
        if self.open >= self.limits.max_connections:
            victim = self._oldest(HANDSHAKE, IDLE)
            if victim is None:
                self.counts["refused"] += 1
                self._warn("every connection is serving a request; refusing new ones")
                return False
            self._evict(victim, "connections")
        self._by_state[conn.state][conn] = None
        self.counts["accepted"] += 1
        return True

    def holds(self, conn: _Conn) -> bool:
        """False once the connection was closed to make room (or removed)."""
        return conn in self._by_state[conn.state]

    def move(self, conn: _Conn, state: str) -> None:
        if self.holds(conn):
            del self._by_state[conn.state][conn]
            conn.state, conn.since = state, time.monotonic()
            self._by_state[state][conn] = None

    def remove(self, conn: _Conn) -> None:
        self._by_state[conn.state].pop(conn, None)

    def _oldest(self, *states: str) -> _Conn | None:
        heads = [next(iter(self._by_state[s]), None) for s in states]
        live = [c for c in heads if c is not None]
        return min(live, key=lambda c: c.since) if live else None

    def _evict(self, conn: _Conn | None, cap: str) -> None:
        if conn is None:
            return
        self.remove(conn)
        self.counts[f"evicted_{conn.state}"] += 1
        self._warn(f"{cap} cap reached; closing the oldest idle connections to make room")
        conn.transport.abort()

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning(
                "%s: %s (open %d of %d, handshakes %d of %d; accepted %d, evicted %d, "
                "refused %d so far)", self.name, what, self.open, self.limits.max_connections,
                self.in_state(HANDSHAKE), self.limits.max_handshakes, self.counts["accepted"],
                self.counts["evicted_handshake"] + self.counts["evicted_idle"],
                self.counts["refused"],
            )


# -- the per-connection handler -------------------------------------------------------


class _BoundedHandler(RequestHandler):
    """aiohttp's connection handler with JSON protocol errors and phase deadlines."""

    budget: ConnectionBudget | None = None
    conn: _Conn | None = None
    _deadline: asyncio.TimerHandle | None = None

    # -- deadlines
    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.budget is not None:
            self.budget.counts[f"timeout_{phase}"] += 1
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.budget is not None and self.conn is not None:
            if self.conn.state == HANDSHAKE:
                self.budget.move(self.conn, IDLE)  # TLS is up
            self._arm(self.budget.limits.header_timeout, "headers")

    def data_received(self, data: bytes) -> None:
        # The first byte of a request after a keep-alive pause starts its header clock.
        if (self.budget is not None and self._deadline is None and self.conn is not None
                and self.conn.state == IDLE):
            self._arm(self.budget.limits.header_timeout, "headers")
        super().data_received(data)

    def request_started(self, payload: Any) -> None:
        self._disarm()
        if self.budget is None or self.conn is None:
            return
        self.budget.move(self.conn, BUSY)
        if not payload.is_eof():
            self._arm(self.budget.limits.body_timeout, "body")
            payload.on_eof(self._disarm)

    def log_access(self, request: BaseRequest, response: web.StreamResponse,
                   time: float | None) -> None:
        super().log_access(request, response, time)
        self._disarm()
        if self.budget is not None and self.conn is not None:
            self.budget.move(self.conn, IDLE)  # aiohttp's keep-alive timer bounds it now

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self.budget is not None and self.conn is not None:
            self.budget.remove(self.conn)
        super().connection_lost(exc)

    # -- errors
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        what = type(exc).__name__ if exc is not None else "error"
        if isinstance(exc, ConnectionResetError):
            # The client hung up mid-request (or was cut off by a deadline): nothing to
            # answer and nothing of ours to debug.
            self.logger.debug("client %s closed the connection during %s %s",
                              request.remote, request.method, request.path)
        elif status >= 500 and exc is not None:
            # Not the client's doing: a handler failed outside any error middleware.
            self.logger.error("internal error on %s %s", request.method, request.path,
                              exc_info=exc)
        else:
            self.logger.info("rejected malformed HTTP from %s: %s (%d)", request.remote, what,
                             status)
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


class _BoundedServer(Server):
    def __call__(self) -> RequestHandler:
        return _BoundedHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _BoundedServer
        make_request = server.request_factory

        def request_factory(message: Any, payload: Any, protocol: RequestHandler,
                            writer: Any, task: Any) -> BaseRequest:
            if isinstance(protocol, _BoundedHandler):
                protocol.request_started(payload)
            return make_request(message, payload, protocol, writer, task)

        server.request_factory = request_factory
        return server


# -- the site -------------------------------------------------------------------------


class _TlsLayer(sslproto.SSLProtocol):
    # asyncio's default keeps a 256 KiB read buffer per connection, 8 times what
    # one TLS record needs: with thousands of idle clients that is most of the memory.
    max_size = 32 * 1024


def _tls_layer(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS layer for connections on `loop`: uvloop's own on a uvloop loop, else
    asyncio's; each is what its loop's create_server(ssl=...) would use. uvloop's is
    compiled: asyncio's, written in Python, cost the CAS about a third of its CPU per
    certificate. Its read buffer is allocated but not written until bytes arrive, so an
    idle connection holds only the pages its handshake touched."""
    if type(loop).__module__.startswith("uvloop"):
        from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]

        return SSLProtocol
    return _TlsLayer


class _Gate(asyncio.Protocol):
    """The protocol of every accepted TCP connection: admit or refuse, then hand over to
    TLS and aiohttp. Everything happens inside `connection_made`, before the loop reads
    a byte, so nothing the client sent early can go astray."""

    def __init__(self, site: BoundedSite) -> None:
        self._site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        stream = cast(asyncio.Transport, transport)
        conn = _Conn(stream, HANDSHAKE if site.ssl_context is not None else IDLE)
        if not site.budget.admit(conn):
            stream.abort()
            return
        handler = site.new_handler(conn)
        if site.ssl_context is None:
            stream.set_protocol(handler)
            handler.connection_made(stream)
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        done.add_done_callback(lambda f: site.handshake_done(conn, f))
        # The same TLS layer asyncio's create_server(ssl=...) puts on a connection; it
        # calls handler.connection_made once the handshake is complete.
        tls = _tls_layer(loop)(
            loop, handler, site.ssl_context, done, server_side=True,
            ssl_handshake_timeout=math.ceil(site.budget.limits.handshake_timeout),
        )
        stream.set_protocol(tls)
        tls.connection_made(stream)


class BoundedSite(web.BaseSite):
    """A TCP(+TLS) site whose connections are admitted by a `ConnectionBudget`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: ConnectionLimits | None = None,
        backlog: int = 1024,
        name: str = "server",
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port = host, port
        self.ssl_context = ssl_context
        self.budget = ConnectionBudget((limits or ConnectionLimits()).within_fd_limit(), name)

    @property
    def name(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Gate(self), self._host, self._port, backlog=self._backlog,
        )

    def new_handler(self, conn: _Conn) -> RequestHandler:
        server = self._runner.server
        assert server is not None
        handler = server()
        if isinstance(handler, _BoundedHandler):
            handler.budget, handler.conn = self.budget, conn
        return handler

    def handshake_done(self, conn: _Conn, done: asyncio.Future[None]) -> None:
        if done.cancelled() or done.exception() is None:
            return  # the handler took over in its connection_made
        self.budget.remove(conn)
        self.budget.counts["handshake_failed"] += 1
        log.debug("%s: TLS handshake failed: %r", self.budget.name, done.exception())


class BudgetCollector(Collector):
    """Prometheus view of a site's budget: open connections by state, and events
    (accepted, evicted_*, refused, timeout_*, handshake_failed)."""

    def __init__(self, budget: ConnectionBudget, prefix: str) -> None:
        self._budget, self._prefix = budget, prefix

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        b = self._budget
        g = GaugeMetricFamily(f"{self._prefix}_connections", "Open client connections",
                              labels=["state"])
        for state in (HANDSHAKE, IDLE, BUSY):
            g.add_metric([state], b.in_state(state))
        yield g
        c = CounterMetricFamily(f"{self._prefix}_connection_events",
                                "Client connections by what happened to them",
                                labels=["event"])
        for event, n in sorted(b.counts.items()):
            c.add_metric([event], n)
        yield c


def bound_port(site: web.BaseSite, requested: int) -> int:
    """The port a site listens on (the kernel's choice for port 0). aiohttp exposes no
    public accessor for it."""
    sockets = getattr(site._server, "sockets", None)  # noqa: SLF001
    return int(sockets[0].getsockname()[1]) if sockets else requested


def runner(app: web.Application, limits: ConnectionLimits | None = None,
           **kwargs: Any) -> web.AppRunner:
    """The runner for a `BoundedSite`: aiohttp's keep-alive timer is the idle timeout."""
    idle = (limits or ConnectionLimits()).idle_timeout
    return JsonErrorAppRunner(app, access_log=None, handle_signals=False,
                              keepalive_timeout=idle, **kwargs)


async def start_site(
    app_runner: web.AppRunner, host: str, port: int, *,
    ssl_context: ssl.SSLContext | None = None, limits: ConnectionLimits | None = None,
    name: str = "server", backlog: int = 1024,
) -> BoundedSite:
    site = BoundedSite(app_runner, host, port, ssl_context=ssl_context, limits=limits,
                       name=name, backlog=backlog)
    await site.start()
    return site
