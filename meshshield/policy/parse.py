"""Policy YAML (SPEC §3) -> `Policy`, reporting every problem with its line and path.

`parse_policy` either returns a complete, valid `Policy` or raises `PolicyInvalid`
carrying all the problems it found, each printable as `FILE:LINE: PATH: MESSAGE`.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from yaml.nodes import MappingNode, Node, SequenceNode

from meshshield.attestation.claims import Platform
from meshshield.clock import parse_duration
from meshshield.errors import PolicyError, Reason
from meshshield.policy.document import (
    MAX_POLICY_BYTES,
    MERGE_TAG,
    AliasNode,
    Problem,
    clip,
    describe,
    index,
    integer,
    is_null,
    is_str,
    join,
    key_text,
    line_of,
    read_document,
    shown,
    structural_problems,
)
from meshshield.policy.model import (
    CERT_TTL_DEFAULT_SECONDS,
    CERT_TTL_MAX_SECONDS,
    CERT_TTL_MIN_SECONDS,
    CREATOR,
    NAME_PATTERN,
    IgnoreAdvisories,
    PeerRef,
    Policy,
    Service,
    SevSnpEntry,
    SgxEntry,
    SimEntry,
    SnpTcb,
    TdxEntry,
    TeeEntry,
    Tolerance,
)

__all__ = ["MAX_POLICY_BYTES", "PolicyInvalid", "Problem", "parse_policy", "policy_hash"]

SUPPORTED_VERSION = "1"
_HEX = frozenset("0123456789abcdefABCDEF")
_ADVISORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NAME_RULE = "1-63 characters of a-z, 0-9 and -"


class PolicyInvalid(PolicyError):
    """A policy document was refused; `problems` lists everything wrong with it."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(Reason.POLICY_INVALID, "\n".join(str(p) for p in self.problems))


def policy_hash(data: bytes) -> str:
    """SHA-256 (hex) of the exact policy bytes: the policy's identity and `predecessor`."""
    return hashlib.sha256(data).hexdigest()


def parse_policy(
    data: bytes, filename: str = "<policy>", cas_dns: Sequence[str] = ("localhost",)
) -> Policy:
    """Parse and validate policy YAML.

    `cas_dns` are the names the CAS serves; no service may claim them or names under
    them in `dns`. Raises PolicyInvalid with every problem found.
    """
    doc, problems = read_document(data, filename)
    if doc is None or doc.root is None:
        raise PolicyInvalid(problems)
    checker = _Checker(filename, structural_problems(doc, filename))
    policy = checker.policy(doc.root, _cas_names(cas_dns))
    if checker.problems:
        # Stable sort: problems on one line keep the order the walk found them in.
        raise PolicyInvalid(sorted(checker.problems, key=lambda p: p.line))
    return policy


def _cas_names(cas_dns: Iterable[str]) -> tuple[str, ...]:
    names = []
    for name in cas_dns:
        name = name.strip().lower().rstrip(".").removeprefix("*.")
        if name:
            names.append(name)
    return tuple(names)


