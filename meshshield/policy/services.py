"""Checking the `services` section: each service, its TEE entries, DNS names and peers."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meshshield.attestation.claims import Platform
from meshshield.clock import parse_duration
from meshshield.policy.checker import Checker, hint_similar
from meshshield.policy.document import (
    BOOL_TAG,
    clip,
    describe,
    index,
    integer,
    is_null,
    is_str,
    join,
    line_of,
)
from meshshield.policy.model import (
    CERT_TTL_DEFAULT_SECONDS,
    CERT_TTL_MAX_SECONDS,
    CERT_TTL_MIN_SECONDS,
    PeerRef,
    Secret,
    SecretUse,
    Service,
    SevSnpEntry,
    SgxEntry,
    SimEntry,
    SnpTcb,
    TdxEntry,
    TeeEntry,
    Tolerance,
)

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class ServiceChecker(Checker):
    """Checks `services`: names unique, TEE entries per platform, dns, allow_from, cert_ttl."""

    def services(
        self,
        node: Node | None,
        session: str,
        tolerate: frozenset[Tolerance],
        cas_dns: tuple[str, ...],
        secrets: dict[str, Secret] | None = None,
    ) -> tuple[Service, ...]:
        if node is None:
            return ()
        items = self.sequence(node, "services", "services", null_ok=False)
        if isinstance(node, SequenceNode) and not items:
            self.add(node, "services", "a session needs at least one service")
        # allow_from may name a service defined further down, so collect names first.
        names = set()
        for item in items:
            if isinstance(item, MappingNode):
                name = next((v for k, v in item.value if is_str(k) and k.value == "name"), None)
                if name is not None and is_str(name):
                    names.add(str(name.value))
        state = SessionState(session, names, tolerate, cas_dns, secrets=dict(secrets or {}))
        services = []
        for i, item in enumerate(items):
            service = self.service(item, index("services", i), state)
            if service is not None:
                services.append(service)
        return tuple(services)

    def service(self, node: Node, path: str, state: SessionState) -> Service | None:
        fields = self.mapping(
            node, path, ("name", "tee", "dns", "allow_from", "cert_ttl", "embed_evidence",
                         "secrets"),
            {
                "name": "the service name, e.g. name: backend",
                "tee": "the list of TEE configurations that may run this service",
            },
            where="in a service",
        )
        if fields is None:
            return None
        name_node = fields.get("name")
        name = self.name(name_node, join(path, "name"), "service")
        if name and name_node is not None:
            if name in state.service_lines:
                self.add(name_node, join(path, "name"),
                         f"duplicate service name {name!r} (first defined at line "
                         f"{state.service_lines[name]}); service names are unique in a session")
            else:
                state.service_lines[name] = line_of(name_node)
        tee = self.tee_entries(fields.get("tee"), join(path, "tee"), state)
        dns = self.dns(fields.get("dns"), join(path, "dns"), name, state)
        allow_from = self.allow_from(fields.get("allow_from"), join(path, "allow_from"), state)
        ttl = self.cert_ttl(fields.get("cert_ttl"), join(path, "cert_ttl"))
        embed = self.flag(fields.get("embed_evidence"), join(path, "embed_evidence"))
        uses = self.service_secrets(fields.get("secrets"), join(path, "secrets"), state)
        return Service(name, tee, dns, allow_from, ttl, embed, uses)

    def service_secrets(self, node: Node | None, path: str, state: SessionState
                        ) -> tuple[SecretUse, ...]:
        """A service's `secrets:` list; checked by SecretChecker (policy/secrets.py)."""
        return ()

    def flag(self, node: Node | None, path: str) -> bool:
        """An optional boolean, written true or false (not YAML 1.1's yes/no/on/off)."""
        if node is None or is_null(node):
            return False
        if isinstance(node, ScalarNode) and node.tag == BOOL_TAG and node.value in (
            "true", "false"
        ):
            return bool(node.value == "true")
        self.expected(node, path, "true or false")
        return False

    def tee_entries(self, node: Node | None, path: str, state: SessionState
                    ) -> tuple[TeeEntry, ...]:
        if node is None:
            return ()
        items = self.sequence(node, path, "TEE configurations", null_ok=False)
        if isinstance(node, SequenceNode) and not items:
            self.add(node, path, "list at least one TEE configuration (platform sev-snp, tdx, "
                                 "sgx or sim) that may run this service")
        entries = []
        for i, item in enumerate(items):
            entry = self.tee_entry(item, index(path, i), state)
            if entry is not None:
                entries.append(entry)
        return tuple(entries)

    def tee_entry(self, node: Node, path: str, state: SessionState) -> TeeEntry | None:
        platforms = ", ".join(p.value for p in Platform)
        if not isinstance(node, MappingNode):
            self.expected(node, path, f"a mapping with platform ({platforms}) and its fields")
            return None
        platform_node = next(
            (v for k, v in node.value if is_str(k) and k.value == "platform"), None
        )
        if platform_node is None:
            self.add(node, join(path, "platform"),
                     f"missing required key: the platform of this entry, one of {platforms}")
            return None
        text = self.string(platform_node, join(path, "platform"), f"one of {platforms}")
        if text is None:
            return None
        if text not in Platform.__members__.values():
            self.add(platform_node, join(path, "platform"),
                     f"unknown platform {clip(text)!r}"
                     f"{hint_similar(text, [p.value for p in Platform])}; "
                     f"expected one of {platforms}")
            return None
        platform = Platform(text)
        if platform is Platform.SEV_SNP:
            return self.snp_entry(node, path)
        if platform is Platform.TDX:
            return self.tdx_entry(node, path)
        if platform is Platform.SGX:
            return self.sgx_entry(node, path)
        return self.sim_entry(node, path, state)

    def snp_entry(self, node: Node, path: str) -> SevSnpEntry | None:
        fields = self.mapping(
            node, path, ("platform", "measurement", "host_data", "min_tcb"),
            {
                "measurement": "the sev-snp launch digest, 96 hex digits",
                "host_data": "sev-snp entries must pin the workload with host_data "
                             "(64 hex digits, e.g. the pod policy digest)",
            },
            where="for platform sev-snp",
        )
        if fields is None:
            return None
        measurement = self.req_hex(fields, path, "measurement", 96, "sev-snp")
        host_data = self.req_hex(fields, path, "host_data", 64, "sev-snp host_data")
        min_tcb = self.min_tcb(fields.get("min_tcb"), join(path, "min_tcb"))
        return SevSnpEntry(measurement, host_data, min_tcb)

    def min_tcb(self, node: Node | None, path: str) -> SnpTcb | None:
        if node is None or is_null(node):
            return None
        fields = self.mapping(node, path, SnpTcb.FIELDS, where="in min_tcb")
        if fields is None:
            return None
        if not fields.node.value:
            self.add(node, path, f"min_tcb is empty; set at least one of "
                                 f"{', '.join(SnpTcb.FIELDS)} (0-255), or remove it")
        values = {
            name: self.bounded_int(fields.get(name), join(path, name), 0, 255)
            for name in SnpTcb.FIELDS
        }
        return SnpTcb(**values)

    def tdx_entry(self, node: Node, path: str) -> TdxEntry | None:
        fields = self.mapping(
            node, path, ("platform", "mrtd", "mrconfigid", "rtmr"),
            {"mrtd": "the tdx MRTD, 96 hex digits"},
            where="for platform tdx",
        )
        if fields is None:
            return None
        mrtd = self.req_hex(fields, path, "mrtd", 96, "tdx")
        mrconfigid = self.optional_hex(fields.get("mrconfigid"), join(path, "mrconfigid"),
                                       96, "tdx mrconfigid")
        rtmr_node = fields.get("rtmr")
        rtmr = self.rtmr(rtmr_node, join(path, "rtmr"))
        mrconfigid_node = fields.get("mrconfigid")
        if mrconfigid_node is None or is_null(mrconfigid_node):
            if rtmr_node is None or is_null(rtmr_node):
                self.add(node, join(path, "mrconfigid"),
                         "tdx entries must pin the workload: set mrconfigid and/or rtmr "
                         "(96 hex digits each)")
            elif rtmr is not None and all(value is None for value in rtmr):
                self.add(rtmr_node, join(path, "rtmr"),
                         "all four rtmr values are null, so nothing pins the workload; "
                         "set mrconfigid or at least one rtmr (96 hex digits)")
        return TdxEntry(mrtd, mrconfigid, rtmr)

    def rtmr(self, node: Node | None, path: str
             ) -> tuple[str | None, str | None, str | None, str | None] | None:
        if node is None or is_null(node):
            return None
        if not isinstance(node, SequenceNode) or len(node.value) != 4:
            found = (f"a list of {len(node.value)}" if isinstance(node, SequenceNode)
                     else describe(node))
            self.add(node, path, "expected a list of 4 values (RTMR0..RTMR3, each 96 hex "
                                 f"digits or null for any), found {found}")
            return None
        a, b, c, d = (
            self.optional_hex(item, index(path, i), 96, f"tdx rtmr{i}")
            for i, item in enumerate(node.value)
        )
        return (a, b, c, d)

    def sgx_entry(self, node: Node, path: str) -> SgxEntry | None:
        fields = self.mapping(
            node, path, ("platform", "mrenclave", "mrsigner", "product_id", "min_svn"),
            where="for platform sgx",
        )
        if fields is None:
            return None
        mrenclave = self.optional_hex(fields.get("mrenclave"), join(path, "mrenclave"),
                                      64, "sgx mrenclave")
        mrsigner = self.optional_hex(fields.get("mrsigner"), join(path, "mrsigner"),
                                     64, "sgx mrsigner")
        product_id = self.bounded_int(fields.get("product_id"), join(path, "product_id"),
                                      0, 65535)
        min_svn = self.bounded_int(fields.get("min_svn"), join(path, "min_svn"), 0, 65535)

        def given(key: str) -> bool:
            value = fields.get(key) if fields else None
            return value is not None and not is_null(value)

        if not given("mrenclave"):
            if not given("mrsigner") and not given("product_id"):
                self.add(node, join(path, "mrenclave"),
                         "sgx entries need mrenclave (64 hex digits), or mrsigner together "
                         "with product_id")
            elif not given("product_id"):
                self.add(node, join(path, "product_id"),
                         "an sgx entry pinned by mrsigner also needs product_id (0-65535), "
                         "or pin the exact build with mrenclave")
            elif not given("mrsigner"):
                self.add(node, join(path, "mrsigner"),
                         "an sgx entry with product_id also needs mrsigner (64 hex digits), "
                         "or pin the exact build with mrenclave")
        return SgxEntry(mrenclave, mrsigner, product_id, min_svn)

    def sim_entry(self, node: Node, path: str, state: SessionState) -> SimEntry | None:
        fields = self.mapping(
            node, path, ("platform", "measurement"),
            {"measurement": "the sim measurement, 64 hex digits (`meshshield measure` output)"},
            where="for platform sim",
        )
        if Tolerance.SIMULATION not in state.tolerate:
            self.add(node, path,
                     "platform sim has no hardware guarantee and is allowed only when "
                     "security.attestation.tolerate lists simulation; add it there "
                     "(development only) or use a hardware platform")
        if fields is None:
            return None
        return SimEntry(self.req_hex(fields, path, "measurement", 64, "sim"))

    def dns(self, node: Node | None, path: str, service: str, state: SessionState
            ) -> tuple[str, ...]:
        if node is None:
            return ()
        names: list[tuple[Node, str]] = []
        for i, item in enumerate(self.sequence(node, path, "DNS names", null_ok=True)):
            text = self.string(item, index(path, i), "a DNS name")
            if text is None:
                continue
            wrong = _dns_problem(text, state.cas_dns)
            if wrong is not None:
                self.add(item, index(path, i), wrong)
                continue
            owner = state.dns_owners.get(text)
            if owner is not None and owner[0] != service:
                self.add(item, index(path, i),
                         f"dns name {text!r} is already claimed by service {owner[0]!r} "
                         f"(line {owner[1]}); each name belongs to one service")
                continue
            state.dns_owners.setdefault(text, (service, line_of(item)))
            names.append((item, text))
        self.no_repeats(names, path, "dns name")
        return tuple(dict.fromkeys(text for _, text in names))

    def allow_from(self, node: Node | None, path: str, state: SessionState
                   ) -> tuple[PeerRef, ...]:
        if node is None:
            return ()
        refs: list[tuple[Node, str]] = []
        parsed: list[PeerRef] = []
        for i, item in enumerate(self.sequence(node, path, 'service references ("svc", '
                                               '"session/svc" or "*")', null_ok=True)):
            here = index(path, i)
            text = self.string(item, here, 'a service reference: "svc", "session/svc" or "*"')
            if text is None:
                continue
            if text.endswith("/*"):
                self.add(item, here, f"{clip(text)!r}: a wildcard is allowed only for this "
                                     'session ("*"); list the services of another session '
                                     "one by one as session/svc")
                continue
            try:
                ref = PeerRef.from_text(text)
            except ValueError as e:
                self.add(item, here, str(e))
                continue
            local = ref.session is None or ref.session == state.session
            if local and ref.service is not None and ref.service not in state.names:
                known = ", ".join(sorted(state.names)) or "none"
                self.add(item, here,
                         f"this session has no service {ref.service!r} (its services: "
                         f"{known}); to allow a service of another session write session/svc")
                continue
            refs.append((item, text))
            parsed.append(ref)
        self.no_repeats(refs, path, "entry")
        return tuple(dict.fromkeys(parsed))

    def cert_ttl(self, node: Node | None, path: str) -> int:
        if node is None or is_null(node):
            return CERT_TTL_DEFAULT_SECONDS
        expected = "a duration from 5m to 24h (e.g. 30m, 1h, 1h30m)"
        seconds: float
        number = integer(node)
        if number is not None:
            seconds, text = float(number), str(number)
        elif is_str(node):
            text = str(node.value)
            try:
                seconds = parse_duration(text)
            except ValueError:
                self.add(node, path, f"expected {expected}, found {clip(text)!r}")
                return CERT_TTL_DEFAULT_SECONDS
        else:
            self.expected(node, path, expected)
            return CERT_TTL_DEFAULT_SECONDS
        if not math.isfinite(seconds) or seconds != int(seconds):
            self.add(node, path, f"expected {expected} in whole seconds, found {clip(text)!r}")
            return CERT_TTL_DEFAULT_SECONDS
        if not CERT_TTL_MIN_SECONDS <= seconds <= CERT_TTL_MAX_SECONDS:
            self.add(node, path, f"expected {expected}, found {clip(text)} "
                                 f"({int(seconds)} seconds)")
            return CERT_TTL_DEFAULT_SECONDS
        return int(seconds)


