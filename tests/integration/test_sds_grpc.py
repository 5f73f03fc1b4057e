"""The SDS server over a real unix socket, driven by a gRPC client: ACK, NACK, push,
FetchSecrets, DeltaSecrets, and requests that do not parse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import status_pb2

from meshshield._proto.envoy.config.core.v3 import base_pb2
from meshshield._proto.envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from meshshield._proto.envoy.service.discovery.v3 import discovery_pb2
from meshshield.sidecar.sds import SdsMaterial, SdsServer
from meshshield.sidecar.sdsprotocol import SECRET_TYPE_URL, SERVICE

ID = "spiffe://meshshield.local/shop/frontend"
TD = "spiffe://meshshield.local"
Req = discovery_pb2.DiscoveryRequest
Resp = discovery_pb2.DiscoveryResponse


def run(tmp_path: Path, body: Callable[[SdsServer, grpc.aio.Channel, list[SdsMaterial]],
                                       Awaitable[None]]) -> None:
    async def main() -> None:
        current = [SdsMaterial(ID, "meshshield.local", b"CHAIN-1", b"KEY-1", "BUNDLE-1")]
        server = SdsServer(tmp_path / "run" / "sds.sock", lambda: current[0], "shop/frontend")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{server.path}") as ch:
                await asyncio.wait_for(body(server, ch, current), 30)
        finally:
            await server.stop()
        assert not server.path.exists()

    asyncio.run(main())


def stream_call(ch: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    return ch.stream_stream(f"/{SERVICE}/StreamSecrets", request_serializer=Req.SerializeToString,
                            response_deserializer=Resp.FromString)


def names(resp: Resp) -> set[str]:
    return {secret_pb2.Secret.FromString(a.value).name for a in resp.resources}


async def until(pred: Callable[[], bool]) -> None:
    while not pred():
        await asyncio.sleep(0.01)


def test_ack_nack_and_pushes_on_one_stream(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshshield.sidecar")

    async def body(server: SdsServer, ch: grpc.aio.Channel, current: list[SdsMaterial]) -> None:
        call = stream_call(ch)()
        node = base_pb2.Node(id="envoy-7", cluster="shop")
        await call.write(Req(node=node, resource_names=[ID, TD], type_url=SECRET_TYPE_URL))
        first = await call.read()
        assert names(first) == {ID, TD} and first.version_info.startswith("1-")
        await call.write(Req(resource_names=[ID, TD], type_url=SECRET_TYPE_URL,
                             response_nonce=first.nonce, version_info=first.version_info))
        # (A change pushed before the ACK is read would make that ACK stale, rightly.)
        await until(lambda: any(st.acked_version == first.version_info
                                for st, _wake in server.streams.values()))
        # A renewal is pushed.
        current[0] = SdsMaterial(ID, "meshshield.local", b"CHAIN-2", b"KEY-2", "BUNDLE-1")
        server.refresh()
        second = await call.read()
        assert second.version_info.startswith("2-") and second.nonce != first.nonce
        # Envoy rejects it: logged with its detail, counted, the stream goes on.
        await call.write(Req(resource_names=[ID, TD], type_url=SECRET_TYPE_URL,
                             response_nonce=second.nonce, version_info=first.version_info,
                             error_detail=status_pb2.Status(code=3, message="bad key")))
        await until(lambda: server.nacks == 1)
        assert server.last_nack is not None and server.last_nack["error_detail"] == "bad key"
        assert server.last_nack["node"] == "envoy-7"
        # A bundle change is still pushed on the same stream.
        current[0] = SdsMaterial(ID, "meshshield.local", b"CHAIN-2", b"KEY-2", "BUNDLE-2")
        server.refresh()
        third = await call.read()
        assert third.version_info.startswith("3-")
        st = server.status()
        assert st["listening"] and st["nacks"] == 1 and len(st["streams"]) == 1
        assert st["streams"][0]["node"] == "envoy-7"
        assert st["streams"][0]["acked_version"] == first.version_info
        await call.done_writing()
        await until(lambda: not server.streams)

    run(tmp_path, body)
    assert "rejected secrets version 2-" in caplog.text and "bad key" in caplog.text


def test_fetch_delta_and_requests_that_do_not_parse(tmp_path: Path) -> None:
    async def body(server: SdsServer, ch: grpc.aio.Channel, _c: list[SdsMaterial]) -> None:
        fetch = ch.unary_unary(f"/{SERVICE}/FetchSecrets",
                               request_serializer=Req.SerializeToString,
                               response_deserializer=Resp.FromString)
        resp = await fetch(Req(resource_names=["default", "ROOTCA"]))
        assert names(resp) == {"default", "ROOTCA"} and resp.type_url == SECRET_TYPE_URL
        raw = ch.stream_stream(f"/{SERVICE}/DeltaSecrets")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in raw(iter([b""])):
                pass
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        garbage = ch.stream_stream(f"/{SERVICE}/StreamSecrets")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in garbage(iter([b"\xff\xff\xff"])):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        wrong = stream_call(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in wrong(iter([Req(type_url="type.googleapis.com/x.Cluster")])):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The server is still there.
        resp = await fetch(Req(resource_names=[ID]))
        assert names(resp) == {ID}
        assert server.last_error is not None

    run(tmp_path, body)
