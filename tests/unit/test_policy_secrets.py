"""`secrets:` in the policy: the SPEC §3 example, the import/export match, properties.

The refused definitions (malformed, oversized, duplicate, unknown kind) are fixtures in
tests/fixtures/policies/invalid/secrets-*.policy.yaml, checked line by line by
test_policy_parse.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshshield.policy import (
    SECRET_SIZE_MAX,
    SECRETS_MAX,
    Policy,
    PolicyInvalid,
    Secret,
    SecretImport,
    SecretKind,
    SecretUse,
    import_problems,
    parse_policy,
)

POLICIES = Path(__file__).resolve().parent.parent / "fixtures" / "policies"
EXAMPLE = (POLICIES / "secrets.policy.yaml").read_bytes()
SIM = "355e7ae14ea478441504d436a075b23a30acf6437bced3602b0c85f9c9ca9d6f"
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def policy_text(session: str, secrets: str, uses: str = "") -> bytes:
    return (
        f'name: {session}\nversion: "1"\nservices:\n  - name: app\n    tee:\n'
        f'      - platform: sim\n        measurement: "{SIM}"\n{uses}'
        "security:\n  attestation:\n    tolerate: [simulation]\n" + secrets
    ).encode()


def problems(data: bytes) -> list[str]:
    with pytest.raises(PolicyInvalid) as e:
        parse_policy(data, "p.yaml")
    return [str(p) for p in e.value.problems]


def test_the_spec_example_parses_into_the_model() -> None:
    policy = parse_policy(EXAMPLE, "secrets.policy.yaml")
    assert [s.name for s in policy.secrets] == [
        "db-password", "tls", "api-key", "ledger-token", "salt"]
    assert policy.secret("db-password") == Secret("db-password", SecretKind.ASCII, 24)
    assert policy.secret("tls") == Secret("tls", SecretKind.X509, None, ("db.shop.svc",))
    assert policy.secret("api-key") == Secret("api-key", SecretKind.VALUE, export=("billing",))
    assert policy.secret("ledger-token") == Secret(
        "ledger-token", None, source=SecretImport("billing", "token"))
    assert policy.secret("salt") == Secret("salt", SecretKind.RANDOM, 32)  # the default size
    db, orders = policy.services
    assert db.secrets == (SecretUse("db-password", env="DB_PASSWORD"),
                          SecretUse("tls", file="/run/secrets/tls"))
    assert orders.secrets[0] == SecretUse("db-password", "PGPASSWORD", "/run/secrets/db-password")
    assert orders.secrets[0].file_name == "db-password"
    assert policy.secret("nothing") is None


def test_a_policy_without_secrets_has_none() -> None:
    policy = parse_policy(policy_text("shop", ""))
    assert policy.secrets == () and policy.services[0].secrets == ()


def test_more_than_the_limit_of_secrets_is_refused() -> None:
    entries = "".join(f"  - {{name: s{i}, kind: random}}\n" for i in range(SECRETS_MAX + 1))
    assert problems(policy_text("shop", "secrets:\n" + entries)) == [
        f"p.yaml:12: secrets: a session may define at most {SECRETS_MAX} secrets, found "
        f"{SECRETS_MAX + 1}"]
    exactly = "".join(f"  - {{name: s{i}, kind: random}}\n" for i in range(SECRETS_MAX))
    assert len(parse_policy(policy_text("shop", "secrets:\n" + exactly)).secrets) == SECRETS_MAX


def test_x509_dns_names_follow_the_service_dns_rules() -> None:
    data = policy_text("shop", "secrets:\n  - {name: tls, kind: x509, dns: [cas.mesh.example, "
                               "'10.0.0.1', Db.shop]}\n")
    with pytest.raises(PolicyInvalid) as e:
        parse_policy(data, "p.yaml", cas_dns=("cas.mesh.example",))
    messages = [p.message for p in e.value.problems]
    assert "a name the CAS itself serves" in messages[0]
    assert "IP addresses are not allowed" in messages[1]
    assert "must be lowercase" in messages[2]


# -- import / export -------------------------------------------------------------------

BILLING = policy_text("billing", "secrets:\n  - {name: token, kind: random, export: [shop]}\n"
                                 "  - {name: private, kind: random}\n"
                                 "  - {name: relayed, import: {session: other, secret: x}}\n")


def shop_importing(secret: str, session: str = "billing") -> Policy:
    return parse_policy(policy_text(
        "shop", f"secrets:\n  - {{name: mine, kind: ascii}}\n"
                f"  - {{name: theirs, import: {{session: {session}, secret: {secret}}}}}\n"))


def exporters(name: str) -> Policy | None:
    return parse_policy(BILLING) if name == "billing" else None


def test_an_import_the_exporter_allows_has_no_problem() -> None:
    assert import_problems(shop_importing("token"), "shop.yaml", exporters) == []


@pytest.mark.parametrize(("secret", "session", "message"), [
    ("private", "billing", "session 'billing' does not export 'private' to 'shop'; its "
                           "admins must add shop to that secret's export list"),
    ("missing", "billing", "session 'billing' defines no secret 'missing' of its own"),
    ("relayed", "billing", "session 'billing' defines no secret 'relayed' of its own"),
    ("token", "nowhere", "session 'nowhere' does not exist on this CAS"),
])
def test_an_import_with_no_matching_export_is_located_and_explained(
    secret: str, session: str, message: str
) -> None:
    (problem,) = import_problems(shop_importing(secret, session), "shop.yaml", exporters)
    assert str(problem).startswith(f"shop.yaml:13: secrets[1].import: {message}")


# -- properties ------------------------------------------------------------------------

NAMES = st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True)
ENVS = st.from_regex(r"[A-Z_][A-Z0-9_]{0,15}", fullmatch=True)


def quoted(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


@st.composite
def written_secrets(draw: st.DrawFn) -> tuple[bytes, list[Secret], list[SecretUse]]:
    names = draw(st.lists(NAMES, min_size=1, max_size=8, unique=True))
    defined, lines = [], ["secrets:"]
    for name in names:
        kind = draw(st.sampled_from(list(SecretKind)))
        if kind in (SecretKind.RANDOM, SecretKind.ASCII):
            size = draw(st.integers(1, SECRET_SIZE_MAX))
            lines.append(f'  - {{name: "{name}", kind: {kind}, size: {size}}}')
            defined.append(Secret(name, kind, size))
        elif kind is SecretKind.X509:
            dns = tuple(draw(st.lists(NAMES.map(lambda n: "h" + n + "h.svc"), max_size=3,
                                      unique=True)))
            lines.append(f'  - {{name: "{name}", kind: x509, dns: {quoted(dns)}}}')
            defined.append(Secret(name, kind, None, dns))
        else:
            export = tuple(draw(st.lists(NAMES.filter(lambda n: n != "shop"), max_size=3,
                                         unique=True)))
            lines.append(f'  - {{name: "{name}", kind: value, export: {quoted(export)}}}')
            defined.append(Secret(name, kind, None, (), export))
    used = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    envs = draw(st.lists(ENVS, min_size=len(used), max_size=len(used), unique=True))
    uses, use_lines = [], ["    secrets:"]
    for name, env in zip(used, envs, strict=True):
        how = draw(st.sampled_from(["env", "file", "both"]))
        use = SecretUse(name, env if how != "file" else None,
                        f"/run/secrets/f{name}" if how != "env" else None)
        parts = [f'name: "{name}"'] + ([f'env: "{use.env}"'] if use.env else []) + (
            [f'file: "{use.file}"'] if use.file else [])
        use_lines.append(f"      - {{{', '.join(parts)}}}")
        uses.append(use)
    data = policy_text("shop", "\n".join(lines) + "\n",
                       "\n".join(use_lines) + "\n" if uses else "")
    return data, defined, uses


@SETTINGS
@given(written_secrets())
def test_generated_secrets_parse_as_written(
    case: tuple[bytes, list[Secret], list[SecretUse]]
) -> None:
    data, defined, uses = case
    policy = parse_policy(data)
    assert list(policy.secrets) == defined
    assert list(policy.services[0].secrets) == uses


LINES = EXAMPLE.decode().splitlines(keepends=True)
TOKENS = ["secrets", "kind", "random", "ascii", "x509", "value", "size", "export", "import",
          "env", "file", "/run/secrets/x", "{session: billing, secret: token}", "4097", "0",
          "-1", "[shop]", "name", ": ", "- ", "{", "}", "[", "]", "\n", "  ", "null", "~"]


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "insert", "replace", "truncate"]))
        line = lines[i]
        if kind == "delete" and len(lines) > 1:
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, line)
        elif kind == "insert":
            lines.insert(i, draw(st.sampled_from(TOKENS)) + "\n")
        elif kind == "replace" and line:
            k = draw(st.integers(0, len(line) - 1))
            lines[i] = line[:k] + draw(st.sampled_from(TOKENS)) + line[k + 1:]
        elif kind == "truncate":
            lines[i] = line[: draw(st.integers(0, len(line)))]
    return "".join(lines).encode()


@SETTINGS
@given(mutated_example())
def test_mutated_secrets_parse_or_report_located_problems(data: bytes) -> None:
    try:
        policy = parse_policy(data, "m.yaml")
    except PolicyInvalid as e:
        assert e.problems
        for problem in e.problems:
            assert str(problem).startswith(f"m.yaml:{problem.line}: ")
            assert 1 <= problem.line <= data.count(b"\n") + 1
        return
    # Whatever survived is still a policy the rules allow.
    assert len(policy.secrets) <= SECRETS_MAX
    names = {s.name for s in policy.secrets}
    assert len(names) == len(policy.secrets)
    for secret in policy.secrets:
        assert (secret.kind is None) == (secret.source is not None)
        if secret.size is not None:
            assert 1 <= secret.size <= SECRET_SIZE_MAX
    for service in policy.services:
        for use in service.secrets:
            assert use.name in names and (use.env or use.file)
