"""Attestation nonces (cas/nonces.py): a nonce opens only under the key-encryption key
it was minted under, says its own expiry, and no other bytes open: random, truncated,
oversized, any bit flipped, or minted under another key."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshshield.cas.nonces import NonceMint

KEK = bytes(range(32))
MINT = NonceMint(KEK)
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def test_a_minted_nonce_opens_with_its_expiry_on_any_mint_of_the_same_key() -> None:
    n = MINT.mint(T0)
    assert len(n) == 32
    assert MINT.open(n) == T0
    assert NonceMint(KEK).open(n) == T0  # another replica, the same KEK


def test_nonces_differ_even_with_one_expiry() -> None:
    got = {MINT.mint(T0) for _ in range(1000)}
    assert len(got) == 1000
    # The expiry is hidden: no byte position is constant across nonces of one expiry.
    for i in range(32):
        assert len({n[i] for n in got}) > 1, i


def test_another_key_opens_nothing() -> None:
    other = NonceMint(bytes(32))
    for _ in range(100):
        assert other.open(MINT.mint(T0)) is None


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 64, 4096])
def test_wrong_sizes_do_not_open(size: int) -> None:
    assert MINT.open(os.urandom(size)) is None
    assert MINT.open((MINT.mint(T0) * 200)[:size]) is None


def test_truncated_or_extended_nonces_do_not_open() -> None:
    n = MINT.mint(T0)
    for cut in range(32):
        assert MINT.open(n[:cut]) is None
    assert MINT.open(n + b"\x00") is None
    assert MINT.open(b"\x00" + n) is None


def test_every_single_bit_flip_is_refused() -> None:
    n = MINT.mint(T0)
    for i in range(32 * 8):
        tampered = bytearray(n)
        tampered[i // 8] ^= 1 << (i % 8)
        assert MINT.open(bytes(tampered)) is None, i


def test_a_kek_of_the_wrong_size_is_refused() -> None:
    for size in (0, 16, 31, 33):
        with pytest.raises(ValueError, match="32 bytes"):
            NonceMint(bytes(size))


def test_an_expiry_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        MINT.mint(datetime(1960, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="out of range"):
        MINT.mint(datetime(2200, 1, 1, tzinfo=UTC))


@given(st.binary(min_size=0, max_size=100))
def test_arbitrary_bytes_do_not_open(data: bytes) -> None:
    assert MINT.open(data) is None


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(0, 255), st.integers(0, 31))
def test_any_expiry_round_trips_and_any_altered_byte_is_refused(
        seconds: int, xor: int, at: int) -> None:
    expires = datetime.fromtimestamp(seconds, UTC)
    n = MINT.mint(expires)
    assert MINT.open(n) == expires
    if xor:
        tampered = bytearray(n)
        tampered[at] ^= xor
        assert MINT.open(bytes(tampered)) is None


def test_expiry_is_in_whole_seconds() -> None:
    got = MINT.open(MINT.mint(T0 + timedelta(milliseconds=700)))
    assert got == T0