def _hint_similar(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _quote_hint(node: Node) -> str:
    return "; put it in quotes" if not isinstance(node, MappingNode | SequenceNode) else ""


def _bad_hex(text: str, digits: int) -> str | None:
    """What is wrong with `text` as `digits` hex digits, or None if nothing."""
    if text[:2] in ("0x", "0X"):
        return f"found a 0x prefix; write just the {digits} hex digits"
    for i, ch in enumerate(text):
        if ch not in _HEX:
            return f"found non-hex character {ch!r} at position {i + 1}"
    if len(text) != digits:
        return f"found {len(text)}"
    return None


@dataclass
class _Fields:
    """The known keys of a mapping that passed its key checks, value nodes by key."""

    node: MappingNode
    values: dict[str, Node] = field(default_factory=dict)

    def get(self, key: str) -> Node | None:
        return self.values.get(key)


@dataclass
class _Checker:
    filename: str
    problems: list[Problem]

    # -- reporting ---------------------------------------------------------------------

    def add(self, node: Node, path: str, message: str) -> None:
        if isinstance(node, AliasNode):
            return  # already reported by the structural walk; its type would only repeat it
        self.problems.append(Problem(self.filename, line_of(node), shown(path), message))

    def expected(self, node: Node, path: str, what: str) -> None:
        self.add(node, path, f"expected {what}, found {describe(node)}")

    # -- generic shapes ------------------------------------------------------------------

    def mapping(
        self,
        node: Node,
        path: str,
        allowed: Sequence[str],
        required: Mapping[str, str] | None = None,
        where: str = "here",
    ) -> _Fields | None:
        """Check a mapping's keys: strings, known, required ones present.

        `required` maps each required key to a hint for the "missing" message.
        """
        if not isinstance(node, MappingNode):
            self.expected(node, path, f"a mapping with keys {', '.join(allowed)}")
            return None
        fields = _Fields(node)
        for key, value in node.value:
            child = join(path, key_text(key))
            if key.tag == MERGE_TAG:
                self.add(key, child, "merge keys (<<) are not allowed; write the keys out in full")
                continue
            if not is_str(key):
                self.add(key, child, f"keys must be strings, found {describe(key)}; "
                                     f"allowed {where}: {', '.join(allowed)}")
                continue
            name = str(key.value)
            if name in fields.values:
                continue  # a duplicate; reported by the structural walk
            if name not in allowed:
                self.add(key, child, f"unknown key {name!r}{_hint_similar(name, allowed)}; "
                                     f"allowed {where}: {', '.join(allowed)}")
                continue
            fields.values[name] = value
        for name, hint in (required or {}).items():
            if name not in fields.values:
                self.add(node, join(path, name), f"missing required key: {hint}")
        return fields

    def sequence(self, node: Node, path: str, what: str, *, null_ok: bool) -> list[Node]:
        if null_ok and is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            self.expected(node, path, f"a list of {what}")
            return []
        return list(node.value)

    def string(self, node: Node, path: str, what: str, *, quote_hint: bool = False
               ) -> str | None:
        """The text of a string scalar; `quote_hint` when quoting a scalar could fix it."""
        if not is_str(node):
            hint = _quote_hint(node) if quote_hint else ""
            self.add(node, path, f"expected {what}, found {describe(node)}{hint}")
            return None
        return str(node.value)

    def hex(self, node: Node, path: str, digits: int, label: str) -> str:
        text = self.string(node, path, f"a quoted string of {digits} hex digits for {label}",
                           quote_hint=True)
        if text is None:
            return ""
        wrong = _bad_hex(text, digits)
        if wrong is not None:
            self.add(node, path, f"expected {digits} hex digits for {label}, {wrong}")
            return ""
        return text.lower()

    def optional_hex(self, node: Node | None, path: str, digits: int, label: str) -> str | None:
        if node is None or is_null(node):
            return None
        return self.hex(node, path, digits, label)

    def bounded_int(self, node: Node | None, path: str, low: int, high: int) -> int | None:
        if node is None or is_null(node):
            return None
        value = integer(node)
        if value is None:
            self.expected(node, path, f"an integer from {low} to {high}")
            return None
        if not low <= value <= high:
            self.add(node, path, f"expected an integer from {low} to {high}, found {value}")
            return None
        return value

    def name(self, node: Node | None, path: str, what: str) -> str:
        if node is None:
            return ""
        text = self.string(node, path, f"a {what} name ({_NAME_RULE})", quote_hint=True)
        if text is None:
            return ""
        if not NAME_PATTERN.fullmatch(text):
            hint = ""
            if NAME_PATTERN.fullmatch(text.lower()):
                hint = f"; write {text.lower()!r}"
            self.add(node, path, f"expected a {what} name of {_NAME_RULE}, "
                                 f"found {clip(text)!r}{hint}")
            return ""
        return text

    def no_repeats(self, items: Sequence[tuple[Node, str]], path: str, what: str) -> None:
        first: dict[str, int] = {}
        for i, (node, value) in enumerate(items):
            if value in first:
                self.add(node, index(path, i),
                         f"duplicate {what} {clip(value)!r} (also at line {first[value]}); "
                         "list it once")
            else:
                first[value] = line_of(node)

    # -- the document --------------------------------------------------------------------

    def policy(self, root: Node, cas_dns: tuple[str, ...]) -> Policy:
        top = self.mapping(
            root, "",
            ("name", "version", "predecessor", "services", "security", "access_policy"),
            {
                "name": "the session name, e.g. name: shop",
                "version": 'the policy language version: version: "1"',
                "services": "the list of services in this session",
            },
            where="at the top level",
        )
        if top is None:
            return Policy("", "", None, ())
        session = self.name(top.get("name"), "name", "session")
        version = self.version(top.get("version"))
        predecessor = self.optional_hex(
            top.get("predecessor"), "predecessor", 64,
            "predecessor (the sha256 of the policy this one replaces)",
        )
        tolerate, ignore = self.security(top.get("security"))
        read, update = self.access_policy(top.get("access_policy"))
        services = self.services(top.get("services"), session, tolerate, cas_dns)
        return Policy(session, version, predecessor, services, tolerate, ignore, read, update)

    def version(self, node: Node | None) -> str:
        if node is None:
            return ""
        if not is_str(node):
            self.add(node, "version", f'expected the string "1" (in quotes), '
                                      f"found {describe(node)}")
            return ""
        if node.value != SUPPORTED_VERSION:
            self.add(node, "version", f"unsupported policy version {clip(str(node.value))!r}; "
                                      f'this meshshield reads version "{SUPPORTED_VERSION}"')
            return ""
        return SUPPORTED_VERSION

    def security(self, node: Node | None) -> tuple[frozenset[Tolerance], IgnoreAdvisories]:
        if node is None or is_null(node):
            return frozenset(), ()
        security = self.mapping(node, "security", ("attestation",))
        attestation = security.get("attestation") if security else None
        if attestation is None or is_null(attestation):
            return frozenset(), ()
        path = "security.attestation"
        fields = self.mapping(attestation, path, ("tolerate", "ignore_advisories"))
        if fields is None:
            return frozenset(), ()
        return (
            self.tolerate(fields.get("tolerate"), join(path, "tolerate")),
            self.ignore_advisories(
                fields.get("ignore_advisories"), join(path, "ignore_advisories")
            ),
        )

    def tolerate(self, node: Node | None, path: str) -> frozenset[Tolerance]:
        if node is None:
            return frozenset()
        choices = ", ".join(t.value for t in Tolerance)
        found: list[tuple[Node, str]] = []
        for i, item in enumerate(self.sequence(node, path, f"tolerances ({choices})",
                                               null_ok=True)):
            text = self.string(item, index(path, i), f"one of {choices}")
            if text is None:
                continue
            if text not in Tolerance.__members__.values():
                self.add(item, index(path, i), f"unknown tolerance {clip(text)!r}"
                         f"{_hint_similar(text, [t.value for t in Tolerance])}; "
                         f"expected one of {choices}")
                continue
            found.append((item, text))
        self.no_repeats(found, path, "tolerance")
        return frozenset(Tolerance(text) for _, text in found)

    def ignore_advisories(self, node: Node | None, path: str) -> IgnoreAdvisories:
        if node is None or is_null(node):
            return ()
        if is_str(node):
            if node.value == "*":
                return "*"
            self.add(node, path, f'expected a list of advisory ids or "*", found the string '
                                 f"{clip(str(node.value))!r}; write [{clip(str(node.value))}] "
                                 "for a single advisory")
            return ()
        ids: list[tuple[Node, str]] = []
        for i, item in enumerate(self.sequence(node, path, 'advisory ids, or "*"',
                                               null_ok=False)):
            text = self.string(item, index(path, i), "an advisory id such as INTEL-SA-00615")
            if text is None:
                continue
            if text == "*":
                self.add(item, index(path, i), 'to ignore every advisory write '
                                               'ignore_advisories: "*" instead of a list')
            elif not _ADVISORY.fullmatch(text):
                self.add(item, index(path, i),
                         f"expected an advisory id such as INTEL-SA-00615 (letters, digits, "
                         f". _ : -), found {clip(text)!r}")
            else:
                ids.append((item, text))
        self.no_repeats(ids, path, "advisory")
        return tuple(text for _, text in ids)

    def access_policy(self, node: Node | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if node is None or is_null(node):
            return (CREATOR,), (CREATOR,)
        fields = self.mapping(node, "access_policy", ("read", "update"))
        if fields is None:
            return (CREATOR,), (CREATOR,)
        return (
            self.admins(fields.get("read"), "access_policy.read", "read"),
            self.admins(fields.get("update"), "access_policy.update", "update"),
        )

    def admins(self, node: Node | None, path: str, right: str) -> tuple[str, ...]:
        if node is None:
            return (CREATOR,)
        what = "admin key fingerprints (64 hex digits) or CREATOR"
        items = self.sequence(node, path, what, null_ok=False)
        if isinstance(node, SequenceNode) and not items:
            self.add(node, path, f"no admin could {right} this session; list at least one "
                                 "admin key fingerprint or CREATOR")
        admins: list[tuple[Node, str]] = []
        for i, item in enumerate(items):
            text = self.string(item, index(path, i), "an admin key fingerprint or CREATOR")
            if text is None:
                continue
            if text == CREATOR:
                admins.append((item, CREATOR))
                continue
            wrong = _bad_hex(text, 64)
            if text.lower() == CREATOR.lower():
                wrong = f"found {clip(text)!r}; write CREATOR in capitals"
            elif text.lower().startswith("sha256:"):
                wrong = "found a sha256: prefix; write just the 64 hex digits"
            if wrong is not None:
                self.add(item, index(path, i),
                         "expected an admin key fingerprint (64 hex digits, as printed by "
                         f"`meshshield admin keygen`) or CREATOR, {wrong}")
                continue
            admins.append((item, text.lower()))
        self.no_repeats(admins, path, "admin")
        return tuple(text for _, text in admins)

    # -- services --------------------------------------------------------------------------

    def services(
        self,
        node: Node | None,
        session: str,
        tolerate: frozenset[Tolerance],
        cas_dns: tuple[str, ...],
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
        state = _SessionState(session, names, tolerate, cas_dns)
        services = []
        for i, item in enumerate(items):
            service = self.service(item, index("services", i), state)
            if service is not None:
                services.append(service)
        return tuple(services)

    def service(self, node: Node, path: str, state: _SessionState) -> Service | None:
        fields = self.mapping(
            node, path, ("name", "tee", "dns", "allow_from", "cert_ttl"),
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
        return Service(name, tee, dns, allow_from, ttl)

    def tee_entries(self, node: Node | None, path: str, state: _SessionState
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

    def tee_entry(self, node: Node, path: str, state: _SessionState) -> TeeEntry | None:
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
                     f"{_hint_similar(text, [p.value for p in Platform])}; "
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

    def sim_entry(self, node: Node, path: str, state: _SessionState) -> SimEntry | None:
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

    def req_hex(self, fields: _Fields, path: str, key: str, digits: int, label: str) -> str:
        node = fields.get(key)
        if node is None:
            return ""  # reported as missing by mapping()
        return self.hex(node, join(path, key), digits, label)

    def dns(self, node: Node | None, path: str, service: str, state: _SessionState
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

    def allow_from(self, node: Node | None, path: str, state: _SessionState
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
class _SessionState:
    """What checking one service needs to know about the rest of the session."""

    session: str
    names: set[str]
    tolerate: frozenset[Tolerance]
    cas_dns: tuple[str, ...]
    service_lines: dict[str, int] = field(default_factory=dict)
    dns_owners: dict[str, tuple[str, int]] = field(default_factory=dict)


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

