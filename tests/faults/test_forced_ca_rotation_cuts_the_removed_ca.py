"""A forced CA rotation (key compromise) removes the old CA from every trust bundle at
once: sidecars and the CAS build fresh TLS contexts (a context can only add CAs, so
editing one in place would keep the old CA trusted), cut live connections whose peer
chains to the removed CA, refuse its leaves on new handshakes, and attest again for a
certificate of the new CA.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from attested_peer import attested_peer
from cryptography import x509
from faultlib import warm_up
from harness import CasProcess
from meshpeers import (
    DATAPLANES,
    LOOPBACK,
    Mesh,
    closed_by_peer,
    connect,
    roundtrip,
    status,
    wait_refusal,
    wait_until,
)

if TYPE_CHECKING:
    from conftest import LeakCheck

pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)


def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    """'ok' if a TLS handshake with a byte exchange completes, else the error."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as s:
            s.settimeout(5)
            s.sendall(b"hello\n")
            data = s.recv(100)
            return "ok" if data else "closed"
    except (OSError, ssl.SSLError) as e:
        return f"{type(e).__name__}: {e}"


def test_forced_ca_rotation_cuts_connections_and_refuses_the_removed_ca(
        fault_cas: CasProcess, shop_mesh: Callable[..., Mesh], leak_check: LeakCheck) -> None:
    cas = fault_cas
    mesh = shop_mesh()
    sidecars = (mesh.frontend, mesh.backend)
    old = attested_peer(cas, "shop", "frontend")  # a frontend certificate of the old CA
    old_cert, old_key = old.cert, old.key
    old_issuer = x509.load_pem_x509_certificate(old_cert.read_bytes()).issuer
    mesh_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    mesh_client.check_hostname = False
    mesh_client.verify_mode = ssl.CERT_NONE  # we test the server's verification
    mesh_client.load_cert_chain(str(old_cert), str(old_key))
    assert _handshake(mesh.inbound["echo"], mesh_client) == "ok"
    serials = {sc.name: status(sc)["identity"]["serial"] for sc in sidecars}
    warm_up(mesh.outbound["echo"])
    for p in (cas, *sidecars):
        leak_check.watch(p)

    with connect(mesh.outbound["echo"]) as s:
        assert roundtrip(s, b"before\n") == b"before\n"
        rotated = time.monotonic()
        r = cas.cli("cas", "rotate-ca", "--force")
        assert r.returncode == 0, r.stdout + r.stderr
        s.settimeout(0.2)
        wait_until(lambda: closed_by_peer(s), 10, "the live connection cut")
        took = (time.monotonic() - rotated) * 1000
        print(f"forced rotation: live connection cut {took:.0f} ms after rotate-ca started")
    wait_refusal(mesh.backend, "chain_invalid", timeout=5)

    # both sidecars attest again, for certificates of the new CA
    wait_until(lambda: all(status(sc)["identity"]["serial"] != serials[sc.name]
                           for sc in sidecars), 20, "both sidecars re-attested")
    with connect(mesh.outbound["echo"]) as s:
        assert roundtrip(s, b"after\n") == b"after\n"

    # a leaf of the removed CA: refused by the sidecar and by the CAS
    got = _handshake(mesh.inbound["echo"], mesh_client)
    assert got != "ok", got
    wait_refusal(mesh.backend, "tls_handshake_failed", timeout=5)
    bundle = cas.get("/v1/bundle").json()
    assert all(c.issuer != old_issuer for c in x509.load_pem_x509_certificates(
        bundle["bundle"].encode())), "the old CA is still in the bundle"
    try:
        r2 = cas.get("/v1/events", ctx=cas.ssl_context(old_cert, old_key), timeout=5)
        outcome = f"HTTP {r2.status}"
    except OSError as e:  # ssl.SSLError, URLError and RemoteDisconnected are OSErrors
        outcome = f"refused: {e}"
    assert outcome.startswith("refused"), outcome
