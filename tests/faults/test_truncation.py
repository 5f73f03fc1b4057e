"""Truncation: a TCP FIN without TLS close_notify (an on-path host can forge one)
reaches the app as a reset, never as a clean end of the stream (SPEC §7)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from meshpeers import no_traceback, wait_until
from onpath import OnPathMesh, how_it_ends


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnPathMesh]:
    m = OnPathMesh(tmp_path_factory.mktemp("truncation"))
    try:
        yield m
        no_traceback(m.backend, m.frontend)
    finally:
        m.close()


def test_fin_without_close_notify_reaches_app_as_reset(mesh: OnPathMesh) -> None:
    """A FIN forged towards the backend's sidecar: the backend app sees a reset."""
    assert mesh.onpath is not None
    before = len(mesh.app.ends)
    with mesh.connect():
        mesh.onpath.forge_fin(towards="server")
        ends = wait_until(lambda: mesh.app.ends[before:], 10,
                          "the backend app's connection to end")
    assert ends == ["reset"], ends
    mesh.no_live_connections()


def test_fin_without_close_notify_reaches_client_as_reset(mesh: OnPathMesh) -> None:
    """A FIN forged towards the frontend's sidecar: the client app sees a reset."""
    assert mesh.onpath is not None
    with mesh.connect() as s:
        mesh.onpath.forge_fin(towards="client")
        s.settimeout(10)
        assert how_it_ends(s) == "reset"
    mesh.no_live_connections()
