"""Time as a dependency, so tests can move it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that only moves when told to (tests)."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self._now = self._now + timedelta(seconds=seconds)


class OffsetClock:
    """System time shifted by a fixed number of seconds (a CAS started with a skewed clock)."""

    def __init__(self, offset_seconds: float) -> None:
        self._offset = offset_seconds

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self._offset, UTC)


def rfc3339(t: datetime) -> str:
    """RFC 3339 in UTC with a trailing Z and whole seconds."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp; naive times are refused."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone; use e.g. 2024-01-01T00:00:00Z")
    return t.astimezone(UTC)


def parse_duration(text: str) -> float:
    """Parse '90s', '5m', '1h', '1h30m', '2d' into seconds. Bare numbers are seconds."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    try:
        return float(s)
    except ValueError:
        pass
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    num = ""
    for ch in s:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
        else:
            raise ValueError(f"invalid duration {text!r}: expected e.g. 90s, 5m, 1h, 1h30m")
    if num:
        raise ValueError(f"invalid duration {text!r}: number {num!r} has no unit (s, m, h, d)")
    return total
