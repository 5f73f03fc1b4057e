"""`meshshield webhook`: the mutating admission webhook (admission.k8s.io/v1).

`review_response` is the whole decision as a pure function (AdmissionReview in,
AdmissionReview out); `create_app` wraps it in aiohttp with a bounded body, health and
Prometheus metrics; `serve_webhook` serves that over TLS (1.2 or later, as the API server
speaks) and picks up a renewed certificate (cert-manager, `webhook certs`) without a
restart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from meshshield.errors import Reason
from meshshield.httpserver import ConnectionLimits, start_site
from meshshield.httpserver import runner as json_error_runner
from meshshield.kube.annotations import InjectError
from meshshield.kube.config import DEFAULT_CONFIG, InjectConfig
from meshshield.kube.inject import describe, inject_pod_spec
from meshshield.kube.patch import json_patch

log = logging.getLogger("meshshield.kube.webhook")

MAX_BODY = 1 << 20  # 1 MiB; the API server's own request limit is larger, pods are not
ADMISSION_API = "admission.k8s.io/v1"
CERT_RELOAD_SECONDS = 10.0
# The API server calls with a 10 s timeout (timeoutSeconds) over a few kept-alive
# connections; anything beyond these bounds is not the API server.
WEBHOOK_LIMITS = ConnectionLimits(max_connections=1024, max_handshakes=64,
                                  handshake_timeout=10.0, header_timeout=10.0,
                                  body_timeout=10.0, idle_timeout=90.0)


class MalformedReview(ValueError):
    """The request body is not an AdmissionReview v1 we can answer."""


@dataclass(frozen=True)
class Decision:
    """What the webhook decided, for the response, the log and the metrics."""

    response: dict[str, Any]
    result: str  # injected | unchanged | denied | skipped


def review_response(review: object, config: InjectConfig = DEFAULT_CONFIG) -> Decision:
    """Answer one AdmissionReview; raises MalformedReview for a body that is not one."""
    if not isinstance(review, dict):
        raise MalformedReview("expected a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != ADMISSION_API or review.get("kind") != "AdmissionReview":
        raise MalformedReview(
            f"expected apiVersion {ADMISSION_API} and kind AdmissionReview, found "
            f"{review.get('apiVersion')!r} and {review.get('kind')!r}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("request: expected an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("request.uid: expected a non-empty string")
    kind = request.get("kind")
    is_pod = isinstance(kind, dict) and kind.get("group", "") == "" and kind.get("kind") == "Pod"
    if not is_pod or request.get("operation") != "CREATE" or request.get("subResource"):
        return Decision(_envelope({"uid": uid, "allowed": True}), "skipped")
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise MalformedReview("request.object: expected the Pod being created")
    spec = pod.get("spec")
    meta = pod.get("metadata", {})
    if not isinstance(spec, dict) or not isinstance(meta, dict):
        raise MalformedReview("request.object: expected a Pod with metadata and spec objects")

    who = _who(request, pod)
    try:
        new_meta, new_spec = inject_pod_spec(meta, spec, config)
    except InjectError as err:
        log.info("denied pod %s: %s", who, err.message)
        return Decision(
            _envelope({
                "uid": uid,
                "allowed": False,
                "status": {"code": 400, "reason": "BadRequest",
                           "message": f"meshshield: {err.message}"},
            }),
            "denied",
        )
    patch = json_patch(pod, {**pod, "metadata": new_meta, "spec": new_spec})
    if not patch:
        return Decision(_envelope({"uid": uid, "allowed": True}), "unchanged")
    log.info("injected pod %s (%s)", who, new_meta.get("annotations", {}).get(
        "meshshield.io/status", ""))
    encoded = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    return Decision(
        _envelope({"uid": uid, "allowed": True, "patchType": "JSONPatch", "patch": encoded}),
        "injected",
    )


def _envelope(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": response}


def _who(request: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    namespace = request.get("namespace")
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else {}
    if namespace and isinstance(meta, Mapping) and not meta.get("namespace"):
        pod = {**pod, "metadata": {**meta, "namespace": namespace}}
    return describe(pod)


class WebhookMetrics:
    """Per-app metrics in a registry of their own (tests run several apps at once)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reviews = Counter(
            "meshshield_webhook_reviews",
            "Admission reviews answered, by result",
            ["result"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "meshshield_webhook_review_seconds",
            "Time to answer one admission review",
            registry=self.registry,
        )
        for result in ("injected", "unchanged", "denied", "skipped", "malformed", "too_large"):
            self.reviews.labels(result=result)


METRICS: web.AppKey[WebhookMetrics] = web.AppKey("metrics", WebhookMetrics)
CONFIG: web.AppKey[InjectConfig] = web.AppKey("config", InjectConfig)


def _error(status: int, reason: Reason, message: str) -> web.Response:
    return web.json_response({"error": {"code": reason.value, "message": message}}, status=status)


async def _mutate(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    started = time.monotonic()
    try:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            metrics.reviews.labels(result="too_large").inc()
            return _error(413, Reason.BODY_TOO_LARGE,
                          f"an AdmissionReview may be at most {MAX_BODY} bytes")
        try:
            review = json.loads(body)
            decision = review_response(review, request.app[CONFIG])
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            metrics.reviews.labels(result="malformed").inc()
            message = str(err) if isinstance(err, MalformedReview) else "body is not valid JSON"
            log.warning("malformed admission review from %s: %s", request.remote, message)
            return _error(400, Reason.BAD_REQUEST, f"malformed AdmissionReview: {message}")
        metrics.reviews.labels(result=decision.result).inc()
        return web.json_response(decision.response)
    finally:
        metrics.seconds.observe(time.monotonic() - started)


async def _healthz(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: InjectConfig = DEFAULT_CONFIG) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[CONFIG] = config
    app[METRICS] = WebhookMetrics()
    app.router.add_post("/mutate", _mutate)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); ValueError with the expected form."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen: expected HOST:PORT (e.g. 0.0.0.0:9443), found {listen!r}")
    return host, int(port)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ server context; raises OSError / ssl.SSLError on unusable files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _mtimes(*paths: str) -> tuple[float, ...]:
    try:
        return tuple(os.stat(p).st_mtime_ns for p in paths)
    except OSError:
        return ()


