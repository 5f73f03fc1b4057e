"""Sidecar configuration: SPEC §7 flags, or the same keys in a `--config` YAML file."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshshield.clock import parse_duration

NAME = re.compile(r"^[a-z0-9-]{1,63}$")


class ConfigError(ValueError):
    """A sidecar setting is unusable; the message names it and the expected form."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class InboundRoute:
    listen: Endpoint
    forward: Endpoint


@dataclass(frozen=True)
class OutboundRoute:
    listen: Endpoint
    session: str | None  # None: the sidecar's own session
    service: str
    target: Endpoint


@dataclass(frozen=True)
class SidecarConfig:
    cas: str
    cas_bundle: Path | None
    session: str
    service: str
    platform: str
    workload: tuple[str, ...] = ()
    sim_key: Path | None = None
    inbound: tuple[InboundRoute, ...] = ()
    outbound: tuple[OutboundRoute, ...] = ()
    admin_listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 15000))
    health_listen: Endpoint | None = None
    # Per direction (inbound, outbound): established connections, TLS handshakes in
    # progress, and inbound handshakes in progress from one source address.
    max_connections: int = 4096
    max_handshakes: int = 1024
    max_handshakes_per_source: int = 128
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    drain_timeout: float = 10.0
    report_interval: float = 10.0
    # The SPIFFE Workload API (sidecar/workloadapi.py): a unix socket path, and the
    # group that may connect to it (None: the socket is the sidecar user's alone).
    workload_api: Path | None = None
    workload_api_group: int | None = None
    # 0 = off. Every connection also ends at its peer certificate's not_after.
    idle_timeout: float = 0.0
    max_connection_lifetime: float = 0.0
    # Envoy SDS on this unix socket path (`--sds unix:///PATH`); None: not served.
    sds: Path | None = None
    # --cas-expect: the CAS's own attestation must pass this file on every (re)connect
    # (sidecar/castrust.py); sim evidence of it verifies against these public keys.
    cas_expect: Path | None = None
    cas_trust_sim_platform: tuple[Path, ...] = ()
    # Who carries the bytes: the Rust relay ("native", meshshield._native, the default)
    # on `workers` threads, or the asyncio one ("python", where the extension is not built).
    dataplane: str = "native"
    workers: int = 2
    # Where file secrets are written for the app (sidecar/secrets.py): a memory-backed
    # folder, unless `secrets_dir_on_disk` says this is a development machine.
    secrets_dir: Path | None = None
    secrets_dir_on_disk: bool = False


def parse_endpoint(text: str, what: str) -> Endpoint:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:15006")
    return Endpoint(host, int(port))


def parse_inbound(text: str) -> InboundRoute:
    listen, sep, forward = text.partition("=")
    if not sep:
        raise ConfigError(
            f"--inbound {text!r}: expected LISTEN=FORWARD, e.g. 0.0.0.0:15006=127.0.0.1:8080"
        )
    return InboundRoute(parse_endpoint(listen, "--inbound listen"),
                        parse_endpoint(forward, "--inbound forward"))


def parse_outbound(text: str) -> OutboundRoute:
    listen, sep, rest = text.partition("=")
    service, at, target = rest.rpartition("@") if sep else ("", "", "")
    if not sep or not at or not service:
        raise ConfigError(
            f"--outbound {text!r}: expected LISTEN=SERVICE@HOST:PORT, e.g. "
            "127.0.0.1:15001=payments@payments.shop.svc:15006"
        )
    session, slash, svc = service.rpartition("/")
    if (slash and not NAME.match(session)) or not NAME.match(svc):
        raise ConfigError(
            f"--outbound {text!r}: SERVICE must be `service` or `session/service` "
            "(names of a-z, 0-9 and -)"
        )
    ep = parse_endpoint(listen, "--outbound listen")
    try:
        if not ipaddress.ip_address(ep.host).is_loopback:
            raise ConfigError(
                f"--outbound {text!r}: the listen address must be loopback (the app's "
                "plaintext side never leaves the pod or host)"
            )
    except ValueError:
        if ep.host != "localhost":
            raise ConfigError(f"--outbound {text!r}: listen on a loopback IP address") from None
    return OutboundRoute(ep, session if slash else None, svc,
                         parse_endpoint(target, "--outbound target"))


