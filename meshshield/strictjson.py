"""Strict JSON decoding helpers for untrusted documents."""

from __future__ import annotations

from typing import Any


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` that refuses an object naming a key twice (json keeps the last
    silently, so two readers could disagree about what a document says)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out