@dataclass
class SessionState:
    """What checking one service needs to know about the rest of the session."""

    session: str
    names: set[str]
    tolerate: frozenset[Tolerance]
    cas_dns: tuple[str, ...]
    service_lines: dict[str, int] = field(default_factory=dict)
    dns_owners: dict[str, tuple[str, int]] = field(default_factory=dict)
    secrets: dict[str, Secret] = field(default_factory=dict)


def _dns_problem(name: str, cas_dns: tuple[str, ...]) -> str | None:
    """Why `name` may not be a DNS SAN of a service certificate, or None."""
    shown_name = clip(name, 80)
    if "*" in name:
        return f"wildcards are not allowed in dns (found {shown_name!r}); list each name"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return (f"IP addresses are not allowed in dns (found {shown_name!r}); "
                "give the service a hostname")
    if name != name.lower():
        return f"dns names must be lowercase; write {clip(name.lower(), 80)!r}"
    if name.endswith("."):
        return f"remove the trailing dot from {shown_name!r}"
    if not name or len(name) > 253:
        return f"expected a hostname of 1-253 characters, found {len(name)}"
    labels = name.split(".")
    for label in labels:
        if not _DNS_LABEL.fullmatch(label):
            return (f"{shown_name!r} is not a valid hostname: label {clip(label)!r} must be "
                    "1-63 characters of a-z, 0-9 and -, not starting or ending with -")
    if labels[-1].isdigit():
        return f"{shown_name!r} ends in an all-numeric label and would read as an IP address"
    for cas_name in cas_dns:
        if name == cas_name:
            return (f"{shown_name!r} is a name the CAS itself serves; a service certificate "
                    "may not claim it")
        if name.endswith("." + cas_name):
            return (f"{shown_name!r} falls under {cas_name!r}, a name the CAS serves; "
                    "choose a name outside it")
    return None

