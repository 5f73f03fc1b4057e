"""The native data plane's Python side (`--dataplane native`, the default).

Rust (`meshshield._native`, built from native/) owns the listeners, mutual TLS 1.3, the
relay and its bounds for the connections it carries; everything that decides trust
stays here. After each handshake the plane calls `NativePlane._check` once, on one of
its threads holding the GIL for that call only: the same `check_peer` as the Python
plane decides, and an admitted connection is listed in the same `ConnectionRegistry`
(with a closer, so a trust event's recheck ends it within the event's handling).
New certificates and bundles reach the plane through `Identity.tls_listeners`
(new handshakes only). What the plane reports (refusals before the peer check, counted
closes, ended connections) arrives as events, drained on the event loop when the plane
wakes it through a socket.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from meshshield.errors import MeshError, Reason
from meshshield.sidecar.peercheck import PeerInfo, TrustView, check_peer
from meshshield.sidecar.registry import Connection

if TYPE_CHECKING:
    from meshshield._native import DataPlane, Event
    from meshshield.sidecar.proxy import Proxy

log = logging.getLogger("meshshield.sidecar")

# How long a drained connection may take to end cleanly (the plane's relay::DRAIN_GRACE),
# and a little more for its event to arrive.
_DRAIN_GRACE = 1.5

# Ways a connection ends that the plane's own timers decide.
_BOUNDS = {"certificate_expired", "idle_timeout", "max_connection_lifetime"}

# How many admitted (certificate, direction, route) decisions are remembered; when full,
# all are forgotten at once (a sidecar talks to far fewer peer certificates than this).
_DECIDED_MAX = 4096


def load_dataplane() -> type[DataPlane]:
    try:
        from meshshield._native import DataPlane
    except ImportError as e:
        raise MeshError(Reason.BAD_REQUEST,
                        f"--dataplane native (the default): the extension meshshield._native "
                        f"is not built ({e}); reinstall meshshield (`make install` builds it "
                        "with cargo), or run the asyncio relay with --dataplane python"
                        ) from None
    return DataPlane


def handshake_error(kind: str, detail: str, peer: str) -> MeshError:
    """The plane's word for a failed handshake or connect, as a reason code."""
    if kind == "missing":
        return MeshError(Reason.CERTIFICATE_MISSING,
                         "peer presented no client certificate; only mesh sidecars may connect")
    if kind == "no_identity":
        return MeshError(Reason.CERTIFICATE_MISSING, "this sidecar holds no certificate yet")
    if kind == "expired":
        return MeshError(Reason.TLS_HANDSHAKE_FAILED,
                         "peer certificate has expired; the peer must attest again with the "
                         f"CAS to renew it ({detail})")
    if kind == "untrusted":
        return MeshError(Reason.TLS_HANDSHAKE_FAILED,
                         f"peer certificate does not chain to the mesh trust bundle ({detail})")
    if kind == "timeout":
        return MeshError(Reason.TLS_HANDSHAKE_FAILED, "TLS handshake timed out")
    if kind == "connect":
        return MeshError(Reason.TLS_HANDSHAKE_FAILED, f"cannot connect to {peer}: {detail}")
    return MeshError(Reason.TLS_HANDSHAKE_FAILED, f"TLS handshake failed: {detail or kind}")


class _LiveBytes:
    """A live native connection's byte counts, read from the plane (as a Relay's)."""

    def __init__(self, plane: DataPlane, conn_id: int) -> None:
        self.plane, self.conn_id = plane, conn_id

    @property
    def bytes_in(self) -> int:
        counts = self.plane.bytes(self.conn_id)
        return counts[0] if counts else 0

    @property
    def bytes_out(self) -> int:
        counts = self.plane.bytes(self.conn_id)
        return counts[1] if counts else 0