async def _reload_certificates(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """Load a renewed certificate into the live context; new handshakes use it."""
    seen = _mtimes(cert, key)
    while True:
        await asyncio.sleep(CERT_RELOAD_SECONDS)
        now = _mtimes(cert, key)
        if now and now != seen:
            try:
                ctx.load_cert_chain(cert, key)
                seen = now
                log.info("reloaded serving certificate %s", cert)
            except (OSError, ssl.SSLError) as err:
                # A half-written pair; keep serving with the old one and retry.
                log.warning("serving certificate %s not reloaded yet: %s", cert, err)


async def serve_webhook(
    listen: str,
    tls_cert: str,
    tls_key: str,
    config: InjectConfig = DEFAULT_CONFIG,
    *,
    started: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT (or `stop` is set). Raises ValueError, OSError,
    ssl.SSLError for a bad listen address or unusable certificate files."""
    host, port = parse_listen(listen)
    ctx = server_tls_context(tls_cert, tls_key)
    runner = json_error_runner(create_app(config), WEBHOOK_LIMITS, shutdown_timeout=5.0)
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    reload_task = loop.create_task(_reload_certificates(ctx, tls_cert, tls_key))
    try:
        await start_site(runner, host, port, ssl_context=ctx, limits=WEBHOOK_LIMITS,
                         name="webhook")
        log.info("webhook listening on https://%s (TLS 1.2+)", listen)
        if started is not None:
            started.set()
        await stop.wait()
    finally:
        reload_task.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
