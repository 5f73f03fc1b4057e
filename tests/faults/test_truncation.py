"""Truncation: a TCP FIN without TLS close_notify (an on-path host can forge one)
reaches the app as a reset, never as a clean end of the stream (SPEC §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from meshpeers import DATAPLANES, wait_until
from onpath import OnPathMesh, how_it_ends

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


def test_fin_without_close_notify_reaches_app_as_reset(
        onpath_mesh: OnPathMesh, leak_check: LeakCheck) -> None:
    """A FIN forged towards the backend's sidecar: the backend app sees a reset."""
    mesh = onpath_mesh
    assert mesh.onpath is not None
    mesh.watch(leak_check)
    before = len(mesh.app.ends)
    with mesh.connect():
        mesh.onpath.forge_fin(towards="server")
        ends = wait_until(lambda: mesh.app.ends[before:], 10,
                          "the backend app's connection to end")
    assert ends == ["reset"], ends
    mesh.no_live_connections()


def test_fin_without_close_notify_reaches_client_as_reset(
        onpath_mesh: OnPathMesh, leak_check: LeakCheck) -> None:
    """A FIN forged towards the frontend's sidecar: the client app sees a reset."""
    mesh = onpath_mesh
    assert mesh.onpath is not None
    mesh.watch(leak_check)
    with mesh.connect() as s:
        mesh.onpath.forge_fin(towards="client")
        s.settimeout(10)
        assert how_it_ends(s) == "reset"
    mesh.no_live_connections()
