"""TDX quote verification against the real vectors (PROVENANCE.md §2) and synthetic quotes."""

from __future__ import annotations

import base64
import random
import struct
from datetime import UTC, datetime

import dcap_synth as synth
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from vectors import vector

from meshshield.attestation import dcap
from meshshield.attestation.claims import Platform, TcbStatus
from meshshield.attestation.tdx import parse_tdx_quote, verify_tdx_evidence, verify_tdx_quote
from meshshield.errors import EvidenceError, Reason

AT = datetime(2025, 6, 1, tzinfo=UTC)
AT_V5_SAMPLE = datetime(2026, 2, 3, tzinfo=UTC)  # its PCK starts 2026-01-27

# file, version, MRTD, REPORT_DATA (PROVENANCE.md §2), verification time
VECTORS = [
    (
        "go-tdx-guest/tdx_prod_quote_SPR_E4.dat",
        4,
        "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb",
        "6c62dec1b8191749a31dab490be532a35944dea47caef1f980863993d9899545eb7406a38d1eed313b987a467dacead6f0c87a6d766c66f6f29f8acb281f1113",
        AT,
    ),
    (
        "go-tdx-guest/quote_v5_sample.dat",
        5,
        "7348651a34b2d2d3462822e3a750ec6110125f36757c78480bbfc69cc0d21fb001a1ced3ee19747dda8f750c3bc8f876",
        "945eaacf5abc1f719d8666a942fda03d1edcb4490277396093dc5a5289ab9f1e094aed63060cd4a4933a4dd537ed1255c9c79ecb3ed82cd1b486233e31c25c3a",
        AT_V5_SAMPLE,
    ),
    (
        "go-tdx-guest/cos-113-tdx-quote.dat",
        4,
        "dae67181d3d65e073ad8f95b7907d5e927bfe9761c9ff3e9b89734a45d8954dba41394c7717cb2735396c1d04231f94a",
        "00" * 64,
        AT,
    ),
    (
        "trustee-tdx/tdx_quote_5.dat",
        5,
        "dfba221b48a22af8511542ee796603f37382800840dcd978703909bf8e64d4c8a1e9de86e7c9638bfcba422f3886400a",
        "6d6ab13b046cff606ac0074be13981b07b6325dba10b5facc96febf551c0c3be2b75f92fe1f88f4bb996969ad0174b4b7a70261b7b85c844f4b33a4674fd049f",
        AT,
    ),
    (
        "trustee-tdx/tdx_quote_6.dat",
        4,
        "21e8dead92d6c69d7cbba79816686c03a48485c7df0c11f6f04792d5e1d378f6b8c46615ba6946adccac6becffbb1e88",
        "26cae1c77185617fb6a03fc29bf1f924596e52352b9b7594940b576ae126cd4a570cc3202a900c5d19a6eb0a95b32cfd"
        + "00" * 16,
        AT,
    ),
]
SPR = "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"


def refused(quote: bytes, reason: Reason | tuple[Reason, ...], at: datetime = AT) -> EvidenceError:
    reasons = reason if isinstance(reason, tuple) else (reason,)
    with pytest.raises(EvidenceError) as info:
        verify_tdx_quote(quote, at=at)
    assert info.value.reason in reasons, info.value
    return info.value


def signed_end(quote: bytes) -> int:
    """Offset of the signature-data length field (the end of the signed region)."""
    return len(dcap.parse_quote(quote).signed)


def declared_end(quote: bytes) -> int:
    end = signed_end(quote)
    return end + 4 + struct.unpack_from("<I", quote, end)[0]


@pytest.mark.parametrize(("path", "version", "mrtd", "report_data", "at"), VECTORS)
def test_every_tdx_vector_verifies_with_its_listed_claims(
    path: str, version: int, mrtd: str, report_data: str, at: datetime
) -> None:
    claims = verify_tdx_quote(vector(path), at=at)
    assert claims.platform is Platform.TDX
    assert claims.measurement == mrtd == claims.extra["mrtd"]
    assert claims.report_data.hex() == report_data
    assert claims.debug is False
    assert claims.tcb_status is TcbStatus.UNKNOWN and claims.advisories == ()
    assert claims.extra["quote_version"] == version
    assert claims.signer is None and claims.svn is None and claims.product_id is None
    assert claims.simulated is False
    for k in ("mrconfigid", "mrowner", "mrownerconfig", "td_attributes", "xfam", "mrseam"):
        assert isinstance(claims.extra[k], str)
    # v5 vectors are TDX 1.5 bodies (type 3)
    assert ("mrservicetd" in claims.extra) == (version == 5)


