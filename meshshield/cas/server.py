"""Running the CAS: open the store, unseal the CA, serve HTTPS, keep house."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import ssl
import sys
import weakref
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from meshshield.cas.authority import Authority, CasConfig
from meshshield.cas.http import METRICS, READY_DETAILS, create_app, off_loop
from meshshield.cas.kekstore import KekOutcome, KekRelease
from meshshield.cas.kekstore import add_routes as add_kek_routes
from meshshield.cas.selfattest import SelfAttestation, SelfAttestConfig, add_routes
from meshshield.cas.store import StoreUnavailable
from meshshield.cas.stores import is_postgres, open_store, where
from meshshield.httpserver import BudgetCollector, ConnectionLimits, bound_port, start_site
from meshshield.httpserver import runner as json_error_runner
from meshshield.pki.ca import cert_pem, issue_server_cert, load_pem_chain
from meshshield.pki.keys import generate_p256, spki_der
from meshshield.pki.spiffe import cas_spiffe_id
from meshshield.policy.expect import CasExpectation
from meshshield.tlsutil import load_chain_from_memory

if TYPE_CHECKING:
    from meshshield.cas.pg_listen import ChangeFeed

log = logging.getLogger("meshshield.cas")

SERVER_CERT_LIFETIME = timedelta(days=7)
TICK_SECONDS = 1.0


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client certificates are optional at the TLS layer: admins sign requests and
    # anyone may fetch a nonce, but /v1/events and /v1/reports demand a mesh one.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class CasServer:
    """One CAS process: the authority, its HTTPS identity and the HTTP app."""

    def __init__(self, config: CasConfig,
                 self_attest: SelfAttestConfig | SelfAttestation | None = None,
                 kek_release: CasExpectation | None = None,
                 kek_outcome: KekOutcome | None = None) -> None:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config = config
        self.store = open_store(config.database, config.data_dir)
        try:
            self.authority = Authority(config, self.store)
            found = ["bundle.pem"] if (config.data_dir / "bundle.pem").exists() else []
            self.authority.start(
                found, str(config.data_dir) if config.database is None
                else f"{config.data_dir} and {where(config.database, config.data_dir)}")
        except BaseException:
            self.store.close()
            raise
        # aiohttp's server holds one SSLContext for good, and a context can only ever
        # add CAs. So the listener's context trusts nothing itself; at every ClientHello
        # its SNI callback (OpenSSL calls it with or without a server name) hands the
        # connection to `self._current`, a context rebuilt whenever the bundle or the
        # CAS's own certificate changes: a CA removed from the bundle is untrusted for
        # every new handshake at once, open connections carry on.
        self.ssl = _server_context()
        self.ssl.sni_callback = self._select_context
        self._current = self.ssl
        self._bundle = ""
        self._chain_pem = b""
        self._key_pem = b""
        self._cert_not_after = self.authority.clock.now()
        self._served_by = ""
        # Each context's (SPKI DER of its key, bundle): the CAS's own evidence binds the
        # key of the connection it answers on (selfattest.py).
        self._tls_of: weakref.WeakKeyDictionary[ssl.SSLContext, tuple[bytes, str]] = (
            weakref.WeakKeyDictionary())
        self.self_attestation: SelfAttestation | None = None
        if isinstance(self_attest, SelfAttestation):
            self.self_attestation = self_attest
        elif self_attest is not None:
            try:
                self.self_attestation = SelfAttestation(self_attest, self.authority.verifier)
            except BaseException:
                self.store.close()
                raise
        # Peer recovery: this replica hands its KEK to attested replicas (cas/kekstore.py).
        self.kek_release = KekRelease(self.authority, kek_release)
        self.kek_outcome = kek_outcome
        if kek_outcome is not None:
            kek_outcome.audit_first_start(self.store, self.authority.clock.now())
        if self.self_attestation is not None and kek_outcome is not None:
            self.self_attestation.kek = kek_outcome.to_json()
        self.refresh_tls()
        self.write_bundle()
        self.authority.listeners.append(lambda _e: self.on_change())

    @property
    def ca_fingerprint(self) -> str:
        return self.authority.ca.fingerprint()

    def write_bundle(self) -> None:
        path = self.config.data_dir / "bundle.pem"
        tmp = path.with_suffix(".pem.tmp")
        tmp.write_text(self.authority.ca.bundle_pem(self.authority.clock.now()))
        tmp.replace(path)

    def refresh_tls(self) -> None:
        """Trust every CA in the bundle; (re)issue the CAS's own certificate if due."""
        now = self.authority.clock.now()
        bundle = self.authority.ca.bundle_pem(now)
        signer = self.authority.ca.signing(now)
        due = now + SERVER_CERT_LIFETIME / 2 >= self._cert_not_after
        if not due and signer.fingerprint == self._served_by:
            if bundle != self._bundle:
                self._install(bundle, self._chain_pem, self._key_pem)
            return
        key = generate_p256()
        dns: list[str] = []
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
            ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ]
        for name in self.config.dns:
            try:
                ip = ipaddress.ip_address(name)
            except ValueError:
                dns.append(name)
            else:
                if ip not in ips:
                    ips.append(ip)
        cert = issue_server_cert(
            signer,
            key.public_key(),
            spiffe_id=cas_spiffe_id(self.config.trust_domain),
            dns=dns,
            ips=ips,
            not_before=now - timedelta(minutes=5),
            not_after=now + SERVER_CERT_LIFETIME,
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain = (cert_pem(cert) + cert_pem(signer.cert)).encode()
        self._install(bundle, chain, key_pem)
        self._cert_not_after = cert.not_valid_after_utc
        self._served_by = signer.fingerprint

    def _install(self, bundle: str, chain_pem: bytes, key_pem: bytes) -> None:
        """Build a fresh context trusting exactly `bundle`, then swap it in."""
        ctx = _server_context()
        ctx.load_verify_locations(cadata=bundle)
        load_chain_from_memory(ctx, chain_pem, key_pem)
        if self._current is self.ssl:
            # The listener needs a certificate of its own to be a valid server context;
            # it never verifies a client (it trusts no CA), the callback swaps first.
            load_chain_from_memory(self.ssl, chain_pem, key_pem)
        self._tls_of[ctx] = (spki_der(load_pem_chain(chain_pem.decode())[0].public_key()),
                             bundle)
        self._current = ctx
        self._bundle, self._chain_pem, self._key_pem = bundle, chain_pem, key_pem

    def _select_context(self, ssl_obj: ssl.SSLObject, _server_name: str | None,
                        _ctx: ssl.SSLContext) -> None:
        ssl_obj.context = self._current

    def on_change(self) -> None:
        self.refresh_tls()
        self.write_bundle()

    async def housekeeping(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                # Store calls and a due CA promotion run off the event loop.
                await asyncio.to_thread(self.authority.tick)
                self.refresh_tls()
            except StoreUnavailable:
                pass  # the store logged it once; requests answer 503 until it is back
            except Exception:  # noqa: BLE001 - keep serving; the next tick retries
                log.exception("housekeeping failed")

    def app(self) -> web.Application:
        app = create_app(self.authority)
        add_routes(app, self.self_attestation, self._tls_of.get, off_loop)
        add_kek_routes(app, self.kek_release, off_loop)
        return app

    def change_feed(self, app: web.Application) -> ChangeFeed | None:
        """On PostgreSQL, what follows the other replicas' changes (cas/pg_listen.py),
        reported in the app's /v1/ready and /metrics; None on SQLite (one process)."""
        if not is_postgres(self.config.database):
            return None
        from meshshield.cas.pg_listen import ChangeFeed, ChangeFeedCollector

        async def caught_up(epoch: int | None) -> None:
            await asyncio.to_thread(self.authority.follow, epoch)

        feed = ChangeFeed(str(self.config.database), caught_up)
        app[METRICS].registry.register(ChangeFeedCollector(feed))
        app[READY_DETAILS]["changes"] = feed.status
        return feed

    def close(self) -> None:
        self.store.close()


async def serve(
    config: CasConfig, host: str, port: int, limits: ConnectionLimits | None = None,
    self_attest: SelfAttestConfig | SelfAttestation | None = None,
    kek_release: CasExpectation | None = None, kek_outcome: KekOutcome | None = None,
) -> None:
    server = CasServer(config, self_attest, kek_release, kek_outcome)
    print(f"ca-fingerprint sha256:{server.ca_fingerprint}", flush=True)
    if server.self_attestation is not None:
        print(server.self_attestation.describe(), flush=True)
    app = server.app()
    feed = server.change_feed(app)
    runner = json_error_runner(app, limits)
    await runner.setup()
    site = await start_site(runner, host, port, ssl_context=server.ssl, limits=limits,
                            name="cas")
    app[METRICS].registry.register(BudgetCollector(site.budget, "meshshield_cas"))
    app[METRICS].registry.register(server.kek_release)
    bound = bound_port(site, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"listening https://{shown}:{bound}", flush=True)
    print(f"bundle {config.data_dir / 'bundle.pem'}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    keeper = asyncio.create_task(server.housekeeping())
    follower = None if feed is None else asyncio.create_task(feed.run())
    try:
        await stop.wait()
    finally:
        keeper.cancel()
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower  # its connection closed before the pool's
        await runner.cleanup()
        server.close()
        print("cas stopped", file=sys.stderr, flush=True)


def state_files(data_dir: Path) -> list[str]:
    """The CAS state files present in a data folder (empty for a first start)."""
    found = []
    for name in ("cas.db", "cas.db-wal", "bundle.pem"):
        p = data_dir / name
        if p.is_file() and p.stat().st_size > 0:
            found.append(name)
    return found


def default_kek_path(data_dir: Path) -> Path:
    """Where the key-encryption secret lives when none is given: beside, never inside."""
    d = data_dir.resolve()
    return d.parent / f".{d.name}.kek"
