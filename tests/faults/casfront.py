"""A CAS front for fault injection: a TLS server on loopback that stands where a sidecar
expects its CAS, passes nonce and attest requests on to the real CAS (they are
anonymous), and lets a test spoil the answers and write the event stream itself.

    front = CasFront(cas, lt)                  # its own CA, trusted beside the mesh's
    front.spoil.append(lambda answer: {...})   # the next attest answer, altered
    front.push_event(snapshot)                 # a `trust` event on every open stream
    SidecarProcess.start(front.as_cas(), ...)  # the sidecar talks to the front

The front's CA is added to the bundles it passes on, so the sidecar keeps verifying it
after it takes the mesh bundle from an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import CasProcess
from meshpeers import LOOPBACK, LoopThread

Spoiler = Callable[[dict[str, Any]], Any]

def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()

def _front_identity(root: Path) -> tuple[str, Path, Path]:
    """A throwaway CA and a 127.0.0.1 server certificate: (CA PEM, cert path, key path)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CAS front CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "front")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = root / "front.crt", root / "front.key"
    cert_path.write_text(_pem(cert))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return _pem(ca), cert_path, key_path

@dataclass
class FrontCas:
    """What SidecarProcess.start reads of a CasProcess, pointing at the front."""

    url: str
    bundle: Path
    workload: Path
    sim_dir: Path
    root: Path

class CasFront:
    def __init__(self, cas: CasProcess, lt: LoopThread, *, serve_events: bool = True) -> None:
        self.cas = cas
        self.lt = lt
        self.serve_events = serve_events
        root = cas.root / f"front-{id(self)}"
        root.mkdir()
        self.root = root
        self.ca_pem, cert, key = _front_identity(root)
        self.bundle = root / "bundle.pem"
        self.bundle.write_text(self.ca_pem + cas.bundle.read_text())
        self.spoil: list[Spoiler] = []  # applied to the next attest answers, in order
        self.answers: list[dict[str, Any]] = []  # every attest answer as sent
        self.attests = 0
        self.streams: list[asyncio.Queue[bytes | None]] = []
        self.stream_opens = 0
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(cert), str(key))
        self._upstream_ctx = cas.ssl_context()
        self.url = lt.run(self._start(server_ctx))

    async def _start(self, server_ctx: ssl.SSLContext) -> str:
        app = web.Application()
        app.router.add_post("/v1/attest/nonce", self._nonce)
        app.router.add_post("/v1/attest", self._attest)
        app.router.add_get("/v1/events", self._events)
        app.router.add_post("/v1/reports", self._reports)
        self.http = aiohttp.ClientSession()
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, LOOPBACK, 0, ssl_context=server_ctx)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"https://{LOOPBACK}:{port}"

    def as_cas(self) -> FrontCas:
        return FrontCas(self.url, self.bundle, self.cas.workload, self.cas.sim_dir,
                        self.cas.root)

    def close(self) -> None:
        async def stop() -> None:
            for q in self.streams:
                q.put_nowait(None)
            await self.http.close()
            await self.runner.cleanup()

        with contextlib.suppress(Exception):
            self.lt.run(stop(), timeout=15)

    # -- passing on ------------------------------------------------------------------
    async def _upstream(self, path: str, body: bytes) -> tuple[int, bytes]:
        async with self.http.post(self.cas.url + path, data=body, ssl=self._upstream_ctx,
                                  headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.read()

    async def _nonce(self, request: web.Request) -> web.Response:
        status, body = await self._upstream("/v1/attest/nonce", await request.read())
        return web.Response(status=status, body=body, content_type="application/json")

    def with_front_ca(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The answer with the front's CA added to its bundles (so the front stays
        trusted as the CAS)."""
        out = dict(answer)
        if isinstance(out.get("bundle"), str):
            out["bundle"] = out["bundle"] + self.ca_pem
        if isinstance(out.get("trust"), dict) and isinstance(out["trust"].get("bundle"), str):
            out["trust"] = {**out["trust"], "bundle": out["trust"]["bundle"] + self.ca_pem}
        return out

    async def _attest(self, request: web.Request) -> web.Response:
        self.attests += 1
        status, body = await self._upstream("/v1/attest", await request.read())
        if status != 200:
            return web.Response(status=status, body=body, content_type="application/json")
        answer: Any = self.with_front_ca(json.loads(body))
        if self.spoil:
            answer = self.spoil.pop(0)(answer)
        self.answers.append(answer)
        text = answer if isinstance(answer, str) else json.dumps(answer)
        return web.Response(status=200, text=text, content_type="application/json")

    async def _reports(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"accepted": 0}, status=202)

    # -- the event stream --------------------------------------------------------------
    async def _events(self, request: web.Request) -> web.StreamResponse:
        if not self.serve_events:
            return web.json_response({"error": {"code": "not_found", "message": "no"}},
                                     status=404)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.streams.append(q)
        self.stream_opens += 1
        try:
            while (data := await q.get()) is not None:
                await resp.write(data)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.streams.remove(q)
        return resp

    def push_raw(self, data: bytes) -> int:
        """Write `data` on every open event stream; how many streams got it."""

        async def put() -> int:
            for q in self.streams:
                q.put_nowait(data)
            return len(self.streams)

        return self.lt.run(put())

    def push_event(self, snapshot: dict[str, Any]) -> int:
        return self.push_raw(
            f"event: trust\ndata: {json.dumps(snapshot)}\n\n".encode())

    def open_streams(self) -> int:
        async def n() -> int:
            return len(self.streams)

        return self.lt.run(n())

    def last_trust(self) -> dict[str, Any]:
        """The trust snapshot of the last good answer, front CA included."""
        for a in reversed(self.answers):
            if isinstance(a, dict) and isinstance(a.get("trust"), dict):
                return dict(a["trust"])
        raise AssertionError("no attest answer with a trust snapshot yet")

def spoil_key(answer: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**answer, key: value}
