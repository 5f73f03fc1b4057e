"""Listeners and the byte pump.

Inbound: mutual TLS in from a peer sidecar, plaintext out to the app.
Outbound: plaintext in from the app, mutual TLS out to the peer's sidecar.
The peer check runs after the handshake and before the first byte is read from either
side; a refused peer gets a TCP reset and a line in the refusal list.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from meshshield.errors import MeshError, Reason
from meshshield.runtime import register_runtime_gauges
from meshshield.sidecar.budget import DirectionBudget, Slot
from meshshield.sidecar.config import Endpoint, InboundRoute, OutboundRoute, SidecarConfig
from meshshield.sidecar.identity import Identity
from meshshield.sidecar.peercheck import check_peer
from meshshield.sidecar.registry import Connection, ConnectionRegistry
from meshshield.sidecar.relay import Relay
from meshshield.sidecar.relayrules import Ending
from meshshield.sidecar.streams import PlainStream, TlsStream

if TYPE_CHECKING:
    from meshshield.sidecar.native import NativePlane

log = logging.getLogger("meshshield.sidecar")


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter("meshshield_sidecar_connections_total",
                                "Connections admitted after the peer check", ["direction"],
                                registry=self.registry)
        self.refused = Counter("meshshield_sidecar_refusals_total",
                               "Connections refused, by reason code", ["direction", "reason"],
                               registry=self.registry)
        self.active = Gauge("meshshield_sidecar_active_connections", "Live connections",
                            ["direction"], registry=self.registry)
        self.handshakes = Gauge("meshshield_sidecar_handshakes_in_progress",
                                "Accepted connections not yet past the peer check",
                                ["direction"], registry=self.registry)
        self.closed = Counter("meshshield_sidecar_connections_closed",
                              "Connections ended after the peer check, by how they ended",
                              ["direction", "reason"], registry=self.registry)
        # Bytes are counted per connection on the relay's hot path as plain integers and
        # summed here at scrape time (a Counter's lock per chunk costs throughput).
        self.bytes_closed: dict[tuple[str, str], int] = {}
        self.live: Callable[[], Iterable[Connection]] = lambda: ()
        self.registry.register(_BytesCollector(self))
        self.cas_reachable = Gauge("meshshield_sidecar_cas_reachable",
                                   "1 when the CAS event stream is connected",
                                   registry=self.registry)
        self.cert_expiry = Gauge("meshshield_sidecar_certificate_expiry_seconds",
                                 "Unix time the held certificate expires",
                                 registry=self.registry)
        register_runtime_gauges(self.registry, "meshshield_sidecar")


class _BytesCollector(Collector):
    def __init__(self, metrics: SidecarMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        totals = dict(self.metrics.bytes_closed)
        for c in self.metrics.live():
            # A live connection's counts are its relay's (the fields are set at its end).
            counts = c.relay if c.relay is not None else c
            for way, n in (("in", counts.bytes_in), ("out", counts.bytes_out)):
                totals[(c.direction, way)] = totals.get((c.direction, way), 0) + n
        fam = CounterMetricFamily("meshshield_sidecar_bytes", "Bytes carried",
                                  labels=["direction", "way"])
        for (direction, way), n in sorted(totals.items()):
            fam.add_metric([direction, way], n)
        yield fam


def _handshake_reason(e: BaseException) -> MeshError:
    text = str(e)
    if "certificate required" in text or "did not return a certificate" in text or (
        "PEER_DID_NOT_RETURN" in text
    ):
        return MeshError(Reason.CERTIFICATE_MISSING,
                         "peer presented no client certificate; only mesh sidecars may connect")
    if "certificate has expired" in text:
        return MeshError(Reason.TLS_HANDSHAKE_FAILED,
                         "peer certificate has expired; the peer must attest again with the "
                         f"CAS to renew it ({text})")
    if "certificate verify failed" in text or "unknown ca" in text.lower():
        return MeshError(Reason.TLS_HANDSHAKE_FAILED,
                         f"peer certificate does not chain to the mesh trust bundle ({text})")
    if isinstance(e, TimeoutError):
        return MeshError(Reason.TLS_HANDSHAKE_FAILED, "TLS handshake timed out")
    return MeshError(Reason.TLS_HANDSHAKE_FAILED,
                     f"TLS handshake failed: {text or type(e).__name__}")


class Proxy:
    def __init__(self, config: SidecarConfig, identity: Identity, registry: ConnectionRegistry,
                 metrics: SidecarMetrics) -> None:
        self.config = config
        self.identity = identity
        self.registry = registry
        self.metrics = metrics
        self.listeners: list[socket.socket] = []
        self.accept_tasks: list[asyncio.Task[None]] = []
        self.handlers: set[asyncio.Task[None]] = set()
        self.budgets = {
            direction: DirectionBudget(
                direction, config.max_connections, config.max_handshakes,
                # Strangers reach the inbound listeners; the outbound ones hear only the
                # local app (one address), whose handshakes the global budget bounds.
                config.max_handshakes_per_source if direction == "inbound" else None)
            for direction in ("inbound", "outbound")
        }
        for direction, budget in self.budgets.items():
            metrics.handshakes.labels(direction).set_function(budget.handshakes_in_progress)
        self._over_budget_logged: dict[tuple[str, str], float] = {}
        self.bound: dict[str, str] = {}
        metrics.live = lambda: list(registry.live.values())
        # With --dataplane native, the Rust plane (meshshield.sidecar.native) listens
        # and carries the bytes; the peer check, refusals and records stay here.
        self.native: NativePlane | None = None

    # -- listening -------------------------------------------------------------------
    def _listen(self, ep: Endpoint) -> socket.socket:
        family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ep.host, ep.port))
        s.listen(1024)
        s.setblocking(False)
        self.listeners.append(s)
        return s

    async def start(self) -> None:
        if self.config.dataplane == "native":
            from meshshield.sidecar.native import NativePlane

            self.native = NativePlane(self)
            self.native.start()
            return
        for r in self.config.inbound:
            s = self._listen(r.listen)
            self.bound[f"inbound {r.listen}"] = _name(s)
            self._accept(s, "inbound", functools.partial(self.inbound, route=r))
        for o in self.config.outbound:
            s = self._listen(o.listen)
            self.bound[f"outbound {o.listen}"] = _name(s)
            self._accept(s, "outbound", functools.partial(self.outbound, route=o))

    def _accept(self, s: socket.socket, direction: str,
                handler: Callable[[socket.socket, str, Slot], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        budget = self.budgets[direction]

        async def loop_accept() -> None:
            while True:
                try:
                    conn, addr = await loop.sock_accept(s)
                except OSError as e:
                    if s.fileno() < 0:
                        return
                    log.warning("accept failed: %s", e)
                    await asyncio.sleep(0.05)
                    continue
                peer = f"{addr[0]}:{addr[1]}"
                try:
                    slot = budget.admit(addr[0])
                except MeshError as e:
                    self._over_budget(direction, e)
                    PlainStream(conn).abort()
                    continue
                task = asyncio.ensure_future(self._run(handler, conn, peer, slot))
                self.handlers.add(task)
                task.add_done_callback(self.handlers.discard)

        self.accept_tasks.append(asyncio.ensure_future(loop_accept()))

    def _over_budget(self, direction: str, err: MeshError, count: int = 1) -> None:
        """Count `count` connections closed at once for want of budget; log it at most
        every 10 s per direction and reason (a flood must not become a flood of log
        lines)."""
        self.metrics.refused.labels(direction, err.reason.value).inc(count)
        now = time.monotonic()
        key = (direction, err.reason.value)
        if now - self._over_budget_logged.get(key, -1e9) >= 10.0:
            self._over_budget_logged[key] = now
            log.warning("%s/%s: closing new %s connections at once: %s: %s",
                        self.config.session, self.config.service, direction,
                        err.reason.value, err.message)

    def _establish(self, slot: Slot, direction: str, *streams: PlainStream) -> bool:
        """Move a connection that passed the peer check to the established budget; when
        that is full, close it at once (before a byte is forwarded)."""
        try:
            slot.establish()
        except MeshError as e:
            self._over_budget(direction, e)
            for stream in streams:
                stream.abort()
            return False
        return True

    def _ended(self, conn: Connection, relay: Relay) -> None:
        """One count and, unless it ended cleanly, one log line per ended connection."""
        ending = relay.ending or Ending.ABORTED
        reason = conn.closed_reason or ending.value
        self.metrics.closed.labels(conn.direction, reason).inc()
        level = logging.DEBUG if ending is Ending.CLOSED else logging.INFO
        log.log(level, "%s/%s: %s connection %d %s %s/%s (%s) ended: %s: %s; "
                "%d bytes in, %d out", self.config.session, self.config.service,
                conn.direction, conn.id, "from" if conn.direction == "inbound" else "to",
                conn.info.session, conn.info.service, conn.peer, reason,
                relay.detail or "both directions closed", relay.bytes_in, relay.bytes_out)

    async def _run(self, handler: Callable[[socket.socket, str, Slot], Awaitable[None]],
                   conn: socket.socket, peer: str, slot: Slot) -> None:
        try:
            await handler(conn, peer, slot)
        except asyncio.CancelledError:
            pass
        except (OSError, ssl.SSLError) as e:
            log.debug("connection from %s ended: %s", peer, e)
        except Exception:  # noqa: BLE001 - one connection must not take the proxy down
            log.exception("connection from %s failed", peer)
        finally:
            slot.release()
            with contextlib.suppress(OSError):
                conn.close()

    def stop_accepting(self) -> None:
        if self.native is not None:
            self.native.stop_accepting()
            # Draining waits for the handlers: the native connections' drain is one.
            task = asyncio.ensure_future(self.native.drain())
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
        for t in self.accept_tasks:
            t.cancel()
        for s in self.listeners:
            with contextlib.suppress(OSError):
                s.close()

    # -- connections -----------------------------------------------------------------
    def _refuse(self, direction: str, local: str, peer: str, err: MeshError,
                spiffe: str | None = None) -> None:
        self.metrics.refused.labels(direction, err.reason.value).inc()
        self.registry.refuse(direction, local, peer, err, spiffe)
        log.info("%s/%s: refused %s %s: %s: %s", self.config.session, self.config.service,
                 direction, spiffe or peer, err.reason.value, err.message)

    async def _connect(self, ep: Endpoint) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = _literal_address(ep)
        if infos is None:  # a name: resolve (getaddrinfo runs in a thread, so only then)
            infos = await loop.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, stype, proto, _c, addr in infos:
            s = socket.socket(family, stype, proto)
            s.setblocking(False)
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    await loop.sock_connect(s, addr)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except (OSError, TimeoutError) as e:
                s.close()
                last = e if isinstance(e, OSError) else OSError(f"connect to {ep} timed out")
        raise last or OSError(f"cannot resolve {ep}")

    async def _serve(self, conn: Connection, a: TlsStream, b: PlainStream) -> None:
        conn.task = asyncio.current_task()
        self.registry.add(conn)
        self.metrics.accepted.labels(conn.direction).inc()
        gauge = self.metrics.active.labels(conn.direction)
        gauge.inc()
        relay = Relay(a, b)
        conn.relay = relay
        bounds = _Bounds(self, conn, relay)
        try:
            await relay.start()
            await relay.done
        except BaseException:
            relay.abort()  # cancelled (a revoked peer, shutdown) or failed to start
            raise
        finally:
            bounds.cancel()
            relay.shutdown()
            for way, n in (("in", relay.bytes_in), ("out", relay.bytes_out)):
                key = (conn.direction, way)
                self.metrics.bytes_closed[key] = self.metrics.bytes_closed.get(key, 0) + n
            conn.relay = None
            conn.bytes_in, conn.bytes_out = relay.bytes_in, relay.bytes_out
            self._ended(conn, relay)
            gauge.dec()
            self.registry.remove(conn)
            if conn.closed_reason:
                a.abort()
                b.abort()
            else:
                a.close()
                b.close()

    def end(self, conn: Connection, err: MeshError) -> None:
        """End an admitted connection now (both sides reset), listed and logged with why."""
        if conn.closed_reason is not None or self.registry.live.get(conn.id) is not conn:
            return
        conn.closed_reason = err.reason.value
        self.registry.refuse(conn.direction, conn.local, conn.peer, err, conn.info.spiffe_id)
        log.info("%s/%s: closed %s connection %s with %s: %s: %s", self.config.session,
                 self.config.service, conn.direction, conn.peer, conn.info.spiffe_id,
                 err.reason.value, err.message)
        conn.cancel()

    async def inbound(self, sock: socket.socket, peer: str, slot: Slot,
                      route: InboundRoute) -> None:
        local = str(route.listen)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = TlsStream(sock, self.identity.server_ctx, server_side=True)
        view = self.identity.view
        if view is None or not self.identity.ready:
            tls.abort()
            return
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await tls.handshake()
        except (OSError, ssl.SSLError, TimeoutError) as e:
            if tls.bytes_received == 0 and not isinstance(e, TimeoutError):
                # A TCP probe or port scan: count it, but keep the refusal list for peers.
                self.metrics.refused.labels("inbound", "tls_handshake_failed").inc()
            else:
                self._refuse("inbound", local, peer, _handshake_reason(e))
            tls.abort()
            return
        cert = _peer_cert(tls)
        checked = self.identity.view or view
        try:
            info = check_peer(cert, checked,
                              local_service=self.config.service, direction="inbound")
        except MeshError as e:
            self._refuse("inbound", local, peer, e, _spiffe(cert))
            tls.abort()
            return
        try:
            app = PlainStream(await self._connect(route.forward))
        except OSError as e:
            log.warning("%s/%s: app at %s unreachable: %s", self.config.session,
                        self.config.service, route.forward, e)
            tls.abort()
            return
        # A trust event applied while we were connecting to the app did not see this
        # connection (it is not registered yet): check again against the view it brought.
        if self.identity.view is not None and self.identity.view is not checked:
            try:
                info = check_peer(cert, self.identity.view,
                                  local_service=self.config.service, direction="inbound")
            except MeshError as e:
                self._refuse("inbound", local, peer, e, _spiffe(cert))
                tls.abort()
                app.abort()
                return
        assert cert is not None
        if not self._establish(slot, "inbound", tls, app):
            return
        conn = Connection(self.registry.next_id(), "inbound", local, peer, info, cert,
                          tls.version(), tls.cipher(), time.time())
        await self._serve(conn, tls, app)

    async def outbound(self, sock: socket.socket, peer: str, slot: Slot,
                       route: OutboundRoute) -> None:
        local = str(route.listen)
        app = PlainStream(sock)
        if not self.identity.ready:
            self._refuse("outbound", local, peer, MeshError(
                Reason.CERTIFICATE_MISSING, "this sidecar holds no certificate yet"))
            app.abort()
            return
        expected = (route.session or self.config.session, route.service)
        try:
            raw = await self._connect(route.target)
        except OSError as e:
            self._refuse("outbound", local, str(route.target), MeshError(
                Reason.TLS_HANDSHAKE_FAILED, f"cannot connect to {route.target}: {e}"))
            app.abort()
            return
        tls = TlsStream(raw, self.identity.client_ctx, server_side=False,
                        server_hostname=route.target.host)
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await tls.handshake()
        except (OSError, ssl.SSLError, TimeoutError) as e:
            self._refuse("outbound", local, str(route.target), _handshake_reason(e))
            tls.abort()
            app.abort()
            return
        cert = _peer_cert(tls)
        try:
            assert self.identity.view is not None
            info = check_peer(cert, self.identity.view, local_service=self.config.service,
                              direction="outbound", expected=expected)
        except MeshError as e:
            self._refuse("outbound", local, str(route.target), e, _spiffe(cert))
            tls.abort()
            app.abort()
            return
        assert cert is not None
        if not self._establish(slot, "outbound", tls, app):
            return
        conn = Connection(self.registry.next_id(), "outbound", local, str(route.target), info,
                          cert, tls.version(), tls.cipher(), time.time(), expected=expected)
        await self._serve(conn, tls, app)


class _Bounds:
    """The timers that end one connection: at its peer certificate's not_after, after
    --max-connection-lifetime, and after --idle-timeout without a byte either way (the
    relay's byte counts are sampled a few times per idle period, so a busy connection
    costs nothing extra)."""

    IDLE_SAMPLES = 4

    def __init__(self, proxy: Proxy, conn: Connection, relay: Relay) -> None:
        self.proxy, self.conn, self.relay = proxy, conn, relay
        loop = asyncio.get_running_loop()
        cfg = proxy.config
        who = f"peer {conn.info.session}/{conn.info.service}"
        not_after = conn.cert.not_valid_after_utc
        self.handles = [loop.call_later(
            max(0.0, not_after.timestamp() - time.time()), proxy.end, conn,
            MeshError(Reason.CERTIFICATE_EXPIRED,
                      f"{who}: its certificate {conn.info.serial} expired at "
                      f"{conn.info.not_after}; a connection ends with its peer's certificate "
                      "(the peer renews by attesting again, then reconnects)"))]
        if cfg.max_connection_lifetime:
            self.handles.append(loop.call_later(
                cfg.max_connection_lifetime, proxy.end, conn,
                MeshError(Reason.MAX_CONNECTION_LIFETIME,
                          f"{who}: the connection reached --max-connection-lifetime "
                          f"({cfg.max_connection_lifetime:g} s); the client may reconnect")))
        self.idle: asyncio.TimerHandle | None = None
        if cfg.idle_timeout:
            self.seen = (-1, -1)
            self.quiet_since = loop.time()
            self._idle_check()

    def _idle_check(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.proxy.config.idle_timeout
        seen = (self.relay.bytes_in, self.relay.bytes_out)
        now = loop.time()
        if seen != self.seen:
            self.seen, self.quiet_since = seen, now
        elif now - self.quiet_since >= limit:
            info = self.conn.info
            self.proxy.end(self.conn, MeshError(
                Reason.IDLE_TIMEOUT,
                f"peer {info.session}/{info.service}: no byte either way for "
                f"{limit:g} s (--idle-timeout); the client may reconnect"))
            return
        wait = min(limit / self.IDLE_SAMPLES, self.quiet_since + limit - now)
        self.idle = loop.call_later(max(0.01, wait), self._idle_check)

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()
        if self.idle is not None:
            self.idle.cancel()


def _literal_address(ep: Endpoint) -> list[tuple[Any, Any, int, str, Any]] | None:
    try:
        ip = ipaddress.ip_address(ep.host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ep.host, ep.port))]


def _name(s: socket.socket) -> str:
    host, port = s.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# A peer presents the same certificate on every connection until it renews: one shared
# object per certificate keeps idle connections small and the peer check's cache warm.
_load_certificate = functools.lru_cache(maxsize=4096)(x509.load_der_x509_certificate)


def _peer_cert(tls: TlsStream) -> x509.Certificate | None:
    der = tls.peer_certificate_der()
    return _load_certificate(der) if der else None


def _spiffe(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    from meshshield.pki.spiffe import spiffe_id_of

    try:
        return spiffe_id_of(cert)
    except ValueError:
        return None
