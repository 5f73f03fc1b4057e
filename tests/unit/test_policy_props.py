"""Property tests: the policy parser takes untrusted bytes and never fails any other way."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshshield.policy import (
    CREATOR,
    PeerRef,
    Policy,
    PolicyInvalid,
    SimEntry,
    Tolerance,
    parse_policy,
)

SHOP = (Path(__file__).resolve().parent.parent / "fixtures" / "policies" / "shop.policy.yaml")
SHOP_BYTES = SHOP.read_bytes()
FILE = "fuzz.policy.yaml"
YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
PROBLEM_LINE = re.compile(rf"{re.escape(FILE)}:(\d+): (\S[^\n]*?): (\S[^\n]*)")

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def parse_or_problems(data: bytes) -> Policy | None:
    """Parse; on PolicyInvalid check every problem's shape. Anything else propagates."""
    try:
        return parse_policy(data, FILE, cas_dns=("cas.mesh.example",))
    except PolicyInvalid as e:
        assert e.problems, "PolicyInvalid without problems"
        text = data.decode("utf-8", "replace")
        last_line = len(YAML_LINE_BREAK.findall(text)) + 1
        for problem in e.problems:
            match = PROBLEM_LINE.fullmatch(str(problem))
            assert match is not None, repr(str(problem))
            assert 1 <= problem.line <= last_line, str(problem)
        return None


@SETTINGS
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_parse_or_raise_policy_invalid(data: bytes) -> None:
    parse_or_problems(data)


YAML_TOKENS = [
    "name", "version", "services", "tee", "platform", "sev-snp", "tdx", "sgx", "sim", "dns",
    "allow_from", "cert_ttl", "security", "attestation", "tolerate", "access_policy", "read",
    "update", "CREATOR", "measurement", "host_data", "rtmr", "min_tcb", ":", ": ", "- ", "-",
    "[", "]", "{", "}", ",", "&a", "*a", "!!str", "!!int", "!!binary", "!x", "<<", "?", "|",
    ">", "---", "...", "#", "'", '"', "\\", "\n", "\n  ", "\n    ", "\t", " ", "null", "~",
    "yes", "no", "on", "0x1f", "1e5", "1:30", "1h", "\"1\"", "0", "-1", "256", "%YAML 1.1",
    "a" * 64, "A" * 96, "\u00e9", "\ufeff", "\x00", "\x85",
]


@SETTINGS
@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=80).map("".join))
def test_yaml_ish_text_parses_or_raises_policy_invalid(text: str) -> None:
    parse_or_problems(text.encode("utf-8", "surrogatepass"))


@SETTINGS
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_arbitrary_text_parses_or_raises_policy_invalid(text: str) -> None:
    parse_or_problems(text.encode("utf-8"))


# -- mutations of the valid example --------------------------------------------------------

LINES = SHOP_BYTES.decode().splitlines(keepends=True)


@st.composite
def mutated_shop(draw: st.DrawFn) -> bytes:
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(
            ["delete", "duplicate", "swap", "insert", "replace-char", "truncate", "indent"]
        ))
        line = lines[i]
        if kind == "delete" and len(lines) > 1:
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, line)
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], line
        elif kind == "insert":
            lines.insert(i, draw(st.sampled_from(YAML_TOKENS)) + draw(st.sampled_from(
                ["\n", ": x\n", ": [a]\n", "\n  "])))
        elif kind == "replace-char" and line:
            k = draw(st.integers(0, len(line) - 1))
            lines[i] = line[:k] + draw(st.sampled_from(YAML_TOKENS)) + line[k + 1:]
        elif kind == "truncate":
            lines[i] = line[: draw(st.integers(0, len(line)))]
        elif kind == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "  ", "      "])) + line.lstrip(" ")
    return "".join(lines).encode()


@SETTINGS
@given(mutated_shop())
def test_mutations_of_the_example_parse_or_report_located_problems(data: bytes) -> None:
    policy = parse_or_problems(data)
    if policy is not None:
        # Whatever survived the mutation is still a policy the rules allow.
        assert policy.version == "1"
        assert policy.services
        assert all(s.tee for s in policy.services)
        assert len({s.name for s in policy.services}) == len(policy.services)
        for service in policy.services:
            if any(isinstance(e, SimEntry) for e in service.tee):
                assert Tolerance.SIMULATION in policy.tolerate
            assert 300 <= service.cert_ttl_seconds <= 86400


# -- generated valid policies come out as written -----------------------------------------

NAMES = st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True)
HEX64 = st.from_regex(r"[0-9a-fA-F]{64}", fullmatch=True)


@st.composite
def written_policy(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    session = draw(NAMES)
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    tolerate = draw(st.sets(st.sampled_from([t for t in Tolerance if t is not
                                             Tolerance.SIMULATION])))
    ttl_minutes = draw(st.lists(st.integers(5, 1440), min_size=len(names),
                                max_size=len(names)))
    admins = draw(st.lists(HEX64, max_size=3, unique_by=str.lower))
    lines = [f'name: "{session}"', 'version: "1"', "services:"]
    measurements = []
    for name, minutes in zip(names, ttl_minutes, strict=True):
        measurement = draw(HEX64)
        measurements.append(measurement.lower())
        peer = draw(st.sampled_from(names + ["*", "other/svc"]))
        lines += [f'  - name: "{name}"', "    tee:", "      - platform: sim",
                  f'        measurement: "{measurement}"', f'    allow_from: ["{peer}"]',
                  f"    cert_ttl: {minutes}m"]
    lines += ["security:", "  attestation:",
              f"    tolerate: [simulation{''.join(', ' + t.value for t in sorted(tolerate))}]"]
    lines += ["access_policy:", f"  update: [{', '.join([CREATOR, *admins])}]"]
    expected = {
        "session": session, "names": names, "measurements": measurements,
        "ttls": [m * 60 for m in ttl_minutes], "tolerate": tolerate | {Tolerance.SIMULATION},
        "update": (CREATOR, *(a.lower() for a in admins)),
    }
    return ("\n".join(lines) + "\n").encode(), expected


@SETTINGS
@given(written_policy())
def test_generated_valid_policies_parse_as_written(case: tuple[bytes, dict[str, object]]
                                                   ) -> None:
    data, expected = case
    policy = parse_policy(data)
    assert policy.name == expected["session"]
    assert [s.name for s in policy.services] == expected["names"]
    assert [s.tee for s in policy.services] == [
        (SimEntry(m),) for m in expected["measurements"]  # type: ignore[attr-defined]
    ]
    assert [s.cert_ttl_seconds for s in policy.services] == expected["ttls"]
    assert policy.tolerate == expected["tolerate"]
    assert policy.access_update == expected["update"]
    for service in policy.services:
        (ref,) = service.allow_from
        assert isinstance(ref, PeerRef)
        assert PeerRef.from_text(str(ref)) == ref
