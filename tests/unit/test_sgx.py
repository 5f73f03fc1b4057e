"""SGX quote verification against the real vectors (PROVENANCE.md §3, §4) and synthetic quotes."""

from __future__ import annotations

import base64
import random
import re
import struct
from datetime import UTC, datetime

import dcap_synth as synth
import pytest
from vectors import vector

from meshshield.attestation import dcap
from meshshield.attestation.claims import Platform, TcbStatus
from meshshield.attestation.sgx import parse_sgx_quote, verify_sgx_evidence, verify_sgx_quote
from meshshield.errors import EvidenceError, Reason

AT = datetime(2025, 6, 1, tzinfo=UTC)
OCCLUM = "trustee-sgx/occlum_quote.dat"


def refused(quote: bytes, reason: Reason | tuple[Reason, ...], at: datetime = AT) -> EvidenceError:
    reasons = reason if isinstance(reason, tuple) else (reason,)
    with pytest.raises(EvidenceError) as info:
        verify_sgx_quote(quote, at=at)
    assert info.value.reason in reasons, info.value
    return info.value


def test_occlum_quote_verifies_with_its_listed_claims() -> None:
    claims = verify_sgx_quote(vector(OCCLUM), at=AT)
    assert claims.platform is Platform.SGX
    assert claims.measurement == "8f173e4613ff05c52aaf04162d234edae8c9977eae47eb2299ae16a553011c68"
    assert claims.signer == "83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e"
    assert claims.signer == claims.extra["mrsigner"]
    assert claims.product_id == 0 and claims.svn == 0
    assert claims.extra["attributes"] == "0700000000000000e700000000000000"
    assert claims.debug is True  # ATTRIBUTES.FLAGS 0x07 has DEBUG (bit 1)
    assert claims.report_data == b"test" + bytes(60)
    assert claims.tcb_status is TcbStatus.UNKNOWN
    assert claims.extra["quote_version"] == 3
    view = claims.to_json()
    assert view["signer"] == claims.signer and view["product_id"] == 0 and view["svn"] == 0


def ratls_quotes(path: str) -> list[bytes]:
    """SGX v3 quotes embedded in an RA-TLS certificate (found by their header bytes)."""
    text = vector(path).decode()
    der = base64.b64decode("".join(re.findall(r"^[A-Za-z0-9+/=]+$", text, re.M)))
    quotes = []
    for m in re.finditer(re.escape(struct.pack("<HHI", 3, 2, 0)), der):
        end = m.start() + 432
        quotes.append(der[m.start() : end + 4 + struct.unpack_from("<I", der, end)[0]])
    return quotes


@pytest.mark.parametrize(
    ("path", "mrenclave", "at"),
    [
        (
            "ccc-interop-ratls/gramine-cert.pem",
            "0866e7ca11b9f4efe4bf39b2607f4e1299f111920d96d95719080f01b62b7585",
            AT,
        ),
        (
            "ccc-interop-ratls/rats-tls-cert.pem",
            "38e1b40b8c68186f359c97ecb6a89965d9d8638f2df06fbe18e84d79a266c041",
            datetime(2023, 6, 1, tzinfo=UTC),
        ),
    ],
)
def test_quotes_inside_ratls_certificates_verify(path: str, mrenclave: str, at: datetime) -> None:
    quotes = ratls_quotes(path)
    assert quotes
    for quote in quotes:
        claims = verify_sgx_quote(quote, at=at)
        assert claims.measurement == mrenclave
        assert claims.debug is True  # all three are debug enclaves


def test_evidence_json_round_trip() -> None:
    quote = vector(OCCLUM)
    evidence = {"quote": base64.b64encode(quote).decode()}
    assert verify_sgx_evidence(evidence, at=AT) == verify_sgx_quote(quote, at=AT)
    with pytest.raises(EvidenceError) as info:
        verify_sgx_evidence({"quote": base64.b64encode(quote).decode() + "\n"}, at=AT)
    assert info.value.reason is Reason.EVIDENCE_MALFORMED


