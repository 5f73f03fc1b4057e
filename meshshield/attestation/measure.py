"""Workload measurement for sim attestation: one digest over a tree of files.

`measure_paths(paths)` is what `meshshield measure PATH...` prints: 64 lowercase hex
digits, the SHA-256 of the *canonical listing* of every entry under the paths.

Canonical listing
=================

One line per entry, lines sorted by the entry's relative path compared bytewise on
its (unescaped) bytes -- for UTF-8 names, bytewise on UTF-8. Each line is::

    TYPE SP MODE SP VALUE SP PATH LF

TYPE
    ``f`` regular file, ``d`` directory, ``l`` symbolic link.
MODE
    Normalised the way git does, so that a checkout measures the same under any umask
    and on any filesystem: ``644`` or ``755`` for a file (``755`` iff the owner-exec bit
    is set), ``755`` for a directory, ``777`` for a link. Owner, group, timestamps and
    other permission bits are not measured.
VALUE
    File: lowercase hex SHA-256 of its contents. Link: the link target as stored,
    escaped (the link is never followed). Directory: ``-``.
PATH
    The entry's path relative to the argument it was found under, prefixed with that
    argument's basename, components joined by ``/``. The argument itself is an entry
    too: ``measure app/`` lists ``app``, ``app/main.py``, ...; ``measure app.py lib``
    lists ``app.py``, ``lib``, ``lib/...``. The basename is taken after making the
    argument absolute, so ``measure .`` inside ``app`` equals ``measure app``.

Escaping. PATH and link targets are byte strings from the filesystem; each byte that
is a control character (0x00-0x1f, 0x7f), a space (0x20) or a backslash (0x5c) is
written as ``\\xHH`` (two lowercase hex digits); every other byte is written as is.
The escaping is injective, so no name -- one containing a newline or a space
included -- can forge a line or shift a field: a listing determines its tree.

Argument order does not matter: every entry of every argument goes into one sorted
listing. Two arguments may not contribute the same relative path (``measure a/app
b/app``), since the listing could not tell them apart.

Arguments are examined with ``lstat``: an argument that is a symlink is measured as a
link. Written with a trailing slash (``app/``) it is resolved by the kernel first, as
everywhere in POSIX, and measured as the directory it names.

Refused with `MeasureError` (a `ValueError`), the message naming the path: a missing
path, special files (fifo, socket, block or character device), files or directories
that cannot be read, duplicate relative paths, the filesystem root, an empty argument
list, and more than `MAX_ENTRIES` entries in total. File contents are streamed, never
read whole into memory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

MAX_ENTRIES = 100_000
_CHUNK = 1 << 20

_ESCAPED = frozenset(range(0x21)) | {0x5C, 0x7F}

# O_NOFOLLOW: a file swapped for a symlink between listing and reading is not followed.
# O_NONBLOCK: a file swapped for a fifo is not waited on (fstat then refuses it).
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class MeasureError(ValueError):
    """A path cannot be measured; the message names it and says why."""


@dataclass(frozen=True, order=True)
class _Entry:
    rel: bytes  # unescaped relative path, the sort key
    kind: str  # "f", "d" or "l"
    mode: str
    value: bytes  # hex digest, escaped link target, or b"-"
    source: bytes  # filesystem path, for error messages

    def line(self) -> bytes:
        return b"%s %s %s %s\n" % (
            self.kind.encode(),
            self.mode.encode(),
            self.value,
            escape(self.rel),
        )


def escape(name: bytes) -> bytes:
    """Escape a path or link target for the canonical listing (see module docstring)."""
    if not any(b in _ESCAPED for b in name):
        return name
    return b"".join(b"\\x%02x" % b if b in _ESCAPED else bytes((b,)) for b in name)


def _show(path: bytes) -> str:
    return repr(os.fsdecode(path))


def measure_paths(paths: Sequence[str | os.PathLike[str]]) -> str:
    """SHA-256 (lowercase hex) of the canonical listing of every entry under `paths`."""
    digest = hashlib.sha256()
    for line in _listing_lines(paths):
        digest.update(line)
    return digest.hexdigest()


def canonical_listing(paths: Sequence[str | os.PathLike[str]]) -> bytes:
    """The listing `measure_paths` hashes, for debugging a measurement mismatch."""
    return b"".join(_listing_lines(paths))


def _listing_lines(paths: Sequence[str | os.PathLike[str]]) -> Iterator[bytes]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError("measure_paths takes a sequence of paths, not a single path")
    if not paths:
        raise MeasureError("no paths to measure")
    walker = _Walker()
    for p in paths:
        walker.walk(os.fsencode(p))
    entries = sorted(walker.entries)
    for prev, cur in zip(entries, entries[1:], strict=False):
        if prev.rel == cur.rel:
            raise MeasureError(
                f"{_show(prev.source)} and {_show(cur.source)} both measure as "
                f"{_show(cur.rel)}; pass each path once, or arguments with distinct basenames"
            )
    for entry in entries:
        yield entry.line()


class _Walker:
    """Collects entries of all arguments, counting every entry it discovers.

    The count includes names seen in a directory but not yet examined, so that one huge
    directory is refused before its listing is held in memory.
    """

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.discovered = 0

    def _discover(self, path: bytes) -> None:
        self.discovered += 1
        if self.discovered > MAX_ENTRIES:
            raise MeasureError(
                f"more than {MAX_ENTRIES} entries to measure (reached at {_show(path)}); "
                "measure the application's own files, not a whole filesystem"
            )

    def walk(self, arg: bytes) -> None:
        if not arg:
            raise MeasureError("empty path")
        name = os.path.basename(os.path.abspath(arg))
        if not name:
            raise MeasureError(f"cannot measure the filesystem root {_show(arg)}; name a directory")
        self._discover(arg)
        stack: list[tuple[bytes, bytes]] = [(arg, name)]
        while stack:
            src, rel = stack.pop()
            st = _lstat(src)
            if stat.S_ISDIR(st.st_mode):
                self.entries.append(_Entry(rel, "d", "755", b"-", src))
                for child in self._list_dir(src):
                    stack.append((os.path.join(src, child), rel + b"/" + child))
            elif stat.S_ISREG(st.st_mode):
                digest, exec_bit = _hash_file(src)
                mode = "755" if exec_bit else "644"
                self.entries.append(_Entry(rel, "f", mode, digest, src))
            elif stat.S_ISLNK(st.st_mode):
                self.entries.append(_Entry(rel, "l", "777", escape(_readlink(src)), src))
            else:
                raise MeasureError(
                    f"{_show(src)} is a {_kind_name(st.st_mode)}; only regular files, "
                    "directories and symlinks can be measured"
                )

    def _list_dir(self, path: bytes) -> list[bytes]:
        names: list[bytes] = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    self._discover(os.path.join(path, e.name))
                    names.append(e.name)
        except OSError as e:
            raise MeasureError(f"cannot list directory {_show(path)}: {e.strerror}") from None
        return names


def _lstat(path: bytes) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise MeasureError(f"{_show(path)} does not exist") from None
    except OSError as e:
        raise MeasureError(f"cannot examine {_show(path)}: {e.strerror}") from None


def _readlink(path: bytes) -> bytes:
    try:
        return os.readlink(path)
    except OSError as e:
        raise MeasureError(f"cannot read symlink {_show(path)}: {e.strerror}") from None


def _hash_file(path: bytes) -> tuple[bytes, bool]:
    """Streamed SHA-256 of a regular file, and whether its owner-exec bit is set."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise MeasureError(f"cannot read {_show(path)}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MeasureError(f"{_show(path)} changed while being measured; measure again")
        digest = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
    except OSError as e:
        raise MeasureError(f"cannot read {_show(path)}: {e.strerror}") from None
    finally:
        os.close(fd)
    return digest.hexdigest().encode(), bool(st.st_mode & stat.S_IXUSR)


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISCHR(mode):
        return "character device"
    return "special file"
