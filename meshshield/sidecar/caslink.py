"""Following the CAS: the `/v1/events` trust stream and the `/v1/reports` summaries.

The event stream authenticates with the sidecar's own mesh certificate. Every `trust`
event is a full snapshot; applying it re-runs the peer check on every live connection
and closes those that no longer pass. When the CAS is unreachable the sidecar keeps
serving with what it has, retries with exponential backoff, and says so in /status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp

from meshshield.sidecar.identity import BACKOFF_MAX, BACKOFF_MIN, Identity, stopped_within
from meshshield.sidecar.peercheck import TrustView
from meshshield.sidecar.registry import ConnectionRegistry

log = logging.getLogger("meshshield.sidecar")

MAX_EVENT = 4 * 1024 * 1024


class CasLink:
    def __init__(self, identity: Identity, registry: ConnectionRegistry) -> None:
        self.identity = identity
        self.registry = registry
        self.connected = False
        self.last_event_at: float | None = None
        self.last_error: str | None = None
        self.reconnects = 0
        self.events_seen = 0

    async def follow(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        backoff = BACKOFF_MIN
        cfg = self.identity.config
        while not stop.is_set():
            if not self.identity.ready:
                await asyncio.sleep(0.1)
                continue
            try:
                async with session.get(
                    cfg.cas + "/v1/events", ssl=self.identity.cas_ctx,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
                ) as r:
                    if r.status != 200:
                        body = await r.text()
                        raise aiohttp.ClientResponseError(
                            r.request_info, (), status=r.status, message=body[:200])
                    self.connected = True
                    self.last_error = None
                    backoff = BACKOFF_MIN
                    log.info("%s/%s: following CAS events", cfg.session, cfg.service)
                    await self._read(r)
                raise ConnectionResetError("CAS closed the event stream")
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                if self.connected:
                    log.warning("%s/%s: CAS event stream lost: %s", cfg.session, cfg.service, e)
                self.connected = False
                self.last_error = str(e) or type(e).__name__
                self.reconnects += 1
                if await stopped_within(stop, backoff):
                    return
                backoff = min(BACKOFF_MAX, backoff * 2)

    async def _read(self, r: aiohttp.ClientResponse) -> None:
        data: list[str] = []
        event = "message"
        size = 0
        async for raw in r.content:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            size += len(raw)
            if size > MAX_EVENT:
                raise ValueError("CAS event larger than 4 MiB")
            if not line:
                if data and event == "trust":
                    self.apply("\n".join(data))
                data, event, size = [], "message", 0
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif line.startswith("event:"):
                event = line[6:].strip()

    def apply(self, payload: str) -> None:
        snap = json.loads(payload)
        view = TrustView.from_snapshot(snap)
        self.events_seen += 1
        self.last_event_at = time.time()
        self.identity.update_view(view)
        closed = self.registry.recheck(view, self.identity.config.service)
        for conn, err in closed:
            log.warning("%s/%s: closed %s connection to %s: %s: %s",
                        self.identity.config.session, self.identity.config.service,
                        conn.direction, conn.info.spiffe_id, err.reason.value, err.message)

    async def report(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        cfg = self.identity.config
        while not stop.is_set():
            if await stopped_within(stop, cfg.report_interval):
                return
            if not self.identity.ready:
                continue
            body: dict[str, Any] = {"connections": [
                *(c.to_json() for c in self.registry.live.values()),
                *({**r.to_json(), "peer_spiffe_id": r.peer_spiffe_id}
                  for r in list(self.registry.refusals)[-50:] if r.peer_spiffe_id),
            ]}
            try:
                async with session.post(cfg.cas + "/v1/reports", json=body,
                                        ssl=self.identity.cas_ctx) as r:
                    await r.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.debug("report to CAS failed: %s", e)
