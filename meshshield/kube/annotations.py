"""The `meshshield.io/*` pod annotations: what an operator writes, parsed and checked.

Every refusal names the annotation, the form it expects and what it found, so the
message `kubectl apply` shows is enough to fix the manifest.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from meshshield.errors import MeshError, Reason

PREFIX = "meshshield.io/"
INJECT = PREFIX + "inject"
SESSION = PREFIX + "session"
SERVICE = PREFIX + "service"
PLATFORM = PREFIX + "platform"
INBOUND = PREFIX + "inbound"
OUTBOUND = PREFIX + "outbound"
STATUS = PREFIX + "status"
WORKLOAD_API = PREFIX + "workload-api"
# "CONFIGMAP/KEY": the sidecar verifies the CAS's attestation against that expect file.
CAS_EXPECT = PREFIX + "cas-expect"
# "true": the sidecar writes the service's file secrets into a memory-backed emptyDir
# that the app's containers mount read-only at /run/secrets.
SECRETS = PREFIX + "secrets"
_CONFIGMAP_KEY_RE = re.compile(r"[-._a-zA-Z0-9]{1,253}")

# Labels a service name falls back to when meshshield.io/service is absent.
SERVICE_LABELS = ("app.kubernetes.io/name", "app")

PLATFORMS = ("sev-snp", "tdx", "sim")
CONFIDENTIAL_VM_PLATFORMS = ("sev-snp", "tdx")

_NAME_RE = re.compile(r"[a-z0-9-]{1,63}")
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)

SGX_REFUSAL = (
    "platform sgx cannot be injected as a separate container: on SGX the sidecar must run "
    "inside the app's own enclave (one Gramine or SCONE enclave image that starts both the "
    "app and `meshshield sidecar`), because a sidecar in an enclave of its own proves "
    "nothing about the app; build that enclave image and deploy it without "
    "meshshield.io/inject"
)


class InjectError(MeshError):
    """The injector refuses a manifest (a request problem, never a crash)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.BAD_REQUEST, message)


class AnnotationError(InjectError):
    """An annotation is missing or does not have the expected form."""

    def __init__(self, annotation: str, expected: str, found: object, hint: str = "") -> None:
        self.annotation = annotation
        self.expected = expected
        self.found = found
        found_text = "nothing" if found is None else json.dumps(found, default=str)
        message = f"annotation {annotation}: expected {expected}, found {found_text}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


@dataclass(frozen=True)
class InboundRoute:
    """Peers connect to `listen_port` on the pod IP; the sidecar forwards to the app."""

    listen_port: int
    app_port: int

    def flag(self, listen_host: str) -> str:
        return f"{listen_host}:{self.listen_port}=127.0.0.1:{self.app_port}"


@dataclass(frozen=True)
class OutboundRoute:
    """The app connects to 127.0.0.1:`listen_port`; the sidecar dials the named service."""

    listen_port: int
    service: str  # "svc" or "session/svc"
    host: str
    port: int

    def flag(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"127.0.0.1:{self.listen_port}={self.service}@{host}:{self.port}"


@dataclass(frozen=True)
class MeshAnnotations:
    session: str
    service: str
    platform: str
    inbound: tuple[InboundRoute, ...]
    outbound: tuple[OutboundRoute, ...]
    workload_api: bool = False  # serve the SPIFFE Workload API to the app's containers
    cas_expect: tuple[str, str] | None = None  # (ConfigMap, key) of the CAS expect file
    secrets: bool = False  # file secrets in a memory-backed emptyDir at /run/secrets


def injection_requested(annotations: Mapping[str, object]) -> bool:
    """True for `meshshield.io/inject: "true"`, False when absent or "false"."""
    value = annotations.get(INJECT)
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise AnnotationError(INJECT, 'the string "true" or "false"', value)


def parse_mesh_annotations(
    annotations: Mapping[str, object], labels: Mapping[str, object]
) -> MeshAnnotations:
    """Parse the annotations of a pod that asked for injection."""
    session = _name(annotations, SESSION)
    service_value = annotations.get(SERVICE)
    if service_value is None:
        for label in SERVICE_LABELS:
            candidate = labels.get(label)
            if isinstance(candidate, str) and _NAME_RE.fullmatch(candidate):
                service_value = candidate
                break
        else:
            raise AnnotationError(
                SERVICE,
                "a service name of the session ([a-z0-9-]{1,63})",
                None,
                "set it, or label the pod app.kubernetes.io/name",
            )
        service = str(service_value)
    else:
        service = _name(annotations, SERVICE)
    platform = _platform(annotations.get(PLATFORM))
    inbound = parse_inbound(annotations.get(INBOUND))
    outbound = parse_outbound(annotations.get(OUTBOUND))
    if not inbound and not outbound:
        raise AnnotationError(
            INBOUND,
            'at least one route, e.g. "15006=8080" (or a meshshield.io/outbound route)',
            None,
            "a sidecar without routes carries no traffic",
        )
    _check_distinct_ports(inbound, outbound)
    workload_api = annotations.get(WORKLOAD_API, "false")
    if workload_api not in ("true", "false"):
        raise AnnotationError(WORKLOAD_API, 'the string "true" or "false"', workload_api)
    secrets = annotations.get(SECRETS, "false")
    if secrets not in ("true", "false"):
        raise AnnotationError(SECRETS, 'the string "true" or "false"', secrets)
    return MeshAnnotations(session, service, platform, inbound, outbound,
                           workload_api=workload_api == "true",
                           cas_expect=_cas_expect(annotations.get(CAS_EXPECT)),
                           secrets=secrets == "true")


def _cas_expect(value: object) -> tuple[str, str] | None:
    """`meshshield.io/cas-expect: "CONFIGMAP/KEY"` (a ConfigMap of the pod's namespace)."""
    if value is None:
        return None
    expected = 'a ConfigMap and its key holding the CAS expect file, e.g. "cas-expect/cas.yaml"'
    if not isinstance(value, str):
        raise AnnotationError(CAS_EXPECT, expected, value)
    name, slash, key = value.partition("/")
    labels = name.split(".")
    if (not slash or len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(x) for x in labels)
            or name != name.lower() or not _CONFIGMAP_KEY_RE.fullmatch(key)
            or key in (".", "..")):
        raise AnnotationError(CAS_EXPECT, expected, value)
    return name, key


