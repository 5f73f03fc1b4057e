"""`--expect` files: what a client requires the CAS itself to run.

The file is the policy language's `tee:` list and `security.attestation` section,
nothing else, and it is read by the same node-by-node machinery as a policy, so its
problems are reported as `FILE:LINE: PATH: MESSAGE`, unknown keys are errors, and a
`sim` entry needs `tolerate: [simulation]`:

    tee:
      - platform: sim
        measurement: "<64 hex>"        # `meshshield measure` of the CAS's files
    security:
      attestation:
        tolerate: [simulation]
"""

from __future__ import annotations

from dataclasses import dataclass

from yaml.nodes import Node

from meshshield.policy.document import Problem, is_null, read_document, structural_problems
from meshshield.policy.model import IgnoreAdvisories, TeeEntry, Tolerance
from meshshield.policy.parse import PolicyInvalid, _PolicyChecker
from meshshield.policy.services import SessionState

__all__ = ["MAX_EXPECT_BYTES", "CasExpectation", "parse_expect"]

MAX_EXPECT_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class CasExpectation:
    """What the CAS may run (any one of `tee`) and the weaknesses tolerated in it."""

    tee: tuple[TeeEntry, ...]
    tolerate: frozenset[Tolerance] = frozenset()
    ignore_advisories: IgnoreAdvisories = ()
    source: str = "<expect>"


class _ExpectChecker(_PolicyChecker):
    def expectation(self, root: Node, source: str) -> CasExpectation:
        top = self.mapping(
            root, "", ("tee", "security"),
            {"tee": "the list of TEE configurations the CAS may run in, as a service's "
                    "tee list in a policy"},
            where="at the top level of an expect file",
        )
        if top is None:
            return CasExpectation((), source=source)
        tolerate, ignore = self.security(top.get("security"))
        state = SessionState("", set(), tolerate, ())
        tee_node = top.get("tee")
        tee = () if tee_node is None or is_null(tee_node) else self.tee_entries(
            tee_node, "tee", state)
        if tee_node is not None and is_null(tee_node):
            self.add(tee_node, "tee", "list at least one TEE configuration (platform "
                                      "sev-snp, tdx, sgx or sim) the CAS may run in")
        return CasExpectation(tee, tolerate, ignore, source)


def parse_expect(data: bytes, filename: str = "<expect>") -> CasExpectation:
    """Parse an expect file, or raise PolicyInvalid with every problem found."""
    if len(data) > MAX_EXPECT_BYTES:
        raise PolicyInvalid([Problem(
            filename, 1, "(document)",
            f"expect file is {len(data)} bytes; the limit is {MAX_EXPECT_BYTES} bytes "
            "(it holds a tee list and security.attestation only)")])
    doc, problems = read_document(data, filename)
    if doc is None or doc.root is None:
        raise PolicyInvalid([
            Problem(p.file, p.line, p.path, p.message.replace("the policy is empty; expected "
                    "a mapping with name, version and services", "the expect file is "
                    "empty; expected a mapping with tee and security"))
            for p in problems])
    checker = _ExpectChecker(filename, structural_problems(doc, filename))
    expectation = checker.expectation(doc.root, filename)
    if checker.problems:
        raise PolicyInvalid(sorted(checker.problems, key=lambda p: p.line))
    return expectation
