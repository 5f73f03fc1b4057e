"""Issue 11: the `--expect` file and the `cas verify` decision.

1. The decision (`casverify.decide_cas`, the service decision's `decide_tee`) on the real
   SEV-SNP, TDX and SGX vectors: a pinned expect file accepts each, a one-bit change
   refuses with the SPEC §6 reason. (The vectors' report_data cannot carry our binding,
   so the binding check is tested apart, on sim evidence we make.)
2. The binding check (`check_cas_answer`): the nonce, the TLS key of the connection and
   every CA of the bundle are bound; changing any one refuses report_data_mismatch.
3. The parser: FILE:LINE: PATH: MESSAGE problems, unknown keys, aliases, oversize,
   sim without tolerate, and a hypothesis property (any bytes: an expectation or
   PolicyInvalid, never another exception).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cas_hardware_decision import (
    flip,
    sgx_claims,
    sgx_entry,
    snp_claims,
    snp_entry,
    tdx_claims,
    tdx_entry,
)

from meshshield.attestation.claims import Claims, cas_report_data
from meshshield.attestation.sim import generate_sim_platform_key, make_sim_evidence
from meshshield.attestation.verify import VerifierConfig
from meshshield.casverify import check_cas_answer, decide_cas
from meshshield.errors import MeshError, PolicyError, Reason
from meshshield.pki.keys import generate_p256, spki_der
from meshshield.policy import PolicyInvalid
from meshshield.policy.expect import MAX_EXPECT_BYTES, CasExpectation, parse_expect


def expect(entry: str, tolerate: str = "[debug-mode, unknown-tcb]") -> CasExpectation:
    text = f"tee:\n  - {entry}\nsecurity:\n  attestation:\n    tolerate: {tolerate}\n"
    return parse_expect(text.encode(), "cas.expect.yaml")


def refused(exp: CasExpectation, claims: Claims) -> Reason:
    with pytest.raises(PolicyError) as info:
        decide_cas(exp, claims)
    return info.value.reason


# --- 1. the decision on real hardware vectors ----------------------------------------------


def test_snp_vector_accepted_by_pinned_expect_refused_by_one_bit() -> None:
    c = snp_claims()
    assert decide_cas(expect(snp_entry(c)), c)
    assert refused(expect(snp_entry(c, measurement=flip(c.measurement, 5))), c) is (
        Reason.MEASUREMENT_NOT_ALLOWED)
    assert refused(expect(snp_entry(c, host_data=flip(c.extra["host_data"], 0))), c) is (
        Reason.WORKLOAD_NOT_ALLOWED)
    assert refused(expect(snp_entry(c), "[unknown-tcb]"), c) is Reason.DEBUG_NOT_TOLERATED


def test_tdx_vector_accepted_by_pinned_expect_refused_by_one_bit() -> None:
    c = tdx_claims()
    assert decide_cas(expect(tdx_entry(c), "[unknown-tcb]"), c)
    assert refused(expect(tdx_entry(c, mrtd=flip(c.measurement, 9)), "[unknown-tcb]"), c) is (
        Reason.MEASUREMENT_NOT_ALLOWED)
    assert refused(expect(tdx_entry(c, rtmr2=flip(c.extra["rtmr2"], 3)), "[unknown-tcb]"),
                   c) is Reason.WORKLOAD_NOT_ALLOWED
    assert refused(expect(tdx_entry(c), "[]"), c) is Reason.TCB_UNKNOWN


def test_sgx_vector_accepted_by_pinned_expect_refused_by_one_bit() -> None:
    c = sgx_claims()
    assert c.signer is not None
    assert decide_cas(expect(sgx_entry(c)), c)
    assert refused(expect(sgx_entry(c, mrenclave=flip(c.measurement, 1))), c) is (
        Reason.MEASUREMENT_NOT_ALLOWED)
    assert refused(expect(sgx_entry(c, mrsigner=flip(c.signer, 8))), c) is (
        Reason.SIGNER_NOT_ALLOWED)
    assert refused(expect(snp_entry(snp_claims())), c) is Reason.PLATFORM_NOT_ALLOWED


def test_the_decision_names_the_expect_file_not_a_policy() -> None:
    c = sgx_claims()
    with pytest.raises(PolicyError) as info:
        decide_cas(expect(sgx_entry(c, mrenclave=flip(c.measurement, 1))), c)
    assert "the expect file cas.expect.yaml" in info.value.message


# --- 2. the binding -------------------------------------------------------------------------


def _ca_and_leaf() -> tuple[str, bytes, bytes]:
    now = datetime.now(UTC)
    ca_key, leaf_key = generate_p256(), generate_p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cas")]))
            .issuer_name(name).public_key(leaf_key.public_key()).serial_number(2)
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
            .sign(ca_key, hashes.SHA256()))
    return (ca.public_bytes(Encoding.PEM).decode(), ca.public_bytes(Encoding.DER),
            leaf.public_bytes(Encoding.DER))


def test_binding_covers_nonce_tls_key_and_bundle() -> None:
    sim_key = generate_sim_platform_key()
    bundle, ca_der, leaf_der = _ca_and_leaf()
    leaf = x509.load_der_x509_certificate(leaf_der)
    spki_sha = hashlib.sha256(spki_der(leaf.public_key())).digest()
    nonce = bytes(range(32))
    measurement = "ab" * 32
    exp = parse_expect(f'tee: [{{platform: sim, measurement: "{measurement}"}}]\n'
                       "security: {attestation: {tolerate: [simulation]}}\n".encode())
    verifier = VerifierConfig(sim_platform_keys=(sim_key.public_key(),))

    def answer(rd: bytes, spki_hex: str | None = None) -> dict[str, object]:
        return {"platform": "sim", "evidence": make_sim_evidence(sim_key, measurement, rd),
                "tls_spki_sha256": spki_hex or spki_sha.hex(), "bundle": bundle}

    good = cas_report_data(nonce, spki_sha, [hashlib.sha256(ca_der).digest()])
    att = check_cas_answer(answer(good), url="https://cas", nonce=nonce, tls_cert_der=leaf_der,
                           expect=exp, verifier=verifier)
    assert att.simulated and att.bundle_pem == bundle and att.claims.measurement == measurement
    bad = [
        cas_report_data(bytes(32), spki_sha, [hashlib.sha256(ca_der).digest()]),
        cas_report_data(nonce, bytes(32), [hashlib.sha256(ca_der).digest()]),
        cas_report_data(nonce, spki_sha, []),
        cas_report_data(nonce, spki_sha, [hashlib.sha256(ca_der).digest()] * 2),
    ]
    for rd in bad:
        with pytest.raises(MeshError) as info:
            check_cas_answer(answer(rd), url="https://cas", nonce=nonce, tls_cert_der=leaf_der,
                             expect=exp, verifier=verifier)
        assert info.value.reason is Reason.REPORT_DATA_MISMATCH
    # A proxy presenting another key, relaying the CAS's answer.
    _, _, other_leaf = _ca_and_leaf()
    with pytest.raises(MeshError) as info:
        check_cas_answer(answer(good), url="https://cas", nonce=nonce, tls_cert_der=other_leaf,
                         expect=exp, verifier=verifier)
    assert info.value.reason is Reason.REPORT_DATA_MISMATCH
    assert "terminates TLS" in info.value.message
    # No sim key trusted: refused, saying how to trust one.
    with pytest.raises(MeshError) as info:
        check_cas_answer(answer(good), url="https://cas", nonce=nonce, tls_cert_der=leaf_der,
                         expect=exp, verifier=VerifierConfig())
    assert info.value.reason is Reason.SIGNATURE_INVALID and "--trust-sim-platform" in (
        info.value.message)


# --- 3. the parser ------------------------------------------------------------------------


def problems(text: str | bytes) -> list[str]:
    with pytest.raises(PolicyInvalid) as info:
        parse_expect(text.encode() if isinstance(text, str) else text, "e.yaml")
    return [str(p) for p in info.value.problems]


def test_parser_reports_file_line_path_message() -> None:
    m = "ab" * 32
    out = problems(f'tee:\n  - platform: sim\n    measurment: "{m}"\nname: x\n')
    assert any(p.startswith("e.yaml:3: tee[0].measurment: unknown key") for p in out)
    assert any(p.startswith("e.yaml:4: name: unknown key 'name'") for p in out)
    assert any("tolerate lists simulation" in p for p in out)  # sim without tolerate


def test_parser_refuses_aliases_empty_oversize_and_bad_hex() -> None:
    assert any("aliases are not allowed" in p for p in problems("tee: &a []\nsecurity: *a\n"))
    assert problems("") == ["e.yaml:1: (document): the expect file is empty; expected a "
                            "mapping with tee and security"]
    big = b"# " + b"x" * MAX_EXPECT_BYTES + b"\ntee: []\n"
    assert "limit is" in problems(big)[0]
    assert any("96 hex digits" in p for p in problems(
        'tee: [{platform: sev-snp, measurement: "ab", host_data: "' + "0" * 64 + '"}]\n'))
    assert any("missing required key" in p for p in problems("security: {}\n"))


def test_parser_accepts_a_minimal_file() -> None:
    m = "cd" * 32
    e = parse_expect(f'tee: [{{platform: sim, measurement: "{m}"}}]\n'
                     "security: {attestation: {tolerate: [simulation]}}\n".encode())
    assert e.tee[0].pinned_measurement == m


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512) | st.text(max_size=300).map(str.encode))
def test_parser_never_raises_anything_else(data: bytes) -> None:
    try:
        parse_expect(data, "fuzz.yaml")
    except PolicyInvalid as e:
        assert all(str(p).startswith("fuzz.yaml:") for p in e.problems)
