"""Reading policy YAML into a node tree that keeps every value's line number.

Policies come from admins over the network, so the reader is defensive: a size cap,
a nesting cap, no anchors or aliases (no "billion laughs"), no duplicate keys (PyYAML
would silently keep the last one), and nothing is ever constructed into Python objects
except the few scalars the schema asks for. Problems are collected, not raised, so an
admin sees every one of them at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event, NodeEvent, StreamEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

MAX_POLICY_BYTES = 1024 * 1024
MAX_DEPTH = 32
DOCUMENT_PATH = "(document)"

_YAML_TAG_PREFIX = "tag:yaml.org,2002:"
STR_TAG = "tag:yaml.org,2002:str"
INT_TAG = "tag:yaml.org,2002:int"
NULL_TAG = "tag:yaml.org,2002:null"
BOOL_TAG = "tag:yaml.org,2002:bool"
MERGE_TAG = "tag:yaml.org,2002:merge"

_TAG_NAMES = {
    STR_TAG: "a string",
    INT_TAG: "an integer",
    "tag:yaml.org,2002:float": "a number",
    BOOL_TAG: "a boolean",
    NULL_TAG: "null",
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:binary": "binary data",
    MERGE_TAG: "a merge key",
    "tag:yaml.org,2002:value": "a value key (=)",
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy, located by file, line and field path."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class AliasNode(ScalarNode):
    """Stands in for a `*alias` so the walk can report it with its path."""


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _GuardedComposer(Composer):
    """PyYAML's composer with aliases replaced, anchors recorded and nesting capped.

    It reads events from whichever parser it is mixed with: libyaml's when PyYAML was
    built with it (several times faster on a 1 MiB policy), else the pure-Python one.
    """

    # Where a ReaderError's position counts from: libyaml reports UTF-8 byte offsets.
    positions_in_bytes = False
    max_depth = MAX_DEPTH

    def __init__(self) -> None:
        super().__init__()
        self.anchored: dict[int, str] = {}
        self._keep: list[Node] = []  # keeps the ids in `anchored` unique while we run
        self._depth = 0
        self.aliases: list[tuple[str, int]] = []  # (anchor, line) of every *alias seen

    # PyYAML's stubs leave the event API untyped; these two pin it down once.
    def upcoming_event(self) -> Event:
        event: Event = self.peek_event()  # type: ignore[attr-defined]
        return event

    def take_event(self) -> Event:
        event: Event = self.get_event()  # type: ignore[attr-defined]
        return event

    def at_stream_end(self) -> bool:
        return bool(self.check_event(StreamEndEvent))  # type: ignore[attr-defined]

    def release(self) -> None:
        dispose = getattr(self, "dispose", None)
        if dispose is not None:
            dispose()

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise _TooDeep(_line(self.upcoming_event().start_mark))
            event = self.upcoming_event()
            if isinstance(event, AliasEvent):
                self.take_event()
                self.aliases.append((str(event.anchor), _line(event.start_mark)))
                return AliasNode(
                    "tag:meshshield:alias", str(event.anchor),
                    event.start_mark, event.end_mark,  # type: ignore[arg-type]
                )
            anchor = event.anchor if isinstance(event, NodeEvent) else None
            if isinstance(event, NodeEvent) and anchor is not None:
                # Compose it as if unanchored; the structural walk reports it with its path.
                event.anchor = None
            node = super().compose_node(parent, index)
            if anchor is not None and node is not None:
                self.anchored[id(node)] = anchor
                self._keep.append(node)
            return node
        finally:
            self._depth -= 1


class _PureLoader(Reader, Scanner, Parser, _GuardedComposer, Resolver):
    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        _GuardedComposer.__init__(self)
        Resolver.__init__(self)


_Loader: Callable[[str], _GuardedComposer] = _PureLoader
try:
    from yaml._yaml import CParser
except ImportError:  # PyYAML built without libyaml: the pure-Python parser will do
    pass
else:

    class _LibyamlLoader(CParser, _GuardedComposer, Resolver):
        positions_in_bytes = True

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            _GuardedComposer.__init__(self)
            Resolver.__init__(self)

    _Loader = _LibyamlLoader


def new_loader(text: str, max_depth: int = MAX_DEPTH) -> _GuardedComposer:
    """A guarded composer over `text` (aliases become AliasNode, nesting capped)."""
    loader = _Loader(text)
    loader.max_depth = max_depth
    return loader


TooDeep = _TooDeep  # what a loader from `new_loader` raises past its nesting cap (.line)


@dataclass(frozen=True, slots=True)
class Document:
    """The composed root node (None when the file is empty) and its anchored nodes."""

    root: Node | None
    anchored: dict[int, str]


def _line(mark: object) -> int:
    line = getattr(mark, "line", None)
    return line + 1 if isinstance(line, int) else 1


# What YAML counts as a line break, so our line numbers agree with the parser's marks.
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def line_of(node: Node) -> int:
    return _line(node.start_mark)


def read_document(data: bytes, filename: str) -> tuple[Document | None, list[Problem]]:
    """Compose one YAML document, or say why it cannot be read at all."""

    def fail(line: int, message: str) -> tuple[None, list[Problem]]:
        return None, [Problem(filename, line, DOCUMENT_PATH, message)]

    if len(data) > MAX_POLICY_BYTES:
        return fail(
            1,
            f"policy is {len(data)} bytes; the limit is {MAX_POLICY_BYTES} bytes (1 MiB). "
            "Split the session or remove unused entries",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return fail(
            data.count(b"\n", 0, e.start) + 1,
            f"policy must be UTF-8 text; found byte 0x{data[e.start]:02x} at offset {e.start}",
        )
    text = text.removeprefix("\ufeff")

    loader: _GuardedComposer | None = None
    try:
        loader = _Loader(text)
        loader.take_event()  # stream start
        root: Node | None = None
        if not loader.at_stream_end():
            root = loader.compose_document()
        if not loader.at_stream_end():
            second = loader.take_event()
            return fail(
                _line(second.start_mark),
                "found a second YAML document; a policy file holds exactly one "
                "(remove the extra --- and what follows it)",
            )
    except _TooDeep as e:
        return fail(e.line, f"values are nested deeper than {MAX_DEPTH} levels")
    except yaml.MarkedYAMLError as e:
        return fail(_syntax_error_line(e, text), f"invalid YAML: {_syntax_error(e, text)}")
    except yaml.reader.ReaderError as e:
        position = e.position if isinstance(e.position, int) else 0
        in_bytes = loader is not None and loader.positions_in_bytes
        before = text.encode()[:position].decode("utf-8", "ignore") if in_bytes else (
            text[:position]
        )
        return fail(
            len(_LINE_BREAK.findall(before)) + 1,
            f"invalid YAML: character {_char(e.character)} is not allowed ({e.reason})",
        )
    except yaml.YAMLError as e:
        return fail(1, f"invalid YAML: {printable(str(e))}")
    finally:
        if loader is not None:
            loader.release()

    if root is None or (isinstance(root, ScalarNode) and root.tag == NULL_TAG and not root.value):
        return fail(1, "the policy is empty; expected a mapping with name, version and services")
    assert loader is not None
    return Document(root, loader.anchored), []


def _syntax_error(e: yaml.MarkedYAMLError, text: str) -> str:
    detail = e.problem or "syntax error"
    if e.context:
        where = ""
        if e.context_mark is not None:
            where = f" at line {_clamp(_line(e.context_mark), text)}"
        detail = f"{detail} ({e.context}{where})"
    return printable(detail)


def _syntax_error_line(e: yaml.MarkedYAMLError, text: str) -> int:
    return _clamp(_raw_syntax_error_line(e, text), text)


def _clamp(line: int, text: str) -> int:
    # Parsers place "end of stream" on a line after the last one; point at the last one.
    lines = len(_LINE_BREAK.findall(text)) + (0 if _LINE_BREAK.search(text[-1:]) else 1)
    return max(1, min(line, lines))


def _raw_syntax_error_line(e: yaml.MarkedYAMLError, text: str) -> int:
    mark = e.problem_mark or e.context_mark
    if e.problem_mark is not None and e.context_mark is not None:
        rest = _LINE_BREAK.split(text)[e.problem_mark.line:]
        if all(not line.strip() or line.lstrip().startswith("#") for line in rest[1:]) and (
            not rest or not rest[0].strip() or rest[0].lstrip().startswith("#")
        ):
            # The parser ran into the end of the document: the fix goes where the
            # construct it was still reading (the context) was opened.
            mark = e.context_mark
    return _line(mark)


def _char(character: object) -> str:
    if isinstance(character, int):
        return f"U+{character:04X}"
    return repr(character)


def join(path: str, key: str) -> str:
    return key if not path else f"{path}.{key}"


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def shown(path: str) -> str:
    return path or DOCUMENT_PATH


def printable(text: str) -> str:
    """`text` with line breaks and other control characters escaped: one problem, one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def clip(text: str, limit: int = 40) -> str:
    """A user-supplied value made short and single-line for a message."""
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_str(node: Node) -> bool:
    return isinstance(node, ScalarNode) and not isinstance(node, AliasNode) and node.tag == STR_TAG


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and not isinstance(node, AliasNode) and node.tag == NULL_TAG


