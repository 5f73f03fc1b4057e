"""The change feed (cas/pg_listen.py) on a real PostgreSQL server: it delivers every
committed change's epoch, catches up after every (re)connection, survives its callback
failing and the server restarting, and says what state it is in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st
from pgserver import PgServer

from meshshield.cas import pg_store
from meshshield.cas.pg_listen import ChangeFeed, ChangeFeedCollector, parse_epoch
from meshshield.cas.store import StoreUnavailable

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_an_epoch_payload_reads_back(n: int) -> None:
    assert parse_epoch(str(n)) == n


@given(st.text(max_size=40))
def test_any_other_payload_is_none_or_its_digits(text: str) -> None:
    got = parse_epoch(text)
    assert got is None or (text.strip().isdigit() and got == int(text.strip()))


def test_malformed_payloads_are_not_epochs() -> None:
    for bad in ("", " ", "-1", "1.5", "1e3", "0x10", "١٢", "9" * 20, "12 34", "epoch"):
        assert parse_epoch(bad) is None, bad


async def _until(pred: object, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():  # type: ignore[operator]
        assert loop.time() < end, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


async def _retried(write: Callable[[], int]) -> int:
    """A write just after the server came back: the pool may hand out a connection the
    restart ended (store_unavailable, once); the store replaces it."""
    for _ in range(20):
        try:
            return await asyncio.to_thread(write)
        except StoreUnavailable:
            await asyncio.sleep(0.1)
    raise AssertionError("the store did not recover")


def test_the_feed_follows_commits_and_recovers_from_a_restart(
        own_pg_server: PgServer) -> None:
    url = own_pg_server.create_database()
    store = pg_store.PostgresStore(url)
    got: list[int | None] = []
    fail_next = [False]

    async def on_change(epoch: int | None) -> None:
        got.append(epoch)
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("a refresh that failed")

    async def scenario() -> None:
        feed = ChangeFeed(url, on_change)
        task = asyncio.create_task(feed.run())
        try:
            await _until(lambda: feed.listening and got == [None], 10, "the first catch-up")
            assert feed.status()["state"] == "listening" and feed.connects == 1
            e1 = await asyncio.to_thread(store.create_session, "shop", b"v1", "h1", "a", T0)
            await _until(lambda: got[-1] == e1, 5, "the create's notification")
            fail_next[0] = True  # the callback fails once: the feed goes on
            e2 = await asyncio.to_thread(store.add_revocation, "shop", "serial", "ab", "a", T0)
            await _until(lambda: got[-1] == e2, 5, "the revocation's notification")
            e3 = await asyncio.to_thread(store.delete_session, "shop", "a", T0)
            await _until(lambda: got[-1] == e3, 5, "the delete's notification")
            assert feed.listening and feed.failures == 0

            # Counted before the restart: the feed may reconnect, and catch up, while
            # launch() is still waiting for the server to accept connections.
            before = len(got)
            await asyncio.to_thread(own_pg_server.stop)
            await _until(lambda: not feed.listening and feed.failures >= 1, 10,
                         "the feed to notice the server went away")
            assert feed.status()["last_error"], feed.status()
            await asyncio.to_thread(own_pg_server.launch)
            await _until(lambda: feed.listening, 15, "the feed to reconnect")
            await _until(lambda: None in got[before:], 5, "a catch-up after the reconnect")
            assert feed.connects == 2
            e4 = await _retried(lambda: store.create_session("cafe", b"c", "hc", "a", T0))
            await _until(lambda: got[-1] == e4, 5, "a notification after the reconnect")
            metrics = {m.name: m for m in ChangeFeedCollector(feed).collect()}
            states = {s.labels["state"]: s.value
                      for s in metrics["meshshield_cas_change_feed_state"].samples}
            assert states["listening"] == 1.0 and sum(states.values()) == 1.0
            assert metrics["meshshield_cas_change_notifications"].samples[0].value >= 4
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert feed.state == "stopped"

    try:
        asyncio.run(scenario())
    finally:
        store.close()
