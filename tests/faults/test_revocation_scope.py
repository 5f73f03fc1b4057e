"""A measurement revocation reaches only as far as its author's authority.

A key that may update one session revokes a measurement in that session only: the
session's peers carrying it are cut and it gets no new certificate there, while another
tenant's session running the same build goes on. A mesh-wide revocation needs a CAS
admin key (`--admin-fingerprint`), and every answer says which scope it had.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from faultlib import warm_up
from harness import CasProcess
from meshpeers import (
    DATAPLANES,
    Mesh,
    closed_by_peer,
    connect,
    refused_on_connect,
    roundtrip,
    status,
    wait_until,
)

from meshshield.adminauth import load_admin_key, write_admin_key

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


def _tenant_policy(cas: CasProcess, name: str, tenant_fp: str) -> str:
    """The harness's sim policy, which the tenant key may read and update."""
    text = cas.sim_policy(name)
    return text + f"access_policy:\n  read: [CREATOR, {tenant_fp}]\n" \
                  f"  update: [CREATOR, {tenant_fp}]\n"


def _revoke(cas: CasProcess, session: str, body: dict[str, object], key: object) -> tuple[
        int, dict[str, object]]:
    r = cas.request("POST", f"/v1/sessions/{session}/revocations",
                    json.dumps(body).encode(), admin=key)  # type: ignore[arg-type]
    return r.status, r.json()


def test_session_admin_cannot_revoke_measurement_of_other_session(
        fault_cas: CasProcess, echo_port: int, meshes: Callable[..., Mesh], tmp_path: Path,
        leak_check: LeakCheck) -> None:
    cas = fault_cas
    _, tenant_fp = write_admin_key(tmp_path / "tenant")
    tenant = load_admin_key(tmp_path / "tenant")
    m_ = cas.measurement()  # both sessions run the same build
    for text in (_tenant_policy(cas, "kiosk", tenant_fp), cas.sim_policy("shop")):
        r = cas.apply_policy(text)
        assert r.returncode == 0, r.stderr
    kiosk = meshes(cas, "kiosk", {"echo": echo_port})
    shop = meshes(cas, "shop", {"echo": echo_port})
    for mesh in (kiosk, shop):
        warm_up(mesh.outbound["echo"])
    for p in (cas, kiosk.backend, kiosk.frontend, shop.backend, shop.frontend):
        leak_check.watch(p)
    with connect(kiosk.outbound["echo"]) as ks, connect(shop.outbound["echo"]) as ss:
        assert roundtrip(ks, b"kiosk\n") == b"kiosk\n"
        assert roundtrip(ss, b"shop\n") == b"shop\n"

        # The tenant revokes the build in its own session; the answer says so.
        code, doc = _revoke(cas, "kiosk", {"measurement": m_}, tenant)
        assert code == 201, doc
        epoch = int(doc["epoch"])  # type: ignore[call-overload]

        ks.settimeout(5)
        assert wait_until(lambda: closed_by_peer(ks), 5, "kiosk's live connection cut")
        for sc in (shop.backend, shop.frontend):
            wait_until(lambda sc=sc: (status(sc)["epoch"] or 0) >= epoch, 5,  # type: ignore[misc]
                       f"shop {sc.name} to apply epoch {epoch}")
        assert roundtrip(ss, b"shop still\n") == b"shop still\n"
    with connect(shop.outbound["echo"]) as s:
        assert roundtrip(s, b"shop new\n") == b"shop new\n"
    other = cas.attest("shop", "backend")
    assert other.status == 200, f"another tenant's session was hit: {other.body!r}"
    assert doc["scope"] == "session" and doc["session"] == "kiosk", doc
    refused = cas.attest("kiosk", "backend")
    assert (refused.status, refused.code) == (403, "revoked"), refused.body
    assert refused_on_connect(kiosk.outbound["echo"], b"kiosk again?\n")

    # The tenant may not revoke mesh-wide, nor in a session it may not update.
    code, doc = _revoke(cas, "kiosk", {"measurement": m_, "mesh_wide": True}, tenant)
    assert code == 403 and doc["error"]["code"] == "forbidden", doc  # type: ignore[index]
    code, doc = _revoke(cas, "shop", {"measurement": m_}, tenant)
    assert code == 403 and doc["error"]["code"] == "forbidden", doc  # type: ignore[index]
    assert cas.attest("shop", "backend").status == 200

    # A CAS admin revokes it mesh-wide, with the CLI.
    r = cas.cli("revoke", "shop", "--measurement", m_, "--mesh-wide")
    assert r.returncode == 0, r.stderr
    assert "mesh-wide" in r.stdout, r.stdout
    refused = cas.attest("shop", "backend")
    assert (refused.status, refused.code) == (403, "revoked"), refused.body
    started = time.monotonic()
    assert refused_on_connect(shop.outbound["echo"], b"shop again?\n"), \
        f"still open after {time.monotonic() - started:.1f} s"
