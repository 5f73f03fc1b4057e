"""The CAS's JWT-SVID authority: one P-256 signing key, sealed like the CA key.

`POST /v1/jwt {"audience": [...]}`, over TLS with the caller's mesh certificate,
answers a JWT-SVID whose `sub` is that certificate's SPIFFE ID, whose `aud` is the
audience asked for, and whose other claims are the attestation claims the certificate
carries: the token says no more than the certificate does, and lives no longer (at
most JWT_TTL_SECONDS, never past the certificate's not_after). The public key is
published as a `jwt-svid` JWK in the SPIFFE bundle (`GET /v1/bundle/spiffe`).

The key is created on first start, stored sealed under the key-encryption key with
the context `jwt:<kid>`, and shared by every CAS on the same store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.cas.store import Store
from meshshield.clock import rfc3339
from meshshield.errors import MeshError, Reason
from meshshield.pki.claims_ext import claims_from_certificate
from meshshield.pki.jwt import (
    check_audience,
    jwk_thumbprint,
    jwt_svid_claims,
    jwt_svid_jwk,
    sign_jwt,
)
from meshshield.pki.keys import generate_p256
from meshshield.pki.seal import SealedKeyError, seal_private_key, unseal_private_key
from meshshield.pki.spiffe import spiffe_id_of

log = logging.getLogger("meshshield.cas")

JWT_TTL_SECONDS = 300


def _context(kid: str) -> bytes:
    return b"jwt:" + kid.encode()


class JwtAuthority:
    def __init__(self, store: Store, kek: bytes) -> None:
        self._store = store
        self._kek = kek
        self._key: ec.EllipticCurvePrivateKey | None = None

    def ensure(self, now: datetime) -> None:
        """Load the signing key, creating it if the store has none."""
        if not self._store.load_jwt_keys():
            key = generate_p256()
            kid = jwk_thumbprint(key.public_key())
            if self._store.add_jwt_key(kid, seal_private_key(key, self._kek, _context(kid)), now):
                log.info("created JWT-SVID signing key %s", kid)
        kid, sealed = self._store.load_jwt_keys()[0]
        key = unseal_private_key(sealed, self._kek, _context(kid))
        if jwk_thumbprint(key.public_key()) != kid:
            raise SealedKeyError(f"the stored JWT signing key {kid} unseals to another key")
        self._key = key

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        if self._key is None:
            raise RuntimeError("JWT signing key not loaded")
        return self._key

    def jwks(self) -> list[dict[str, Any]]:
        """The JWT authorities' JWKs, for the SPIFFE bundle."""
        return [] if self._key is None else [jwt_svid_jwk(self._key.public_key())]

    def issue(self, cert: x509.Certificate, body: object, now: datetime) -> dict[str, Any]:
        """A JWT-SVID for the holder of mesh certificate `cert` (already verified by TLS
        and checked unrevoked), for the audience in `body`."""
        if not isinstance(body, Mapping) or set(body) - {"audience"}:
            raise MeshError(Reason.BAD_REQUEST, 'body must be {"audience": ["..."]}')
        audience = body.get("audience")
        if isinstance(audience, str):
            audience = [audience]
        if not isinstance(audience, list):
            raise MeshError(Reason.BAD_REQUEST, '"audience" must be a list of strings')
        auds = check_audience(audience)
        sid = spiffe_id_of(cert)
        if sid is None:
            raise MeshError(Reason.PEER_NOT_ALLOWED, "client certificate has no SPIFFE ID")
        claims = claims_from_certificate(cert)
        iat = int(now.timestamp())
        exp = min(iat + JWT_TTL_SECONDS, int(cert.not_valid_after_utc.timestamp()))
        if exp <= iat:
            raise MeshError(Reason.UNAUTHENTICATED, "the client certificate expires now; renew it")
        token = sign_jwt(self.key, jwt_svid_claims(sid, auds, iat, exp, claims))
        log.info("issued JWT-SVID for %s, audience %s, until %s", sid, auds,
                 rfc3339(datetime.fromtimestamp(exp, now.tzinfo)))
        return {"token": token, "spiffe_id": sid, "audience": auds,
                "expires_at": rfc3339(datetime.fromtimestamp(exp, now.tzinfo))}
