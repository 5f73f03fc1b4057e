"""Envoy's Secret Discovery Service (SDS) on a unix socket: the sidecar's identity for Envoy.

`--sds unix:///PATH` serves `envoy.service.secret.v3.SecretDiscoveryService` over gRPC
(`StreamSecrets`, `FetchSecrets`; `DeltaSecrets` answers UNIMPLEMENTED) with two
secrets, each under either of two names:

- the workload's certificate (`tls_certificate`: chain and private key, inline), named
  by the sidecar's SPIFFE ID (`spiffe://<trust-domain>/<session>/<service>`) or `default`;
- the mesh trust (`validation_context`): Envoy's SPIFFE certificate validator
  (`envoy.tls.cert_validator.spiffe`) with the trust domain and its CA bundle, named
  `spiffe://<trust-domain>` or `ROOTCA`.

Every renewal and every bundle change is pushed on each open stream as a new version.
The secrets and the xDS rules of a stream are pure (`sdsprotocol`); this module is the
gRPC shell around them: the socket, one `SdsStream` per call, pushes, /status, metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshshield._proto.envoy.service.discovery.v3 import discovery_pb2
from meshshield.errors import MeshError
from meshshield.pki.spiffe import parse_spiffe_id
from meshshield.sidecar import unixsocket
from meshshield.sidecar.identity import Identity
from meshshield.sidecar.sdsprotocol import (
    BUNDLE_ALIAS,
    CERT_ALIAS,
    MAX_MESSAGE,
    MAX_STREAMS,
    SECRET_TYPE_URL,
    SERVICE,
    Outcome,
    ProtocolError,
    SdsMaterial,
    SdsSnapshot,
    SdsStream,
    build_response,
    clean,
    make_snapshot,
)

__all__ = ["SERVICE", "SdsCollector", "SdsMaterial", "SdsServer", "identity_material",
           "prepare_socket_path"]

log = logging.getLogger("meshshield.sidecar")


def identity_material(identity: Identity) -> SdsMaterial | None:
    """The sidecar's current certificate, key and bundle; None before it holds one."""
    held, creds = identity.held, identity.credentials()
    if held is None or creds is None:
        return None
    trust_domain = parse_spiffe_id(held.spiffe_id).trust_domain
    return SdsMaterial(held.spiffe_id, trust_domain, creds[0], creds[1],
                       identity.tls.bundle_pem)


def _parse_request(data: bytes) -> discovery_pb2.DiscoveryRequest | None:
    try:
        return discovery_pb2.DiscoveryRequest.FromString(data)
    except DecodeError:
        return None


def _socket_error(message: str) -> OSError:
    return OSError(errno.EPERM, message)


def prepare_socket_path(path: Path) -> None:
    """Make `path`'s directory safe to hold the socket (the sidecar's own, mode 0700,
    writable by no one else) and clear a stale socket of ours, by the same rules as the
    Workload API's socket (sidecar/unixsocket.py); OSError naming --sds if refused."""
    try:
        unixsocket.prepare_socket_path(path)
    except MeshError as e:
        raise _socket_error(f"--sds {path}: {e.message}") from None


MaterialSource = Callable[[], SdsMaterial | None]


