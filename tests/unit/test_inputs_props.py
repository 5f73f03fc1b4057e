"""Property tests for the two input guards every command uses: the duration parser
(meshshield.clock.parse_duration) and the bounded reader (meshshield.inputs)."""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshield.clock import MAX_DURATION_SECONDS, parse_duration
from meshshield.inputs import InputFileError, read_bounded

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from("smhd")), min_size=1,
                max_size=4))
def test_well_formed_durations_sum_their_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    expected = float(sum(n * UNITS[u] for n, u in parts))
    if expected <= MAX_DURATION_SECONDS:
        assert parse_duration(text) == expected
    else:
        with pytest.raises(ValueError, match="out of range"):
            parse_duration(text)


@given(st.text(max_size=30))
def test_any_text_is_a_finite_duration_in_range_or_a_value_error_naming_the_flag(
        text: str) -> None:
    try:
        v = parse_duration(text, what="--some-flag", minimum=1, maximum=3600)
    except ValueError as e:
        assert str(e).startswith("--some-flag "), e
        assert "Traceback" not in str(e)
    else:
        assert math.isfinite(v) and 1 <= v <= 3600


@given(st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "-60", "-1s", "1e3",
                        "1e400", "0x10", "+5s", "5 s", "", " ", "1h-5m", "..", "1.2.3s"]))
def test_hostile_duration_spellings_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text, what="--nonce-ttl")


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_spellings_never_give_nan_inf_or_negative(x: float) -> None:
    try:
        v = parse_duration(repr(x))
    except ValueError:
        return
    assert math.isfinite(v) and v >= 0


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), limit=st.integers(0, 2000))
def test_bounded_read_returns_the_file_or_refuses_naming_it_and_the_cap(
        data: bytes, limit: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "input.yaml"
        path.write_bytes(data)
        try:
            got = read_bounded(path, what="--config", limit=limit)
        except InputFileError as e:
            assert len(data) > limit
            assert str(path) in str(e) and "limit" in str(e) and "--config" in str(e)
        else:
            assert got == data and len(got) <= limit


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), limit=st.integers(0, 2000))
def test_bounded_read_of_stdin_never_takes_more_than_the_cap(data: bytes, limit: int) -> None:
    class Counting(io.BytesIO):
        taken = 0

        def read(self, n: int | None = -1) -> bytes:
            block = super().read(n)
            Counting.taken += len(block)
            return block

    stream = Counting(data)
    try:
        got = read_bounded("-", what="policy file", limit=limit, stdin=stream)
    except InputFileError as e:
        assert len(data) > limit and "standard input" in str(e)
    else:
        assert got == data
    assert Counting.taken <= limit + 1


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_special_files_are_refused_without_reading(special: str) -> None:
    if not os.path.exists(special):
        pytest.skip(f"{special} missing")
    with pytest.raises(InputFileError, match="not a regular file"):
        read_bounded(special, what="-f", limit=1 << 20)


def test_a_fifo_without_a_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match="FIFO"):
        read_bounded(fifo, what="-f", limit=10)
