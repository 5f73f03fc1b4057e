"""Policy YAML -> model: the SPEC §3 example, and every way a policy can be wrong.

Each file in tests/fixtures/policies/invalid/ ends with `# expect: LINE: PATH: MESSAGE`
comments naming, in order, every problem the parser must report for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from pathlib import Path

import pytest

from meshshield.errors import PolicyError, Reason
from meshshield.policy import (
    CREATOR,
    MAX_POLICY_BYTES,
    PeerRef,
    Policy,
    PolicyInvalid,
    Problem,
    Service,
    SevSnpEntry,
    SgxEntry,
    SimEntry,
    SnpTcb,
    TdxEntry,
    Tolerance,
    document,
    parse_policy,
    policy_hash,
)

POLICIES = Path(__file__).resolve().parent.parent / "fixtures" / "policies"
SHOP = POLICIES / "shop.policy.yaml"
INVALID = sorted((POLICIES / "invalid").glob("*.policy.yaml"))
CAS_DNS = ("cas.mesh.example",)

SNP_M = (
    "774c52afa8c5c267191c4816b2377ea488b58c7bfa1748f3"
    "252614c9af4f9377abe2544b65d22fd900bfa609ed177d61"
)
SNP_H = "7fbf1c6c7307e245caf686d18cd4ccd81ed8761dd95a975b6543f9dea2c1d511"
FRONT_M = (
    "df889b4e84083c37509805ec5bc0244372025c861bdd4549"
    "9d267f6cba160cae87ed67c0acf065a0e5950fe50045eab2"
)
FRONT_H = "7599a7c4673818f76dc531f95852d539b252caa613f1b9bb85bcd30086a33e90"
TDX_MRTD = (
    "65c69c481b771f015388a8d1a6d2a7ab4fe503517b1673d1"
    "7f652dc2628ab36699467ea94c04253075aea045af555297"
)
TDX_CFG = (
    "161e8a02dacef90b867741f9b142a7256b6bec2147d5821d"
    "3ec176868f710596b5a6c4a18cbdc177802d5245113203a0"
)
TDX_RTMR0 = (
    "77e19b2d6eb57c919f69e23712f290280c66efc111b55c5f"
    "54c20f31a974e1e2a04c46b7a10c72a43084159f7f67e5e7"
)
SGX_E = "9cfb94db522b5993f480c8f54dc256b222b30e6073af759f501043386035c419"
SGX_S = "1cd63787416bfb6aecf38eee37941cc2d8ffb9b7b46f652d5bef59e48016663a"
SIM_BACKEND = "355e7ae14ea478441504d436a075b23a30acf6437bced3602b0c85f9c9ca9d6f"
SIM_FRONTEND = "491efcf333d15621ecd4a53b6ac90899a5d34f15b1e9325c30597367b1a78d2a"
BOB = "45cd6d33f51ebfaa5c25972449cedffc823073e220de91ff26cabff583793bca"
ALICE = "2220b222ee717c2410efd3ca6e85421a2b2b5da46c73d23a5d5f62704a65daf0"

MINIMAL = f"""\
name: shop
version: "1"
services:
  - name: backend
    tee:
      - platform: sev-snp
        measurement: "{SNP_M}"
        host_data: "{SNP_H}"
