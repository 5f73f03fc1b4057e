"""Following the CAS: the `/v1/events` trust stream and the `/v1/reports` summaries.

The event stream authenticates with the sidecar's own mesh certificate. Every `trust`
event is a full snapshot; the identity makes it current unless a newer one already is,
and every view that becomes current re-runs the peer check on every live connection,
closing those that no longer pass. When the CAS is unreachable the sidecar keeps
serving with what it has, retries with exponential backoff, and says so in /status.

The stream is read in bounded chunks and parsed by `SseParser` with a bound on one
event's size; any failure of the follow task (an oversize or malformed event, a bug)
reconnects with backoff and is reported, so the task never ends before shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp

from meshshield.errors import MeshError, Reason
from meshshield.sidecar.identity import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    Identity,
    describe_error,
    stopped_within,
    wait_any,
)
from meshshield.sidecar.peercheck import TrustView
from meshshield.sidecar.registry import ConnectionRegistry

log = logging.getLogger("meshshield.sidecar")

MAX_EVENT = 4 * 1024 * 1024
READ_CHUNK = 256 * 1024


class SseParser:
    """Server-sent events, sans I/O: feed bytes, get (event, data) pairs.

    One event (its lines up to the blank line that ends it) may hold at most
    `max_event` bytes; more is a MeshError (body_too_large), never unbounded memory."""

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self.max_event = max_event
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already searched for a newline
        self._event = "message"
        self._data: list[str] = []
        self._size = 0  # bytes of the current event in complete lines

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buf += chunk
        out: list[tuple[str, str]] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", max(start, self._scan))
            if nl < 0:
                break
            raw = bytes(self._buf[start:nl])
            self._size += nl + 1 - start
            start = nl + 1
            self._scan = start
            if self._size > self.max_event:
                raise self._too_large()
            self._line(raw.rstrip(b"\r").decode("utf-8", "replace"), out)
        del self._buf[:start]
        self._scan = len(self._buf)
        if self._size + len(self._buf) > self.max_event:
            raise self._too_large()
        return out

    def _too_large(self) -> MeshError:
        return MeshError(Reason.BODY_TOO_LARGE,
                         f"CAS event larger than {self.max_event} bytes; dropped the stream")

    def _line(self, line: str, out: list[tuple[str, str]]) -> None:
        if not line:
            if self._data:
                out.append((self._event, "\n".join(self._data)))
            self._event, self._data, self._size = "message", [], 0
        elif line.startswith(":"):
            pass  # a comment: the CAS's keep-alive
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value.strip()


class CasLink:
    def __init__(self, identity: Identity, registry: ConnectionRegistry) -> None:
        self.identity = identity
        self.registry = registry
        self.connected = False
        self.state = "waiting_for_certificate"
        self.last_event_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.reconnects = 0
        self.failures = 0
        self.events_seen = 0
        self.events_stale = 0
        # Whatever view becomes current (an event, an attest answer) is the one live
        # connections are rechecked against; a dropped, older one never is.
        identity.listeners.append(self._recheck)

    async def follow(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Follow `/v1/events` until `stop`; never ends on a failure."""
        backoff = BACKOFF_MIN
        cfg = self.identity.config
        while not stop.is_set():
            if not self.identity.ready:
                self.state = "waiting_for_certificate"
                if await stopped_within(stop, 0.1):
                    return
                continue
            self.state = "connecting"
            trust = self.identity.cas_trust
            try:
                if trust is not None:
                    self.state = "verifying"
                    await trust.verify()
                async with session.get(
                    cfg.cas + "/v1/events", ssl=self.identity.cas_ctx,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
                ) as r:
                    if r.status != 200:
                        body = (await r.content.read(2048)).decode("utf-8", "replace")
                        raise MeshError(Reason.BAD_REQUEST,
                                        f"CAS answered /v1/events with HTTP {r.status}: "
                                        f"{body[:200]}")
                    self.connected = True
                    self.state = "following"
                    self.last_error = None
                    backoff = BACKOFF_MIN
                    log.info("%s/%s: following CAS events", cfg.session, cfg.service)
                    await self._read(r)
                raise ConnectionResetError("CAS closed the event stream")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - this loop must never end
                self.failures += 1
                self.reconnects += 1
                self.last_error = describe_error(e)
                self.last_error_at = time.time()
                log.warning("%s/%s: CAS event stream %s: %s; reconnecting in %.1f s",
                            cfg.session, cfg.service,
                            "lost" if self.connected else "unavailable",
                            self.last_error, backoff)
                if not isinstance(e, MeshError | aiohttp.ClientError | OSError):
                    log.debug("event stream failure details", exc_info=e)
                self.connected = False
                self.state = "backing_off"
                # A new certificate (say after a forced CA rotation) is worth trying at
                # once: the old one may be why the CAS refused us.
                self.identity.tls_changed.clear()
                await wait_any([stop, self.identity.tls_changed], backoff)
                if stop.is_set():
                    return
                backoff = min(BACKOFF_MAX, backoff * 2)
        self.connected = False
        self.state = "stopped"

    async def _read(self, r: aiohttp.ClientResponse) -> None:
        parser = SseParser(MAX_EVENT)
        while True:
            chunk = await r.content.readany()
            if not chunk:
                return
            for event, data in parser.feed(chunk):
                if event == "trust":
                    self.apply(data)

    def apply(self, payload: str) -> bool:
        """Apply one `trust` event; True if it became the current view."""
        try:
            snap = json.loads(payload)
        except (ValueError, RecursionError):
            raise MeshError(Reason.BAD_REQUEST, "CAS trust event is not JSON") from None
        if not isinstance(snap, dict):
            raise MeshError(Reason.BAD_REQUEST, "CAS trust event is not a JSON object")
        try:
            view = TrustView.from_snapshot(snap)
        except ValueError as e:
            raise MeshError(Reason.BAD_REQUEST, str(e)) from None
        self.events_seen += 1
        self.last_event_at = time.time()
        if not self.identity.update_view(view):
            self.events_stale += 1
            current = self.identity.view
            log.info("%s/%s: ignored a late trust event of epoch %d (current %s)",
                     self.identity.config.session, self.identity.config.service, view.epoch,
                     None if current is None else current.epoch)
            return False
        return True

    def _recheck(self, view: TrustView) -> None:
        if view is not self.identity.view:
            return
        closed = self.registry.recheck(view, self.identity.config.service)
        for conn, err in closed:
            log.warning("%s/%s: closed %s connection to %s: %s: %s",
                        self.identity.config.session, self.identity.config.service,
                        conn.direction, conn.info.spiffe_id, err.reason.value, err.message)

    def status(self) -> dict[str, Any]:
        from meshshield.sidecar.registry import rfc3339_from

        return {
            "url": self.identity.config.cas,
            "reachable": self.connected,
            "state": self.state,
            "last_error": self.last_error,
            "last_error_at": None if self.last_error_at is None
            else rfc3339_from(self.last_error_at),
            "last_event_at": None if self.last_event_at is None
            else rfc3339_from(self.last_event_at),
            "reconnects": self.reconnects,
            "failures": self.failures,
            "events": self.events_seen,
            "stale_events_ignored": self.events_stale,
            "verification": None if self.identity.cas_trust is None
            else self.identity.cas_trust.status(),
        }

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
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reports are best effort; keep going
                log.debug("report to CAS failed: %s", describe_error(e))
