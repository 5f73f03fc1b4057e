"""A sidecar direction's connection budgets, without sockets."""

from __future__ import annotations

import pytest

from meshshield.errors import MeshError, Reason
from meshshield.sidecar.budget import DirectionBudget


def _reason(budget: DirectionBudget, source: str) -> Reason | None:
    try:
        budget.admit(source)
    except MeshError as e:
        return e.reason
    return None


def test_handshake_budget_per_source_then_global() -> None:
    b = DirectionBudget("inbound", max_established=3, max_handshakes=4,
                        max_handshakes_per_source=2)
    a1, a2 = b.admit("10.0.0.1"), b.admit("10.0.0.1")
    assert _reason(b, "10.0.0.1") is Reason.OVER_HANDSHAKE_BUDGET_PER_SOURCE
    b.admit("10.0.0.2")
    b.admit("10.0.0.3")
    assert _reason(b, "10.0.0.4") is Reason.OVER_HANDSHAKE_BUDGET
    a1.release()
    assert b.per_source["10.0.0.1"] == 1
    a2.establish()
    assert (b.handshakes, b.established) == (2, 1)
    assert "10.0.0.1" not in b.per_source
    a2.release()
    a2.release()  # idempotent
    assert (b.handshakes, b.established) == (2, 0)


def test_established_budget_is_apart_from_handshakes() -> None:
    b = DirectionBudget("outbound", max_established=1, max_handshakes=2,
                        max_handshakes_per_source=None)
    s1, s2 = b.admit("127.0.0.1"), b.admit("127.0.0.1")
    s1.establish()
    # Full: new connections are refused at once, and one that finishes its handshake
    # now is refused too (before a byte is forwarded).
    assert _reason(b, "127.0.0.1") is Reason.OVER_CONNECTION_BUDGET
    with pytest.raises(MeshError) as e:
        s2.establish()
    assert e.value.reason is Reason.OVER_CONNECTION_BUDGET
    s2.release()
    assert (b.handshakes, b.established) == (0, 1)
    s1.release()
    assert (b.handshakes, b.established, b.per_source) == (0, 0, {})