def key_text(node: Node) -> str:
    if isinstance(node, AliasNode):
        return f"*{node.value}"
    if isinstance(node, ScalarNode):
        text = str(node.value)
        shown_text = clip(text)
        if not text or shown_text != text or text != text.strip() or "." in text:
            return repr(shown_text)
        return text
    return "<" + describe(node) + ">"


def describe(node: Node) -> str:
    """What a node is, for "expected X, found Y" messages (YAML 1.1 types included)."""
    if isinstance(node, AliasNode):
        return f"an alias (*{node.value})"
    if isinstance(node, MappingNode):
        return "a mapping" + _tagged(node, "map")
    if isinstance(node, SequenceNode):
        return "a list" + _tagged(node, "seq")
    if node.tag == NULL_TAG:
        return "null"
    name = _TAG_NAMES.get(node.tag, "a value" + _tagged(node, "str"))
    return f"{name} ({clip(str(node.value))})"


def _tagged(node: Node, plain: str) -> str:
    if node.tag == _YAML_TAG_PREFIX + plain:
        return ""
    return " tagged " + node.tag.replace(_YAML_TAG_PREFIX, "!!", 1)


def integer(node: Node) -> int | None:
    """The value of an integer scalar (YAML 1.1: 0x1f, 0o17, 1_000, 1:30), else None."""
    if not isinstance(node, ScalarNode) or isinstance(node, AliasNode) or node.tag != INT_TAG:
        return None
    try:
        return SafeConstructor().construct_yaml_int(node)
    except (ValueError, TypeError, IndexError):
        return None