def test_spr_e4_rtmrs_and_json_view() -> None:
    claims = verify_tdx_quote(vector(SPR), at=AT)
    assert claims.extra["rtmr0"] == (
        "2927da70461cd63266f43230cc1849c03ef25ebe490062a801d8fcc80af42976823adf08f833c1e50b51779c6593f32a"
    )
    assert claims.extra["rtmr1"] == (
        "2c700b8ba9b85783f8be9fb9443647bdc0bb3c50747f06297cc6538c25a5f589c4b56d035c59107c6bc5800db2cacb61"
    )
    assert claims.extra["rtmr2"] == (
        "8652f0caaba7e215ea442dc36a4499d8fec3362f3a0b2ca151cbe4b3e6466fe59c7368b3c2287fc7c3bf5c924eb4424e"
    )
    assert claims.extra["rtmr3"] == "00" * 48
    assert claims.extra["tee_tcb_svn"] == "03000400000000000000000000000000"
    assert claims.extra["td_attributes"] == "0000004000000000"  # bit 0 (DEBUG) clear
    view = claims.to_json()
    assert view["platform"] == "tdx" and view["measurement"] == claims.measurement
    assert view["mrconfigid"] == claims.extra["mrconfigid"] and view["tcb_status"] == "unknown"


def test_evidence_json_round_trip() -> None:
    quote = vector(SPR)
    claims = verify_tdx_evidence({"quote": base64.b64encode(quote).decode()}, at=AT)
    assert claims == verify_tdx_quote(quote, at=AT)


@pytest.mark.parametrize(
    ("evidence", "needle"),
    [
        ([], "JSON object"),
        ({}, '"quote"'),
        ({"quote": 5}, "base64 string"),
        ({"quote": "!!!"}, "not valid standard base64"),
        ({"quote": "QQ="}, "base64"),
        ({"quote": "QR=="}, "canonical"),
        ({"quote": "é"}, "non-ASCII"),
        ({"quote": "", "extra": 1}, "exactly"),
        ({"report": "AA==", "certs": ""}, "sev-snp"),
        ({"report": "AA==", "signature": "AA=="}, "sim"),
        ({"quote": ""}, "shorter than its 48-byte header"),
    ],
)
def test_malformed_evidence_json(evidence: object, needle: str) -> None:
    with pytest.raises(EvidenceError) as info:
        verify_tdx_evidence(evidence, at=AT)
    assert info.value.reason is Reason.EVIDENCE_MALFORMED
    assert needle in info.value.message


def test_outside_the_pck_window_names_the_certificate() -> None:
    err = refused(vector("go-tdx-guest/quote_v5_sample.dat"), Reason.CHAIN_INVALID, at=AT)
    assert "PCK leaf certificate" in err.message and "Intel SGX PCK Certificate" in err.message
    assert "not yet valid" in err.message and "2026-01-27T14:36:27Z" in err.message

    err = refused(vector(SPR), Reason.CHAIN_INVALID, at=datetime(2030, 1, 1, tzinfo=UTC))
    assert "PCK leaf certificate" in err.message and "expired" in err.message
    assert "2029-09-20T13:20:31Z" in err.message

    err = refused(vector(SPR), Reason.CHAIN_INVALID, at=datetime(2034, 1, 1, tzinfo=UTC))
    assert "Intel SGX PCK Platform CA" in err.message and "2033-05-21" in err.message

    err = refused(vector(SPR), Reason.CHAIN_INVALID, at=datetime(2018, 1, 1, tzinfo=UTC))
    assert "Intel SGX Root CA" in err.message and "not yet valid" in err.message


def test_naive_time_is_a_caller_error() -> None:
    with pytest.raises(ValueError):
        verify_tdx_quote(vector(SPR), at=datetime(2025, 6, 1))


@pytest.mark.parametrize(
    "path", ["go-tdx-guest/tdx_prod_quote_SPR_E4.dat", "trustee-tdx/tdx_quote_5.dat"]
)
def test_a_flipped_bit_anywhere_in_the_signed_region_is_refused(path: str) -> None:
    # Every bit of the header and v5 body descriptor; one (seeded) bit of every body byte.
    quote = bytearray(vector(path))
    rng = random.Random(path)
    for offset in range(signed_end(bytes(quote))):
        bits = range(8) if offset < 54 else [rng.randrange(8)]
        for bit in bits:
            quote[offset] ^= 1 << bit
            try:
                verify_tdx_quote(bytes(quote), at=AT)
            except EvidenceError as e:
                assert e.reason in (Reason.SIGNATURE_INVALID, Reason.EVIDENCE_MALFORMED), (
                    offset,
                    bit,
                    e,
                )
            else:
                raise AssertionError(f"bit {bit} of byte {offset} flipped and still verified")
            finally:
                quote[offset] ^= 1 << bit


