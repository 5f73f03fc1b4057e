"""YAML from users that PyYAML may then load: no aliases, bounded nesting.

`yaml.safe_load` expands aliases (a "billion laughs" file of a few hundred bytes becomes
gigabytes, or hangs the command) and recurses once per nesting level (a deep file ends
in RecursionError). The policy reader refuses both (meshshield/policy/document.py);
`guard_yaml` applies the same guarded composer to any YAML stream (Kubernetes
manifests, the sidecar's `--config`, `mesh.dev.yaml`) before it is loaded.
"""

from __future__ import annotations

import yaml

from meshshield.policy.document import TooDeep, new_loader, printable

MANIFEST_MAX_DEPTH = 100  # CRDs' openAPI schemas nest deeply; 100 levels is still cheap
CONFIG_MAX_DEPTH = 32


class YamlRefused(ValueError):
    """The YAML cannot be accepted; `line` (1-based) and `message` say where and why."""

    def __init__(self, line: int, message: str, *, syntax: bool = False) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message
        self.syntax = syntax  # not valid YAML (rather than a refused construct)


def guard_yaml(text: str, *, max_depth: int = CONFIG_MAX_DEPTH) -> None:
    """Raise YamlRefused if any document of `text` uses an alias, nests deeper than
    `max_depth`, or is not valid YAML."""
    loader = new_loader(text, max_depth)
    try:
        loader.take_event()  # stream start
        while not loader.at_stream_end():
            loader.compose_document()
            if loader.aliases:
                anchor, line = loader.aliases[0]
                raise YamlRefused(line, f"aliases are not allowed (found *{printable(anchor)}"
                                  "); write the value out in full")
            loader.anchored.clear()
    except TooDeep as e:
        raise YamlRefused(e.line, f"values are nested deeper than {max_depth} levels"
                          ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = str(e.problem or "syntax error")
        if "nesting depth" in problem:  # libyaml's own cap (1000) came first
            raise YamlRefused(line, f"values are nested deeper than {max_depth} levels"
                              ) from None
        raise YamlRefused(line, f"not valid YAML: {printable(problem)}", syntax=True
                          ) from None
    except yaml.YAMLError as e:
        raise YamlRefused(1, f"not valid YAML: {printable(str(e))}", syntax=True) from None
    finally:
        loader.release()
