"""Policy YAML (SPEC §3) -> `Policy`, reporting every problem with its line and path.

`parse_policy` either returns a complete, valid `Policy` or raises `PolicyInvalid`
carrying all the problems it found, each printable as `FILE:LINE: PATH: MESSAGE`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

from yaml.nodes import Node, SequenceNode

from meshshield.errors import PolicyError, Reason
from meshshield.policy.checker import bad_hex, hint_similar
from meshshield.policy.document import (
    MAX_POLICY_BYTES,
    Problem,
    clip,
    describe,
    index,
    is_null,
    is_str,
    join,
    read_document,
    structural_problems,
)
from meshshield.policy.model import (
    CREATOR,
    IgnoreAdvisories,
    Policy,
    Tolerance,
)
from meshshield.policy.secrets import SecretChecker
from meshshield.policy.services import SessionState

__all__ = ["MAX_POLICY_BYTES", "PolicyInvalid", "Problem", "parse_policy", "policy_hash"]

SUPPORTED_VERSION = "1"
_ADVISORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


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
    checker = _PolicyChecker(filename, structural_problems(doc, filename))
    policy = checker.policy(doc.root, _cas_names(cas_dns))
    if checker.problems:
        # Stable sort: problems on one line keep the order the walk found them in.
        raise PolicyInvalid(sorted(checker.problems, key=lambda p: p.line))
    return policy


def _cas_names(cas_dns: Iterable[str]) -> tuple[str, ...]:
    if isinstance(cas_dns, str):  # one name passed where a sequence of them was meant
        cas_dns = (cas_dns,)
    names = []
    for name in cas_dns:
        name = name.strip().lower().rstrip(".").removeprefix("*.")
        if name:
            names.append(name)
    return tuple(names)


class _PolicyChecker(SecretChecker):
    """The top level, security and access_policy; services come from ServiceChecker."""

    # -- the document --------------------------------------------------------------------

    def policy(self, root: Node, cas_dns: tuple[str, ...]) -> Policy:
        top = self.mapping(
            root, "",
            ("name", "version", "predecessor", "services", "security", "access_policy",
             "secrets"),
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
        # Services name secrets defined anywhere in the top-level list: read it first.
        secrets_state = SessionState(session, set(), tolerate, cas_dns)
        secrets = self.secrets(top.get("secrets"), secrets_state)
        services = self.services(top.get("services"), session, tolerate, cas_dns,
                                 secrets_state.secrets)
        return Policy(session, version, predecessor, services, tolerate, ignore, read, update,
                      secrets)

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
                         f"{hint_similar(text, [t.value for t in Tolerance])}; "
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
            wrong = bad_hex(text, 64)
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
