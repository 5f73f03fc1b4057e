"""The sidecar's secrets folder: memory-backed only, files 0400, replaced atomically,
unchanged versions left alone, secrets the policy dropped removed."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshshield.errors import MeshError
from meshshield.sidecar.secrets import (
    ReleasedSecret,
    SecretFiles,
    check_memory_folder,
    environment,
    filesystem_type,
    write_secret_files,
)


@pytest.fixture
def shm() -> Iterator[Path]:
    if filesystem_type(Path("/dev/shm")) != "tmpfs":
        pytest.fail("these tests need /dev/shm on tmpfs")
    d = Path("/dev/shm") / f"meshshield-unit-{os.getpid()}"
    d.mkdir(mode=0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def secret(name: str, value: bytes, version: int = 1, *, env: str | None = None,
           file: bool = True, kind: str = "ascii") -> ReleasedSecret:
    return ReleasedSecret(name, kind, version, value, env,
                          f"/run/secrets/{name}" if file else None)


def test_a_folder_on_disk_a_symlink_or_a_file_is_refused(tmp_path: Path, shm: Path) -> None:
    assert check_memory_folder(shm, allow_disk=False) == "tmpfs"
    with pytest.raises(MeshError, match="not in memory"):
        check_memory_folder(tmp_path, allow_disk=False)
    assert check_memory_folder(tmp_path, allow_disk=True) == filesystem_type(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(shm)
    with pytest.raises(MeshError, match="symbolic link"):
        check_memory_folder(link, allow_disk=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(MeshError, match="not a directory"):
        check_memory_folder(tmp_path / "f", allow_disk=True)
    with pytest.raises(MeshError, match="not a directory"):
        check_memory_folder(tmp_path / "missing", allow_disk=True)


def test_files_are_0400_rewritten_only_when_their_version_changes(shm: Path) -> None:
    versions = write_secret_files(shm, [secret("a", b"one"), secret("b", b"\x00\xff")])
    assert {k: v for k, (v, _) in versions.items()} == {"a": 1, "b": 1}
    assert (shm / "a").read_bytes() == b"one" and (shm / "b").read_bytes() == b"\x00\xff"
    assert stat.S_IMODE((shm / "a").stat().st_mode) == 0o400
    inode_a, inode_b = (shm / "a").stat().st_ino, (shm / "b").stat().st_ino
    versions = write_secret_files(shm, [secret("a", b"two", 2), secret("b", b"\x00\xff")],
                                  versions)
    assert {k: v for k, (v, _) in versions.items()} == {"a": 2, "b": 1}
    assert (shm / "a").read_bytes() == b"two" and (shm / "a").stat().st_ino != inode_a
    assert (shm / "b").stat().st_ino == inode_b  # unchanged: not rewritten
    # The same version with new contents (an x509 secret's certificate issued anew).
    versions = write_secret_files(shm, [secret("a", b"two"), secret("b", b"renewed cert")],
                                  versions)
    assert (shm / "b").read_bytes() == b"renewed cert" and (shm / "b").stat().st_ino != inode_b
    versions = write_secret_files(shm, [secret("b", b"renewed cert")], versions)
    assert list(versions) == ["b"] and not (shm / "a").exists()  # dropped from the policy
    assert sorted(p.name for p in shm.iterdir()) == ["b"]  # no temporary file left


def test_env_only_secrets_write_no_file_and_reach_the_environment_as_text(shm: Path) -> None:
    released = [secret("pw", b"hunter2", env="PW", file=False),
                secret("salt", b"\x01\x02", env="SALT", file=False, kind="random")]
    assert write_secret_files(shm, released) == {} and list(shm.iterdir()) == []
    assert environment(released) == {"PW": "hunter2", "SALT": "0102"}
    with pytest.raises(MeshError, match="cannot be an environment variable"):
        environment([secret("bin", b"\xff\xfe", env="BIN", file=False, kind="value")])
    with pytest.raises(MeshError, match="NUL"):
        environment([secret("nul", b"a\x00b", env="NUL", file=False, kind="value")])


def test_a_write_that_fails_is_a_mesh_error_naming_the_folder(shm: Path) -> None:
    files = SecretFiles(shm, allow_disk=False)
    files.update([secret("a", b"x")])
    shutil.rmtree(shm)
    with pytest.raises(MeshError, match=f"cannot write secrets into {shm}"):
        files.update([secret("a", b"y", 2)])
    assert files.status()["files"] == {"a": 1}
