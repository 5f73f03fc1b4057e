"""The JWT-SVID profile of the Workload API: fetch, bundles, validate.

A JWT-SVID is signed by the CAS, never by the sidecar: `FetchJWTSVID` asks the CAS
(`POST /v1/jwt`, authenticated by the sidecar's mesh certificate) and caches the token
per audience until half its life has passed. The trust domain's JWT authorities come
from the CAS's SPIFFE bundle (`GET /v1/bundle/spiffe`, its `jwt-svid` keys), fetched
at start, after every trust event, at the bundle's refresh hint, and again (at most
every few seconds) when a token names a key not yet known. `ValidateJWTSVID` checks a
token locally against them (pki/jwt.py): signature, expiry, audience, trust domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.errors import MeshError, Reason
from meshshield.pki.jwt import (
    JwtError,
    check_audience,
    jwt_authorities,
    parse_jwt,
    validate_jwt_svid,
)
from meshshield.pki.spiffe import parse_spiffe_id
from meshshield.sidecar.castrust import cas_connector
from meshshield.sidecar.config import SidecarConfig
from meshshield.sidecar.identity import Identity, describe_error, wait_any
from meshshield.sidecar.spiffe_workload import workload_pb2 as pb

if TYPE_CHECKING:
    from meshshield.sidecar.workloadapi import Changes, WorkloadApiState

log = logging.getLogger("meshshield.sidecar")

MAX_CACHED_TOKENS = 64
MAX_ANSWER_BYTES = 256 * 1024
REFRESH_MIN = 5.0
REFRESH_MAX = 300.0
BACKOFF_MAX = 30.0
UNKNOWN_KID_REFRESH = 5.0
CAS_TIMEOUT = 10.0


class JwtSvids:
    def __init__(self, config: SidecarConfig, identity: Identity, changes: Changes,
                 state: WorkloadApiState) -> None:
        self.config = config
        self.identity = identity
        self.changes = changes
        self.state = state
        self.keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self.jwks_json: bytes | None = None
        self.keys_fetched_at: float | None = None
        self.issued = 0
        self.validated = 0
        self.validation_failures = 0
        self._tokens: OrderedDict[tuple[str, tuple[str, ...]], tuple[str, int, int]] = (
            OrderedDict())
        self._refresh = asyncio.Event()
        self._last_forced = 0.0
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        # Closed after every request: a pooled connection would keep presenting the
        # certificate it was opened with, after a renewal.
        self._http = aiohttp.ClientSession(
            connector=cas_connector(self.identity.cas_trust, force_close=True, limit=4),
            timeout=aiohttp.ClientTimeout(total=CAS_TIMEOUT))
        self._task = asyncio.ensure_future(self._follow_keys())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._http is not None:
            await self._http.close()

    def view_changed(self) -> None:
        self._refresh.set()

    def status(self) -> dict[str, Any]:
        return {
            "jwt_authorities": sorted(self.keys),
            "jwt_authorities_fetched_at": None if self.keys_fetched_at is None
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.keys_fetched_at)),
            "jwt_svids_issued": self.issued,
            "jwt_svids_validated": self.validated,
            "jwt_validation_failures": self.validation_failures,
        }

    # -- the JWT authorities --------------------------------------------------------------
    async def _follow_keys(self) -> None:
        """Never ends before cancellation: failures are recorded and retried."""
        backoff = 1.0
        while True:
            self._refresh.clear()
            try:
                interval = await self._fetch_keys()
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - this loop must never end
                self.state.error(f"JWT authorities: {describe_error(e)}")
                log.warning("%s/%s: cannot fetch the JWT authorities from the CAS: %s",
                            self.config.session, self.config.service, describe_error(e))
                interval, backoff = backoff, min(BACKOFF_MAX, backoff * 2)
            await wait_any([self._refresh], interval)

    async def _fetch_keys(self) -> float:
        assert self._http is not None
        async with self._http.get(self.config.cas + "/v1/bundle/spiffe",
                                  ssl=self.identity.cas_anonymous_ctx) as r:
            data = await r.content.read(MAX_ANSWER_BYTES + 1)
            if r.status != 200 or len(data) > MAX_ANSWER_BYTES:
                raise MeshError(Reason.BAD_REQUEST,
                                f"GET /v1/bundle/spiffe answered {r.status} ({len(data)} bytes)")
        try:
            doc = json.loads(data)
            keys = jwt_authorities(doc)
        except (ValueError, RecursionError) as e:
            raise MeshError(Reason.BAD_REQUEST, f"SPIFFE bundle from the CAS: {e}") from None
        jwks = [k for k in doc["keys"] if isinstance(k, dict) and k.get("use") == "jwt-svid"]
        jwks_json = json.dumps({"keys": jwks}, sort_keys=True).encode()
        self.keys_fetched_at = time.time()
        if jwks_json != self.jwks_json:
            self.keys, self.jwks_json = keys, jwks_json
            self.changes.notify()
        hint = doc.get("spiffe_refresh_hint")
        return float(min(REFRESH_MAX, max(REFRESH_MIN, hint if isinstance(hint, int) else 300)))

    def _trust_domain(self) -> str | None:
        held = self.identity.held
        if held is not None:
            return parse_spiffe_id(held.spiffe_id).trust_domain
        view = self.identity.view
        return None if view is None else view.trust_domain

    # -- RPCs ----------------------------------------------------------------------------
    async def fetch_svid(self, request: pb.JWTSVIDRequest, context: Any) -> pb.JWTSVIDResponse:
        try:
            auds = check_audience(list(request.audience))
        except JwtError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        held = self.identity.held
        if held is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the sidecar holds no attested identity yet; retry")
        assert held is not None
        if request.spiffe_id and request.spiffe_id != held.spiffe_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"this workload's identity is {held.spiffe_id}, not "
                                f"{request.spiffe_id[:200]}")
        key = (held.serial, tuple(sorted(auds)))
        now = time.time()
        cached = self._tokens.get(key)
        if cached is not None and now < cached[2]:
            token = cached[0]
        else:
            try:
                token = await self._ask_cas(auds)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported to the caller, never raised
                text = describe_error(e)
                self.state.error(f"FetchJWTSVID: {text}")
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"the CAS did not sign a JWT-SVID: {text}"[:500])
            parsed = parse_jwt(token)
            iat = int(parsed.claims.get("iat", now))
            exp = int(parsed.claims["exp"])
            self._tokens[key] = (token, exp, iat + (exp - iat) // 2)
            while len(self._tokens) > MAX_CACHED_TOKENS:
                self._tokens.popitem(last=False)
            self.issued += 1
        return pb.JWTSVIDResponse(svids=[pb.JWTSVID(spiffe_id=held.spiffe_id, svid=token)])

    async def _ask_cas(self, audience: list[str]) -> str:
        assert self._http is not None
        async with self._http.post(self.config.cas + "/v1/jwt", json={"audience": audience},
                                   ssl=self.identity.cas_ctx) as r:
            data = await r.content.read(MAX_ANSWER_BYTES + 1)
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise MeshError(Reason.BAD_REQUEST, f"CAS answered {r.status} without JSON") from None
        if r.status != 200:
            err = doc.get("error") if isinstance(doc, dict) else None
            msg = err.get("message") if isinstance(err, dict) else None
            raise MeshError(Reason.BAD_REQUEST, f"CAS answered {r.status}: {str(msg)[:300]}")
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str):
            raise MeshError(Reason.BAD_REQUEST, "CAS answer has no token")
        parse_jwt(token)  # well-formed, or JwtError
        return token

    async def bundles(self, context: Any) -> AsyncIterator[pb.JWTBundlesResponse]:
        sent: bytes | None = None
        while not context.done():
            waiter = self.changes.waiter()
            td = self._trust_domain()
            if self.jwks_json is not None and td is not None and self.jwks_json != sent:
                sent = self.jwks_json
                yield pb.JWTBundlesResponse(bundles={f"spiffe://{td}": sent})
                continue
            await waiter.wait()

    async def validate(self, request: pb.ValidateJWTSVIDRequest,
                       context: Any) -> pb.ValidateJWTSVIDResponse:
        if not request.audience or not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "audience and svid are required")
        td = self._trust_domain()
        if td is None or not self.keys:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the JWT authorities are not known yet; retry")
        assert td is not None
        try:
            svid = validate_jwt_svid(request.svid, self.keys, request.audience, time.time(), td)
        except JwtError as e:
            self.validation_failures += 1
            if e.reason is Reason.SIGNATURE_INVALID:
                self._maybe_refresh()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message[:500])
        self.validated += 1
        resp = pb.ValidateJWTSVIDResponse(spiffe_id=svid.spiffe_id)
        resp.claims.update(svid.claims)
        return resp

    def _maybe_refresh(self) -> None:
        """A token signed by a key we do not know may be signed by a new one."""
        now = time.monotonic()
        if now - self._last_forced >= UNKNOWN_KID_REFRESH:
            self._last_forced = now
            self._refresh.set()
