"""Bounded reads of the files a user names on the command line.

Every file a command reads (`policy validate FILE`, `dev up -f`, `sidecar --config`,
`inject -f`) goes through `read_bounded`: a regular file (or `-`, standard input) of at
most `limit` bytes. `/dev/zero`, a FIFO, a directory or a file over the cap is refused
at once with a message naming the file, what it is and the cap, never read to
exhaustion. Opening never blocks (O_NONBLOCK, so a FIFO without a writer cannot hang
the command) and never makes a terminal ours (O_NOCTTY).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 16


class InputFileError(ValueError):
    """A named input cannot be used; the message names it and says why."""


def describe_size(limit: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if limit >= size and limit % size == 0:
            return f"{limit // size} {unit}"
    return f"{limit} bytes"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def read_bounded(path: str | Path, *, what: str, limit: int,
                 stdin: BinaryIO | None = None) -> bytes:
    """The bytes of `path` (`-`: standard input), at most `limit` of them.

    `what` names the input in messages (e.g. "--config", "policy file"). Raises
    InputFileError for a special file or one over the cap, OSError when it cannot be
    opened (missing, permission)."""
    name = str(path)
    if name == "-":
        data = _read_capped((stdin or sys.stdin.buffer).read, limit)
        if data is None:
            raise InputFileError(f"{what} - (standard input): more than the "
                                 f"{describe_size(limit)} limit")
        return data
    flags = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(name, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{what} {name}: not a regular file ({_kind(st.st_mode)}); "
                                 "give the path of a file")
        if st.st_size > limit:
            raise InputFileError(f"{what} {name}: {st.st_size} bytes, over the "
                                 f"{describe_size(limit)} limit")
        os.set_blocking(fd, True)
        data = _read_capped(lambda n: os.read(fd, n), limit)
    finally:
        os.close(fd)
    if data is None:  # it grew while we read it
        raise InputFileError(f"{what} {name}: over the {describe_size(limit)} limit")
    return data


def read_bounded_text(path: str | Path, *, what: str, limit: int,
                      stdin: BinaryIO | None = None) -> str:
    """`read_bounded`, decoded as UTF-8 (a leading BOM dropped)."""
    data = read_bounded(path, what=what, limit=limit, stdin=stdin)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{what} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} "
                             f"at offset {e.start})") from None


def _read_capped(read: Callable[[int], bytes], limit: int) -> bytes | None:
    """Read until EOF; None as soon as more than `limit` bytes arrived."""
    parts: list[bytes] = []
    total = 0
    while True:
        block = read(min(CHUNK, limit + 1 - total))
        if not block:
            return b"".join(parts)
        parts.append(block)
        total += len(block)
        if total > limit:
            return None
