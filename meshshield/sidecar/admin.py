"""The sidecar's admin API (loopback by default) and its kubelet health listener."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshshield.clock import rfc3339
from meshshield.runtime import runtime_counts
from meshshield.sidecar.caslink import CasLink
from meshshield.sidecar.identity import Identity
from meshshield.sidecar.proxy import Proxy, SidecarMetrics
from meshshield.sidecar.registry import ConnectionRegistry, rfc3339_from
from meshshield.sidecar.sds import SdsServer


class SidecarState:
    """What the admin API reads; one per sidecar process."""

    def __init__(self, identity: Identity, registry: ConnectionRegistry, proxy: Proxy,
                 link: CasLink, metrics: SidecarMetrics) -> None:
        self.identity = identity
        self.registry = registry
        self.proxy = proxy
        self.link = link
        self.metrics = metrics
        self.listening = False
        self.draining = False
        self.sds: SdsServer | None = None
        self.started = time.time()
        self.workload_api: Any = None  # sidecar/workloadapi.py, with --workload-api
        metrics.registry.register(_LoopCollector(identity, link))

    @property
    def ready(self) -> bool:
        """Holding an unexpired certificate, listening, not draining. (An expired one,
        kept while the CAS is unreachable, can no longer complete a handshake.)"""
        held = self.identity.held
        return (self.identity.ready and held is not None and self.listening
                and not self.draining and held.not_after.timestamp() > time.time())

    def status(self) -> dict[str, Any]:
        cfg = self.identity.config
        held = self.identity.held
        view = self.identity.view
        return {
            "session": cfg.session,
            "service": cfg.service,
            "platform": cfg.platform,
            "ready": self.ready,
            "draining": self.draining,
            "identity": None if held is None else {
                "spiffe_id": held.spiffe_id,
                "serial": held.serial,
                "not_after": rfc3339(held.not_after),
                "renew_at": None if self.identity.renew_at is None
                else rfc3339_from(self.identity.renew_at),
                "claims": held.claims,
                "simulated": bool(held.claims.get("simulated")),
            },
            "attestations": self.identity.renewals,
            "attest_failures": self.identity.failures,
            "last_attest_error": self.identity.last_error,
            "last_attest_error_at": None if self.identity.last_error_at is None
            else rfc3339_from(self.identity.last_error_at),
            "cas": self.link.status(),
            "epoch": None if view is None else view.epoch,
            "policy_hash": None if view is None else view.policy_hash,
            "listeners": [
                {"route": name, "bound": bound} for name, bound in self.proxy.bound.items()
            ],
            "connections": len(self.registry.live),
            "sds": None if self.sds is None else self.sds.status(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "runtime": runtime_counts(),
            "workload_api": None if self.workload_api is None else self.workload_api.status(),
            "secrets": None if self.identity.secret_files is None else (
                self.identity.secret_files.status()),
        }


class _LoopCollector(Collector):
    """The renewal and event-stream loops' health, read at scrape time."""

    def __init__(self, identity: Identity, link: CasLink) -> None:
        self.identity = identity
        self.link = link

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "meshshield_sidecar_attest_failures", "Failed attestations and renewals",
            value=self.identity.failures)
        yield CounterMetricFamily(
            "meshshield_sidecar_event_stream_failures",
            "Times the CAS event stream failed or could not be opened",
            value=self.link.failures)
        yield CounterMetricFamily(
            "meshshield_sidecar_stale_events_ignored",
            "Trust events older than the current view, ignored",
            value=self.link.events_stale)
        trust = self.identity.cas_trust
        if trust is not None:
            verifications = CounterMetricFamily(
                "meshshield_sidecar_cas_verifications",
                "Verifications of the CAS's own attestation (--cas-expect), by result "
                "(verified or the refusal reason code)", labels=["result"])
            for result, n in sorted(trust.results.items()):
                verifications.add_metric([result], n)
            yield verifications
            yield GaugeMetricFamily(
                "meshshield_sidecar_cas_verified",
                "1 if the CAS's attestation passed its last verification",
                value=1.0 if trust.state == "verified" else 0.0)
        yield GaugeMetricFamily(
            "meshshield_sidecar_last_event_timestamp_seconds",
            "Unix time of the last trust event from the CAS (0: none yet)",
            value=self.link.last_event_at or 0.0)


STATE = web.AppKey("state", SidecarState)


async def ready(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.ready:
        return web.json_response({"ready": True})
    held = st.identity.held
    trust = st.identity.cas_trust
    if held is None and trust is not None and trust.state in ("refused", "unreachable"):
        return web.json_response({"ready": False, "reason": "the CAS failed verification: "
                                  f"{trust.last_error}"}, status=503)
    why = ("draining" if st.draining else "no certificate yet" if held is None
           else "certificate expired; the CAS is needed to renew it"
           if held.not_after.timestamp() <= time.time() else "listeners not up")
    return web.json_response({"ready": False, "reason": why}, status=503)


async def live(_request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].status())


async def connections(request: web.Request) -> web.Response:
    refused = request.query.get("refused", "") in ("1", "true", "yes")
    return web.json_response(request.app[STATE].registry.snapshot(refused=refused))


async def metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.metrics.cas_reachable.set(1 if st.link.connected else 0)
    if st.identity.held is not None:
        st.metrics.cert_expiry.set(st.identity.held.not_after.timestamp())
    return web.Response(body=generate_latest(st.metrics.registry), content_type="text/plain")


def create_admin_app(state: SidecarState, *, health_only: bool = False) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[STATE] = state
    app.router.add_get("/ready", ready)
    app.router.add_get("/live", live)
    if not health_only:
        app.router.add_get("/status", status)
        app.router.add_get("/connections", connections)
        app.router.add_get("/metrics", metrics)
    return app
