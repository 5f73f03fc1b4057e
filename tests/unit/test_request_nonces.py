"""The CAS store's replay guard for signed admin requests: one (key, nonce) once, until
its window ends, kept across reopening the store; on SQLite and on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from meshshield.cas.store import Store
from meshshield.cas.stores import open_store

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = timedelta(seconds=300)


def _open(location: str, tmp_path: Path) -> Store:
    return open_store(location or None, tmp_path)


def test_a_nonce_is_accepted_once_until_it_expires(store_location: str, tmp_path: Path) -> None:
    store = _open(store_location, tmp_path)
    assert store.remember_request_nonce("fp", "n1", T0 + WINDOW, T0)
    assert not store.remember_request_nonce("fp", "n1", T0 + WINDOW, T0 + timedelta(seconds=1))
    # Another key may use the same nonce; it is its own request.
    assert store.remember_request_nonce("other", "n1", T0 + WINDOW, T0)
    # Once the window is over, the request's timestamp is refused anyway: the row can go.
    assert store.remember_request_nonce("fp", "n1", T0 + 3 * WINDOW, T0 + 2 * WINDOW)
    store.close()


def test_seen_nonces_survive_reopening_and_are_purged_after_the_window(
    store_location: str, tmp_path: Path
) -> None:
    store = _open(store_location, tmp_path)
    for i in range(5):
        assert store.remember_request_nonce("fp", f"n{i}", T0 + WINDOW, T0)
    store.close()
    store = _open(store_location, tmp_path)
    assert not store.remember_request_nonce("fp", "n3", T0 + WINDOW, T0)
    assert store.purge_request_nonces(T0 + WINDOW - timedelta(seconds=1)) == 0
    assert store.purge_request_nonces(T0 + WINDOW) == 5
    assert store.record_counts()["CA"] == 0  # nonces are not state that blocks a first start
    store.close()
