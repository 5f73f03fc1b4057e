"""The sidecar's attested identity: attest, hold the key in memory, renew, swap contexts.

The private key is generated here and lives only in this process's memory; it reaches
OpenSSL through a memfd (`tlsutil.load_chain_from_memory`), never a file on disk.
Renewal attests again with fresh evidence at 50% of the lifetime (minus up to 10%
jitter, so a fleet does not renew in step). The TLS contexts are long-lived objects
whose certificate is replaced in place: new handshakes use the new certificate while
open connections carry on with the one they negotiated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.attestclient import AttestRequest, build_attest_body
from meshshield.errors import MeshError, Reason
from meshshield.pki.keys import generate_p256
from meshshield.sidecar.config import SidecarConfig
from meshshield.sidecar.peercheck import TrustView
from meshshield.tlsutil import load_chain_from_memory

log = logging.getLogger("meshshield.sidecar")

RENEW_AT = 0.5
JITTER = 0.1
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if `stop` was set meanwhile (the caller should return)."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def mesh_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No session tickets: every connection is a full handshake with a fresh peer check
    # (resumption would skip presenting the certificate), so tickets are pure cost.
    ctx.num_tickets = 0
    return ctx


def mesh_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # The peer is identified by its SPIFFE ID in the peer check, not by host name.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(frozen=True)
class Held:
    """One certificate the sidecar holds."""

    cert: x509.Certificate
    serial: str
    not_after: datetime
    issued_at: float
    lifetime: float
    claims: dict[str, Any]
    spiffe_id: str


class Identity:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.server_ctx = mesh_server_context()
        self.client_ctx = mesh_client_context()
        self.cas_bundle = config.cas_bundle.read_text()
        self.cas_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.cas_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.cas_ctx.load_verify_locations(cadata=self.cas_bundle)
        self._trusted: set[str] = set()
        self.held: Held | None = None
        self.view: TrustView | None = None
        self.renew_at: float | None = None
        self.last_error: str | None = None
        self.renewals = 0
        self.listeners: list[Any] = []

    @property
    def ready(self) -> bool:
        return self.held is not None and self.view is not None

    def _trust(self, bundle_pem: str) -> None:
        if bundle_pem and bundle_pem not in self._trusted:
            for ctx in (self.server_ctx, self.client_ctx, self.cas_ctx):
                ctx.load_verify_locations(cadata=bundle_pem)
            self._trusted.add(bundle_pem)

    async def attest(self, session: aiohttp.ClientSession) -> Held:
        key = generate_p256()
        req = AttestRequest(
            session=self.config.session,
            service=self.config.service,
            platform=self.config.platform,
            workload=self.config.workload,
            sim_key=self.config.sim_key,
        )
        nonce = await self._post(session, "/v1/attest/nonce", {})
        body = await asyncio.to_thread(build_attest_body, req, key, nonce["nonce"])
        resp = await self._post(session, "/v1/attest", body)
        self._install(key, resp)
        assert self.held is not None
        return self.held

    async def _post(self, session: aiohttp.ClientSession, path: str, obj: Any) -> Any:
        async with session.post(self.config.cas + path, json=obj, ssl=self.cas_ctx) as r:
            data = await r.read()
            try:
                doc = json.loads(data)
            except ValueError:
                raise MeshError(
                    Reason.BAD_REQUEST, f"CAS answered {r.status} without JSON"
                ) from None
            if r.status != 200:
                err = doc.get("error", {}) if isinstance(doc, dict) else {}
                try:
                    reason = Reason(str(err.get("code")))
                except ValueError:
                    reason = Reason.BAD_REQUEST
                raise MeshError(reason, str(err.get("message", f"HTTP {r.status}")))
            return doc

    def _install(self, key: ec.EllipticCurvePrivateKey, resp: dict[str, Any]) -> None:
        chain_pem = str(resp["certificate"]).encode()
        leaf = x509.load_pem_x509_certificate(chain_pem)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._trust(str(resp["bundle"]))
        for ctx in (self.server_ctx, self.client_ctx, self.cas_ctx):
            load_chain_from_memory(ctx, chain_pem, key_pem)
        now = time.time()
        lifetime = max(1.0, leaf.not_valid_after_utc.timestamp() - now)
        self.held = Held(
            cert=leaf,
            serial=str(resp.get("serial") or format(leaf.serial_number, "x")),
            not_after=leaf.not_valid_after_utc,
            issued_at=now,
            lifetime=lifetime,
            claims=dict(resp["claims"]),
            spiffe_id=str(resp["spiffe_id"]),
        )
        self.renew_at = now + lifetime * RENEW_AT * (1 - random.uniform(0, JITTER))  # noqa: S311
        self.update_view(TrustView.from_snapshot(resp["trust"]))
        log.info(
            "%s/%s: holding certificate %s until %s%s; renewal in %.1f s",
            self.config.session, self.config.service, self.held.serial,
            self.held.not_after.isoformat(),
            " (SIMULATED attestation)" if self.held.claims.get("simulated") else "",
            self.renew_at - now,
        )

    def update_view(self, view: TrustView) -> None:
        if self.view is not None and view.epoch < self.view.epoch:
            return  # an older snapshot arriving late
        self._trust(view.bundle_pem)
        self.view = view
        for listener in list(self.listeners):
            listener(view)

    async def run_renewals(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Keep a certificate: attest until one is held, then renew on schedule."""
        backoff = BACKOFF_MIN
        while not stop.is_set():
            wait = 0.0 if self.held is None else max(0.0, (self.renew_at or 0) - time.time())
            if wait and await stopped_within(stop, wait):
                return
            try:
                await self.attest(session)
                self.renewals += 1
                self.last_error = None
                backoff = BACKOFF_MIN
            except (MeshError, aiohttp.ClientError, OSError, TimeoutError) as e:
                self.last_error = str(e)
                log.warning("%s/%s: attestation failed (%s); retrying in %.1f s",
                            self.config.session, self.config.service, e, backoff)
                if await stopped_within(stop, backoff):
                    return
                backoff = min(BACKOFF_MAX, backoff * 2)