class NativePlane:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        cfg = proxy.config
        self.plane = load_dataplane()(
            workers=cfg.workers, check=self._check,
            handshake_timeout=cfg.handshake_timeout, connect_timeout=cfg.connect_timeout,
            idle_timeout=cfg.idle_timeout, max_connection_lifetime=cfg.max_connection_lifetime,
            max_connections=cfg.max_connections, max_handshakes=cfg.max_handshakes,
            max_handshakes_per_source=cfg.max_handshakes_per_source,
        )
        self._wake = socket.socket(fileno=self.plane.take_wake_fd())
        self._wake.setblocking(False)
        # Admissions by (DER, direction, route): the view each was decided on, what it
        # found and the certificate's not_after. `check_peer` is a function of the
        # certificate and the view alone, so on the same view the answer is the same; a
        # peer that opens many connections with one certificate is decided once per view,
        # and every trust event (a new view) decides it afresh. Refusals are not kept.
        self._decided: dict[tuple[bytes, str, int], tuple[TrustView, PeerInfo, float]] = {}
        m = proxy.metrics
        self._counters = {d: (m.accepted.labels(d), m.active.labels(d))
                          for d in ("inbound", "outbound")}
        for direction in ("inbound", "outbound"):
            proxy.metrics.handshakes.labels(direction).set_function(
                functools.partial(self.plane.handshakes_in_progress, direction))
        proxy.metrics.registry.register(_PeerCheckCollector(self.plane))

    def start(self) -> None:
        """Hand the plane the current identity, then listen on every route."""
        cfg, proxy = self.proxy.config, self.proxy
        self._push_identity()
        proxy.identity.tls_listeners.append(self._push_identity)
        asyncio.get_running_loop().add_reader(self._wake.fileno(), self._drain)
        for i, r in enumerate(cfg.inbound):
            proxy.bound[f"inbound {r.listen}"] = self.plane.listen(
                "inbound", i, str(r.listen), str(r.forward))
        for i, o in enumerate(cfg.outbound):
            proxy.bound[f"outbound {o.listen}"] = self.plane.listen(
                "outbound", i, str(o.listen), str(o.target))
        log.info("%s/%s: native data plane on %d threads", cfg.session, cfg.service,
                 cfg.workers)

    def stop_accepting(self) -> None:
        self.plane.stop_accepting()

    async def drain(self) -> None:
        """Until the native connections have ended. When cut short (--drain-timeout),
        each one still open is ended gracefully (both directions end cleanly, within the
        plane's grace of 1 s), then whatever is left is reset."""
        try:
            while self.proxy.registry.live:
                await asyncio.sleep(0.05)
        finally:
            self.plane.drain_all()
            try:
                deadline = time.monotonic() + _DRAIN_GRACE
                while self.proxy.registry.live and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            finally:
                self.plane.close_all()

    def _push_identity(self) -> None:
        identity = self.proxy.identity
        creds = identity.credentials()
        bundle = identity.tls.bundle_pem
        if creds is None or not bundle:
            return
        try:
            self.plane.set_identity(creds[0], creds[1], bundle.encode())
        except ValueError as e:
            cfg = self.proxy.config
            log.error("%s/%s: the native data plane refused the new certificate or bundle "
                      "(new handshakes keep the previous one): %s", cfg.session, cfg.service, e)

    # -- on a data plane thread, holding the GIL ------------------------------------------
    def _check(self, direction: str, route: int, peer: str, der: bytes, cipher: str,
               conn_id: int) -> float:
        """The peer check of one handshake: seconds until the peer certificate expires,
        or -1 for a refusal (listed here). Never raises into the plane."""
        try:
            return self._decide(direction, route, peer, der, cipher, conn_id)
        except Exception:  # noqa: BLE001 - fail closed; the log shows the bug
            log.exception("peer check of a %s connection from %s failed", direction, peer)
            return -1.0

    def _decide(self, direction: str, route: int, peer: str, der: bytes, cipher: str,
                conn_id: int) -> float:
        from meshshield.sidecar.proxy import _load_certificate, _spiffe

        proxy, cfg = self.proxy, self.proxy.config
        identity = proxy.identity
        expected: tuple[str, str] | None = None
        if direction == "inbound":
            local = str(cfg.inbound[route].listen)
        else:
            o = cfg.outbound[route]
            local = str(o.listen)
            expected = (o.session or cfg.session, o.service)
        cert = _load_certificate(der)
        view = identity.view
        key = (der, direction, route)
        try:
            if view is None:
                raise MeshError(Reason.CERTIFICATE_MISSING,
                                "this sidecar holds no trust view yet")
            decided = self._decided.get(key)
            if decided is not None and decided[0] is view:
                _, info, not_after = decided
            else:
                info = check_peer(cert, view, local_service=cfg.service,
                                  direction=direction, expected=expected)
                not_after = cert.not_valid_after_utc.timestamp()
                if len(self._decided) >= _DECIDED_MAX:
                    self._decided.clear()
                self._decided[key] = (view, info, not_after)
            # rustls checks validity in whole seconds: within the second after not_after
            # it still passes a certificate, which is refused here as the handshake
            # would have been (nothing is forwarded on it either way).
            if not_after <= time.time():
                raise handshake_error("expired", f"certificate is not valid after "
                                      f"{cert.not_valid_after_utc.isoformat()}", peer)
        except MeshError as e:
            proxy._refuse(direction, local, peer, e, _spiffe(cert))
            return -1.0
        plane = self.plane
        conn = Connection(conn_id, direction, local, peer, info, cert, "TLSv1.3", cipher,
                          time.time(), expected=expected,
                          relay=_LiveBytes(plane, conn_id),
                          closer=lambda: plane.close(conn_id))
        proxy.registry.add(conn)
        # A trust event applied since `view` was read may have rechecked the registry
        # before this connection was in it: check again against what it brought.
        latest = identity.view
        if latest is not None and latest is not view:
            try:
                check_peer(cert, latest, local_service=cfg.service, direction=direction,
                           expected=expected)
            except MeshError as e:
                proxy.registry.remove(conn)
                proxy._refuse(direction, local, peer, e, _spiffe(cert))
                return -1.0
        accepted, active = self._counters[direction]
        accepted.inc()
        active.inc()
        return max(0.0, not_after - time.time())

    # -- on the event loop ----------------------------------------------------------------
    def _drain(self) -> None:
        try:
            while self._wake.recv(4096):
                pass
            # The plane's end is gone: nothing more will wake us.
            asyncio.get_running_loop().remove_reader(self._wake.fileno())
        except (BlockingIOError, InterruptedError):
            pass
        for event in self.plane.take_events():
            try:
                self._event(event)
            except Exception:  # noqa: BLE001 - one event must not stop the others
                log.exception("native data plane event %r failed", event[:3])

    def _local(self, direction: str, route: int) -> str:
        cfg = self.proxy.config
        routes = cfg.inbound if direction == "inbound" else cfg.outbound
        return str(routes[route].listen)

    def _event(self, event: Event) -> None:
        proxy = self.proxy
        kind = event[0]
        if kind == "refused":
            _, direction, route, peer, why, detail = event
            assert isinstance(direction, str) and isinstance(route, int)
            proxy._refuse(direction, self._local(direction, route), str(peer),
                          handshake_error(str(why), str(detail), str(peer)))
        elif kind == "counted":
            # Closes coalesced by direction and reason (a flood is one event).
            _, direction, reason, count = event
            assert isinstance(count, int)
            if reason == "tls_handshake_failed":
                # A TCP probe or port scan: counted, the refusal list is for peers.
                proxy.metrics.refused.labels(str(direction), str(reason)).inc(count)
            else:
                proxy._over_budget(str(direction), MeshError(
                    Reason(str(reason)),
                    f"{direction} connections over budget (--max-connections, "
                    "--max-handshakes, --max-handshakes-per-source)"), count)
        elif kind == "ended":
            _, conn_id, ending, detail, bytes_in, bytes_out = event
            assert isinstance(conn_id, int)
            assert isinstance(bytes_in, int) and isinstance(bytes_out, int)
            self._ended(conn_id, str(ending), str(detail), bytes_in, bytes_out)
        elif kind == "unreachable":
            _, conn_id, detail = event
            conn = proxy.registry.live.get(int(str(conn_id)))
            if conn is not None:
                proxy.registry.remove(conn)
                self._counters[conn.direction][1].dec()
            cfg = proxy.config
            log.warning("%s/%s: %s", cfg.session, cfg.service, detail)

    def _ended(self, conn_id: int, ending: str, detail: str, bytes_in: int,
               bytes_out: int) -> None:
        proxy, cfg = self.proxy, self.proxy.config
        conn = proxy.registry.live.get(conn_id)
        if conn is None:
            return
        conn.relay = None
        conn.bytes_in, conn.bytes_out = bytes_in, bytes_out
        if conn.closed_reason is None and ending in _BOUNDS:
            err = self._bound_error(conn, ending)
            conn.closed_reason = ending
            proxy.registry.refuse(conn.direction, conn.local, conn.peer, err,
                                  conn.info.spiffe_id)
            log.info("%s/%s: closed %s connection %s with %s: %s: %s", cfg.session,
                     cfg.service, conn.direction, conn.peer, conn.info.spiffe_id,
                     err.reason.value, err.message)
        reason = conn.closed_reason or ending
        proxy.metrics.closed.labels(conn.direction, reason).inc()
        for way, n in (("in", bytes_in), ("out", bytes_out)):
            key = (conn.direction, way)
            proxy.metrics.bytes_closed[key] = proxy.metrics.bytes_closed.get(key, 0) + n
        self._counters[conn.direction][1].dec()
        proxy.registry.remove(conn)
        level = logging.DEBUG if ending == "closed" else logging.INFO
        log.log(level, "%s/%s: %s connection %d %s %s/%s (%s) ended: %s: %s; "
                "%d bytes in, %d out", cfg.session, cfg.service, conn.direction, conn.id,
                "from" if conn.direction == "inbound" else "to", conn.info.session,
                conn.info.service, conn.peer, reason, detail or "both directions closed",
                bytes_in, bytes_out)

    def _bound_error(self, conn: Connection, ending: str) -> MeshError:
        cfg, info = self.proxy.config, conn.info
        who = f"peer {info.session}/{info.service}"
        if ending == "certificate_expired":
            return MeshError(Reason.CERTIFICATE_EXPIRED,
                             f"{who}: its certificate {info.serial} expired at "
                             f"{info.not_after}; a connection ends with its peer's "
                             "certificate (the peer renews by attesting again, then reconnects)")
        if ending == "max_connection_lifetime":
            return MeshError(Reason.MAX_CONNECTION_LIFETIME,
                             f"{who}: the connection reached --max-connection-lifetime "
                             f"({cfg.max_connection_lifetime:g} s); the client may reconnect")
        return MeshError(Reason.IDLE_TIMEOUT,
                         f"{who}: no byte either way for {cfg.idle_timeout:g} s "
                         "(--idle-timeout); the client may reconnect")


class _PeerCheckCollector(Collector):
    """What the Python peer check costs the native plane (the GIL, once per handshake)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def collect(self) -> Iterator[Metric]:
        count, wait_ns, held_ns = self.plane.peer_check_stats()
        yield CounterMetricFamily("meshshield_sidecar_native_peer_checks",
                                  "Peer checks the native data plane asked of Python",
                                  value=count)
        yield CounterMetricFamily("meshshield_sidecar_native_peer_check_gil_wait_seconds",
                                  "Time the native data plane waited for the GIL to check "
                                  "peers", value=wait_ns / 1e9)
        yield CounterMetricFamily("meshshield_sidecar_native_peer_check_seconds",
                                  "Time the native data plane held the GIL to check peers",
                                  value=held_ns / 1e9)
