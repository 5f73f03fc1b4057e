"""Checking `secrets:`: the session's secrets and the ones each service receives.

The top-level list defines what the CAS holds for the session (generated, uploaded, or
imported from another session); a service's list says which of them its app gets and
how (`env:`, `file:`). Whether an `import:` is matched by the other session's `export:`
needs that session's policy, so the CAS checks it (`import_problems`) when the policy is
applied, and again at every release.
"""

from __future__ import annotations

from collections.abc import Callable

from yaml.nodes import MappingNode, Node

from meshshield.policy.checker import hint_similar
from meshshield.policy.document import (
    Problem,
    clip,
    index,
    integer,
    is_null,
    is_str,
    join,
    line_of,
)
from meshshield.policy.model import (
    ENV_NAME_PATTERN,
    FILE_NAME_PATTERN,
    SECRET_DNS_MAX,
    SECRET_EXPORTS_MAX,
    SECRET_FILE_DIR,
    SECRET_SIZE_DEFAULT,
    SECRET_SIZE_MAX,
    SECRETS_MAX,
    Policy,
    Secret,
    SecretImport,
    SecretKind,
    SecretUse,
)
from meshshield.policy.services import ServiceChecker, SessionState, _dns_problem

_KINDS = ", ".join(k.value for k in SecretKind)


