"""The SPIFFE Workload API on a unix socket (`--workload-api unix:///PATH`).

Software written against go-spiffe, py-spiffe or java-spiffe gets the sidecar's
attested identity from here: `FetchX509SVID` streams the X.509-SVID (the certificate
chain and key the sidecar holds, and the trust bundle), and sends it again after every
renewal or bundle change; `FetchX509Bundles` streams the bundle alone. The JWT-SVID
profile (`FetchJWTSVID`, `FetchJWTBundles`, `ValidateJWTSVID`) is in `jwtsvid.py`.

Every call must carry the metadata `workload.spiffe.io: true` (SPIFFE Workload
Endpoint §4: a browser or an SSRF-able client cannot add it), else InvalidArgument.
The socket's rights decide who is a workload of this identity: 0600 for the sidecar's
user, or 0660 for `--workload-api-group`, in a directory only the sidecar may change
(unixsocket.py). The server holds at most MAX_CLIENTS calls at once and reads no
request larger than 64 KiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from meshshield.errors import MeshError
from meshshield.pki.ca import load_pem_chain
from meshshield.pki.spiffe import parse_spiffe_id
from meshshield.sidecar.config import SidecarConfig
from meshshield.sidecar.identity import Identity, describe_error
from meshshield.sidecar.jwtsvid import JwtSvids
from meshshield.sidecar.spiffe_workload import workload_pb2 as pb
from meshshield.sidecar.spiffe_workload import workload_pb2_grpc as pb_grpc
from meshshield.sidecar.unixsocket import (
    prepare_socket_path,
    private_umask,
    remove_socket,
    secure_socket,
)

log = logging.getLogger("meshshield.sidecar")

SECURITY_HEADER = "workload.spiffe.io"
MAX_CLIENTS = 128
MAX_REQUEST_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


def _der_certificates(pem: str | bytes) -> bytes:
    """PEM certificates as the concatenated DER the Workload API carries."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in load_pem_chain(pem))


@dataclass(frozen=True)
class X509Snapshot:
    """What FetchX509SVID sends, built once per certificate and bundle."""

    serial: str
    bundle_pem: str
    spiffe_id: str
    trust_domain_id: str
    chain_der: bytes
    key_der: bytes
    bundle_der: bytes


def build_snapshot(identity: Identity) -> X509Snapshot | None:
    held, creds = identity.held, identity.credentials()
    bundle_pem = identity.tls.bundle_pem
    if held is None or creds is None or not bundle_pem:
        return None
    chain_pem, key_pem = creds
    key = serialization.load_pem_private_key(key_pem, password=None)
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    td = parse_spiffe_id(held.spiffe_id).trust_domain
    return X509Snapshot(
        serial=held.serial, bundle_pem=bundle_pem, spiffe_id=held.spiffe_id,
        trust_domain_id=f"spiffe://{td}", chain_der=_der_certificates(chain_pem),
        key_der=key_der, bundle_der=_der_certificates(bundle_pem),
    )


