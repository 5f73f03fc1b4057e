"""A TCP reset from one app reaches the other app as a reset, through both sidecars
(plaintext RST -> TLS-side abort with a TCP RST, no close_notify -> RST to the far app),
never as a clean FIN that would make a cut-short response look complete."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
from meshpeers import DATAPLANES, roundtrip, wait_until
from onpath import OnPathMesh, how_it_ends, linger_zero

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


def test_app_reset_reaches_other_app_as_reset(
        onpath_mesh: OnPathMesh, leak_check: LeakCheck) -> None:
    """The client app resets its connection; the backend app sees a reset."""
    mesh = onpath_mesh
    mesh.watch(leak_check)
    before = len(mesh.app.ends)
    s = mesh.connect()
    linger_zero(s)
    s.close()
    ends = wait_until(lambda: mesh.app.ends[before:], 10, "the backend app's connection to end")
    assert ends == ["reset"], ends
    mesh.no_live_connections()


def test_backend_app_reset_reaches_client_as_reset(
        onpath_mesh: OnPathMesh, leak_check: LeakCheck) -> None:
    """The backend app resets its connection mid-conversation; the client sees a reset."""
    mesh = onpath_mesh
    mesh.watch(leak_check)
    mesh.app.reset_at = 6 + 9  # "hello\n" then "response\n"
    try:
        with mesh.connect() as s:
            s.settimeout(10)
            assert roundtrip(s, b"response\n") == b"response\n"
            assert how_it_ends(s) == "reset"
    finally:
        mesh.app.reset_at = None
    mesh.no_live_connections()


def test_clean_close_still_reaches_app_as_clean_end(
        onpath_mesh: OnPathMesh, leak_check: LeakCheck) -> None:
    """A client's FIN (TLS close_notify then FIN between the sidecars) stays a clean end,
    and the way back stays open until the backend app closes."""
    mesh = onpath_mesh
    mesh.watch(leak_check)
    before = len(mesh.app.ends)
    with mesh.connect() as s:
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        assert how_it_ends(s) == "eof"
    ends = wait_until(lambda: mesh.app.ends[before:], 10, "the backend app's connection to end")
    assert ends == ["eof"], ends
    mesh.no_live_connections()