class SecretChecker(ServiceChecker):
    """Checks the top-level `secrets:` list and each service's `secrets:` list."""

    def secrets(self, node: Node | None, state: SessionState) -> tuple[Secret, ...]:
        if node is None or is_null(node):
            return ()
        items = self.sequence(node, "secrets", "secret definitions", null_ok=True)
        if len(items) > SECRETS_MAX:
            self.add(node, "secrets", f"a session may define at most {SECRETS_MAX} secrets, "
                                      f"found {len(items)}")
        out: list[Secret] = []
        first_lines: dict[str, int] = {}
        for i, item in enumerate(items[:SECRETS_MAX]):
            here = index("secrets", i)
            name_node = _name_node(item)
            if name_node is not None and is_str(name_node):
                name = str(name_node.value)
                if name in first_lines:
                    self.add(name_node, join(here, "name"),
                             f"duplicate secret name {clip(name)!r} (first defined at line "
                             f"{first_lines[name]}); secret names are unique in a session")
                    continue
                first_lines[name] = line_of(item)
            secret = self.secret(item, here, state)
            if secret is not None:
                state.secrets[secret.name] = secret
                out.append(secret)
        return tuple(out)

    def secret(self, node: Node, path: str, state: SessionState) -> Secret | None:
        fields = self.mapping(
            node, path, ("name", "kind", "size", "dns", "export", "import"),
            {"name": "the secret's name, e.g. name: db-password"},
            where="in a secret",
        )
        if fields is None:
            return None
        name = self.name(fields.get("name"), join(path, "name"), "secret")
        kind_node, import_node = fields.get("kind"), fields.get("import")
        if kind_node is not None and import_node is not None:
            self.add(import_node, join(path, "import"),
                     "a secret is either defined here (kind) or imported from another "
                     "session (import), not both; remove one")
            return None
        if kind_node is None and import_node is None:
            self.add(node, join(path, "kind"),
                     f"missing required key: kind ({_KINDS}), or import: {{session, secret}} "
                     "for a secret another session exports")
            return None
        if not name:
            return None
        line = line_of(node)
        if import_node is not None:
            for key in ("size", "dns", "export"):
                extra = fields.get(key)
                if extra is not None:
                    self.add(extra, join(path, key),
                             f"{key} is set by the exporting session's policy, not on an "
                             "import; remove it")
            source = self.secret_import(import_node, join(path, "import"), state)
            return None if source is None else Secret(name, None, source=source, line=line)
        assert kind_node is not None
        text = self.string(kind_node, join(path, "kind"), f"one of {_KINDS}")
        if text is None:
            return None
        if text not in SecretKind.__members__.values():
            self.add(kind_node, join(path, "kind"),
                     f"unknown secret kind {clip(text)!r}"
                     f"{hint_similar(text, [k.value for k in SecretKind])}; "
                     f"expected one of {_KINDS}")
            return None
        kind = SecretKind(text)
        size = self.secret_size(fields.get("size"), join(path, "size"), kind)
        dns = self.secret_dns(fields.get("dns"), join(path, "dns"), kind, state)
        export = self.secret_export(fields.get("export"), join(path, "export"), state)
        return Secret(name, kind, size, dns, export, None, line)

    def secret_size(self, node: Node | None, path: str, kind: SecretKind) -> int | None:
        if kind not in (SecretKind.RANDOM, SecretKind.ASCII):
            if node is not None:
                self.add(node, path, f"size applies to kinds random and ascii only; a {kind} "
                                     "secret has no size: remove it")
            return None
        unit = "bytes" if kind is SecretKind.RANDOM else "characters"
        if node is None or is_null(node):
            return SECRET_SIZE_DEFAULT
        value = integer(node)
        if value is None or not 1 <= value <= SECRET_SIZE_MAX:
            found = str(value) if value is not None else clip(str(getattr(node, "value", "")))
            self.add(node, path, f"expected the number of {unit}, an integer from 1 to "
                                 f"{SECRET_SIZE_MAX}, found {found}")
            return SECRET_SIZE_DEFAULT
        return value

    def secret_dns(self, node: Node | None, path: str, kind: SecretKind, state: SessionState
                   ) -> tuple[str, ...]:
        if node is None:
            return ()
        if kind is not SecretKind.X509:
            self.add(node, path, f"dns applies to kind x509 only; a {kind} secret has no "
                                 "certificate: remove it")
            return ()
        items = self.sequence(node, path, "DNS names", null_ok=True)
        if len(items) > SECRET_DNS_MAX:
            self.add(node, path, f"at most {SECRET_DNS_MAX} DNS names, found {len(items)}")
        names: list[tuple[Node, str]] = []
        for i, item in enumerate(items[:SECRET_DNS_MAX]):
            text = self.string(item, index(path, i), "a DNS name")
            if text is None:
                continue
            wrong = _dns_problem(text, state.cas_dns)
            if wrong is not None:
                self.add(item, index(path, i), wrong)
                continue
            names.append((item, text))
        self.no_repeats(names, path, "dns name")
        return tuple(dict.fromkeys(text for _, text in names))

    def secret_export(self, node: Node | None, path: str, state: SessionState
                      ) -> tuple[str, ...]:
        if node is None:
            return ()
        items = self.sequence(node, path, "session names", null_ok=True)
        if len(items) > SECRET_EXPORTS_MAX:
            self.add(node, path, f"at most {SECRET_EXPORTS_MAX} sessions, found {len(items)}")
        sessions: list[tuple[Node, str]] = []
        for i, item in enumerate(items[:SECRET_EXPORTS_MAX]):
            name = self.name(item, index(path, i), "session")
            if not name:
                continue
            if name == state.session:
                self.add(item, index(path, i), "a session does not export to itself; its "
                                               "own services use the secret directly")
                continue
            sessions.append((item, name))
        self.no_repeats(sessions, path, "session")
        return tuple(name for _, name in sessions)

    def secret_import(self, node: Node, path: str, state: SessionState) -> SecretImport | None:
        fields = self.mapping(
            node, path, ("session", "secret"),
            {"session": "the exporting session's name", "secret": "the secret's name there"},
            where="in an import",
        )
        if fields is None:
            return None
        session = self.name(fields.get("session"), join(path, "session"), "session")
        secret = self.name(fields.get("secret"), join(path, "secret"), "secret")
        if session and session == state.session:
            session_node = fields.get("session")
            assert session_node is not None
            self.add(session_node, join(path, "session"),
                     "a session does not import from itself; name the secret directly")
            return None
        if not session or not secret:
            return None
        return SecretImport(session, secret)

    # -- a service's secrets -------------------------------------------------------------

    def service_secrets(self, node: Node | None, path: str, state: SessionState
                        ) -> tuple[SecretUse, ...]:
        if node is None or is_null(node):
            return ()
        items = self.sequence(node, path, "secrets this service receives", null_ok=True)
        if len(items) > SECRETS_MAX:
            self.add(node, path, f"a service may receive at most {SECRETS_MAX} secrets, "
                                 f"found {len(items)}")
        uses: list[SecretUse] = []
        seen: dict[str, dict[str, int]] = {"secret": {}, "environment variable": {}, "file": {}}
        for i, item in enumerate(items[:SECRETS_MAX]):
            here = index(path, i)
            use = self.secret_use(item, here, state)
            if use is None:
                continue
            repeated = False
            for what, key, value in (("secret", "name", use.name),
                                     ("environment variable", "env", use.env),
                                     ("file", "file", use.file)):
                if value is None:
                    continue
                first = seen[what].get(value)
                if first is not None:
                    self.add(item, join(here, key), f"duplicate {what} {clip(value)!r} (also "
                                                    f"at line {first}); list it once")
                    repeated = True
                else:
                    seen[what][value] = line_of(item)
            if not repeated:
                uses.append(use)
        return tuple(uses)

    def secret_use(self, node: Node, path: str, state: SessionState) -> SecretUse | None:
        fields = self.mapping(node, path, ("name", "env", "file"),
                              {"name": "which secret (a name from the top-level secrets)"},
                              where="in a service's secret")
        if fields is None:
            return None
        name_node = fields.get("name")
        name = self.name(name_node, join(path, "name"), "secret")
        if name and name_node is not None:
            if name not in state.secrets:
                known = ", ".join(sorted(state.secrets)) or "none"
                self.add(name_node, join(path, "name"),
                         f"the session defines no secret {name!r}"
                         f"{hint_similar(name, state.secrets)} (its secrets: {known}); "
                         "define it in the top-level secrets list")
                name = ""
        env = self.shaped(fields.get("env"), join(path, "env"), "an environment variable "
                          "name (letters, digits and _, not starting with a digit, at most "
                          "128)", ENV_NAME_PATTERN.fullmatch)
        file = self.shaped(fields.get("file"), join(path, "file"),
                           f"a file in {SECRET_FILE_DIR}, e.g. {SECRET_FILE_DIR}/db-password "
                           "(a name of letters, digits, . _ and -, at most 128, no "
                           "subfolders)", _secret_file_ok)
        if fields.get("env") is None and fields.get("file") is None:
            self.add(node, join(path, "env"), "say how the app gets the secret: env: NAME, "
                                              f"file: {SECRET_FILE_DIR}/NAME, or both")
        if not name or (env is None and file is None):
            return None
        return SecretUse(name, env, file)

    def shaped(self, node: Node | None, path: str, what: str, ok: Callable[[str], object]
               ) -> str | None:
        if node is None:
            return None
        text = self.string(node, path, what)
        if text is None:
            return None
        if not ok(text):
            self.add(node, path, f"expected {what}, found {clip(text)!r}")
            return None
        return text


