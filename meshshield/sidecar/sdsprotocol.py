"""The SDS protocol, without I/O: the two secrets and the xDS rules of one stream.

State of the world (SotW) xDS: a request with an empty nonce opens a subscription and is
answered at once; one whose nonce is not the last one sent is stale and ignored; one
carrying the last nonce is an ACK, or a NACK when `error_detail` is set (counted, and
reported with Envoy's message; the next change is pushed as usual); a changed list of
names is answered with the resources now named. `meshshield.sidecar.sds` drives this
over gRPC.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from google.protobuf import any_pb2

from meshshield._proto.envoy.config.core.v3 import base_pb2, extension_pb2
from meshshield._proto.envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from meshshield._proto.envoy.service.discovery.v3 import discovery_pb2

SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
SPIFFE_VALIDATOR_TYPE_URL = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
)
CERT_ALIAS = "default"
BUNDLE_ALIAS = "ROOTCA"
MAX_STREAMS = 64
MAX_MESSAGE = 1 << 20
MAX_DETAIL = 500


def clean(text: str, limit: int = MAX_DETAIL) -> str:
    """Text from Envoy, fit for one log line: control characters escaped, bounded."""
    text = text[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class SdsSnapshot:
    """What the sidecar serves at one moment; `version` changes with any of it."""

    spiffe_id: str
    trust_domain: str
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: str
    version: str

    @property
    def bundle_name(self) -> str:
        return f"spiffe://{self.trust_domain}"

    def names(self) -> tuple[str, str]:
        """The canonical names of the two secrets."""
        return self.spiffe_id, self.bundle_name

    def secret(self, name: str) -> secret_pb2.Secret | None:
        """The secret served under `name`, or None for a name this sidecar does not serve."""
        if name in (self.spiffe_id, CERT_ALIAS):
            return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=self.chain_pem),
                private_key=base_pb2.DataSource(inline_bytes=self.key_pem)))
        if name in (self.bundle_name, BUNDLE_ALIAS):
            spiffe = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(trust_domains=[
                tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                    name=self.trust_domain,
                    trust_bundle=base_pb2.DataSource(inline_bytes=self.bundle_pem.encode()))])
            typed = any_pb2.Any(type_url=SPIFFE_VALIDATOR_TYPE_URL,
                                value=spiffe.SerializeToString())
            return secret_pb2.Secret(
                name=name, validation_context=common_pb2.CertificateValidationContext(
                    custom_validator_config=extension_pb2.TypedExtensionConfig(
                        name=SPIFFE_VALIDATOR, typed_config=typed)))
        return None


@dataclass(frozen=True)
class SdsMaterial:
    """The identity to serve, as read from the sidecar at one moment."""

    spiffe_id: str
    trust_domain: str
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: str

    def digest(self) -> str:
        return hashlib.sha256(self.chain_pem + b"\0" + self.bundle_pem.encode()).hexdigest()


def make_snapshot(m: SdsMaterial, generation: int) -> SdsSnapshot:
    """Version `<generation>-<digest>`: grows with each change, unique to its content."""
    return SdsSnapshot(m.spiffe_id, m.trust_domain, m.chain_pem, m.key_pem, m.bundle_pem,
                       f"{generation}-{m.digest()[:12]}")


def build_response(snap: SdsSnapshot, names: tuple[str, ...],
                   nonce: str) -> tuple[discovery_pb2.DiscoveryResponse, list[str]]:
    """The response for `names` (all canonical names when empty), and the unknown names."""
    resources, unknown = [], []
    for name in names or snap.names():
        secret = snap.secret(name)
        if secret is None:
            unknown.append(name)
            continue
        resources.append(any_pb2.Any(type_url=SECRET_TYPE_URL,
                                     value=secret.SerializeToString()))
    return discovery_pb2.DiscoveryResponse(
        version_info=snap.version, resources=resources, type_url=SECRET_TYPE_URL,
        nonce=nonce), unknown


@dataclass
class Outcome:
    """What one request or change did: a response to send, and what to log."""

    kind: str  # "subscribe", "ack", "nack", "stale", "resubscribe", "push", "none"
    response: discovery_pb2.DiscoveryResponse | None = None
    unknown: list[str] = field(default_factory=list)
    detail: str = ""
    version: str = ""


class ProtocolError(ValueError):
    """A request this server cannot answer (wrong type_url, unparsable)."""


@dataclass
class SdsStream:
    """The xDS state of one StreamSecrets stream; pure, fed requests and snapshots."""

    id: int
    names: tuple[str, ...] | None = None  # None: no request yet
    node: str = ""
    sent_nonce: str = ""
    sent_version: str = ""
    acked_version: str = ""
    nacks: int = 0
    _nonces: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def _respond(self, kind: str, snap: SdsSnapshot | None) -> Outcome:
        if snap is None or self.names is None:
            return Outcome(kind)
        nonce = f"{self.id}-{next(self._nonces)}"
        response, unknown = build_response(snap, self.names, nonce)
        self.sent_nonce, self.sent_version = nonce, snap.version
        return Outcome(kind, response, unknown, version=snap.version)

    def on_request(self, req: discovery_pb2.DiscoveryRequest,
                   snap: SdsSnapshot | None) -> Outcome:
        if req.type_url and req.type_url != SECRET_TYPE_URL:
            raise ProtocolError(f"type_url {clean(req.type_url, 200)!r}: this server "
                                f"serves only {SECRET_TYPE_URL}")
        if req.HasField("node") and req.node.id:
            self.node = clean(req.node.id, 200)
        names = tuple(req.resource_names)
        if not req.response_nonce:
            self.names = names
            return self._respond("subscribe", snap)
        if req.response_nonce != self.sent_nonce:
            return Outcome("stale")
        if req.HasField("error_detail"):
            self.nacks += 1
            detail = clean(req.error_detail.message) or f"code {req.error_detail.code}"
            return Outcome("nack", detail=detail, version=self.sent_version)
        self.acked_version = req.version_info
        if names != self.names:
            self.names = names
            return self._respond("resubscribe", snap)
        return Outcome("ack", version=req.version_info)

    def on_change(self, snap: SdsSnapshot | None) -> Outcome:
        """Push `snap` if this stream has subscribed and has not been sent it yet."""
        if snap is None or self.names is None or snap.version == self.sent_version:
            return Outcome("none")
        return self._respond("push", snap)
