"""The `mesh.dev.yaml` format of `meshshield dev up`.

```yaml
session: shop                 # optional (default: dev); [a-z0-9-]{1,63}
services:
  - name: backend             # [a-z0-9-]{1,63}
    workload: backend/        # file(s)/folder(s) measured for sim attestation, relative
                              #   to this file; a string or a list
    command: [python3, backend/app.py]   # optional: started for you (list or string)
    port: 8080                # optional: where the app listens on 127.0.0.1 (plaintext);
                              #   needed if another service calls this one
    mesh_port: 15006          # optional: its sidecar's mutual-TLS port (default: free port)
  - name: frontend
    workload: frontend/
    command: python3 frontend/app.py
    calls:                    # services this one calls, and the local port on which its
      backend: 15001          #   app reaches each (null: a free port)
```

Each command runs in this file's folder with `MESHSHIELD_PORT` (its own `port`) and
`MESHSHIELD_CALL_<SERVICE>` = `127.0.0.1:<port>` for each service it calls (upper case,
`-` as `_`). Every problem is reported at once as `FILE:LINE: PATH: MESSAGE`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from meshshield.inputs import InputFileError, read_bounded_text
from meshshield.safeyaml import YamlRefused, guard_yaml

MAX_DEV_FILE_BYTES = 1 << 20
NAME = re.compile(r"^[a-z0-9-]{1,63}$")
TOP_KEYS = ("session", "services")
SERVICE_KEYS = ("name", "workload", "command", "port", "mesh_port", "calls")


class DevFileInvalid(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class DevService:
    name: str
    workload: list[Path]
    command: list[str] | None = None
    port: int | None = None
    mesh_port: int | None = None
    calls: dict[str, int | None] = field(default_factory=dict)

    def env_name(self) -> str:
        return "MESHSHIELD_CALL_" + self.name.upper().replace("-", "_")


@dataclass
class DevFile:
    path: Path
    session: str
    services: list[DevService]


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def bad(self, node: yaml.Node | None, where: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(f"{self.path}:{line}: {where}: {message}")

    def mapping(self, node: yaml.Node, where: str, allowed: tuple[str, ...]
                ) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.bad(node, where, f"expected a mapping, found {_kind(node)}")
            return None
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            key = str(k.value)
            if key not in allowed:
                self.bad(k, f"{where}.{key}" if where != "(document)" else key,
                         f"unknown key {key!r}; allowed: {', '.join(allowed)}")
            elif key in out:
                self.bad(k, key, "duplicate key")
            else:
                out[key] = v
        return out

    def port(self, node: yaml.Node, where: str, nullable: bool = False) -> int | None:
        if nullable and isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":int"):
            p = int(node.value)
            if 1 <= p <= 65535:
                return p
        self.bad(node, where, f"expected a port number 1-65535, found {_show(node)}")
        return None


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}"


def _show(node: yaml.Node) -> str:
    return _kind(node)


def _strings(c: _Checker, node: yaml.Node, where: str) -> list[str]:
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":str"):
        return [node.value]
    if isinstance(node, yaml.SequenceNode) and node.value and all(
        isinstance(x, yaml.ScalarNode) for x in node.value
    ):
        return [str(x.value) for x in node.value]
    c.bad(node, where, f"expected a string or a non-empty list of strings, found {_show(node)}")
    return []


def parse_dev_file(path: Path, text: str | None = None) -> DevFile:
    """Parse `text` (read from `path`, bounded, when not given)."""
    c = _Checker(path)
    if text is None:
        try:
            text = read_bounded_text(path, what="dev file", limit=MAX_DEV_FILE_BYTES)
        except (OSError, InputFileError) as e:
            raise DevFileInvalid([f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"]
                                 ) from None
    try:
        guard_yaml(text)
    except YamlRefused as e:
        if not e.syntax:
            raise DevFileInvalid([f"{path}:{e.line}: (document): {e.message}"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise DevFileInvalid([f"{path}:{line}: (document): not valid YAML: "
                              f"{getattr(e, 'problem', e)}"]) from None
    if root is None:
        raise DevFileInvalid([f"{path}:1: (document): the file is empty; see examples/"])
    top = c.mapping(root, "(document)", TOP_KEYS) or {}
    session = "dev"
    if "session" in top:
        node = top["session"]
        if isinstance(node, yaml.ScalarNode) and NAME.match(str(node.value)):
            session = str(node.value)
        else:
            c.bad(node, "session", f"expected 1-63 of a-z, 0-9 and -, found {_show(node)}")
    services: list[DevService] = []
    snode = top.get("services")
    if snode is None:
        c.bad(root, "services", "missing: list the services to run")
    elif not isinstance(snode, yaml.SequenceNode) or not snode.value:
        c.bad(snode, "services", f"expected a non-empty list, found {_show(snode)}")
    else:
        for i, item in enumerate(snode.value):
            svc = _service(c, item, f"services[{i}]", path.parent)
            if svc is not None:
                services.append(svc)
    _cross_check(c, snode, services)
    if c.problems:
        raise DevFileInvalid(c.problems)
    return DevFile(path, session, services)


def _service(c: _Checker, node: yaml.Node, where: str, base: Path) -> DevService | None:
    m = c.mapping(node, where, SERVICE_KEYS)
    if m is None:
        return None
    name = ""
    if "name" not in m:
        c.bad(node, f"{where}.name", "missing")
    elif not NAME.match(str(getattr(m["name"], "value", ""))):
        c.bad(m["name"], f"{where}.name", f"expected 1-63 of a-z, 0-9 and -, found "
              f"{_show(m['name'])}")
    else:
        name = str(m["name"].value)
    workload: list[Path] = []
    if "workload" not in m:
        c.bad(node, f"{where}.workload", "missing: the files measured for attestation")
    else:
        for w in _strings(c, m["workload"], f"{where}.workload"):
            p = (base / w).resolve()
            if not p.exists():
                c.bad(m["workload"], f"{where}.workload", f"{w!r} does not exist (looked "
                      f"for {p})")
            workload.append(p)
    command = None
    if "command" in m:
        cn = m["command"]
        if isinstance(cn, yaml.ScalarNode) and cn.tag.endswith(":str"):
            try:
                command = shlex.split(cn.value)
            except ValueError as e:
                c.bad(cn, f"{where}.command", f"cannot split into words: {e}")
        else:
            command = _strings(c, cn, f"{where}.command") or None
    port = c.port(m["port"], f"{where}.port") if "port" in m else None
    mesh_port = c.port(m["mesh_port"], f"{where}.mesh_port") if "mesh_port" in m else None
    calls: dict[str, int | None] = {}
    if "calls" in m:
        cm = m["calls"]
        if not isinstance(cm, yaml.MappingNode):
            c.bad(cm, f"{where}.calls", f"expected a mapping of service: port, found {_show(cm)}")
        else:
            for k, v in cm.value:
                calls[str(k.value)] = c.port(v, f"{where}.calls.{k.value}", nullable=True)
    return DevService(name, workload, command, port, mesh_port, calls)


def _cross_check(c: _Checker, snode: yaml.Node | None, services: list[DevService]) -> None:
    if not isinstance(snode, yaml.SequenceNode):
        return
    by_name = {s.name: s for s in services}
    seen: set[str] = set()
    for i, (s, node) in enumerate(zip(services, snode.value, strict=False)):
        if s.name in seen:
            c.bad(node, f"services[{i}].name", f"service {s.name!r} is listed twice")
        seen.add(s.name)
        if s.port is None and not s.calls:
            c.bad(node, f"services[{i}]", f"service {s.name!r} neither listens (`port`) nor "
                  "calls another service (`calls`), so its sidecar would carry nothing; "
                  "give it one of them")
        for target in s.calls:
            t = by_name.get(target)
            if t is None:
                c.bad(node, f"services[{i}].calls.{target}",
                      f"no service named {target!r} in this file")
            elif t.port is None:
                c.bad(node, f"services[{i}].calls.{target}",
                      f"{target!r} has no `port`, so nothing listens for its calls")
    ports: dict[int, str] = {}
    for s in services:
        for what, p in (("port", s.port), ("mesh_port", s.mesh_port),
                        *((f"calls.{k}", v) for k, v in s.calls.items())):
            if p is None:
                continue
            if p in ports:
                c.bad(snode, "services", f"port {p} is used twice ({ports[p]} and "
                      f"{s.name}.{what})")
            ports[p] = f"{s.name}.{what}"
