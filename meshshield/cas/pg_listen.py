"""Following the other CAS replicas on one PostgreSQL database: LISTEN/NOTIFY.

Every store write that bumps the epoch (a session created, updated or deleted, a
revocation, a CA change) sends `NOTIFY meshshield_cas, '<epoch>'` in its own transaction
(`pg_store.PostgresStore._bump`), so PostgreSQL delivers it when, and only if, the write
commits. Each replica LISTENs on a connection of its own (not one of the pool's: a
pooled connection goes back to the pool between requests and would drop the LISTEN),
and on a notification newer than what it serves it refreshes its Authority from the
store and wakes its event streams at once: a change made through any replica reaches
the sidecars subscribed to every other replica in milliseconds.

The loop never ends before shutdown: a lost connection (PostgreSQL restarted, the
network cut) is reconnected with exponential backoff, and after every (re)connection
the replica refreshes at once, since notifications sent while it was not listening are
gone. A connection that stays silent is pinged every `PING_SECONDS`, so a dead one is
noticed even when nothing changes. The Authority's periodic refresh (the CAS's 1 s
housekeeping tick) stays as the bounded fallback for whatever this misses. The state
is reported in `/v1/ready` ("changes") and in /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meshshield.cas.pg_store import NOTIFY_CHANNEL as CHANNEL
from meshshield.cas.pg_store import redact

log = logging.getLogger("meshshield.cas")

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
PING_SECONDS = 5.0
# A connection that lasted this long resets the backoff; one that keeps failing soon
# after it was made does not, so a flapping database is not hammered.
STEADY_SECONDS = 10.0
CONNECT_TIMEOUT = 5
STATES = ("connecting", "listening", "backing_off", "stopped")


def parse_epoch(payload: str) -> int | None:
    """The epoch a notification names, or None for a payload that is not one."""
    text = payload.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    return int(text)


class ChangeFeed:
    """LISTEN on a dedicated connection; `on_change(epoch)` for every notification
    (epoch None: after a (re)connection, when notifications may have been missed)."""

    def __init__(self, url: str, on_change: Callable[[int | None], Awaitable[None]]) -> None:
        self.url = url
        self.where = redact(url)
        self.on_change = on_change
        self.state = "connecting"
        self.notifications = 0
        self.ignored = 0  # payloads that were not an epoch
        self.connects = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.listening_since: float | None = None

    @property
    def listening(self) -> bool:
        return self.state == "listening"

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "listening": self.listening,
            "channel": CHANNEL,
            "notifications": self.notifications,
            "connects": self.connects,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_age_seconds": None if self.last_error_at is None
            else round(time.monotonic() - self.last_error_at, 1),
        }

    async def run(self) -> None:
        """Listen until cancelled; never ends on a failure."""
        backoff = BACKOFF_MIN
        try:
            while True:
                self.state = "connecting"
                try:
                    await self._listen()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - this loop must never end
                    self.failures += 1
                    first = self.last_error is None or self.listening_since is not None
                    self.last_error = f"{type(e).__name__}: {str(e).strip()[:200]}"
                    self.last_error_at = time.monotonic()
                    if first:
                        log.warning("change notifications from %s lost: %s; reconnecting "
                                    "(the 1 s refresh covers the gap)", self.where,
                                    self.last_error)
                    if not isinstance(e, psycopg.Error | OSError):
                        log.debug("change feed failure details", exc_info=e)
                since = self.listening_since
                if since is not None and time.monotonic() - since > STEADY_SECONDS:
                    backoff = BACKOFF_MIN  # it had worked for a while: retry soon
                self.listening_since = None
                self.state = "backing_off"
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
        finally:
            self.state = "stopped"

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
            application_name="meshshield-cas-listen",
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
        ) as conn:
            await conn.execute(f"LISTEN {CHANNEL}".encode())
            self.connects += 1
            self.state = "listening"
            self.listening_since = time.monotonic()
            if self.connects > 1 or self.failures:
                log.warning("change notifications from %s resumed", self.where)
            # Anything committed before the LISTEN took effect was not heard: catch up.
            await self._deliver(None)
            while True:
                async for n in conn.notifies(timeout=PING_SECONDS):
                    self.notifications += 1
                    epoch = parse_epoch(n.payload)
                    if epoch is None:
                        self.ignored += 1
                        log.warning("change notification on %s with payload %r: not an "
                                    "epoch; refreshing anyway", CHANNEL, n.payload[:40])
                    await self._deliver(epoch)
                # Quiet for PING_SECONDS: is the connection still alive?
                await conn.execute(b"SELECT 1")

    async def _deliver(self, epoch: int | None) -> None:
        try:
            await self.on_change(epoch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the periodic refresh retries
            log.warning("refresh after a change notification failed: %s: %s",
                        type(e).__name__, str(e)[:200])


class ChangeFeedCollector(Collector):
    """The feed's state for /metrics."""

    def __init__(self, feed: ChangeFeed) -> None:
        self._feed = feed

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        f = self._feed
        g = GaugeMetricFamily("meshshield_cas_change_feed_state",
                              "State of the LISTEN connection that follows the other "
                              "replicas (1 for the current state)", labels=["state"])
        for state in STATES:
            g.add_metric([state], 1.0 if f.state == state else 0.0)
        yield g
        yield CounterMetricFamily("meshshield_cas_change_notifications",
                                  "Change notifications received from the database",
                                  value=f.notifications)
        yield CounterMetricFamily("meshshield_cas_change_feed_connects",
                                  "LISTEN connections made (the first and every reconnection)",
                                  value=f.connects)
        yield CounterMetricFamily("meshshield_cas_change_feed_failures",
                                  "LISTEN connections lost or refused", value=f.failures)
