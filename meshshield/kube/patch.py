"""RFC 6902 JSON Patch between two JSON documents, as admission webhooks answer.

Mappings are diffed key by key; a list that changed is replaced whole (containers,
volumes, env), which keeps the patch short and unambiguous.
"""

from __future__ import annotations

import copy
from typing import Any

JsonPatch = list[dict[str, Any]]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python but not in JSON.
    return type(a) is type(b) and a == b


def json_patch(old: Any, new: Any, path: str = "") -> JsonPatch:
    """Operations that turn `old` into `new`."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: JsonPatch = []
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in new.items():
            child = f"{path}/{_escape(key)}"
            if key not in old:
                ops.append({"op": "add", "path": child, "value": copy.deepcopy(value)})
            else:
                ops.extend(json_patch(old[key], value, child))
        return ops
    if _same(old, new) and not isinstance(old, list):
        return []
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        if all(_same_deep(a, b) for a, b in zip(old, new, strict=True)):
            return []
    return [{"op": "replace", "path": path, "value": copy.deepcopy(new)}]


def _same_deep(a: Any, b: Any) -> bool:
    return not json_patch(a, b)


def apply_patch(doc: Any, patch: JsonPatch) -> Any:
    """Apply add / remove / replace operations (what `json_patch` emits) to a copy."""
    result = copy.deepcopy(doc)
    for op in patch:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        if not parts:
            if op["op"] == "remove":
                raise ValueError("cannot remove the document root")
            result = copy.deepcopy(op["value"])
            continue
        parent = result
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "remove":
                del parent[index]
            elif op["op"] == "replace":
                parent[index] = copy.deepcopy(op["value"])
            else:
                raise ValueError(f"unsupported op {op['op']!r}")
        else:
            if op["op"] in ("add", "replace"):
                if op["op"] == "replace" and last not in parent:
                    raise KeyError(op["path"])
                parent[last] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del parent[last]
            else:
                raise ValueError(f"unsupported op {op['op']!r}")
    return result