def test_body_flips_are_signature_invalid_header_flips_may_be_malformed() -> None:
    quote = bytearray(vector(SPR))
    quote[48 + 136] ^= 1  # MRTD
    assert (
        "quote signature does not verify" in refused(bytes(quote), Reason.SIGNATURE_INVALID).message
    )
    quote = bytearray(vector(SPR))
    quote[0] ^= 1  # version 4 -> 5
    refused(bytes(quote), Reason.EVIDENCE_MALFORMED)


def test_flips_in_the_signature_data_are_refused() -> None:
    original = vector(SPR)
    end = signed_end(original)
    # signature, attestation key, QE report, QE report signature, auth data
    for offset in (
        end + 4,
        end + 4 + 64,
        end + 4 + 128 + 6 + 100,
        end + 4 + 134 + 384 + 10,
        end + 4 + 134 + 448 + 4,
    ):
        quote = bytearray(original)
        quote[offset] ^= 0x10
        refused(
            bytes(quote),
            (Reason.SIGNATURE_INVALID, Reason.CHAIN_INVALID, Reason.EVIDENCE_MALFORMED),
        )


def test_truncation_anywhere_short_of_the_signature_data_is_malformed() -> None:
    for path, _, _, _, at in VECTORS[:2]:
        quote = vector(path)
        for n in range(declared_end(quote)):
            refused(quote[:n], Reason.EVIDENCE_MALFORMED, at=at)


def test_trailing_bytes_are_allowed() -> None:
    quote = vector(SPR)
    end = declared_end(quote)
    assert quote[end:] == b"\nextra bytes(only for testing purpose)\n"
    base = verify_tdx_quote(quote[:end], at=AT)
    rng = random.Random(6)
    assert verify_tdx_quote(quote + rng.randbytes(300), at=AT) == base
    assert verify_tdx_quote(vector("go-tdx-guest/cos-113-tdx-quote.dat"), at=AT).debug is False


def test_other_platforms_evidence_fails_cleanly() -> None:
    err = refused(vector("go-sev-guest/attestation.bin"), Reason.EVIDENCE_MALFORMED)
    assert "SEV-SNP" in err.message
    err = refused(vector("trustee-sgx/occlum_quote.dat"), Reason.EVIDENCE_MALFORMED)
    assert "SGX quote" in err.message
    refused(vector("go-tdx-guest/report.dat"), Reason.EVIDENCE_MALFORMED)  # a TDREPORT
    refused(bytes(random.Random(1).randbytes(5000)), Reason.EVIDENCE_MALFORMED)


def test_a_chain_to_another_root_is_refused() -> None:
    with pytest.raises(EvidenceError) as info:
        verify_tdx_quote(vector(SPR), at=AT, roots=[synth.ROOT])
    assert info.value.reason is Reason.CHAIN_INVALID
    assert "not signed by the trusted Intel SGX Root CA" in info.value.message


def test_parse_exposes_the_td_report() -> None:
    q, td = parse_tdx_quote(vector("go-tdx-guest/quote_v5_sample.dat"))
    assert q.version == 5 and q.body_type == dcap.BODY_TYPE_TDX15
    assert td.tee_tcb_svn2 is not None and td.mr_service_td is not None
    assert q.trailing == 0


# --- synthetic quotes (test chain injected as the root) -----------------------------------


@pytest.mark.parametrize(("version", "body_type"), [(4, None), (5, 2), (5, 3)])
def test_synthetic_tdx_quotes_of_every_layout(version: int, body_type: int | None) -> None:
    spec = synth.QuoteSpec(version=version, body_type=body_type)
    claims = verify_tdx_quote(synth.make_quote(spec), at=synth.AT, roots=synth.ROOTS)
    assert claims.measurement == spec.mrtd.hex()
    assert claims.report_data == spec.report_data
    assert claims.extra["quote_version"] == version
    assert claims.extra["rtmr2"] == "12" * 48
    assert ("mrservicetd" in claims.extra) == (body_type == 3)
    if body_type == 3:
        assert claims.extra["mrservicetd"] == "aa" * 48


