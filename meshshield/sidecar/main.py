"""Running a sidecar: attest, listen, follow the CAS, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import aiohttp
from aiohttp import web

from meshshield.errors import MeshError
from meshshield.httpserver import ConnectionLimits, bound_port, start_site
from meshshield.httpserver import runner as json_error_runner
from meshshield.sidecar.admin import SidecarState, create_admin_app
from meshshield.sidecar.caslink import CasLink
from meshshield.sidecar.castrust import cas_connector
from meshshield.sidecar.config import Endpoint, SidecarConfig
from meshshield.sidecar.identity import Identity
from meshshield.sidecar.proxy import Proxy, SidecarMetrics
from meshshield.sidecar.registry import ConnectionRegistry
from meshshield.sidecar.sds import SdsCollector, SdsServer, identity_material
from meshshield.sidecar.secrets import open_secrets_dir

log = logging.getLogger("meshshield.sidecar")


# The admin API serves operators and scrapers, the health listener the kubelet: a few
# clients each, so small caps, and whoever holds connections open cannot starve them.
ADMIN_LIMITS = ConnectionLimits(max_connections=256, header_timeout=5.0, body_timeout=5.0,
                                idle_timeout=30.0)


async def _site(app: web.Application, ep: Endpoint) -> tuple[web.AppRunner, str]:
    runner = json_error_runner(app, ADMIN_LIMITS)
    await runner.setup()
    site = await start_site(runner, ep.host, ep.port, limits=ADMIN_LIMITS, name="admin")
    port = bound_port(site, ep.port)
    return runner, str(Endpoint(ep.host, port))


async def run_sidecar(config: SidecarConfig) -> int:
    identity = Identity(config)
    if config.secrets_dir is not None:
        try:
            identity.secret_files = open_secrets_dir(config)
        except MeshError as e:
            print(f"meshshield: {e.message}", file=sys.stderr, flush=True)
            return 1
    metrics = SidecarMetrics()
    registry = ConnectionRegistry()
    proxy = Proxy(config, identity, registry, metrics)
    link = CasLink(identity, registry)
    state = SidecarState(identity, registry, proxy, link, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    runners = []
    runner, admin_at = await _site(create_admin_app(state), config.admin_listen)
    runners.append(runner)
    print(f"admin http://{admin_at}", flush=True)
    if config.health_listen is not None:
        runner, health_at = await _site(create_admin_app(state, health_only=True),
                                        config.health_listen)
        runners.append(runner)
        print(f"health http://{health_at}", flush=True)

    workload_api = None
    if config.workload_api is not None:
        from meshshield.sidecar.workloadapi import WorkloadApi

        workload_api = WorkloadApi(config, identity)
        state.workload_api = workload_api
        # Serves at once; its streams answer as soon as a certificate is held.
        print(f"workload-api listening {await workload_api.start()}", flush=True)

    sds: SdsServer | None = None
    if config.sds is not None:
        sds = SdsServer(config.sds, lambda: identity_material(identity),
                        f"{config.session}/{config.service}")
        await sds.start()  # serves at once; streams are answered once a certificate is held
        identity.tls_listeners.append(sds.refresh)
        state.sds = sds
        metrics.registry.register(SdsCollector(sds))
        print(f"sds listening unix://{config.sds}", flush=True)

    connector = cas_connector(identity.cas_trust, limit=8)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        renewals = asyncio.ensure_future(identity.run_renewals(http, stop))
        # Fail closed: no listener exists until a certificate is held.
        while not identity.ready and not stop.is_set():
            await asyncio.sleep(0.05)
        tasks = [renewals]
        mesh_http: aiohttp.ClientSession | None = None
        if identity.ready:
            await proxy.start()
            state.listening = True
            for name, bound in proxy.bound.items():
                print(f"{name} listening {bound}", flush=True)
            print("ready", flush=True)
            # Its own connections: a pooled one from before the certificate was held
            # would carry no client certificate, and the CAS requires one here.
            mesh_http = aiohttp.ClientSession(
                connector=cas_connector(identity.cas_trust, force_close=True),
                timeout=aiohttp.ClientTimeout(total=30),
            )
            tasks.append(asyncio.ensure_future(link.follow(mesh_http, stop)))
            tasks.append(asyncio.ensure_future(link.report(mesh_http, stop)))
        await stop.wait()
        log.info("%s/%s: stopping: no new connections, draining %d for up to %.0f s",
                 config.session, config.service, len(registry.live), config.drain_timeout)
        state.draining = True
        proxy.stop_accepting()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.drain_timeout):
                while proxy.handlers:
                    await asyncio.wait(set(proxy.handlers))
        for t in list(proxy.handlers) + tasks:
            t.cancel()
        for t in list(proxy.handlers) + tasks:
            with contextlib.suppress(BaseException):
                await t
        if mesh_http is not None:
            await mesh_http.close()
        if workload_api is not None:
            await workload_api.stop()
        if sds is not None:
            await sds.stop()
    for r in runners:
        await r.cleanup()
    print("stopped", flush=True)
    return 0