class Changes:
    """A generation counter that streams wait on: each change wakes every waiter."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def waiter(self) -> asyncio.Event:
        return self._event


class WorkloadApiState:
    """Counters and the last error, for /status."""

    def __init__(self) -> None:
        self.listening: str | None = None
        self.clients = 0
        self.calls = 0
        self.refused = 0
        self.x509_pushes = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def error(self, text: str) -> None:
        self.last_error = text[:500]
        self.last_error_at = time.time()


class WorkloadApiServicer(pb_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, identity: Identity, jwt: JwtSvids, changes: Changes,
                 state: WorkloadApiState) -> None:
        self.identity = identity
        self.jwt = jwt
        self.changes = changes
        self.state = state
        self._snapshot: X509Snapshot | None = None

    # -- common -----------------------------------------------------------------
    async def _admit(self, context: Any) -> None:
        """The security header, then the client budget; aborts the call otherwise."""
        self.state.calls += 1
        metadata = context.invocation_metadata() or ()
        if not any(k == SECURITY_HEADER and v == "true" for k, v in metadata):
            self.state.refused += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "security header missing from request: send the metadata "
                                f"{SECURITY_HEADER}: true (SPIFFE Workload Endpoint)")
        if self.state.clients >= MAX_CLIENTS:
            self.state.refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the Workload API serves at most {MAX_CLIENTS} calls at once")

    @contextlib.contextmanager
    def _client(self) -> Iterator[None]:
        self.state.clients += 1
        try:
            yield
        finally:
            self.state.clients -= 1

    def current(self) -> X509Snapshot | None:
        """The snapshot of the certificate and bundle held now (rebuilt on change)."""
        held = self.identity.held
        snap = self._snapshot
        if (held is not None and snap is not None and snap.serial == held.serial
                and snap.bundle_pem == self.identity.tls.bundle_pem):
            return snap
        try:
            self._snapshot = build_snapshot(self.identity)
        except (ValueError, TypeError, MeshError) as e:
            self.state.error(f"cannot build the X.509-SVID: {describe_error(e)}")
            return None
        return self._snapshot

    async def _changes(self, context: Any) -> AsyncIterator[X509Snapshot]:
        """Each distinct snapshot, the first as soon as a certificate is held."""
        sent: tuple[str, str] | None = None
        while not context.done():
            waiter = self.changes.waiter()
            snap = self.current()
            if snap is not None and (snap.serial, snap.bundle_pem) != sent:
                sent = (snap.serial, snap.bundle_pem)
                yield snap
                continue
            await waiter.wait()

    # -- X.509-SVID profile ---------------------------------------------------------
    async def FetchX509SVID(  # noqa: N802 - the protocol's method name
        self, request: pb.X509SVIDRequest, context: Any
    ) -> AsyncIterator[pb.X509SVIDResponse]:
        await self._admit(context)
        with self._client():
            async for snap in self._changes(context):
                self.state.x509_pushes += 1
                yield pb.X509SVIDResponse(svids=[pb.X509SVID(
                    spiffe_id=snap.spiffe_id, x509_svid=snap.chain_der,
                    x509_svid_key=snap.key_der, bundle=snap.bundle_der,
                )])

    async def FetchX509Bundles(  # noqa: N802
        self, request: pb.X509BundlesRequest, context: Any
    ) -> AsyncIterator[pb.X509BundlesResponse]:
        await self._admit(context)
        with self._client():
            last: bytes | None = None
            async for snap in self._changes(context):
                if snap.bundle_der != last:
                    last = snap.bundle_der
                    yield pb.X509BundlesResponse(bundles={snap.trust_domain_id: snap.bundle_der})

    # -- JWT-SVID profile -----------------------------------------------------------
    async def FetchJWTSVID(  # noqa: N802
        self, request: pb.JWTSVIDRequest, context: Any
    ) -> pb.JWTSVIDResponse:
        await self._admit(context)
        with self._client():
            return await self.jwt.fetch_svid(request, context)

    async def FetchJWTBundles(  # noqa: N802
        self, request: pb.JWTBundlesRequest, context: Any
    ) -> AsyncIterator[pb.JWTBundlesResponse]:
        await self._admit(context)
        with self._client():
            async for resp in self.jwt.bundles(context):
                yield resp

    async def ValidateJWTSVID(  # noqa: N802
        self, request: pb.ValidateJWTSVIDRequest, context: Any
    ) -> pb.ValidateJWTSVIDResponse:
        await self._admit(context)
        with self._client():
            return await self.jwt.validate(request, context)


class WorkloadApi:
    """The server: its socket, its servicer, and what /status shows of it."""

    def __init__(self, config: SidecarConfig, identity: Identity) -> None:
        if config.workload_api is None:
            raise ValueError("no --workload-api socket configured")
        self.path = config.workload_api
        self.group = config.workload_api_group
        self.identity = identity
        self.state = WorkloadApiState()
        self.changes = Changes()
        self.jwt = JwtSvids(config, identity, self.changes, self.state)
        self.servicer = WorkloadApiServicer(identity, self.jwt, self.changes, self.state)
        self._server: Any = None
        identity.tls_listeners.append(self.changes.notify)
        identity.listeners.append(lambda _view: self.jwt.view_changed())

    async def start(self) -> str:
        """Bind the socket (MeshError if its directory is not safe) and serve."""
        prepare_socket_path(self.path, self.group)
        server = grpc.aio.server(
            maximum_concurrent_rpcs=MAX_CLIENTS + 8,
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_SpiffeWorkloadAPIServicer_to_server(self.servicer, server)  # type: ignore[no-untyped-call]
        with private_umask():
            server.add_insecure_port(f"unix:{self.path}")
            await server.start()
        secure_socket(self.path, self.group)
        self._server = server
        self.state.listening = f"unix://{self.path}"
        self.jwt.start()
        return self.state.listening

    async def stop(self) -> None:
        await self.jwt.stop()
        if self._server is not None:
            # Open streams end now: a client reconnects to the next sidecar.
            await self._server.stop(grace=0.5)
            self._server = None
        self.state.listening = None
        remove_socket(self.path)

    def status(self) -> dict[str, Any]:
        st = self.state
        return {
            "listening": st.listening,
            "clients": st.clients,
            "calls": st.calls,
            "refused": st.refused,
            "x509_pushes": st.x509_pushes,
            **self.jwt.status(),
            "last_error": st.last_error,
            "last_error_at": None if st.last_error_at is None
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.last_error_at)),
        }
