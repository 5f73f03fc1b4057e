"""sidecar/unixsocket.py and the --workload-api settings: where the socket may live."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from meshshield.errors import MeshError
from meshshield.sidecar.config import ConfigError, build_config
from meshshield.sidecar.unixsocket import prepare_socket_path, remove_socket, secure_socket


def test_a_missing_directory_is_created_private(tmp_path: Path) -> None:
    sock = tmp_path / "wl" / "agent.sock"
    prepare_socket_path(sock)
    assert stat.S_IMODE(os.lstat(sock.parent).st_mode) == 0o700


def test_a_group_gets_a_searchable_directory_and_a_0660_socket(tmp_path: Path) -> None:
    gid = os.getgid()
    sock = tmp_path / "wl" / "agent.sock"
    prepare_socket_path(sock, gid)
    assert stat.S_IMODE(os.lstat(sock.parent).st_mode) == 0o750
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        secure_socket(sock, gid)
        st = os.lstat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(MeshError, match="writable by"):
        prepare_socket_path(d / "agent.sock")


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(MeshError, match="symbolic link"):
        prepare_socket_path(tmp_path / "link" / "agent.sock")


def test_a_missing_parent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match="parent directory does not exist"):
        prepare_socket_path(tmp_path / "no" / "such" / "agent.sock")


def test_only_a_stale_socket_is_removed(tmp_path: Path) -> None:
    d = tmp_path / "wl"
    d.mkdir(mode=0o700)
    sock = d / "agent.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # bound, never listening: stale
    prepare_socket_path(sock)
    assert not sock.exists()
    sock.write_text("data")
    with pytest.raises(MeshError, match="not a socket"):
        prepare_socket_path(sock)
    assert sock.read_text() == "data"
    remove_socket(sock)
    assert sock.exists()  # never a regular file


def test_a_socket_another_process_serves_is_left_alone(tmp_path: Path) -> None:
    d = tmp_path / "wl"
    d.mkdir(mode=0o700)
    sock = d / "agent.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        s.listen()
        with pytest.raises(MeshError, match="another running process"):
            prepare_socket_path(sock)
    assert sock.exists()


BASE = {"cas": "https://cas:8443", "cas_bundle": "b.pem", "session": "s", "service": "a",
        "platform": "sim", "inbound": ["127.0.0.1:1=127.0.0.1:2"]}


def test_workload_api_settings() -> None:
    cfg = build_config({**BASE, "workload_api": "unix:///run/x/agent.sock",
                        "workload_api_group": "0"})
    assert cfg.workload_api == Path("/run/x/agent.sock") and cfg.workload_api_group == 0
    assert build_config({**BASE, "workload_api": "unix:/run/x/a.sock"}).workload_api == Path(
        "/run/x/a.sock")
    assert build_config(BASE).workload_api is None
    for bad in ("/run/x.sock", "unix://relative/x", "tcp://127.0.0.1:1",
                "unix:///" + "x" * 120):
        with pytest.raises(ConfigError):
            build_config({**BASE, "workload_api": bad})
    with pytest.raises(ConfigError, match="needs --workload-api"):
        build_config({**BASE, "workload_api_group": "0"})
    with pytest.raises(ConfigError, match="no such group"):
        build_config({**BASE, "workload_api": "unix:///a/b", "workload_api_group": "nope-x"})
