"""The sidecar's attested identity: attest, hold the key in memory, renew, swap contexts.

The private key is generated here and lives only in this process's memory; it reaches
OpenSSL through a memfd (`tlsutil.load_chain_from_memory`), never a file on disk.
Renewal attests again with fresh evidence at 50% of the lifetime (minus up to 10%
jitter, so a fleet does not renew in step).

TLS contexts are never edited in place: OpenSSL can only ever add CAs to a context, so
a CA removed from the trust bundle would stay trusted. Every change of certificate or
bundle builds a fresh set of contexts (`TlsContexts`) and swaps it in as one object:
new handshakes use the new set, open connections carry on with the one they negotiated.

A CAS answer is validated whole (chain, key, bundle, trust snapshot) before any of it
is applied, and the renewal loop never ends: every failure is logged, counted, shown
in /status and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.attestclient import AttestRequest, build_attest_body
from meshshield.errors import MeshError, Reason
from meshshield.pki.ca import issued_by_bundle, load_pem_chain, serial_hex
from meshshield.pki.keys import generate_p256, spki_der
from meshshield.sidecar.castrust import CasTrust
from meshshield.sidecar.config import SidecarConfig
from meshshield.sidecar.peercheck import TrustView
from meshshield.sidecar.secrets import SecretFiles, issuer_key, open_released
from meshshield.tlsutil import load_chain_from_memory

log = logging.getLogger("meshshield.sidecar")

RENEW_AT = 0.5
JITTER = 0.1
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
# Without a usable certificate the sidecar serves nothing: retry the CAS more eagerly
# (a nonce request is cheap), so it is back within seconds of the CAS returning.
BACKOFF_MAX_UNCERTIFIED = 4.0


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if `stop` was set meanwhile (the caller should return)."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def wait_any(events: list[asyncio.Event], seconds: float) -> None:
    """Return after `seconds`, or as soon as one of `events` is set."""
    if seconds <= 0 or any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        for w in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await w


def describe_error(e: BaseException) -> str:
    """One line for /status and the log: the reason code of a MeshError, else the type."""
    if isinstance(e, MeshError):
        return f"{e.reason.value}: {e.message}"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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


def cas_client_context() -> ssl.SSLContext:
    """The CAS is verified by certificate and host name, as any HTTPS server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass(frozen=True)
class TlsContexts:
    """One generation of the sidecar's TLS contexts, all built from the same bundle.

    - `server`, `client`: mesh mTLS (TLS 1.3), trusting exactly `bundle_pem`.
    - `cas`: to the CAS presenting the mesh certificate (`/v1/events`, `/v1/reports`).
    - `cas_anonymous`: to the CAS without a client certificate (nonce and attest are
      anonymous; an expired certificate presented there would fail the handshake).
    """

    server: ssl.SSLContext
    client: ssl.SSLContext
    cas: ssl.SSLContext
    cas_anonymous: ssl.SSLContext
    bundle_pem: str
    cas_trust_pem: str


def build_contexts(
    bundle_pem: str, cas_trust_pem: str, chain_pem: bytes | None, key_pem: bytes | None
) -> TlsContexts:
    """Fresh contexts trusting only `bundle_pem` (mesh) and `cas_trust_pem` (the CAS)."""
    server, client = mesh_server_context(), mesh_client_context()
    cas, anonymous = cas_client_context(), cas_client_context()
    for ctx in (server, client):
        if bundle_pem:
            ctx.load_verify_locations(cadata=bundle_pem)
    for ctx in (cas, anonymous):
        if cas_trust_pem:  # empty with --cas-expect alone, until the CAS is verified
            ctx.load_verify_locations(cadata=cas_trust_pem)
    if chain_pem is not None and key_pem is not None:
        for ctx in (server, client, cas):
            load_chain_from_memory(ctx, chain_pem, key_pem)
    return TlsContexts(server, client, cas, anonymous, bundle_pem, cas_trust_pem)


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