def test_outside_the_pck_window_names_the_certificate() -> None:
    err = refused(vector(OCCLUM), Reason.CHAIN_INVALID, at=datetime(2031, 1, 1, tzinfo=UTC))
    assert "PCK leaf certificate" in err.message and "2030-04-26" in err.message
    err = refused(vector(OCCLUM), Reason.CHAIN_INVALID, at=datetime(2023, 1, 1, tzinfo=UTC))
    assert "not yet valid" in err.message and "2023-04-26" in err.message


def test_a_flipped_bit_anywhere_in_the_signed_region_is_refused() -> None:
    quote = bytearray(vector(OCCLUM))
    rng = random.Random(3)
    for offset in range(432):
        for bit in range(8) if offset < 48 else [rng.randrange(8)]:
            quote[offset] ^= 1 << bit
            try:
                verify_sgx_quote(bytes(quote), at=AT)
            except EvidenceError as e:
                assert e.reason in (Reason.SIGNATURE_INVALID, Reason.EVIDENCE_MALFORMED)
            else:
                raise AssertionError(f"bit {bit} of byte {offset} flipped and still verified")
            finally:
                quote[offset] ^= 1 << bit
    quote[112] ^= 1  # MRENCLAVE
    refused(bytes(quote), Reason.SIGNATURE_INVALID)


def test_truncation_is_malformed_and_trailing_bytes_are_allowed() -> None:
    quote = vector(OCCLUM)
    end = 436 + struct.unpack_from("<I", quote, 432)[0]
    assert end == len(quote)
    for n in range(end):
        refused(quote[:n], Reason.EVIDENCE_MALFORMED)
    base = verify_sgx_quote(quote, at=AT)
    assert verify_sgx_quote(quote + bytes(70), at=AT) == base
    assert verify_sgx_quote(quote + random.Random(2).randbytes(999), at=AT) == base


def test_other_platforms_evidence_fails_cleanly() -> None:
    err = refused(vector("go-tdx-guest/tdx_prod_quote_SPR_E4.dat"), Reason.EVIDENCE_MALFORMED)
    assert "TDX quote" in err.message
    err = refused(vector("trustee-snp/test-report.bin"), Reason.EVIDENCE_MALFORMED)
    assert "SEV-SNP" in err.message
    refused(random.Random(4).randbytes(4733), Reason.EVIDENCE_MALFORMED)
    refused(b"", Reason.EVIDENCE_MALFORMED)


def test_parse_exposes_the_report() -> None:
    q, report = parse_sgx_quote(vector(OCCLUM))
    assert q.version == 3 and q.header.qe_svn == 8 and q.header.pce_svn == 13
    assert q.sig.qe_report.mr_signer == dcap.SGX_QE3_MRSIGNER
    assert report.isv_prod_id == 0 and report.debug


def test_synthetic_sgx_quote_and_refusals() -> None:
    spec = synth.QuoteSpec(version=3, isv_prod_id=7, isv_svn=3)
    claims = verify_sgx_quote(synth.make_quote(spec), at=synth.AT, roots=synth.ROOTS)
    assert claims.product_id == 7 and claims.svn == 3 and claims.debug is False
    assert claims.measurement == spec.mrenclave.hex() and claims.signer == spec.mrsigner.hex()

    # The TD QE's MRSIGNER is not Intel's SGX QE3
    spec = synth.QuoteSpec(version=3, qe_mrsigner=dcap.TDX_QE_MRSIGNER)
    with pytest.raises(EvidenceError) as info:
        verify_sgx_quote(synth.make_quote(spec), at=synth.AT, roots=synth.ROOTS)
    assert info.value.reason is Reason.CHAIN_INVALID and "MRSIGNER" in info.value.message

    # an SGX body in a v5 quote is not what meshshield verifies for sgx
    tdx_v5 = bytearray(synth.make_quote(synth.QuoteSpec(version=5, body_type=2)))
    refused(bytes(tdx_v5), Reason.EVIDENCE_MALFORMED)