def test_debug_comes_from_td_attributes_bit_0() -> None:
    spec = synth.QuoteSpec(td_attributes=bytes([1]) + bytes(7))
    assert verify_tdx_quote(synth.make_quote(spec), at=synth.AT, roots=synth.ROOTS).debug
    spec = synth.QuoteSpec(td_attributes=bytes([0xFE]) + bytes(7))
    assert not verify_tdx_quote(synth.make_quote(spec), at=synth.AT, roots=synth.ROOTS).debug


def synth_refused(spec: synth.QuoteSpec, reason: Reason, needle: str) -> None:
    with pytest.raises(EvidenceError) as info:
        verify_tdx_quote(synth.make_quote(spec), at=synth.AT, roots=synth.ROOTS)
    assert info.value.reason is reason, info.value
    assert needle in info.value.message


def test_synthetic_refusals() -> None:
    synth_refused(synth.QuoteSpec(qe_mrsigner=bytes(32)), Reason.CHAIN_INVALID, "MRSIGNER")
    synth_refused(synth.QuoteSpec(qe_binding=bytes(64)), Reason.SIGNATURE_INVALID, "does not vouch")
    debug_qe = bytes([0x17]) + synth.QE_ATTRIBUTES[1:]
    synth_refused(synth.QuoteSpec(qe_attributes=debug_qe), Reason.CHAIN_INVALID, "debug mode")
    synth_refused(
        synth.QuoteSpec(chain=synth.pem(synth.CA, synth.ROOT)), Reason.CHAIN_INVALID, "is a CA"
    )
    synth_refused(synth.QuoteSpec(cert_type=3), Reason.EVIDENCE_MALFORMED, "type is 3")
    synth_refused(
        synth.QuoteSpec(chain=synth.pem(synth.pck_leaf())), Reason.CHAIN_INVALID, "1 certificate"
    )
    synth_refused(
        synth.QuoteSpec(chain=synth.pem(synth.pck_leaf(), synth.ROOT)),
        Reason.CHAIN_INVALID,
        "not signed by any CA certificate",
    )
    synth_refused(synth.QuoteSpec(chain=b"junk"), Reason.EVIDENCE_MALFORMED, "no PEM")
    # the quote carries a look-alike root: only the injected (pinned) root counts
    other_ca = synth.cert(synth.CA_CN, synth.ROOT_CN, "ca", "other-root", ca=True)
    synth_refused(
        synth.QuoteSpec(chain=synth.pem(synth.pck_leaf(), other_ca, synth.OTHER_ROOT)),
        Reason.CHAIN_INVALID,
        "not signed by the trusted Intel SGX Root CA",
    )


def test_v5_body_descriptor_is_checked() -> None:
    quote = bytearray(synth.make_quote(synth.QuoteSpec(version=5, body_type=2)))
    struct.pack_into("<H", quote, 48, 3)  # claims TDX 1.5 but is 584 bytes
    refused(bytes(quote), Reason.EVIDENCE_MALFORMED)
    struct.pack_into("<H", quote, 48, 1)  # SGX body under TEE type 0x81
    refused(bytes(quote), Reason.EVIDENCE_MALFORMED)
    struct.pack_into("<H", quote, 48, 9)
    refused(bytes(quote), Reason.EVIDENCE_MALFORMED)


def test_unknown_version_key_type_and_vendor_are_malformed() -> None:
    good = vector(SPR)
    for offset, value, needle in (
        (0, 6, "version is 6"),
        (2, 3, "attestation key type is 3"),
        (4, 0x80, "TEE type"),
        (12, 0, "vendor"),
    ):
        quote = bytearray(good)
        quote[offset] = value
        err = refused(bytes(quote), Reason.EVIDENCE_MALFORMED)
        assert needle in err.message


def test_certificates_cryptography_rejects_late_are_malformed() -> None:
    # Found by the property tests: X.509 version 2 raises InvalidVersion, not ValueError.
    der = bytearray(synth.pck_leaf().public_bytes(Encoding.DER))
    at = der.index(bytes.fromhex("a003020102"))  # [0] { INTEGER 2 } = v3
    der[at + 4] = 0x01
    leaf_pem = (
        b"-----BEGIN CERTIFICATE-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE-----\n"
    )
    chain = leaf_pem + synth.pem(synth.CA, synth.ROOT)
    synth_refused(synth.QuoteSpec(chain=chain), Reason.EVIDENCE_MALFORMED, "not valid PEM")
