"""The sidecar's CAS event stream never dies silently: a `trust` event longer than any
line limit is read (bounded by the event cap), and an over-cap or malformed event, like
any other failure, reconnects with backoff and shows in /status and /metrics.

The sidecar follows a CAS front whose event stream the test writes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from casfront import CasFront
from faultlib import metric
from harness import CasProcess, SidecarProcess
from meshpeers import apply, status, wait_until

if TYPE_CHECKING:
    from conftest import LeakCheck


@pytest.fixture
def followed(fault_cas: CasProcess, cas_front: Callable[..., CasFront],
             sidecar: Callable[..., SidecarProcess],
             leak_check: LeakCheck) -> tuple[CasFront, SidecarProcess]:
    """A sidecar following a front's event stream, its first stream open; it and the
    CAS behind the front are watched for leaks from here."""
    apply(fault_cas, fault_cas.sim_policy("shop"))
    front = cas_front(fault_cas)
    sc = sidecar(front.as_cas(), "shop", "backend", inbound=["127.0.0.1:0=127.0.0.1:9"])
    _stream_open(front, 1)
    for p in (fault_cas, sc):
        leak_check.watch(p)
    return front, sc


def _stream_open(front: CasFront, opens: int) -> None:
    wait_until(lambda: front.stream_opens >= opens, 20,
               f"event stream #{opens} open")


def _epoch(sc: SidecarProcess) -> int | None:
    e = status(sc)["epoch"]
    return None if e is None else int(e)


def test_sidecar_follows_a_trust_event_of_20000_revoked_serials(
        followed: tuple[CasFront, SidecarProcess]) -> None:
    front, sc = followed
    snap = front.last_trust()
    big = {**snap, "epoch": snap["epoch"] + 1,
           "revoked_serials": [secrets.token_hex(16) for _ in range(20_000)]}
    assert front.push_event(big) == 1
    wait_until(lambda: _epoch(sc) == big["epoch"], 10,
               "the 700 kB trust event applied")
    st = status(sc)["cas"]
    assert st["reachable"] and st["state"] == "following", st


def test_an_over_cap_or_malformed_event_reconnects_and_is_reported(
        followed: tuple[CasFront, SidecarProcess]) -> None:
    front, sc = followed
    snap = front.last_trust()
    before = status(sc)["cas"]["reconnects"]
    # 5 MiB in one event: over the cap, an error, never a silent end
    front.push_raw(b"event: trust\ndata: " + b"x" * (5 * 1024 * 1024) + b"\n\n")
    wait_until(lambda: status(sc)["cas"]["reconnects"] > before, 10,
               "a reconnect after the over-cap event")
    st = status(sc)["cas"]
    assert "body_too_large" in (st["last_error"] or ""), st
    assert metric(sc, "meshshield_sidecar_event_stream_failures_total", required=True) >= 1
    _stream_open(front, 2)
    wait_until(lambda: status(sc)["cas"]["reachable"], 10, "/status reachable again")
    front.push_event({**snap, "epoch": snap["epoch"] + 2})
    wait_until(lambda: _epoch(sc) == snap["epoch"] + 2, 10, "an event after the reconnect")

    # a snapshot that does not parse: also a reported reconnect
    reconnects = status(sc)["cas"]["reconnects"]
    front.push_raw(b"event: trust\ndata: {\"epoch\": [\n\n")
    wait_until(lambda: status(sc)["cas"]["reconnects"] > reconnects, 10,
               "a reconnect after the malformed event")
    assert status(sc)["cas"]["last_error"], status(sc)["cas"]
    _stream_open(front, 3)
    front.push_event({**snap, "epoch": snap["epoch"] + 3})
    wait_until(lambda: _epoch(sc) == snap["epoch"] + 3, 10, "following again")
    assert metric(sc, "meshshield_sidecar_event_stream_failures_total", required=True) >= 2
    assert metric(sc, "meshshield_sidecar_cas_reachable", required=True) == 1
