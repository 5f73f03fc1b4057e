"""Property tests: sim verification takes any input and refuses with EvidenceError only."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshield.attestation import sim
from meshshield.errors import EvidenceError, Reason

KEY = sim.generate_sim_platform_key()
TRUSTED = [KEY.public_key()]
EVIDENCE = sim.make_sim_evidence(KEY, "5a" * 32, bytes(64))
REPORT = base64.b64decode(EVIDENCE["report"])
SIGNATURE = base64.b64decode(EVIDENCE["signature"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["report", "signature", "quote", "certs"]) | st.text(max_size=10),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


def verify_refuses(evidence: object) -> EvidenceError:
    try:
        sim.verify_sim_evidence(evidence, TRUSTED)
    except EvidenceError as e:
        assert e.reason in (Reason.EVIDENCE_MALFORMED, Reason.SIGNATURE_INVALID)
        return e
    raise AssertionError(f"accepted: {evidence!r}")


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_value_is_refused_with_evidence_error(value: object) -> None:
    verify_refuses(value)


@settings(max_examples=200, deadline=None)
@given(report=st.binary(max_size=400), signature=st.binary(max_size=200))
def test_any_bytes_as_report_and_signature(report: bytes, signature: bytes) -> None:
    verify_refuses(
        {"report": base64.b64encode(report).decode(), "signature": EVIDENCE["signature"]}
    )
    verify_refuses(
        {"report": EVIDENCE["report"], "signature": base64.b64encode(signature).decode()}
    )
    verify_refuses(
        {
            "report": base64.b64encode(report).decode(),
            "signature": base64.b64encode(signature).decode(),
        }
    )


@settings(max_examples=200, deadline=None)
@given(report=st.text(max_size=300), signature=st.text(max_size=300))
def test_any_strings_as_report_and_signature(report: str, signature: str) -> None:
    verify_refuses({"report": report, "signature": signature})


@settings(max_examples=200, deadline=None)
@given(body=st.binary(min_size=sim.REPORT_SIZE - 16, max_size=sim.REPORT_SIZE - 16))
def test_well_framed_random_reports_are_refused(body: bytes) -> None:
    """Correct magic, version, flags and length, random contents: never accepted."""
    report = REPORT[:16] + body
    verify_refuses(
        {"report": base64.b64encode(report).decode(), "signature": EVIDENCE["signature"]}
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(REPORT) * 8 - 1))
def test_any_bit_flip_in_report_fails(bit: int) -> None:
    bad = bytearray(REPORT)
    bad[bit // 8] ^= 1 << (bit % 8)
    verify_refuses({"report": base64.b64encode(bad).decode(), "signature": EVIDENCE["signature"]})


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(SIGNATURE) * 8 - 1))
def test_any_bit_flip_in_signature_fails(bit: int) -> None:
    bad = bytearray(SIGNATURE)
    bad[bit // 8] ^= 1 << (bit % 8)
    e = verify_refuses({"report": EVIDENCE["report"], "signature": base64.b64encode(bad).decode()})
    assert e.reason is Reason.SIGNATURE_INVALID


@settings(max_examples=50, deadline=None)
@given(
    measurement=st.binary(min_size=32, max_size=32),
    report_data=st.binary(min_size=64, max_size=64),
    debug=st.booleans(),
)
def test_round_trip(measurement: bytes, report_data: bytes, debug: bool) -> None:
    ev = sim.make_sim_evidence(KEY, measurement.hex(), report_data, debug=debug)
    claims = sim.verify_sim_evidence(
        ev, [ec.generate_private_key(ec.SECP256R1()).public_key(), KEY.public_key()]
    )
    assert (claims.measurement, claims.report_data, claims.debug) == (
        measurement.hex(),
        report_data,
        debug,
    )
