"""Property tests: the DCAP parsers take any bytes and refuse with EvidenceError only."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import dcap_synth as synth
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from vectors import vectors_dir

from meshshield.attestation import dcap, pck
from meshshield.attestation.collateral import load_collateral_files
from meshshield.attestation.sgx import verify_sgx_evidence, verify_sgx_quote
from meshshield.attestation.tdx import verify_tdx_evidence, verify_tdx_quote
from meshshield.errors import EvidenceError, Reason

AT = datetime(2025, 6, 1, tzinfo=UTC)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Real quotes when the vectors are present, synthetic ones (test root) otherwise.
SYNTH_TDX = synth.make_quote(synth.QuoteSpec(version=5, body_type=3))
SYNTH_SGX = synth.make_quote(synth.QuoteSpec(version=3))
VERIFIERS = (verify_tdx_quote, verify_sgx_quote)


def _real(path: str) -> bytes | None:
    try:
        return (vectors_dir() / path).read_bytes()
    except (pytest.skip.Exception, OSError):
        return None


REAL_TDX = _real("go-tdx-guest/tdx_prod_quote_SPR_E4.dat")
REAL_SGX = _real("trustee-sgx/occlum_quote.dat")
SEEDS = [q for q in (REAL_TDX, REAL_SGX, SYNTH_TDX, SYNTH_SGX) if q is not None]


def outcome(quote: bytes, roots: list[object] | None = None) -> Reason | None:
    """Run both verifiers; None if one accepted, else the last refusal's reason."""
    reason = None
    for verify in VERIFIERS:
        try:
            verify(quote, at=AT, roots=roots)  # type: ignore[arg-type]
            return None
        except EvidenceError as e:
            reason = e.reason
    return reason


@SETTINGS
@given(st.binary(max_size=6000))
def test_random_bytes_are_malformed(data: bytes) -> None:
    assert outcome(data) is Reason.EVIDENCE_MALFORMED


@SETTINGS
@given(
    st.sampled_from([3, 4, 5]),
    st.sampled_from([0, 0x81]),
    st.binary(min_size=0, max_size=5000),
)
def test_a_plausible_header_then_garbage(version: int, tee: int, rest: bytes) -> None:
    header = (
        version.to_bytes(2, "little")
        + b"\x02\x00"
        + tee.to_bytes(4, "little")
        + bytes(4)
        + dcap.INTEL_QE_VENDOR_ID
        + bytes(20)
    )
    assert outcome(header + rest) in (Reason.EVIDENCE_MALFORMED, Reason.SIGNATURE_INVALID)


@SETTINGS
@given(st.sampled_from(range(len(SEEDS))), st.data())
def test_mutated_quotes_never_raise_anything_else(seed: int, data: st.DataObject) -> None:
    quote = bytearray(SEEDS[seed])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(quote) - 1))
        quote[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(0, len(quote)))
    mutated = bytes(quote[:cut] if cut is not None else quote)
    roots = None if SEEDS[seed] in (REAL_TDX, REAL_SGX) else synth.ROOTS
    outcome(mutated, roots)  # any Claims or EvidenceError, nothing else


@SETTINGS
@given(st.sampled_from(range(len(SEEDS))), st.integers(0, 10_000))
def test_truncated_quotes_are_malformed(seed: int, n: int) -> None:
    quote = SEEDS[seed]
    q = dcap.parse_quote(quote)
    declared = len(quote) - q.trailing
    assume(n < declared)
    assert outcome(quote[:n]) is Reason.EVIDENCE_MALFORMED


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["quote", "report", "certs"]) | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@SETTINGS
@given(
    json_values
    | st.fixed_dictionaries(
        {"quote": st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode())}
    )
)
def test_any_evidence_json_is_refused_cleanly(evidence: object) -> None:
    for verify in (verify_tdx_evidence, verify_sgx_evidence):
        with pytest.raises(EvidenceError) as info:
            verify(evidence, at=AT)
        assert info.value.reason is Reason.EVIDENCE_MALFORMED


@SETTINGS
@given(st.binary(max_size=400))
def test_the_sgx_extension_reader_takes_any_bytes(data: bytes) -> None:
    try:
        pck._pairs(data)
    except EvidenceError as e:
        assert e.reason is Reason.EVIDENCE_MALFORMED


COLLATERAL_SEEDS = [
    synth.signed_json("tcbInfo", synth.tcb_info([synth.tdx_level("UpToDate")])),
    synth.signed_json("enclaveIdentity", synth.qe_identity()),
    synth.crl(synth.CA_CN, "ca", [1, 2, 3]),
    synth.issuer_chain(),
]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.sampled_from(range(len(COLLATERAL_SEEDS))), st.data())
def test_collateral_files_load_or_are_refused(
    tmp_path: Path, seed: int, data: st.DataObject
) -> None:
    content = bytearray(COLLATERAL_SEEDS[seed])
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(content) - 1))
        content[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(0, len(content)))
    path = tmp_path / "f"
    path.write_bytes(bytes(content[:cut] if cut is not None else content))
    try:
        collateral = load_collateral_files([path])
    except EvidenceError as e:
        assert e.reason is Reason.EVIDENCE_MALFORMED
        return
    # whatever loaded is evaluated against a valid synthetic quote without surprises
    (tmp_path / "chain.pem").write_bytes(synth.issuer_chain())
    collateral = load_collateral_files([path, tmp_path / "chain.pem"])
    try:
        verify_tdx_quote(SYNTH_TDX, at=synth.AT, collateral=collateral, roots=synth.ROOTS)
    except EvidenceError:
        pass


CHAIN_DER = [
    c.public_bytes(serialization.Encoding.DER) for c in (synth.pck_leaf(), synth.CA, synth.ROOT)
]


def _pem(der: bytes) -> bytes:
    b64 = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
@SETTINGS
@given(st.integers(0, 2), st.data())
def test_altered_certificates_in_the_pck_chain(which: int, data: st.DataObject) -> None:
    # Re-encoded as valid PEM, so the certificate parser and chain checks see the damage.
    ders = [bytearray(d) for d in CHAIN_DER]
    target = ders[which]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(target) - 1))
        target[i] = data.draw(st.integers(0, 255))
    chain = b"".join(_pem(bytes(d)) for d in ders)
    quote = synth.make_quote(synth.QuoteSpec(chain=chain))
    try:
        verify_tdx_quote(quote, at=synth.AT, roots=synth.ROOTS)
    except EvidenceError as e:
        assert e.reason in (
            Reason.EVIDENCE_MALFORMED,
            Reason.CHAIN_INVALID,
            Reason.SIGNATURE_INVALID,
        )
