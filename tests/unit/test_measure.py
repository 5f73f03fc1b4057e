"""Workload measurement over real temporary trees."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from meshshield.attestation import measure
from meshshield.attestation.measure import MeasureError, canonical_listing, measure_paths


def make_app(root: Path) -> Path:
    app = root / "app"
    (app / "lib").mkdir(parents=True)
    (app / "main.py").write_bytes(b"print('hello')\n")
    (app / "lib" / "util.py").write_bytes(b"X = 1\n")
    run = app / "run.sh"
    run.write_bytes(b"#!/bin/sh\nexec python main.py\n")
    run.chmod(0o755)
    return app


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_canonical_listing_is_exactly_as_documented(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    (app / "current").symlink_to("lib/util.py")
    util = sha(b"X = 1\n")
    main = sha(b"print('hello')\n")
    run = sha(b"#!/bin/sh\nexec python main.py\n")
    expected = (
        b"d 755 - app\n"
        b"l 777 lib/util.py app/current\n"
        b"d 755 - app/lib\n"
        + f"f 644 {util} app/lib/util.py\n".encode()
        + f"f 644 {main} app/main.py\n".encode()
        + f"f 755 {run} app/run.sh\n".encode()
    )
    assert canonical_listing([app]) == expected
    assert measure_paths([app]) == sha(expected)


def test_result_is_64_lowercase_hex(tmp_path: Path) -> None:
    digest = measure_paths([make_app(tmp_path)])
    assert len(digest) == 64 and digest == digest.lower() and int(digest, 16) >= 0


def test_stable_across_umask_mtime_and_group_bits(tmp_path: Path) -> None:
    a = make_app(tmp_path / "a")
    old = os.umask(0o077)
    try:
        b = make_app(tmp_path / "b")
    finally:
        os.umask(old)
    assert (b / "main.py").stat().st_mode & 0o777 == 0o600
    assert measure_paths([a]) == measure_paths([b])
    os.utime(b / "main.py", (1, 1))
    (b / "lib").chmod(0o700)
    (b / "run.sh").chmod(0o700)  # owner-exec still set
    assert measure_paths([a]) == measure_paths([b])


def test_changes_with_one_byte(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    before = measure_paths([app])
    (app / "lib" / "util.py").write_bytes(b"X = 2\n")
    assert measure_paths([app]) != before


def test_changes_with_exec_bit(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    before = measure_paths([app])
    (app / "main.py").chmod(0o744)
    assert measure_paths([app]) != before


def test_changes_with_rename_and_new_empty_dir(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    before = measure_paths([app])
    (app / "main.py").rename(app / "main2.py")
    renamed = measure_paths([app])
    assert renamed != before
    (app / "empty").mkdir()
    assert measure_paths([app]) != renamed


def test_depends_on_argument_basename(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    before = measure_paths([app])
    app.rename(tmp_path / "app2")
    assert measure_paths([tmp_path / "app2"]) != before


def test_dot_equals_named_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(tmp_path)
    expected = measure_paths([app])
    monkeypatch.chdir(app)
    assert measure_paths(["."]) == expected
    assert measure_paths([str(app) + "/"]) == expected


def test_symlink_is_recorded_not_followed(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"one")
    (app / "link").symlink_to(secret)
    (app / "dangling").symlink_to("does/not/exist")
    (app / "dirlink").symlink_to("lib")
    before = measure_paths([app])
    secret.write_bytes(b"two")  # target content is not measured
    assert measure_paths([app]) == before
    listing = canonical_listing([app])
    assert f"l 777 {secret} app/link\n".encode() in listing
    assert b"l 777 does/not/exist app/dangling\n" in listing
    assert b"app/dirlink/" not in listing
    (app / "link").unlink()
    (app / "link").symlink_to(tmp_path / "other")
    assert measure_paths([app]) != before


def test_symlink_argument_is_a_link_unless_trailing_slash(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    (tmp_path / "current").symlink_to("app")
    assert canonical_listing([tmp_path / "current"]) == b"l 777 app current\n"
    via_slash = canonical_listing([str(tmp_path / "current") + "/"])
    assert via_slash == canonical_listing([app]).replace(b" app", b" current")


def test_file_arguments_and_order_independence(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    one = measure_paths([app / "main.py", app / "lib"])
    assert measure_paths([app / "lib", app / "main.py"]) == one
    listing = canonical_listing([app / "main.py", app / "lib"])
    assert [line.split(b" ")[-1] for line in listing.splitlines()] == [
        b"lib",
        b"lib/util.py",
        b"main.py",
    ]


def test_sorted_bytewise_not_by_tree_order(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "a" / "z").write_bytes(b"")
    (root / "a-b").write_bytes(b"")
    (root / "é").write_bytes(b"")
    (root / "B").write_bytes(b"")
    paths = [line.split(b" ")[-1] for line in canonical_listing([root]).splitlines()]
    assert paths == [b"r", b"r/B", b"r/a", b"r/a-b", b"r/a/z", "r/é".encode()]


def test_newline_and_space_in_names_cannot_forge_lines(tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    empty = sha(b"")
    forged = f"x\nf 644 {empty} y"  # unescaped, this would add the line "f 644 ... y"
    (evil / forged).write_bytes(b"")
    (evil / "back\\slash").write_bytes(b"")
    (evil / "l").symlink_to("a b\nc")
    listing = canonical_listing([evil])
    assert listing.count(b"\n") == 4
    assert b"evil/x\\x0af\\x20644\\x20" in listing
    assert b"evil/back\\x5cslash\n" in listing
    assert b"l 777 a\\x20b\\x0ac evil/l\n" in listing
    assert f"{empty} y\n".encode() not in listing


def test_escape_is_injective_on_backslash_sequences() -> None:
    assert measure.escape(b"a\\x0ab") != measure.escape(b"a\nb")
    assert measure.escape(b"plain-\xc3\xa9") == b"plain-\xc3\xa9"


def test_non_utf8_names_are_measured(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    raw = os.fsencode(str(root)) + b"/\xff\xfe"
    with open(raw, "wb") as f:
        f.write(b"data")
    assert b"r/\xff\xfe\n" in canonical_listing([root])


def test_fifo_refused(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    os.mkfifo(app / "pipe")
    with pytest.raises(MeasureError, match=r"pipe.*fifo"):
        measure_paths([app])


def test_socket_refused(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    sock_path = app / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(MeasureError, match=r"socket"):
            measure_paths([app])


def test_device_refused() -> None:
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(MeasureError, match=r"/dev/null.*character device"):
        measure_paths(["/dev/null"])


def test_missing_path_refused(tmp_path: Path) -> None:
    with pytest.raises(MeasureError, match=r"nope.*does not exist"):
        measure_paths([tmp_path / "nope"])


def test_duplicates_refused(tmp_path: Path) -> None:
    a = make_app(tmp_path / "a")
    b = make_app(tmp_path / "b")
    with pytest.raises(MeasureError, match=r"both measure as 'app'"):
        measure_paths([a, b])
    with pytest.raises(MeasureError, match=r"both measure as"):
        measure_paths([a, str(a) + "/"])


def test_empty_and_root_refused(tmp_path: Path) -> None:
    with pytest.raises(MeasureError, match="no paths"):
        measure_paths([])
    with pytest.raises(MeasureError, match="root"):
        measure_paths(["/"])
    with pytest.raises(MeasureError):
        measure_paths([""])
    with pytest.raises(TypeError):
        measure_paths(str(tmp_path))


def test_measure_error_is_value_error() -> None:
    assert issubclass(MeasureError, ValueError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_and_dir_refused(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    (app / "main.py").chmod(0)
    with pytest.raises(MeasureError, match=r"main\.py"):
        measure_paths([app])
    (app / "main.py").chmod(0o644)
    (app / "lib").chmod(0)
    try:
        with pytest.raises(MeasureError, match=r"lib"):
            measure_paths([app])
    finally:
        (app / "lib").chmod(0o755)


def test_entry_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(20):
        (root / f"f{i}").write_bytes(b"")
    monkeypatch.setattr(measure, "MAX_ENTRIES", 21)
    measure_paths([root])  # 21 entries: the directory and 20 files
    (root / "one-more").write_bytes(b"")
    with pytest.raises(MeasureError, match=r"more than 21 entries"):
        measure_paths([root])


def test_large_file_streams(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    chunk = os.urandom(1 << 16)
    with open(big, "wb") as f:
        for _ in range(64):  # 4 MiB, several read chunks
            f.write(chunk)
    expected = sha(f"f 644 {sha(chunk * 64)} big.bin\n".encode())
    assert measure_paths([big]) == expected


def test_read_errors_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusals as above, by injected errors, so they are tested as root too."""
    app = make_app(tmp_path)
    real_open, real_scandir = os.open, os.scandir

    def deny_main(path: bytes, flags: int, *args: int) -> int:
        if path.endswith(b"main.py"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", deny_main)
    with pytest.raises(MeasureError, match=r"cannot read .*main\.py.*Permission denied"):
        measure_paths([app])
    monkeypatch.setattr(os, "open", real_open)

    def deny_lib(path: bytes) -> os._ScandirIterator[bytes]:
        if path.endswith(b"lib"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", deny_lib)
    with pytest.raises(MeasureError, match=r"cannot list directory .*lib.*Permission denied"):
        measure_paths([app])