def _name_node(node: Node) -> Node | None:
    if not isinstance(node, MappingNode):
        return None
    return next((v for k, v in node.value if is_str(k) and k.value == "name"), None)


def _secret_file_ok(text: str) -> bool:
    folder, slash, name = text.rpartition("/")
    return bool(slash) and folder == SECRET_FILE_DIR and bool(FILE_NAME_PATTERN.fullmatch(name))


def import_problems(
    policy: Policy, filename: str, exporter: Callable[[str], Policy | None]
) -> list[Problem]:
    """Each import of `policy` that its exporting session does not allow, with the reason.

    `exporter(session)` is that session's current policy, or None if it has none."""
    problems = []
    for i, secret in enumerate(policy.secrets):
        source = secret.source
        if source is None:
            continue
        path = join(index("secrets", i), "import")  # a valid policy: model order is text order
        other = exporter(source.session)
        message = None
        if other is None:
            message = (f"session {source.session!r} does not exist on this CAS; apply its "
                       "policy (with the export) first")
        else:
            defined = other.secret(source.secret)
            if defined is None or defined.source is not None:
                message = (f"session {source.session!r} defines no secret {source.secret!r} "
                           "of its own to export")
            elif policy.name not in defined.export:
                message = (f"session {source.session!r} does not export {source.secret!r} to "
                           f"{policy.name!r}; its admins must add {policy.name} to that "
                           "secret's export list")
        if message is not None:
            problems.append(Problem(filename, secret.line or 1, path, message))
    return problems