class SdsServer:
    """The gRPC server: one `SdsStream` per open StreamSecrets call, pushed on change."""

    def __init__(self, path: Path, source: MaterialSource, who: str) -> None:
        self.path = path
        self.source = source
        self.who = who  # "session/service", for every log line
        self.snapshot: SdsSnapshot | None = None
        self.server: grpc.aio.Server | None = None
        self.listening = False
        self.streams: dict[int, tuple[SdsStream, asyncio.Event]] = {}
        self._ids = itertools.count(1)
        self.generation = 0
        self._digest: str | None = None
        self.pushes = 0
        self.fetches = 0
        self.nacks = 0
        self.refused = 0
        self.last_nack: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        prepare_socket_path(self.path)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_concurrent_streams", MAX_STREAMS),
        ])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "StreamSecrets": grpc.stream_stream_rpc_method_handler(
                self._stream_secrets, request_deserializer=_parse_request,
                response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString),
            "FetchSecrets": grpc.unary_unary_rpc_method_handler(
                self._fetch_secrets, request_deserializer=_parse_request,
                response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString),
            "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
                self._delta_secrets, request_deserializer=lambda b: b,
                response_serializer=lambda b: b),
        }),))
        # The socket is created by the bind below: no moment with a wider mode.
        try:
            with unixsocket.private_umask():
                server.add_insecure_port(f"unix:{self.path}")
        except RuntimeError as e:
            raise _socket_error(f"--sds {self.path}: cannot listen: {e}") from None
        unixsocket.secure_socket(self.path)
        await server.start()
        self.server = server
        self.listening = True
        self.refresh()
        log.info("%s: SDS listening on unix://%s", self.who, self.path)

    async def stop(self) -> None:
        self.listening = False
        if self.server is not None:
            await self.server.stop(grace=1.0)
            self.server = None
        unixsocket.remove_socket(self.path)

    def refresh(self) -> None:
        """Re-read the identity; if what is served changed, wake every stream to push it."""
        try:
            material = self.source()
        except Exception as e:  # noqa: BLE001 - a bad read must not stop the sidecar
            self._error(f"cannot build the secrets: {type(e).__name__}: {e}")
            return
        if material is None or material.digest() == self._digest:
            return
        self._digest = material.digest()
        self.generation += 1
        self.snapshot = make_snapshot(material, self.generation)
        for _stream, wake in self.streams.values():
            wake.set()

    def _error(self, message: str) -> None:
        self.last_error, self.last_error_at = message, time.time()
        log.warning("%s: SDS: %s", self.who, message)

    # -- RPCs -----------------------------------------------------------------------
    async def _stream_secrets(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest | None],
                              context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if len(self.streams) >= MAX_STREAMS:
            self.refused += 1
            self._error(f"refused a stream: {MAX_STREAMS} already open")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"at most {MAX_STREAMS} SDS streams")
        stream = SdsStream(next(self._ids))
        wake = asyncio.Event()
        self.streams[stream.id] = (stream, wake)
        pending: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue(4)
        ended = asyncio.Event()

        async def read() -> None:
            try:
                async for req in requests:
                    await pending.put(req)
                    wake.set()
            except Exception as e:  # noqa: BLE001 - a stream that breaks just ends
                log.debug("%s: SDS stream %d read ended: %s", self.who, stream.id, e)
            finally:
                ended.set()
                wake.set()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                await wake.wait()
                wake.clear()
                while not pending.empty():
                    req = pending.get_nowait()
                    if req is None:
                        self._error(f"stream {stream.id}: a request that does not parse")
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "DiscoveryRequest does not parse")
                    try:
                        outcome = stream.on_request(req, self.snapshot)
                    except ProtocolError as e:
                        self._error(f"stream {stream.id} (node {stream.node!r}): {e}")
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                    await self._apply(stream, outcome, context)
                await self._apply(stream, stream.on_change(self.snapshot), context)
                if ended.is_set() and pending.empty():
                    return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.streams.pop(stream.id, None)
            log.info("%s: SDS stream %d (node %r) closed", self.who, stream.id, stream.node)

    async def _apply(self, stream: SdsStream, outcome: Outcome,
                     context: grpc.aio.ServicerContext[Any, Any]) -> None:
        tag = f"SDS stream {stream.id} (node {stream.node!r})"
        if outcome.kind == "nack":
            self.nacks += 1
            self.last_nack = {"at": time.time(), "node": stream.node, "stream": stream.id,
                              "version": outcome.version, "error_detail": outcome.detail}
            log.warning("%s: %s rejected secrets version %s: %s", self.who, tag,
                        outcome.version, outcome.detail)
        elif outcome.kind == "stale":
            log.debug("%s: %s: a request with a stale nonce, ignored", self.who, tag)
        elif outcome.kind == "ack":
            log.debug("%s: %s acknowledged version %s", self.who, tag, outcome.version)
        if outcome.unknown:
            self._error(f"{tag} asked for secrets this sidecar does not serve: "
                        f"{[clean(n, 200) for n in outcome.unknown]}; it serves "
                        f"{list(self.snapshot.names()) if self.snapshot else []} "
                        f"(or {CERT_ALIAS!r}, {BUNDLE_ALIAS!r})")
        if outcome.response is not None:
            await context.write(outcome.response)
            self.pushes += 1
            log.info("%s: %s: sent secrets version %s (%s)", self.who, tag, outcome.version,
                     outcome.kind)

    async def _fetch_secrets(self, req: discovery_pb2.DiscoveryRequest | None,
                             context: grpc.aio.ServicerContext[Any, Any]
                             ) -> discovery_pb2.DiscoveryResponse:
        if req is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "DiscoveryRequest does not parse")
        assert req is not None
        if req.type_url and req.type_url != SECRET_TYPE_URL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"this server serves only {SECRET_TYPE_URL}")
        snap = self.snapshot
        if snap is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no certificate yet: the sidecar has not attested")
        assert snap is not None
        self.fetches += 1
        response, unknown = build_response(snap, tuple(req.resource_names), "")
        if unknown:
            self._error(f"FetchSecrets asked for secrets this sidecar does not serve: "
                        f"{[clean(n, 200) for n in unknown]}")
        return response

    async def _delta_secrets(self, _requests: AsyncIterator[bytes],
                             context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "DeltaSecrets is not served; use StreamSecrets (SotW)")

    # -- reporting ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        snap = self.snapshot
        return {
            "listening": self.listening,
            "path": str(self.path),
            "secrets": [] if snap is None else list(snap.names()),
            "version": None if snap is None else snap.version,
            "streams": [
                {"id": s.id, "node": s.node, "names": list(s.names or ()),
                 "sent_version": s.sent_version, "acked_version": s.acked_version,
                 "nacks": s.nacks}
                for s, _wake in self.streams.values()
            ],
            "pushes": self.pushes,
            "fetches": self.fetches,
            "nacks": self.nacks,
            "last_nack": self.last_nack,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


class SdsCollector(Collector):
    def __init__(self, server: SdsServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("meshshield_sidecar_sds_streams", "Open SDS streams",
                                value=len(self.server.streams))
        yield CounterMetricFamily("meshshield_sidecar_sds_pushes",
                                  "SDS responses sent on streams", value=self.server.pushes)
        yield CounterMetricFamily("meshshield_sidecar_sds_nacks",
                                  "SDS responses Envoy rejected (NACK)",
                                  value=self.server.nacks)