def _duration(v: Any, what: str, minimum: float = 0.001, maximum: float = 86400.0) -> float:
    """A duration setting: refuses nan, inf, negative, zero and more than a day."""
    try:
        return parse_duration(str(v), what=what, minimum=minimum, maximum=maximum,
                              allow_zero=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _count(values: Mapping[str, Any], key: str, default: int) -> int:
    v = values.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ConfigError(f"{key}: expected an integer, e.g. {default}")
    try:
        n = int(v)
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, e.g. {default}") from None
    if not 1 <= n <= 1_000_000:
        raise ConfigError(f"{key}: expected 1..1000000")
    return n


def _bound(v: Any, what: str) -> float:
    """A connection bound: a duration, or 0 / off for none."""
    if v is None or str(v).strip().lower() in ("0", "off", "none", "false"):
        return 0.0
    seconds = _duration(v, what)
    if not math.isfinite(seconds) or not 0.1 <= seconds <= 30 * 86400:
        raise ConfigError(f"{what} {v!r}: expected a duration from 0.1s to 30d "
                          "(e.g. 30s, 5m, 1h), or off")
    return seconds


DATAPLANES = ("python", "native")

FILE_KEYS = {
    "cas", "cas_bundle", "session", "service", "platform", "workload", "sim_key",
    "inbound", "outbound", "admin_listen", "health_listen", "max_connections",
    "max_handshakes", "max_handshakes_per_source",
    "handshake_timeout", "connect_timeout", "drain_timeout", "report_interval",
    "workload_api", "workload_api_group",
    "idle_timeout", "max_connection_lifetime", "sds",
    "cas_expect", "cas_trust_sim_platform",
    "dataplane", "workers", "secrets_dir", "secrets_dir_on_disk",
}


def build_config(values: Mapping[str, Any]) -> SidecarConfig:
    """From flag values or a YAML mapping with the same (underscored) keys."""
    unknown = sorted(set(values) - FILE_KEYS)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(FILE_KEYS)}")
    for key in ("cas", "session", "service", "platform"):
        if not values.get(key):
            raise ConfigError(f"--{key.replace('_', '-')} is required")
    if not values.get("cas_bundle") and not values.get("cas_expect"):
        raise ConfigError("--cas-bundle PEM or --cas-expect FILE is required: the CAS is "
                          "trusted by a bundle you were given, or by its verified attestation")
    if not str(values["cas"]).startswith("https://"):
        raise ConfigError(f"--cas {values['cas']!r}: expected an https:// URL")
    for key in ("session", "service"):
        if not NAME.match(str(values[key])):
            raise ConfigError(f"--{key} {values[key]!r}: expected 1-63 of a-z, 0-9 and -")
    if values["platform"] not in ("sim", "sev-snp", "tdx", "sgx"):
        raise ConfigError(f"--platform {values['platform']!r}: one of sim, sev-snp, tdx, sgx")

    def _list(key: str) -> list[str]:
        v = values.get(key) or []
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{key}: expected a list of strings")
        return v

    inbound = tuple(parse_inbound(x) for x in _list("inbound"))
    outbound = tuple(parse_outbound(x) for x in _list("outbound"))
    sds = _unix_socket(values.get("sds"), "--sds")
    if not inbound and not outbound and sds is None and not values.get("secrets_dir"):
        raise ConfigError("give at least one --inbound or --outbound route (or --sds, or "
                          "--secrets-dir)")
    listens = [str(r.listen) for r in inbound] + [str(r.listen) for r in outbound]
    dup = {x for x in listens if listens.count(x) > 1}
    if dup:
        raise ConfigError(f"listen address used by two routes: {sorted(dup)}")
    health = values.get("health_listen")
    dataplane = str(values.get("dataplane") or "native")
    if dataplane not in DATAPLANES:
        raise ConfigError(f"--dataplane {dataplane!r}: one of {', '.join(DATAPLANES)}")
    workers = _count(values, "workers", 2)
    if workers > 64:
        raise ConfigError("workers: expected 1..64")
    max_conn = _count(values, "max_connections", 4096)
    max_hs = _count(values, "max_handshakes", 1024)
    max_hs_source = _count(values, "max_handshakes_per_source", min(128, max_hs))
    if max_hs_source > max_hs:
        raise ConfigError(f"max_handshakes_per_source ({max_hs_source}) cannot exceed "
                          f"max_handshakes ({max_hs})")
    return SidecarConfig(
        cas=str(values["cas"]).rstrip("/"),
        cas_bundle=Path(str(values["cas_bundle"])) if values.get("cas_bundle") else None,
        session=str(values["session"]),
        service=str(values["service"]),
        platform=str(values["platform"]),
        workload=tuple(_list("workload")),
        sim_key=Path(str(values["sim_key"])) if values.get("sim_key") else None,
        inbound=inbound,
        outbound=outbound,
        admin_listen=parse_endpoint(str(values.get("admin_listen") or "127.0.0.1:15000"),
                                    "--admin-listen"),
        health_listen=parse_endpoint(str(health), "--health-listen") if health else None,
        max_connections=max_conn,
        max_handshakes=max_hs,
        max_handshakes_per_source=max_hs_source,
        handshake_timeout=_duration(values.get("handshake_timeout", "10s"), "handshake_timeout"),
        connect_timeout=_duration(values.get("connect_timeout", "5s"), "connect_timeout"),
        drain_timeout=_duration(values.get("drain_timeout", "10s"), "drain_timeout"),
        report_interval=_duration(values.get("report_interval", "10s"), "report_interval"),
        workload_api=_unix_socket(values.get("workload_api"), "--workload-api"),
        workload_api_group=_group(values.get("workload_api_group"), values.get("workload_api")),
        idle_timeout=_bound(values.get("idle_timeout"), "idle_timeout"),
        max_connection_lifetime=_bound(values.get("max_connection_lifetime"),
                                       "max_connection_lifetime"),
        sds=sds,
        cas_expect=Path(str(values["cas_expect"])) if values.get("cas_expect") else None,
        cas_trust_sim_platform=tuple(Path(p) for p in _list("cas_trust_sim_platform")),
        dataplane=dataplane,
        workers=workers,
        secrets_dir=Path(str(values["secrets_dir"])) if values.get("secrets_dir") else None,
        secrets_dir_on_disk=bool(values.get("secrets_dir_on_disk")),
    )