"""


# PyYAML reads events with libyaml when it was built with it, else in pure Python; line
# numbers and paths must not depend on which one a machine has.
PARSERS = ["default", "pure-python"]


@pytest.fixture(params=PARSERS)
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pure-python":
        monkeypatch.setattr(document, "_Loader", document._PureLoader)
    return str(request.param)


def problems_of(text: str | bytes, filename: str = "p.yaml", **kwargs: object
                ) -> tuple[Problem, ...]:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(PolicyInvalid) as info:
        parse_policy(data, filename, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def located(problems: tuple[Problem, ...]) -> list[tuple[int, str]]:
    return [(p.line, p.path) for p in problems]


# -- the valid example -------------------------------------------------------------------


def test_shop_example_parses_into_the_expected_model(parser: str) -> None:
    policy = parse_policy(SHOP.read_bytes(), SHOP.name, cas_dns=CAS_DNS)
    assert policy == Policy(
        name="shop",
        version="1",
        predecessor=None,
        services=(
            Service(
                name="backend",
                tee=(
                    SevSnpEntry(SNP_M, SNP_H, SnpTcb(bootloader=3, tee=0, snp=8, microcode=115)),
                    TdxEntry(TDX_MRTD, TDX_CFG, (TDX_RTMR0, None, None, None)),
                    SgxEntry(mrenclave=SGX_E, mrsigner=SGX_S, product_id=0, min_svn=0),
                    SimEntry(SIM_BACKEND),
                ),
                dns=("backend", "backend.shop.svc.cluster.local"),
                allow_from=(PeerRef(None, "frontend"),),
                cert_ttl_seconds=3600,
            ),
            Service(
                name="frontend",
                # The fixture writes this measurement in capitals: stored lowercase.
                tee=(SevSnpEntry(FRONT_M, FRONT_H), SimEntry(SIM_FRONTEND)),
                dns=("frontend.shop.svc.cluster.local",),
                allow_from=(PeerRef(None, None), PeerRef("edge", "gateway")),
                cert_ttl_seconds=1800,
            ),
        ),
        tolerate=frozenset({Tolerance.SIMULATION}),
        ignore_advisories=(),
        access_read=(CREATOR, BOB),
        access_update=(CREATOR,),
    )
    assert policy.service("frontend") is policy.services[1]
    assert policy.service("payments") is None
    assert policy.readers(ALICE) == frozenset({ALICE, BOB})
    assert policy.updaters(ALICE.upper()) == frozenset({ALICE})
    assert policy.services[0].platforms == ("sev-snp", "tdx", "sgx", "sim")


def test_model_is_immutable_and_hashable() -> None:
    policy = parse_policy(SHOP.read_bytes())
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.name = "other"  # type: ignore[misc]
    assert hash(policy) == hash(parse_policy(SHOP.read_bytes()))


def test_defaults_when_optional_sections_are_absent() -> None:
    policy = parse_policy(MINIMAL.encode())
    assert policy.predecessor is None
    assert policy.tolerate == frozenset()
    assert policy.ignore_advisories == ()
    assert policy.access_read == (CREATOR,)
    assert policy.access_update == (CREATOR,)
    assert policy.readers(ALICE) == policy.updaters(ALICE) == frozenset({ALICE})
    service = policy.services[0]
    assert (service.dns, service.allow_from, service.cert_ttl_seconds) == ((), (), 3600)


def test_optional_values_may_be_null_or_alternative_forms() -> None:
    text = f"""\
name: shop
version: "1"
predecessor: "{SNP_H.upper()}"
services:
  - name: backend
    tee:
      - platform: tdx
        mrtd: "{TDX_MRTD}"
        mrconfigid: null
        rtmr: [null, null, "{TDX_RTMR0.upper()}", null]
      - platform: sgx
        mrsigner: "{SGX_S}"
        product_id: 0x10
      - platform: sev-snp
        measurement: "{SNP_M}"
        host_data: "{SNP_H}"
        min_tcb: null
    dns: ~
    allow_from:
    cert_ttl: 300
  - name: api
    tee:
      - platform: sgx
        mrenclave: "{SGX_E}"
    allow_from: ["shop/backend", "*", "other-session/backend"]
    cert_ttl: 24h
security:
  attestation:
    tolerate: [outdated-tcb, unknown-tcb]
    ignore_advisories: "*"
access_policy:
  read: ["{ALICE.upper()}"]
