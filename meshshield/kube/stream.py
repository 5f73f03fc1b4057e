"""`meshshield inject -f`: the injector over a multi-document YAML stream.

Documents the injector does not change (Services, ConfigMaps, unannotated workloads,
already injected ones) are copied through byte for byte, comments included. A document
it changes is re-emitted from its parsed form: its leading comments and `---` line are
kept, comments inside it are not, key order is. The stream is split on `---` lines at
column 0 (YAML's document marker); if that split ever disagrees with the YAML parser
(directives, unusual markers), every document is re-emitted instead, still semantically
equal.
"""

from __future__ import annotations

from typing import Any

import yaml

from meshshield.kube.annotations import InjectError
from meshshield.kube.config import DEFAULT_CONFIG, InjectConfig
from meshshield.kube.inject import describe, inject_document
from meshshield.kube.patch import json_patch
from meshshield.safeyaml import MANIFEST_MAX_DEPTH, YamlRefused, guard_yaml

_MAX_WIDTH = 1 << 30  # never fold long strings (commands, JSON annotations)


def inject_stream(text: str, config: InjectConfig = DEFAULT_CONFIG) -> str:
    """Inject into every workload of a YAML stream; return the whole stream.

    Aliases are refused and nesting is capped before PyYAML loads anything (a
    "billion laughs" manifest would otherwise expand without bound)."""
    try:
        guard_yaml(text, max_depth=MANIFEST_MAX_DEPTH)
    except YamlRefused as err:
        if not err.syntax:  # syntax errors: the loader below words them as it always has
            raise InjectError(str(err)) from None
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise InjectError(f"invalid YAML: {_yaml_problem(err)}") from None
    chunks = _split_documents(text)
    parsed = _parse_chunks(chunks)
    if parsed is None or [d for d in parsed if d is not None] != [
        d for d in documents if d is not None
    ]:
        return _reemit_all(documents, config)
    out = []
    index = 0
    for (start_line, chunk), doc in zip(chunks, parsed, strict=True):
        if doc is None:
            out.append(chunk)
            continue
        index += 1
        new = _inject(doc, config, index, _content_line(start_line, chunk))
        out.append(chunk if not json_patch(doc, new) else _rewrite(chunk, new))
    return "".join(out)


def _inject(doc: Any, config: InjectConfig, index: int, line: int) -> Any:
    try:
        return inject_document(doc, config)
    except InjectError as err:
        where = f"document {index}" + (f" (line {line})" if line else "")
        if isinstance(doc, dict) and "kind" in doc and doc.get("kind") != "List":
            where += f", {describe(doc)}"
        # inject_document already names the object; avoid saying it twice.
        message = err.message
        if isinstance(doc, dict) and message.startswith(describe(doc) + ": "):
            message = message[len(describe(doc)) + 2:]
        raise InjectError(f"{where}: {message}") from None


def _content_line(start: int, chunk: str) -> int:
    """Line number of the document's first line of content (after `---` and comments)."""
    for offset, line in enumerate(chunk.splitlines()):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not _is_marker(line, "---"):
            return start + offset
    return start


def _is_marker(line: str, marker: str) -> bool:
    return line.startswith(marker) and (len(line) == 3 or line[3] in " \t\r\n")


def _split_documents(text: str) -> list[tuple[int, str]]:
    """(first line number, raw text) of each document, split before each `---` line."""
    chunks: list[tuple[int, str]] = []
    current: list[str] = []
    start = 1
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if _is_marker(line, "---") and current:
            chunks.append((start, "".join(current)))
            current, start = [], number
        current.append(line)
    if current:
        chunks.append((start, "".join(current)))
    return chunks


def _parse_chunks(chunks: list[tuple[int, str]]) -> list[Any] | None:
    parsed = []
    for _, chunk in chunks:
        try:
            docs = list(yaml.safe_load_all(chunk))
        except yaml.YAMLError:
            return None
        if len(docs) > 1:
            return None
        parsed.append(docs[0] if docs else None)
    return parsed


def _dump(doc: Any) -> str:
    return yaml.safe_dump(
        doc, sort_keys=False, default_flow_style=False, allow_unicode=True, width=_MAX_WIDTH
    )


def _rewrite(chunk: str, doc: Any) -> str:
    lines = chunk.splitlines(keepends=True)
    head: list[str] = []
    if lines and _is_marker(lines[0], "---"):
        rest = lines[0][3:].strip()
        head.append(lines[0] if not rest or rest.startswith("#") else "---\n")
        if not head[0].endswith("\n"):
            head[0] += "\n"
        lines = lines[1:]
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        head.append(line if line.endswith("\n") else line + "\n")
    return "".join(head) + _dump(doc)


def _reemit_all(documents: list[Any], config: InjectConfig) -> str:
    out = []
    index = 0
    for doc in documents:
        if doc is None:
            continue
        index += 1
        out.append(_dump(_inject(doc, config, index, 0)))
    return "---\n".join(out)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(problem)
