"""The CAS's HTTP API (SPEC §6): a thin shell around `Authority`.

Every error leaves as `{"error": {"code", "message"}}` with a fitting status; nothing a
client sends can produce a 500 or a stack trace (the middleware turns anything
unexpected into a logged `internal` error without details).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from meshshield.adminauth import verify_signature
from meshshield.cas.authority import Authority
from meshshield.cas.edges import fold_edges
from meshshield.cas.store import StoreUnavailable
from meshshield.errors import MeshError, Reason
from meshshield.pki.ca import issued_by_bundle
from meshshield.pki.spiffe import parse_spiffe_id, spiffe_id_of
from meshshield.policy import PolicyInvalid
from meshshield.runtime import register_runtime_gauges

log = logging.getLogger("meshshield.cas")

MAX_BODY = 1024 * 1024
MAX_REPORT_CONNECTIONS = 10_000
HEARTBEAT_SECONDS = 15.0
EVENT_WRITE_SECONDS = 30.0
REPORT_MAX_AGE = 120.0
# Threads that run Authority's work (evidence verification, signing, policy parsing,
# store calls), so that the event loop only moves bytes and one tenant's big change or
# slow verification never holds up anyone else's request.
WORKERS = 8
# Certificate issuance (nonces and attestations, the mesh's hot path) has a lane of its
# own: a thread or two that take its work in turn, so an admin's big policy change never
# queues it, and so that a burst of attestations is not spread over every worker thread
# at once. Those threads would only take turns at the interpreter lock anyway, and each
# hand-over between them costs a kernel wake-up: with 8 at a time, more CPU per
# certificate went into those hand-overs than into signing. One thread on SQLite, whose
# writes take turns on the file; two on PostgreSQL, so one computes while the other
# waits for its round trip to the server.
ISSUE_WORKERS = {"sqlite": 1, "postgresql": 2}

T = TypeVar("T")

# Metric status of a request whose client went away before it was answered (nginx: 499).
CLIENT_CLOSED = "client_closed"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

AUTHORITY = web.AppKey("authority", Authority)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
ISSUE_LANE = web.AppKey("issue_lane", ThreadPoolExecutor)
# More of /v1/ready's answer: name -> a status, e.g. "changes" (cas/pg_listen.py).
READY_DETAILS = web.AppKey("ready_details", dict[str, Callable[[], Any]])


async def off_loop(request: web.Request, fn: Callable[..., T], *args: Any,
                   lane: web.AppKey[ThreadPoolExecutor] = EXECUTOR) -> T:
    """Run `fn(*args)` on the CAS's worker threads (or those of `lane`) and wait."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[lane], functools.partial(fn, *args))


class _AuthorityWork(Collector):
    """Counters kept by Authority (work done per change), read at scrape time."""

    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    def collect(self) -> Iterator[CounterMetricFamily]:
        a = self._authority
        yield CounterMetricFamily(
            "meshshield_cas_policies_parsed", "Stored or submitted policies parsed",
            value=a.stats.policies_parsed,
        )
        yield CounterMetricFamily(
            "meshshield_cas_ca_keys_unsealed", "CA private keys unsealed from the store",
            value=a.ca.keys_unsealed,
        )


class CasMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "meshshield_cas_requests_total", "HTTP requests by route and status",
            ["route", "status"], registry=self.registry,
        )
        self.attestations = Counter(
            "meshshield_cas_attestations_total",
            "Attestations by result (issued or the refusal reason code)",
            ["result"], registry=self.registry,
        )
        # No session label: /metrics is open to any scraper, and session names are
        # the tenants' business (per-session counts are in the audit log).
        self.issued = Counter(
            "meshshield_cas_certificates_issued_total", "Certificates issued",
            ["platform", "simulated"], registry=self.registry,
        )
        self.attest_seconds = Histogram(
            "meshshield_cas_attest_seconds", "Time to verify evidence and issue",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.epoch = Gauge("meshshield_cas_epoch", "Trust epoch", registry=self.registry)
        self.subscribers = Gauge(
            "meshshield_cas_event_subscribers", "Open /v1/events streams", registry=self.registry
        )
        register_runtime_gauges(self.registry, "meshshield_cas")


class EventHub:
    """Wakes every /v1/events stream when the trust epoch changes."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()
        self.closing = False

    def notify(self, _epoch: int) -> None:
        for w in self._waiters:
            w.set()

    async def close(self, _app: web.Application) -> None:
        """On shutdown: end every stream now, or a graceful stop waits for them."""
        self.closing = True
        self.notify(-1)

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiters.add(ev)
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._waiters.discard(ev)


METRICS = web.AppKey("metrics", CasMetrics)
HUB = web.AppKey("hub", EventHub)


def _error(reason: Reason, message: str, status: int | None = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"error": {"code": reason.value, "message": message, **extra}}
    return web.json_response(body, status=status or MeshError(reason, message).http_status)


_HTTP_REASON = {
    400: Reason.BAD_REQUEST,
    401: Reason.UNAUTHENTICATED,
    403: Reason.FORBIDDEN,
    404: Reason.NOT_FOUND,
    405: Reason.BAD_REQUEST,
    409: Reason.CONFLICT,
    413: Reason.BODY_TOO_LARGE,
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics: CasMetrics = request.app[METRICS]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "?"
    try:
        resp = await handler(request)
    except PolicyInvalid as e:
        resp = _error(
            Reason.POLICY_INVALID,
            f"policy has {len(e.problems)} problem(s): "
            + "; ".join(str(p) for p in e.problems[:3]),
            problems=[str(p) for p in e.problems],
        )
    except MeshError as e:
        resp = _error(e.reason, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = _HTTP_REASON.get(e.status, Reason.BAD_REQUEST)
        msg = e.reason
        if e.status == 413:
            msg = f"request body is larger than {MAX_BODY} bytes"
        elif e.status == 404:
            msg = f"no such endpoint: {request.method} {request.path}"
        elif e.status == 405:
            msg = f"method {request.method} is not allowed on {request.path}"
        resp = _error(reason, msg, status=e.status)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the one place unexpected errors are contained
        if isinstance(e, ConnectionResetError) and _client_gone(request):
            # The client hung up before its request was read or answered: its doing, not
            # ours, so no traceback and no 500; counted apart so a flood of them shows.
            log.debug("client %s closed the connection during %s %s", request.remote,
                      request.method, request.path)
            metrics.requests.labels(route, CLIENT_CLOSED).inc()
            return web.Response(status=499)  # never delivered: there is no one to read it
        log.exception("internal error on %s %s", request.method, request.path)
        resp = _error(Reason.INTERNAL, "internal error; the CAS logged the details", status=500)
    metrics.requests.labels(route, str(resp.status)).inc()
    return resp


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise MeshError(
            Reason.BODY_TOO_LARGE,
            f"request body is {request.content_length} bytes, at most {MAX_BODY}",
        )
    return await request.read()


async def _read_json(request: web.Request) -> Any:
    body = await _read_body(request)
    if not body:
        raise MeshError(Reason.BAD_REQUEST, "request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise MeshError(Reason.BAD_REQUEST, "request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise MeshError(
            Reason.BAD_REQUEST, f"request body is not valid JSON: {e.msg} at line {e.lineno} "
            f"column {e.colno}"
        ) from None
    except ValueError:  # e.g. an integer longer than Python's 4300-digit limit
        raise MeshError(
            Reason.BAD_REQUEST, "request body JSON holds a number too long to read (over 4300 "
            "digits); send numbers of reasonable size"
        ) from None
    except RecursionError:
        raise MeshError(Reason.BAD_REQUEST, "request body JSON is nested too deeply") from None


async def _admin(request: web.Request, body: bytes = b"") -> str:
    authority = request.app[AUTHORITY]
    signed = verify_signature(
        request.headers.get("Authorization"),
        request.method,
        request.path_qs,
        body,
        authority.clock.now().timestamp(),
    )
    return await off_loop(request, authority.admit_request, signed)  # a store write


def _peer_certificate(request: web.Request) -> x509.Certificate:
    """The verified TLS client certificate of this connection, or certificate_missing."""
    ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_obj.getpeercert(binary_form=True) if isinstance(ssl_obj, ssl.SSLObject) else None
    if not der:
        raise MeshError(
            Reason.CERTIFICATE_MISSING,
            "this endpoint needs a mesh certificate: present the sidecar's certificate "
            "as the TLS client certificate",
        )
    return x509.load_der_x509_certificate(der)


def _mesh_identity(request: web.Request) -> tuple[str, str, x509.Certificate]:
    """(session, service) of a verified, unrevoked mesh client certificate."""
    authority = request.app[AUTHORITY]
    cert = _peer_certificate(request)
    try:
        uri = spiffe_id_of(cert)
        sid = parse_spiffe_id(uri) if uri else None
    except ValueError as e:
        raise MeshError(Reason.PEER_NOT_ALLOWED, f"client certificate SPIFFE ID: {e}") from None
    if (
        sid is None
        or sid.trust_domain != authority.config.trust_domain
        or len(sid.path_segments) != 2
    ):
        raise MeshError(
            Reason.PEER_NOT_ALLOWED,
            f"client certificate is not a workload of trust domain "
            f"{authority.config.trust_domain} (URI SAN {uri!r})",
        )
    refusal = authority.certificate_refusal(cert)
    if refusal is not None:
        raise refusal
    return sid.path_segments[0], sid.path_segments[1], cert


# -- handlers ---------------------------------------------------------------------------


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    try:
        epoch = await off_loop(request, authority.store.epoch)
    except MeshError as e:  # store_unavailable: the database is down or restarting
        return _error(e.reason, e.message, status=503)
    except Exception as e:  # noqa: BLE001 - readiness reports, it does not raise
        return _error(Reason.STORE_UNAVAILABLE, f"store unavailable: {type(e).__name__}",
                      status=503)
    details = {name: f() for name, f in request.app.get(READY_DETAILS, {}).items()}
    return web.json_response({"status": "ready", "epoch": epoch, **details})


async def bundle(request: web.Request) -> web.Response:
    return web.json_response(request.app[AUTHORITY].bundle())


async def bundle_spiffe(request: web.Request) -> web.Response:
    """The trust bundle as a SPIFFE bundle endpoint document (a JWK Set)."""
    return web.json_response(request.app[AUTHORITY].spiffe_bundle())


def _session_response(rec_policy: bytes, h: str, status: int = 200) -> web.Response:
    return web.Response(
        body=rec_policy,
        status=status,
        content_type="application/yaml",
        headers={"ETag": f'"{h}"', "X-Policy-Hash": h},
    )


async def create_session(request: web.Request) -> web.Response:
    body = await _read_body(request)
    who = await _admin(request, body)
    authority = request.app[AUTHORITY]
    rec = await off_loop(request, authority.create_session, who, body)
    return web.json_response(
        {"session": rec.name, "policy_hash": rec.policy_hash, "epoch": authority.epoch},
        status=201, headers={"ETag": f'"{rec.policy_hash}"'},
    )


async def get_session(request: web.Request) -> web.Response:
    who = await _admin(request)
    rec = request.app[AUTHORITY].read_session(who, request.match_info["name"])
    return _session_response(rec.policy, rec.policy_hash)


async def put_session(request: web.Request) -> web.Response:
    body = await _read_body(request)
    who = await _admin(request, body)
    authority = request.app[AUTHORITY]
    rec = await off_loop(request, authority.update_session, who, request.match_info["name"], body)
    return web.json_response(
        {"session": rec.name, "policy_hash": rec.policy_hash, "epoch": authority.epoch},
        headers={"ETag": f'"{rec.policy_hash}"'},
    )


async def delete_session(request: web.Request) -> web.Response:
    who = await _admin(request)
    authority = request.app[AUTHORITY]
    await off_loop(request, authority.delete_session, who, request.match_info["name"])
    return web.json_response({"deleted": request.match_info["name"], "epoch": authority.epoch})


async def revoke(request: web.Request) -> web.Response:
    raw = await _read_body(request)
    who = await _admin(request, raw)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise MeshError(Reason.BAD_REQUEST, "revocation body is not valid JSON") from None
    authority = request.app[AUTHORITY]
    result = await off_loop(request, authority.revoke, who, request.match_info["name"], body)
    return web.json_response(result, status=201)


async def put_secret(request: web.Request) -> web.Response:
    """An admin's upload of a `value` secret: the raw bytes are the value."""
    body = await _read_body(request)
    who = await _admin(request, body)
    authority = request.app[AUTHORITY]
    result = await off_loop(request, authority.put_secret, who, request.match_info["name"],
                            request.match_info["secret"], body)
    return web.json_response(result)


async def rotate_secret(request: web.Request) -> web.Response:
    body = await _read_body(request)
    who = await _admin(request, body)
    authority = request.app[AUTHORITY]
    result = await off_loop(request, authority.rotate_secret, who, request.match_info["name"],
                            request.match_info["secret"])
    return web.json_response(result, status=201)


async def secret_releases(request: web.Request) -> web.Response:
    who = await _admin(request)
    authority = request.app[AUTHORITY]
    result = await off_loop(request, authority.secret_audit, who, request.match_info["name"])
    return web.json_response(result)


async def nonce(request: web.Request) -> web.Response:
    await _read_body(request)
    authority = request.app[AUTHORITY]
    # No store call: a nonce is minted, not stored. While the database is known to be
    # down, say so now rather than at the attestation that would follow.
    down = authority.store.unavailable()
    if down is not None:
        raise StoreUnavailable(down)
    return web.json_response(authority.new_nonce())


async def attest(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    started = time.perf_counter()
    try:
        body = await _read_json(request)
        result = await off_loop(request, request.app[AUTHORITY].attest, body,
                                lane=ISSUE_LANE)
    except MeshError as e:
        metrics.attestations.labels(e.reason.value).inc()
        log.info("attestation refused from %s: %s", request.remote, e)
        raise
    metrics.attestations.labels("issued").inc()
    claims = result["claims"]
    metrics.issued.labels(claims["platform"], str(claims["simulated"])).inc()
    metrics.attest_seconds.observe(time.perf_counter() - started)
    return web.json_response(result)


async def _write_within(request: web.Request, resp: web.StreamResponse, data: bytes) -> bool:
    """Write to an event stream; a subscriber that does not read for EVENT_WRITE_SECONDS
    is cut (its connection aborted), so no stream holds a buffer or a slot forever."""
    try:
        async with asyncio.timeout(EVENT_WRITE_SECONDS):
            await resp.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        return False
    return True


async def events(request: web.Request) -> web.StreamResponse:
    session, service, cert = _mesh_identity(request)
    authority = request.app[AUTHORITY]
    hub = request.app[HUB]
    metrics = request.app[METRICS]
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    wake = hub.subscribe()
    metrics.subscribers.inc()
    log.info("events: %s/%s subscribed", session, service)
    try:
        sent: tuple[int, str] | None = None
        while not hub.closing:
            # Clear before reading the state: a change from here on, even one made while
            # the write below waits for the client, sets `wake` again and is sent next.
            wake.clear()
            snap = authority.trust_snapshot(session)
            now_sending = (authority.epoch, str(snap.get("bundle", "")))
            if now_sending != sent:
                sent = now_sending
                if not await _write_within(
                    request, resp,
                    f"id: {sent[0]}\nevent: trust\ndata: {json.dumps(snap)}\n\n".encode(),
                ):
                    log.warning("events: %s/%s: took no snapshot within %.0f s; cut (it will "
                                "reconnect)", session, service, EVENT_WRITE_SECONDS)
                    break
                if not issued_by_bundle(cert, sent[1]):
                    # It has heard of the new bundle; its certificate is no longer trusted.
                    log.info("events: %s/%s: its certificate's CA left the bundle; closing",
                             session, service)
                    break
                # Revoked, or no longer passing its policy: it got the snapshot that says
                # so (its peers in it), and nothing after.
                refusal = authority.certificate_refusal(cert)
                if refusal is not None:
                    log.info("events: %s/%s: stream ended: %s", session, service, refusal)
                    break
                continue
            try:
                await asyncio.wait_for(wake.wait(), HEARTBEAT_SECONDS)
            except TimeoutError:
                if not await _write_within(request, resp, b": keep-alive\n\n"):
                    log.warning("events: %s/%s: took no keep-alive within %.0f s; cut",
                                session, service, EVENT_WRITE_SECONDS)
                    break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.unsubscribe(wake)
        metrics.subscribers.dec()
    return resp


async def reports(request: web.Request) -> web.Response:
    session, service, cert = _mesh_identity(request)
    body = await _read_json(request)
    conns = body.get("connections") if isinstance(body, dict) else None
    if not isinstance(conns, list) or not all(isinstance(c, dict) for c in conns):
        raise MeshError(
            Reason.BAD_REQUEST, 'report must be {"connections": [ {...}, ... ]}'
        )
    if len(conns) > MAX_REPORT_CONNECTIONS:
        raise MeshError(
            Reason.BODY_TOO_LARGE,
            f"report lists {len(conns)} connections, at most {MAX_REPORT_CONNECTIONS}",
        )
    authority = request.app[AUTHORITY]
    reporter = spiffe_id_of(cert) or f"{session}/{service}"
    own = authority.own_connections(session, service, conns)
    await off_loop(
        request, authority.store.put_report,
        reporter, json.dumps({"connections": own}), authority.clock.now(),
    )
    return web.json_response(
        {"accepted": len(own), "dropped": len(conns) - len(own)}, status=202
    )


async def jwt_svid(request: web.Request) -> web.Response:
    """A JWT-SVID for the caller's mesh certificate (cas/jwt.py)."""
    # _mesh_identity refuses revoked or failing certificates and revoked measurements.
    _session, _service, cert = _mesh_identity(request)
    authority = request.app[AUTHORITY]
    body = await _read_json(request)
    return web.json_response(authority.jwt.issue(cert, body, authority.clock.now()))


async def edges(request: web.Request) -> web.Response:
    who = await _admin(request)
    authority = request.app[AUTHORITY]
    visible = authority.visible_sessions(who)
    if visible is not None and not visible:
        raise MeshError(
            Reason.FORBIDDEN, "this admin key may read no session, so it sees no edges"
        )
    return web.json_response({"edges": await off_loop(request, _fold_reports, authority, visible)})


def _fold_reports(authority: Authority, visible: set[str] | None) -> list[dict[str, Any]]:
    fresh_after = authority.clock.now() - timedelta(seconds=REPORT_MAX_AGE)
    reports = []
    for rep in authority.store.reports():
        try:
            sid = parse_spiffe_id(rep.reporter)
        except ValueError:
            continue
        if rep.at < fresh_after:
            continue  # a sidecar that stopped reporting no longer vouches for its edges
        if visible is not None and (not sid.path_segments or sid.path_segments[0] not in visible):
            continue
        reports.append((rep.reporter, json.loads(rep.body_json).get("connections", [])))
    return fold_edges(reports)


async def rotate_ca(request: web.Request) -> web.Response:
    raw = await _read_body(request)
    who = await _admin(request, raw)
    authority = request.app[AUTHORITY]
    authority.require_admin(who, "rotate the CA")
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        raise MeshError(Reason.BAD_REQUEST, "rotate body is not valid JSON") from None
    if not isinstance(body, dict) or set(body) - {"activate_after_seconds", "force"}:
        raise MeshError(Reason.BAD_REQUEST, 'rotate body must be {"activate_after_seconds": '
                        'N} or {"force": true}')
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise MeshError(Reason.BAD_REQUEST, '"force" must be true or false')
    if force:
        return web.json_response(authority.rotate_ca(who, 0.0, force=True), status=201)
    after = body.get("activate_after_seconds", 3600)
    if (
        not isinstance(after, (int, float))
        or isinstance(after, bool)
        or not 1 <= after <= 30 * 86400
    ):
        raise MeshError(
            Reason.BAD_REQUEST, "activate_after_seconds must be a number from 1 to 2592000"
        )
    return web.json_response(
        await off_loop(request, authority.rotate_ca, who, float(after)), status=201
    )


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    m.epoch.set(request.app[AUTHORITY].epoch)
    return web.Response(body=generate_latest(m.registry), content_type="text/plain")


async def _bind_loop(app: web.Application) -> None:
    """Authority's listeners (event streams, the TLS context) belong to the event loop;
    changes made on worker threads hand them over to it."""
    loop = asyncio.get_running_loop()

    def dispatch(call: Callable[[], None]) -> None:
        loop.call_soon_threadsafe(call)

    app[AUTHORITY].dispatch = dispatch


async def _open_issue_lane(app: web.Application) -> None:
    """Start the issuance lane's thread now, with its store connection (SQLite keeps one
    per thread), rather than at the first attestation."""
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(app[ISSUE_LANE], app[AUTHORITY].store.epoch)
    except MeshError as e:  # the database is down: the first attestation will say so
        log.warning("issuance lane: the store is not reachable yet: %s", e.message)


async def _stop_workers(app: web.Application) -> None:
    loop = asyncio.get_running_loop()
    for pool in (app[ISSUE_LANE], app[EXECUTOR]):
        await loop.run_in_executor(None, pool.shutdown)


def create_app(authority: Authority) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware])
    app[AUTHORITY] = authority
    m = CasMetrics()
    app[METRICS] = m
    hub = EventHub()
    app[HUB] = hub
    app[EXECUTOR] = ThreadPoolExecutor(WORKERS, thread_name_prefix="cas-work")
    app[ISSUE_LANE] = ThreadPoolExecutor(ISSUE_WORKERS.get(authority.store.engine, 2),
                                         thread_name_prefix="cas-issue")
    app[READY_DETAILS] = {}
    m.registry.register(_AuthorityWork(authority))
    authority.listeners.append(hub.notify)
    app.on_startup.append(_bind_loop)
    app.on_startup.append(_open_issue_lane)
    app.on_shutdown.append(hub.close)
    app.on_cleanup.append(_stop_workers)
    r = app.router
    r.add_get("/v1/health", health)
    r.add_get("/v1/ready", ready)
    r.add_get("/v1/bundle", bundle)
    r.add_get("/v1/bundle/spiffe", bundle_spiffe)
    r.add_post("/v1/sessions", create_session)
    r.add_get("/v1/sessions/{name}", get_session)
    r.add_put("/v1/sessions/{name}", put_session)
    r.add_delete("/v1/sessions/{name}", delete_session)
    r.add_post("/v1/sessions/{name}/revocations", revoke)
    r.add_put("/v1/sessions/{name}/secrets/{secret}", put_secret)
    r.add_post("/v1/sessions/{name}/secrets/{secret}/rotation", rotate_secret)
    r.add_get("/v1/sessions/{name}/secret-releases", secret_releases)
    r.add_post("/v1/attest/nonce", nonce)
    r.add_post("/v1/attest", attest)
    r.add_get("/v1/events", events)
    r.add_post("/v1/reports", reports)
    r.add_post("/v1/jwt", jwt_svid)
    r.add_get("/v1/edges", edges)
    r.add_post("/v1/ca/rotate", rotate_ca)
    r.add_get("/metrics", metrics)
    return app