"""
    policy = parse_policy(text.encode())
    assert policy.predecessor == SNP_H
    backend, api = policy.services
    assert backend.tee == (
        TdxEntry(TDX_MRTD, None, (None, None, TDX_RTMR0, None)),
        SgxEntry(mrsigner=SGX_S, product_id=16),
        SevSnpEntry(SNP_M, SNP_H, None),
    )
    assert (backend.dns, backend.allow_from, backend.cert_ttl_seconds) == ((), (), 300)
    assert api.allow_from == (
        PeerRef("shop", "backend"), PeerRef(None, None), PeerRef("other-session", "backend")
    )
    assert api.cert_ttl_seconds == 86400
    assert policy.tolerate == {Tolerance.OUTDATED_TCB, Tolerance.UNKNOWN_TCB}
    assert policy.ignore_advisories == "*"
    assert policy.access_read == (ALICE,)
    assert policy.access_update == (CREATOR,)
    assert policy.readers("ignored") == frozenset({ALICE})


# -- every invalid fixture ---------------------------------------------------------------

_EXPECT = re.compile(r"^# expect: (\d+): (\S+): (.+)$", re.MULTILINE)


def test_there_are_enough_distinct_invalid_fixtures() -> None:
    assert len(INVALID) >= 25
    assert len({f.read_bytes() for f in INVALID}) == len(INVALID)


@pytest.mark.parametrize("path", INVALID, ids=[f.name.removesuffix(".policy.yaml")
                                               for f in INVALID])
def test_invalid_fixture_reports_exactly_its_problems(path: Path, parser: str) -> None:
    data = path.read_bytes()
    expected = [(int(line), where, part) for line, where, part in
                _EXPECT.findall(data.decode("utf-8", "replace"))]
    assert expected, f"{path.name} has no '# expect:' lines"
    problems = problems_of(data, path.name, cas_dns=CAS_DNS)
    assert located(problems) == [(line, where) for line, where, _ in expected], (
        "\n".join(str(p) for p in problems)
    )
    for problem, (_, _, part) in zip(problems, expected, strict=True):
        assert part in problem.message, str(problem)
        assert str(problem) == f"{path.name}:{problem.line}: {problem.path}: {problem.message}"


def test_the_spec_example_problem_line_is_printed_exactly() -> None:
    path = POLICIES / "invalid" / "hex-length-sev-snp.policy.yaml"
    (problem,) = problems_of(path.read_bytes(), "shop.policy.yaml")
    assert str(problem) == (
        "shop.policy.yaml:12: services[1].tee[0].measurement: "
        "expected 96 hex digits for sev-snp, found 95"
    )


def test_several_problems_are_all_reported_at_once() -> None:
    problems = problems_of((POLICIES / "invalid" / "several-problems.policy.yaml").read_bytes(),
                           cas_dns=CAS_DNS)
    assert len(problems) == 11
    assert [p.line for p in problems] == sorted(p.line for p in problems)


# -- problems that are not written as files --------------------------------------------


def test_oversize_policy_is_refused_without_parsing() -> None:
    padding = b"# " + b"x" * MAX_POLICY_BYTES + b"\n"
    (problem,) = problems_of(MINIMAL.encode() + padding)
    assert (problem.line, problem.path) == (1, "(document)")
    assert "limit is 1048576 bytes (1 MiB)" in problem.message


def test_policy_of_exactly_the_limit_is_accepted() -> None:
    data = MINIMAL.encode()
    data += b"#" * (MAX_POLICY_BYTES - len(data) - 1) + b"\n"
    assert len(data) == MAX_POLICY_BYTES
    assert parse_policy(data).name == "shop"


def test_non_utf8_bytes_are_reported_with_their_line(parser: str) -> None:
    data = MINIMAL.encode().replace(b"name: backend", b"name: back\xffend")
    (problem,) = problems_of(data)
    assert (problem.line, problem.path) == (4, "(document)")
    assert "UTF-8" in problem.message


def test_control_characters_are_reported_with_their_line(parser: str) -> None:
    (problem,) = problems_of(MINIMAL.replace("version", "ver\x00sion"))
    assert (problem.line, problem.path) == (2, "(document)")
    assert "U+0000" in problem.message


def test_a_utf8_byte_order_mark_is_accepted(parser: str) -> None:
    assert parse_policy(b"\xef\xbb\xbf" + MINIMAL.encode()).name == "shop"


def test_empty_input_is_one_problem(parser: str) -> None:
    for data in (b"", b"\n\n", b"---\n", b"# just a comment\n"):
        (problem,) = problems_of(data)
        assert (problem.line, problem.path) == (1, "(document)")
        assert "empty" in problem.message


def test_deep_nesting_is_refused_quickly(parser: str) -> None:
    (problem,) = problems_of(b"name: " + b"[" * 50_000 + b"]" * 50_000)
    # libyaml has a flow-nesting limit of its own; either refusal will do.
    assert problem.path == "(document)" and "nest" in problem.message


def test_billion_laughs_is_refused_without_expanding(parser: str) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    started = time.monotonic()
    problems = problems_of("\n".join(lines) + "\n")
    assert time.monotonic() - started < 5
    assert (1, "a0") in located(problems)
    assert any("aliases are not allowed" in p.message and p.path == "a9[8]" for p in problems)


def test_merge_keys_and_foreign_tags_are_not_interpreted() -> None:
    text = MINIMAL + "security: !!python/object/apply:os.system ['true']\n"
    text += "access_policy:\n  <<: {read: [CREATOR]}\n"
    problems = problems_of(text)
    assert located(problems) == [(9, "security"), (11, "access_policy.<<")]
    assert "found a list tagged !!python/object/apply:os.system" in problems[0].message
    assert "merge keys (<<) are not allowed" in problems[1].message


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("yes", "a boolean (yes)"),
        ("on", "a boolean (on)"),
        ("12345", "an integer (12345)"),
        ("0x1f", "an integer (0x1f)"),
        ("1.5e+3", "a number (1.5e+3)"),
        ("!custom x", "a value tagged !custom (x)"),
        ("2024-01-01", "a date (2024-01-01)"),
        ("null", "null"),
        ("[a, b]", "a list"),
        ("{a: b}", "a mapping"),
    ],
)
def test_yaml_1_1_types_are_named_when_a_string_was_expected(value: str, found: str) -> None:
    (problem,) = problems_of(MINIMAL.replace("name: backend", f"name: {value}"))
    assert (problem.line, problem.path) == (4, "services[0].name")
    assert f"found {found}" in problem.message


def test_non_string_keys_are_reported() -> None:
    (problem,) = problems_of(MINIMAL + "yes: 1\n")
    assert (problem.line, problem.path) == (9, "yes")
    assert "keys must be strings, found a boolean (yes)" in problem.message


@pytest.mark.parametrize(
    ("cas_dns", "name", "refused"),
    [
        (("localhost",), "localhost", True),
        (("localhost",), "api.localhost", True),
        (("localhost",), "notlocalhost", False),
        (("CAS.Mesh.Example.",), "cas.mesh.example", True),
        (("*.mesh.example",), "backend.mesh.example", True),
        (("cas.mesh.example",), "mesh.example", False),
        (("cas.mesh.example",), "cas-mesh.example", False),
        ((), "localhost", False),
    ],
)
def test_dns_may_not_be_or_fall_under_a_cas_name(
    cas_dns: tuple[str, ...], name: str, refused: bool
) -> None:
    text = MINIMAL + f"    dns: [{name}]\n"
    if not refused:
        assert parse_policy(text.encode(), cas_dns=cas_dns).services[0].dns == (name,)
        return
    (problem,) = problems_of(text, cas_dns=cas_dns)
    assert (problem.line, problem.path) == (9, "services[0].dns[0]")
    assert "CAS" in problem.message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("-backend", "label '-backend'"),
        ("back_end", "label 'back_end'"),
        ("a" * 64 + ".example", "label"),
        ("example.123", "all-numeric"),
        ('"::1"', "IP addresses"),
        ('"backend.example."', "trailing dot"),
        ('""', "1-253 characters"),
    ],
)
def test_dns_names_must_be_rfc1123_hostnames(name: str, message: str) -> None:
    (problem,) = problems_of(MINIMAL + f"    dns: [{name}]\n")
    assert (problem.line, problem.path) == (9, "services[0].dns[0]")
    assert message in problem.message


def test_repeated_list_entries_are_reported() -> None:
    text = MINIMAL + "    dns: [a, a]\n    allow_from: [backend, backend]\n"
    text += "security:\n  attestation:\n    tolerate: [debug-mode, debug-mode]\n"
    problems = problems_of(text)
    assert located(problems) == [
        (9, "services[0].dns[1]"),
        (10, "services[0].allow_from[1]"),
        (13, "security.attestation.tolerate[1]"),
    ]


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("24h", 86400), ("1d", 86400), ("600", 600), ("3600", 3600)],
)
def test_cert_ttl_accepts_durations_in_range(ttl: str, seconds: int) -> None:
    policy = parse_policy((MINIMAL + f"    cert_ttl: {ttl}\n").encode())
    assert policy.services[0].cert_ttl_seconds == seconds


@pytest.mark.parametrize("ttl", ["4m59s", "25h", "0", "-1h", "inf", "nan", "1.5s", "1h30"])
def test_cert_ttl_refuses_out_of_range_and_malformed(ttl: str) -> None:
    (problem,) = problems_of(MINIMAL + f'    cert_ttl: "{ttl}"\n')
    assert (problem.line, problem.path) == (9, "services[0].cert_ttl")
    assert "5m to 24h" in problem.message


@pytest.mark.parametrize(("text", "embed"), [("", False), ("    embed_evidence: true\n", True),
                                            ("    embed_evidence: false\n", False),
                                            ("    embed_evidence: null\n", False)])
def test_embed_evidence_flag(text: str, embed: bool) -> None:
    assert parse_policy((MINIMAL + text).encode()).services[0].embed_evidence is embed


@pytest.mark.parametrize("value", ["yes", "1", '"true"', "True", "[true]"])
def test_embed_evidence_refuses_anything_but_true_or_false(value: str) -> None:
    (problem,) = problems_of(MINIMAL + f"    embed_evidence: {value}\n")
    assert (problem.line, problem.path) == (9, "services[0].embed_evidence")
    assert "true or false" in problem.message


# -- errors and hashes -------------------------------------------------------------------


def test_policy_invalid_is_a_policy_error_with_every_problem() -> None:
    data = (POLICIES / "invalid" / "missing-required-top-level-keys.policy.yaml").read_bytes()
    with pytest.raises(PolicyError) as info:
        parse_policy(data, "x.yaml")
    error = info.value
    assert isinstance(error, PolicyInvalid)
    assert error.reason is Reason.POLICY_INVALID
    assert error.http_status == 400
    assert error.message.splitlines() == [str(p) for p in error.problems]
    assert error.to_json()["error"]["code"] == "policy_invalid"


def test_problem_prints_as_file_line_path_message() -> None:
    problem = Problem("shop.policy.yaml", 12, "services[1].tee[0].measurement", "bad")
    assert str(problem) == "shop.policy.yaml:12: services[1].tee[0].measurement: bad"


def test_policy_hash_is_sha256_of_the_exact_bytes() -> None:
    data = SHOP.read_bytes()
    assert policy_hash(data) == hashlib.sha256(data).hexdigest()
    assert policy_hash(data + b"\n") != policy_hash(data)
    assert re.fullmatch(r"[0-9a-f]{64}", policy_hash(b""))


# -- peer references -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref"),
    [("frontend", PeerRef(None, "frontend")), ("*", PeerRef(None, None)),
     ("edge/gateway", PeerRef("edge", "gateway"))],
)
def test_peer_ref_parses_and_prints(text: str, ref: PeerRef) -> None:
    assert PeerRef.from_text(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize("text", ["", "Frontend", "a/b/c", "/b", "a/", "edge/*", "*/x", " a"])
def test_peer_ref_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="session/service"):
        PeerRef.from_text(text)


@pytest.mark.parametrize(
    ("ref", "peer_session", "peer_service", "matches"),
    [
        (PeerRef(None, "frontend"), "shop", "frontend", True),
        (PeerRef(None, "frontend"), "edge", "frontend", False),
        (PeerRef(None, "frontend"), "shop", "backend", False),
        (PeerRef(None, None), "shop", "anything", True),
        (PeerRef(None, None), "edge", "anything", False),
        (PeerRef("edge", "gateway"), "edge", "gateway", True),
        (PeerRef("edge", "gateway"), "shop", "gateway", False),
        (PeerRef("shop", "frontend"), "shop", "frontend", True),
    ],
)
def test_peer_ref_matches(
    ref: PeerRef, peer_session: str, peer_service: str, matches: bool
) -> None:
    assert ref.matches("shop", peer_session, peer_service) is matches
