"""The shapes every policy field is checked against, and how problems are recorded.

`Checker` walks composed YAML nodes. Each method checks one shape (a mapping with known
keys, a list, a string, hex digits, a bounded integer, a name), records a `Problem`
with the node's line and the field's path when the shape is wrong, and returns a
usable stand-in, so that one walk finds every problem in the document.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from yaml.nodes import MappingNode, Node, SequenceNode

from meshshield.policy.document import (
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
    shown,
)
from meshshield.policy.model import NAME_PATTERN

_HEX = frozenset("0123456789abcdefABCDEF")
NAME_RULE = "1-63 characters of a-z, 0-9 and -"


def hint_similar(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _quote_hint(node: Node) -> str:
    return "; put it in quotes" if not isinstance(node, MappingNode | SequenceNode) else ""


def bad_hex(text: str, digits: int) -> str | None:
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
class Fields:
    """The known keys of a mapping that passed its key checks, value nodes by key."""

    node: MappingNode
    values: dict[str, Node] = field(default_factory=dict)

    def get(self, key: str) -> Node | None:
        return self.values.get(key)


@dataclass
class Checker:
    """Records problems for one document; its methods check one shape each."""

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
    ) -> Fields | None:
        """Check a mapping's keys: strings, known, required ones present.

        `required` maps each required key to a hint for the "missing" message.
        """
        if not isinstance(node, MappingNode):
            self.expected(node, path, f"a mapping with keys {', '.join(allowed)}")
            return None
        fields = Fields(node)
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
                self.add(key, child, f"unknown key {name!r}{hint_similar(name, allowed)}; "
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
        wrong = bad_hex(text, digits)
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
        text = self.string(node, path, f"a {what} name ({NAME_RULE})", quote_hint=True)
        if text is None:
            return ""
        if not NAME_PATTERN.fullmatch(text):
            hint = ""
            if NAME_PATTERN.fullmatch(text.lower()):
                hint = f"; write {text.lower()!r}"
            self.add(node, path, f"expected a {what} name of {NAME_RULE}, "
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

    def req_hex(self, fields: Fields, path: str, key: str, digits: int, label: str) -> str:
        node = fields.get(key)
        if node is None:
            return ""  # reported as missing by mapping()
        return self.hex(node, join(path, key), digits, label)