def _unix_socket(v: Any, what: str) -> Path | None:
    """`unix:///ABSOLUTE/PATH` (or `unix:/ABSOLUTE/PATH`), as the SPIFFE endpoint
    socket variable names it; None when not set."""
    if v is None or v == "":
        return None
    text = str(v)
    if not text.startswith("unix:"):
        raise ConfigError(f"{what} {text!r}: expected unix:///PATH (a unix socket)")
    path = text[len("unix:"):]
    if path.startswith("//"):
        path = path[2:]
    if not path.startswith("/") or "\0" in path or len(path.encode()) > 107:
        raise ConfigError(f"{what} {text!r}: expected unix:///ABSOLUTE/PATH of at most "
                          "107 bytes, e.g. unix:///run/meshshield/workload/socket")
    return Path(path)


def _group(v: Any, socket: Any) -> int | None:
    """A group name or numeric gid; only with a Workload API socket."""
    if v is None or v == "":
        return None
    if not socket:
        raise ConfigError("--workload-api-group needs --workload-api")
    text = str(v)
    if text.isdigit():
        gid = int(text)
        if gid > 2**31 - 1:
            raise ConfigError(f"--workload-api-group {text!r}: gid out of range")
        return gid
    import grp

    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"--workload-api-group {text!r}: no such group") from None


MAX_CONFIG_BYTES = 1 << 20


def load_config_file(path: Path) -> dict[str, Any]:
    import yaml

    from meshshield.inputs import InputFileError, read_bounded_text
    from meshshield.safeyaml import YamlRefused, guard_yaml

    try:
        text = read_bounded_text(path, what="--config", limit=MAX_CONFIG_BYTES)
        guard_yaml(text)
        doc = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from None
    except InputFileError as e:
        raise ConfigError(str(e)) from None
    except YamlRefused as e:
        raise ConfigError(f"--config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in doc.items()}
