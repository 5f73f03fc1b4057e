"""The relay's end-of-connection rules, without sockets: tables of events and the
actions they must yield."""

from __future__ import annotations

import pytest

from meshshield.sidecar.relayrules import Close, Ending, RelayRules, Reset, SendEof, Side

MESH, APP = Side.MESH, Side.APP
BOTH_RESET = [Reset(MESH), Reset(APP)]


def test_half_close_each_way_then_a_clean_close() -> None:
    r = RelayRules()
    assert r.eof(APP) == [SendEof(MESH)]
    assert not r.ended
    assert r.eof(MESH, clean=True) == [SendEof(APP), Close(MESH), Close(APP)]
    assert r.ending is Ending.CLOSED
    assert r.final() == [Close(MESH), Close(APP)]


@pytest.mark.parametrize(("events", "ending"), [
    ([("eof", MESH, False)], Ending.TRUNCATED),
    # A forged FIN stays truncation after the app's half-close, too.
    ([("eof", APP, True), ("eof", MESH, False)], Ending.TRUNCATED),
    ([("reset", APP, None)], Ending.RESET),
    ([("reset", MESH, None)], Ending.RESET),
    ([("eof", APP, True), ("reset", APP, None)], Ending.RESET),
    ([("lost", APP, "Connection reset by peer")], Ending.RESET),
    ([("lost", MESH, None)], Ending.RESET),  # gone without its EOF
    ([("tls", MESH, "sslv3 alert bad certificate")], Ending.TLS_ERROR),
    ([("abort", MESH, None)], Ending.ABORTED),
])
def test_every_unclean_end_resets_both_sides(
        events: list[tuple[str, Side, object]], ending: Ending) -> None:
    r = RelayRules()
    actions = []
    for kind, side, arg in events:
        if kind == "eof":
            actions = r.eof(side, clean=bool(arg))
        elif kind == "reset":
            actions = r.reset(side)
        elif kind == "lost":
            actions = r.lost(side, arg if isinstance(arg, str) else None)
        elif kind == "tls":
            actions = r.tls_error(str(arg))
        else:
            actions = r.abort()
    assert actions == BOTH_RESET
    assert r.ending is ending
    assert r.detail
    assert r.final() == BOTH_RESET


def test_the_first_end_is_the_one_kept() -> None:
    r = RelayRules()
    r.eof(MESH, clean=False)
    assert r.reset(APP) == [] and r.tls_error("late") == [] and r.eof(APP) == []
    assert r.lost(APP, None) == [] and r.abort() == []
    assert r.ending is Ending.TRUNCATED


def test_fin_after_close_notify_is_not_truncation() -> None:
    r = RelayRules()
    assert r.eof(MESH, clean=True) == [SendEof(APP)]
    assert r.eof(MESH, clean=False) == []  # the TCP FIN that follows close_notify
    assert not r.ended


def test_lost_after_its_own_eof_closes_the_other_side_cleanly() -> None:
    r = RelayRules()
    r.eof(APP)
    assert r.lost(APP, None) == [SendEof(MESH), Close(MESH)]
    assert r.ending is Ending.CLOSED


def test_torn_down_before_any_end_is_an_abort() -> None:
    r = RelayRules()
    assert r.final() == BOTH_RESET
    assert r.ending is Ending.ABORTED
