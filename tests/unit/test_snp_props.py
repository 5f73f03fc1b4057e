"""Property tests: SEV-SNP parsing and verification take any input and refuse with
EvidenceError only; no change to a signed report or its certificate ever verifies."""

from __future__ import annotations

import base64
import functools
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snp_synth import build_report
from vectors import vector

from meshshield.attestation.snp import verify_snp_evidence, verify_snp_report
from meshshield.attestation.snp_report import REPORT_SIZE, SIGNED_SIZE, parse_snp_report
from meshshield.errors import EvidenceError, Reason

AT = datetime(2025, 6, 1, tzinfo=UTC)
ANY_REASON = (Reason.EVIDENCE_MALFORMED, Reason.SIGNATURE_INVALID, Reason.CHAIN_INVALID)
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def real(name: str) -> bytes:
    return vector(name)


def report_and_cert(which: int) -> tuple[bytes, bytes]:
    pairs = [("go-sev-guest/attestation.bin", "go-sev-guest/vcek.testcer"),
             ("trustee-snp/test-report.bin", "trustee-snp/test-vcek.der"),
             ("trustee-snp/test-vlek-report.bin", "trustee-snp/test-vlek.der")]
    r, c = pairs[which]
    return real(r), real(c)


def refuses(fn, *args, reasons=ANY_REASON, **kwargs) -> EvidenceError:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kwargs)
    except EvidenceError as e:
        assert e.reason in reasons, e
        assert e.message
        return e
    raise AssertionError("accepted")


@SETTINGS
@given(st.binary(max_size=REPORT_SIZE + 64))
def test_parser_takes_any_bytes(data: bytes) -> None:
    try:
        parse_snp_report(data)
    except EvidenceError as e:
        assert e.reason is Reason.EVIDENCE_MALFORMED


@SETTINGS
@given(
    version=st.sampled_from([2, 3, 5]),
    patches=st.lists(
        st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(0, 255)), max_size=6
    ),
)
def test_parser_on_near_valid_reports(version: int, patches: list[tuple[int, int]]) -> None:
    report = build_report(version=version)
    for off, value in patches:
        report[off] = value
    try:
        parsed = parse_snp_report(bytes(report))
    except EvidenceError as e:
        assert e.reason is Reason.EVIDENCE_MALFORMED
        assert "offset 0x" in e.message
    else:
        assert parsed.raw == bytes(report)
        assert parsed.measurement == bytes(report[0x090:0x0C0])


@SETTINGS
@given(which=st.integers(0, 2), offset=st.integers(0, SIGNED_SIZE - 1), bit=st.integers(0, 7))
def test_a_flipped_signed_bit_never_verifies(which: int, offset: int, bit: int) -> None:
    report, cert = report_and_cert(which)
    bad = bytearray(report)
    bad[offset] ^= 1 << bit
    refuses(verify_snp_report, bytes(bad), cert, at=AT,
            reasons=(Reason.SIGNATURE_INVALID, Reason.EVIDENCE_MALFORMED))


@SETTINGS
@given(which=st.integers(0, 2), data=st.data())
def test_any_change_to_the_report_never_verifies(which: int, data: st.DataObject) -> None:
    report, cert = report_and_cert(which)
    changed = data.draw(
        (st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE)
         | st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(1, 255)),
                    min_size=1, max_size=4).map(lambda ps: _xor(report, ps)))
        .filter(lambda b: b != report)
    )
    refuses(verify_snp_report, changed, cert, at=AT,
            reasons=(Reason.SIGNATURE_INVALID, Reason.EVIDENCE_MALFORMED))


def _xor(report: bytes, patches: list[tuple[int, int]]) -> bytes:
    out = bytearray(report)
    for off, mask in patches:
        out[off] ^= mask
    return bytes(out)


@SETTINGS
@given(which=st.integers(0, 2), offset=st.integers(0, 2000), mask=st.integers(1, 255))
def test_a_changed_certificate_byte_never_verifies(which: int, offset: int, mask: int) -> None:
    report, cert = report_and_cert(which)
    bad = bytearray(cert)
    bad[offset % len(bad)] ^= mask
    refuses(verify_snp_report, report, bytes(bad), at=AT)


@SETTINGS
@given(st.binary(max_size=3000))
def test_any_certificate_bytes(certs: bytes) -> None:
    report, _ = report_and_cert(0)
    refuses(verify_snp_report, report, certs, at=AT,
            reasons=(Reason.EVIDENCE_MALFORMED, Reason.CHAIN_INVALID))


@SETTINGS
@given(st.text(max_size=600))
def test_any_pem_text(text: str) -> None:
    report, _ = report_and_cert(0)
    pem = "-----BEGIN CERTIFICATE-----\n" + text + "\n-----END CERTIFICATE-----\n"
    evidence = {"report": base64.b64encode(report).decode(), "certs": pem}
    refuses(verify_snp_evidence, evidence, at=AT,
            reasons=(Reason.EVIDENCE_MALFORMED, Reason.CHAIN_INVALID))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=200),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["report", "certs", "quote", "signature"]) | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=16,
)


@SETTINGS
@given(json_values)
def test_any_json_evidence(evidence: object) -> None:
    refuses(verify_snp_evidence, evidence, at=AT)


@SETTINGS
@given(report=st.binary(max_size=REPORT_SIZE + 8), certs=st.one_of(st.none(), st.text(max_size=64)))
def test_any_base64_report(report: bytes, certs: str | None) -> None:
    evidence: dict[str, object] = {"report": base64.b64encode(report).decode()}
    if certs is not None:
        evidence["certs"] = certs
    refuses(verify_snp_evidence, evidence, at=AT, extra_certs=real("go-sev-guest/vcek.testcer"))


@settings(max_examples=40, deadline=None)
@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1),
                    timezones=st.just(UTC)))
def test_time_either_verifies_inside_every_window_or_is_chain_invalid(at: datetime) -> None:
    report, cert = report_and_cert(0)
    inside = datetime(2022, 9, 24, 0, 55, 28, tzinfo=UTC) <= at <= datetime(
        2029, 9, 24, 0, 55, 28, tzinfo=UTC)
    if inside:
        verify_snp_report(report, cert, at=at)
    else:
        refuses(verify_snp_report, report, cert, at=at, reasons=(Reason.CHAIN_INVALID,))