def _name(annotations: Mapping[str, object], annotation: str) -> str:
    value = annotations.get(annotation)
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise AnnotationError(annotation, "a name of [a-z0-9-]{1,63}", value)
    return value


def _platform(value: object) -> str:
    if value == "sgx":
        raise AnnotationError(PLATFORM, "one of sev-snp, tdx, sim", value, SGX_REFUSAL)
    if not isinstance(value, str) or value not in PLATFORMS:
        raise AnnotationError(PLATFORM, "one of sev-snp, tdx, sim", value)
    return value


def _port(text: str, annotation: str, expected: str, found: object) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise AnnotationError(annotation, expected, found)
    port = int(text)
    if not 1 <= port <= 65535:
        raise AnnotationError(annotation, expected, found, f"port {port} is out of 1..65535")
    return port


def _items(value: object, annotation: str, expected: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, str):
        raise AnnotationError(annotation, expected, value)
    items = [item.strip() for item in value.split(",")]
    if any(not item for item in items):
        raise AnnotationError(annotation, expected, value, "an entry of the list is empty")
    return items


INBOUND_FORM = 'a comma-separated list of LISTEN_PORT=APP_PORT, e.g. "15006=8080"'
OUTBOUND_FORM = (
    "a comma-separated list of LISTEN_PORT=SERVICE@HOST:PORT, "
    'e.g. "15001=payments@payments.shop.svc:15006"'
)


def parse_inbound(value: object) -> tuple[InboundRoute, ...]:
    routes = []
    for item in _items(value, INBOUND, INBOUND_FORM):
        listen, sep, app = item.partition("=")
        if not sep:
            raise AnnotationError(INBOUND, INBOUND_FORM, value)
        route = InboundRoute(
            _port(listen.strip(), INBOUND, INBOUND_FORM, value),
            _port(app.strip(), INBOUND, INBOUND_FORM, value),
        )
        if route.listen_port == route.app_port:
            raise AnnotationError(
                INBOUND,
                INBOUND_FORM,
                value,
                f"the sidecar's port and the app's port must differ (both {route.app_port})",
            )
        routes.append(route)
    return tuple(routes)


def parse_outbound(value: object) -> tuple[OutboundRoute, ...]:
    routes = []
    for item in _items(value, OUTBOUND, OUTBOUND_FORM):
        listen, sep, target = item.partition("=")
        service, at, address = target.partition("@")
        if not sep or not at:
            raise AnnotationError(OUTBOUND, OUTBOUND_FORM, value)
        service = service.strip()
        parts = service.split("/")
        if len(parts) > 2 or not all(_NAME_RE.fullmatch(part) for part in parts):
            raise AnnotationError(
                OUTBOUND,
                OUTBOUND_FORM,
                value,
                f"SERVICE must be NAME or SESSION/NAME of [a-z0-9-]{{1,63}}, not {service!r}",
            )
        host, port = _host_port(address.strip(), value)
        listen_port = _port(listen.strip(), OUTBOUND, OUTBOUND_FORM, value)
        routes.append(OutboundRoute(listen_port, service, host, port))
    return tuple(routes)


def _host_port(address: str, value: object) -> tuple[str, int]:
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            hint = f"bad IPv6 host {host!r}"
            raise AnnotationError(OUTBOUND, OUTBOUND_FORM, value, hint) from None
        if not sep:
            raise AnnotationError(OUTBOUND, OUTBOUND_FORM, value)
        return host, _port(port, OUTBOUND, OUTBOUND_FORM, value)
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise AnnotationError(OUTBOUND, OUTBOUND_FORM, value, "HOST:PORT is missing its port")
    if not _valid_host(host):
        raise AnnotationError(OUTBOUND, OUTBOUND_FORM, value, f"{host!r} is not a DNS name or IP")
    return host, _port(port, OUTBOUND, OUTBOUND_FORM, value)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(_DNS_LABEL_RE.fullmatch(label) for label in labels)


def _check_distinct_ports(
    inbound: tuple[InboundRoute, ...], outbound: tuple[OutboundRoute, ...]
) -> None:
    """Every port bound inside the pod's network namespace must be bound once."""
    seen: dict[int, str] = {}

    def claim(port: int, annotation: str, role: str) -> None:
        if port in seen:
            raise AnnotationError(
                annotation,
                "ports that are each used once in the pod",
                port,
                f"port {port} is both {seen[port]} and {role}",
            )
        seen[port] = role

    for route in inbound:
        claim(route.listen_port, INBOUND, f"the sidecar's inbound port {route.listen_port}")
    for route in inbound:
        if route.app_port in seen and seen[route.app_port] == f"the app's port {route.app_port}":
            continue  # two listeners may forward to the same app port
        claim(route.app_port, INBOUND, f"the app's port {route.app_port}")
    for out_route in outbound:
        port = out_route.listen_port
        claim(port, OUTBOUND, f"the outbound port {port}")