@dataclass(frozen=True)
class Answer:
    """A CAS attest answer that passed validation, ready to apply."""

    chain_pem: bytes
    leaf: x509.Certificate
    bundle_pem: str
    view: TrustView
    claims: dict[str, Any]
    spiffe_id: str
    serial: str


def _bad_answer(what: str) -> MeshError:
    return MeshError(Reason.BAD_REQUEST, f"CAS attest answer rejected: {what}")


def validate_answer(key: ec.EllipticCurvePrivateKey, resp: object) -> Answer:
    """Check the whole attest answer before any of it is applied; MeshError if unusable.

    The chain must parse and its leaf must carry our public key, be valid now and be
    issued by a CA of the answer's bundle; the bundle and the trust snapshot must parse.
    """
    if not isinstance(resp, dict):
        raise _bad_answer(f"expected a JSON object, found {type(resp).__name__}")
    missing = [k for k in ("certificate", "bundle", "trust", "claims", "spiffe_id")
               if k not in resp]
    if missing:
        raise _bad_answer(f"missing {', '.join(missing)}")
    if not isinstance(resp["certificate"], str) or not isinstance(resp["bundle"], str):
        raise _bad_answer("certificate and bundle must be PEM strings")
    try:
        chain = load_pem_chain(resp["certificate"])
        load_pem_chain(resp["bundle"])
    except ValueError as e:
        raise _bad_answer(str(e)) from None
    leaf = chain[0]
    if spki_der(leaf.public_key()) != spki_der(key.public_key()):
        raise _bad_answer("the certificate's public key is not the key this sidecar made")
    now = datetime.now(UTC)
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise _bad_answer(f"the certificate is not valid now (valid "
                          f"{leaf.not_valid_before_utc} to {leaf.not_valid_after_utc})")
    if not issued_by_bundle(leaf, resp["bundle"]):
        raise _bad_answer("the certificate is not issued by a CA of the answer's bundle")
    if not isinstance(resp["claims"], dict) or not isinstance(resp["spiffe_id"], str):
        raise _bad_answer("claims must be an object and spiffe_id a string")
    if not isinstance(resp["trust"], dict):
        raise _bad_answer("trust snapshot must be an object")
    try:
        view = TrustView.from_snapshot(resp["trust"])
    except ValueError as e:
        raise _bad_answer(str(e)) from None
    return Answer(
        chain_pem=resp["certificate"].encode(), leaf=leaf, bundle_pem=resp["bundle"],
        view=view, claims=dict(resp["claims"]), spiffe_id=resp["spiffe_id"],
        serial=str(resp.get("serial") or serial_hex(leaf)),
    )


