"""A mesh peer that is not a sidecar: a certificate attested through the real CAS, used
by a plain TLS client. It never cuts its own connections, so whatever closes them is
the other side's (the sidecar's or the CAS's) doing."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from harness import CasProcess

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class AttestedPeer:
    session: str
    service: str
    cert: Path
    key: Path
    serial: str
    bundle: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the mesh identifies peers by SPIFFE ID
        ctx.load_verify_locations(str(self.bundle))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def connect(self, port: int, timeout: float = 10.0) -> ssl.SSLSocket:
        raw = socket.create_connection((LOOPBACK, port), timeout=timeout)
        try:
            return self.context().wrap_socket(raw)
        except BaseException:
            raw.close()
            raise


def attested_peer(cas: CasProcess, session: str, service: str,
                  workload: Path | None = None) -> AttestedPeer:
    key, body = cas.attest_body(session, service, workload=workload)
    r = cas.post_json("/v1/attest", body)
    assert r.status == 200, r.body
    doc = r.json()
    folder = cas.root / f"peer-{session}-{service}-{doc['serial']}"
    folder.mkdir()
    cert = folder / "cert.pem"
    cert.write_text(doc["certificate"])
    key_path = folder / "key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return AttestedPeer(session, service, cert, key_path, str(doc["serial"]), cas.bundle)


def cut(s: socket.socket) -> bool:
    """True once the other side has closed or reset `s` (waits up to the socket timeout)."""
    try:
        return s.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