def structural_problems(doc: Document, filename: str) -> list[Problem]:
    """Anchors, aliases and duplicate keys anywhere in the tree, with their paths."""
    problems: list[Problem] = []

    def walk(node: Node, path: str) -> None:
        if isinstance(node, AliasNode):
            problems.append(Problem(
                filename, line_of(node), shown(path),
                f"aliases are not allowed (found *{clip(str(node.value))}); write the value "
                "out in full",
            ))
            return
        anchor = doc.anchored.get(id(node))
        if anchor is not None:
            problems.append(Problem(
                filename, line_of(node), shown(path),
                f"anchors are not allowed (found &{clip(anchor)}); write each value out in "
                "full",
            ))
        if isinstance(node, MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                child = join(path, key_text(key))
                if isinstance(key, ScalarNode) and not isinstance(key, AliasNode):
                    ident = (key.tag, str(key.value))
                    if ident in seen:
                        problems.append(Problem(
                            filename, line_of(key), child,
                            f"duplicate key {clip(str(key.value))!r} (first at line "
                            f"{seen[ident]}); keep only one",
                        ))
                    else:
                        seen[ident] = line_of(key)
                walk(key, child)
                walk(value, child)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, index(path, i))

    if doc.root is not None:
        walk(doc.root, "")
    return problems