class Identity:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        # Until the CAS hands out the mesh bundle, the configured one is all we trust.
        self.cas_bundle = config.cas_bundle.read_text() if config.cas_bundle else ""
        self.tls = build_contexts("", self.cas_bundle, None, None)
        # --cas-expect: the CAS is verified before every attestation (castrust.py).
        self.cas_trust: CasTrust | None = CasTrust(config) if config.cas_expect else None
        self._chain_pem: bytes | None = None
        self._key_pem: bytes | None = None
        self.held: Held | None = None
        self.view: TrustView | None = None
        self.renew_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.renewals = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.listeners: list[Callable[[TrustView], None]] = []
        self.renew_now = asyncio.Event()
        self.tls_changed = asyncio.Event()
        # Called after every new certificate or bundle (views for other software: the
        # Workload API pushes each one to its clients).
        self.tls_listeners: list[Callable[[], None]] = []
        # File secrets of each attest answer (--secrets-dir); None: none are written.
        self.secret_files: SecretFiles | None = None

    # The contexts of the current generation; read at every new handshake or request.
    @property
    def server_ctx(self) -> ssl.SSLContext:
        return self.tls.server

    @property
    def client_ctx(self) -> ssl.SSLContext:
        return self.tls.client

    @property
    def cas_ctx(self) -> ssl.SSLContext:
        return self.tls.cas

    @property
    def cas_anonymous_ctx(self) -> ssl.SSLContext:
        return self.tls.cas_anonymous

    @property
    def ready(self) -> bool:
        return self.held is not None and self.view is not None

    @property
    def certified(self) -> bool:
        """Holding a certificate that is unexpired and chains to the current bundle."""
        held = self.held
        return (held is not None and held.not_after > datetime.now(UTC)
                and issued_by_bundle(held.cert, self.tls.bundle_pem))

    def _swap(self, tls: TlsContexts) -> None:
        self.tls = tls
        self.tls_changed.set()
        for listener in list(self.tls_listeners):
            listener()

    def credentials(self) -> tuple[bytes, bytes] | None:
        """(PEM chain, leaf first; PEM PKCS#8 key) of the certificate held, if any."""
        if self._chain_pem is None or self._key_pem is None:
            return None
        return self._chain_pem, self._key_pem

    async def attest(self, session: aiohttp.ClientSession) -> Held:
        if self.cas_trust is not None:
            att = await self.cas_trust.verify()
            if self.held is None and self.tls.cas_trust_pem != self.cas_bundle + att.bundle_pem:
                # No mesh bundle yet: the CAS's certificate chains to the attested one.
                self.tls = build_contexts("", self.cas_bundle + att.bundle_pem, None, None)
        key = generate_p256()
        req = AttestRequest(
            session=self.config.session,
            service=self.config.service,
            platform=self.config.platform,
            workload=self.config.workload,
            sim_key=self.config.sim_key,
        )
        nonce = await self._post(session, "/v1/attest/nonce", {})
        if not isinstance(nonce, dict) or not isinstance(nonce.get("nonce"), str):
            raise _bad_answer("nonce answer has no \"nonce\" string")
        body = await asyncio.to_thread(build_attest_body, req, key, nonce["nonce"])
        resp = await self._post(session, "/v1/attest", body)
        self._install(key, resp)
        assert self.held is not None
        return self.held

    async def _post(self, session: aiohttp.ClientSession, path: str, obj: Any) -> Any:
        # Nonce and attest are anonymous: no client certificate, so an expired one can
        # never lock the sidecar out of renewing it.
        async with session.post(self.config.cas + path, json=obj,
                                ssl=self.cas_anonymous_ctx) as r:
            data = await r.content.read(4 * 1024 * 1024 + 1)
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError):
                raise MeshError(
                    Reason.BAD_REQUEST, f"CAS answered {r.status} without JSON"
                ) from None
            if r.status != 200:
                err = doc.get("error", {}) if isinstance(doc, dict) else {}
                err = err if isinstance(err, dict) else {}
                try:
                    reason = Reason(str(err.get("code")))
                except ValueError:
                    reason = Reason.BAD_REQUEST
                raise MeshError(reason, str(err.get("message", f"HTTP {r.status}"))[:500])
            return doc

    def _install(self, key: ec.EllipticCurvePrivateKey, resp: object) -> None:
        """Validate the whole answer, build the new contexts, then apply all at once."""
        answer = validate_answer(key, resp)
        field = resp.get("secrets") if isinstance(resp, dict) else None
        released = () if field is None else open_released(
            key, field, answer.spiffe_id, answer.serial,
            issuer_key(answer.leaf, answer.bundle_pem))
        if self.secret_files is not None:
            # Before the certificate is applied: an answer whose secrets cannot be
            # written is retried like any other failed renewal.
            self.secret_files.update(released)
        elif any(s.file for s in released):
            log.warning("%s/%s: the CAS released file secrets but this sidecar has no "
                        "--secrets-dir; they are not written", self.config.session,
                        self.config.service)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # The newest view decides, and its bundle with it; a late answer's older
        # snapshot does not roll trust back.
        view = answer.view
        if self.view is not None and view.epoch < self.view.epoch:
            view = self.view
        bundle = view.bundle_pem or answer.bundle_pem
        if not issued_by_bundle(answer.leaf, bundle):
            raise _bad_answer("the certificate is not issued by a CA of the current bundle")
        tls = build_contexts(bundle, bundle, answer.chain_pem, key_pem)
        now = time.time()
        leaf = answer.leaf
        lifetime = max(1.0, leaf.not_valid_after_utc.timestamp() - now)
        held = Held(
            cert=leaf, serial=answer.serial, not_after=leaf.not_valid_after_utc,
            issued_at=now, lifetime=lifetime, claims=answer.claims,
            spiffe_id=answer.spiffe_id,
        )
        # -- apply: nothing below can fail half-way --
        self._chain_pem, self._key_pem = answer.chain_pem, key_pem
        self.held = held
        self.renew_at = now + lifetime * RENEW_AT * (1 - random.uniform(0, JITTER))  # noqa: S311
        self._swap(tls)
        if view is not self.view:
            self._set_view(view)
        log.info(
            "%s/%s: holding certificate %s until %s%s; renewal in %.1f s",
            self.config.session, self.config.service, held.serial,
            held.not_after.isoformat(),
            " (SIMULATED attestation)" if held.claims.get("simulated") else "",
            self.renew_at - now,
        )

    def update_view(self, view: TrustView) -> bool:
        """Make `view` current unless it is older than the current one; True if applied.

        A changed bundle replaces every context (a removed CA stops being trusted at
        once); if our own certificate no longer chains to it, renew now."""
        if self.view is not None and view.epoch < self.view.epoch:
            return False  # an older snapshot arriving late
        if view.bundle_pem and view.bundle_pem != self.tls.bundle_pem:
            self._swap(build_contexts(view.bundle_pem, view.bundle_pem,
                                      self._chain_pem, self._key_pem))
            if self.held is not None and not issued_by_bundle(self.held.cert, view.bundle_pem):
                log.warning("%s/%s: the trust bundle no longer holds the CA of our "
                            "certificate %s; attesting again now", self.config.session,
                            self.config.service, self.held.serial)
                self.renew_now.set()
        self._set_view(view)
        return True

    def _set_view(self, view: TrustView) -> None:
        self.view = view
        for listener in list(self.listeners):
            listener(view)

    async def run_renewals(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Keep a certificate: attest until one is held, then renew on schedule.

        Never ends before `stop`: any failure (the CAS unreachable, an answer that does
        not validate, a bug) is logged, counted and retried with backoff."""
        backoff = BACKOFF_MIN
        cfg = self.config
        while not stop.is_set():
            if self.held is not None and not self.renew_now.is_set():
                await wait_any([stop, self.renew_now],
                               max(0.0, (self.renew_at or 0) - time.time()))
                if stop.is_set():
                    return
            self.renew_now.clear()
            try:
                await self.attest(session)
                self.renewals += 1
                self.last_error = None
                self.consecutive_failures = 0
                backoff = BACKOFF_MIN
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - this loop must never end
                self.failures += 1
                self.consecutive_failures += 1
                self.last_error = describe_error(e)
                self.last_error_at = time.time()
                if not self.certified:
                    backoff = min(backoff, BACKOFF_MAX_UNCERTIFIED)
                delay = backoff * (1 - random.uniform(0, JITTER))  # noqa: S311
                what = ("no certificate yet: attestation" if self.held is None
                        else "renewal of certificate " + self.held.serial)
                log.warning("%s/%s: %s failed (attempt %d): %s; retrying in %.1f s",
                            cfg.session, cfg.service, what, self.consecutive_failures,
                            self.last_error, delay)
                if not isinstance(e, MeshError | aiohttp.ClientError | OSError):
                    log.debug("attestation failure details", exc_info=e)
                if await stopped_within(stop, delay):
                    return
                backoff = min(BACKOFF_MAX, backoff * 2)
