"""Time as a dependency, so tests can move it."""

from __future__ import annotations

import math
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


MAX_DURATION_SECONDS = 366 * 86400.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FORM = "e.g. 90s, 5m, 1h, 1h30m, 2d"


def parse_duration(text: str, *, what: str = "duration", minimum: float = 0.0,
                   maximum: float = MAX_DURATION_SECONDS,
                   allow_zero: bool = True) -> float:
    """Parse '90s', '5m', '1h', '1h30m', '2d' (or bare seconds, '1.5') into seconds.

    Refuses nan, inf, negative values, exponents and anything outside
    [minimum, maximum] (`allow_zero=False` also refuses 0) with a ValueError whose
    message names `what` (a flag such as "--nonce-ttl") and the expected form."""
    s = text.strip() if isinstance(text, str) else ""
    if not s:
        raise ValueError(f"{what} {text!r}: empty; expected a duration, {_FORM}")
    total = 0.0
    num = ""
    for ch in s:
        if ch.isascii() and (ch.isdigit() or ch == "."):
            num += ch
        elif ch in _UNITS and num:
            total += _number(num, text, what) * _UNITS[ch]
            num = ""
        else:
            raise ValueError(f"{what} {text!r}: not a duration; expected a positive "
                             f"number with a unit, {_FORM}")
    if num:
        if total:
            raise ValueError(f"{what} {text!r}: number {num!r} has no unit (s, m, h, d)")
        total = _number(num, text, what)
    if not math.isfinite(total) or total < minimum or total > maximum or (
            total == 0 and not allow_zero):
        lo = _show(minimum) if (minimum or allow_zero) else "more than 0s"
        raise ValueError(f"{what} {text!r}: out of range; expected {lo} to {_show(maximum)}")
    return total


def _number(num: str, text: str, what: str) -> float:
    if num.count(".") > 1 or num == ".":
        raise ValueError(f"{what} {text!r}: {num!r} is not a number; expected {_FORM}")
    return float(num)


def _show(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
