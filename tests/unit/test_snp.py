"""AMD SEV-SNP verification: real vectors (../shared/vectors) and synthetic layouts."""

from __future__ import annotations

import base64
import hashlib
import re
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from snp_synth import AT, CPUID, SynthPki, build_report, default_chip_id, rsa_key, sign_report
from vectors import vector

from meshshield.attestation import roots, snp_chain
from meshshield.attestation.claims import Platform, TcbStatus
from meshshield.attestation.snp import verify_snp_evidence, verify_snp_report
from meshshield.attestation.snp_report import Product, decode_tcb, parse_snp_report
from meshshield.errors import EvidenceError, Reason

REPO = Path(__file__).resolve().parents[2]
MALFORMED, SIG, CHAIN = Reason.EVIDENCE_MALFORMED, Reason.SIGNATURE_INVALID, Reason.CHAIN_INVALID


def refused(reason: Reason, fn, *args, match: str | None = None, **kwargs) -> EvidenceError:  # type: ignore[no-untyped-def]
    with pytest.raises(EvidenceError) as info:
        fn(*args, **kwargs)
    assert info.value.reason is reason, info.value.message
    if match is not None:
        assert re.search(match, info.value.message), info.value.message
    return info.value


def pem_of(der: bytes) -> str:
    with warnings.catch_warnings():  # AMD's VCEKs have serial number 0
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        cert = x509.load_der_x509_certificate(der)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# --- real vectors (PROVENANCE.md) --------------------------------------------------------

REAL = {
    "go-sev-guest": dict(
        report="go-sev-guest/attestation.bin",
        cert="go-sev-guest/vcek.testcer",
        measurement="b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
        "6bdf8a9ece31a5a608eb0cf2e4872b01",
        report_data=bytes([1, 2, 3, 4, 5]) + bytes(59),
        debug=True,  # policy 0xb0000: bit 19
        policy="0xb0000",
        version=2,
        kind="vcek",
        tcb={"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68},
        chip_prefix="3ac3fe21e13fb099",
    ),
    "trustee-vcek": dict(
        report="trustee-snp/test-report.bin",
        cert="trustee-snp/test-vcek.der",
        measurement="a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c"
        "23500644e0e692e6be917f9050d3d38c",
        report_data=bytes.fromhex(
            "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2") + bytes(32),
        debug=False,
        policy="0x3001f",
        version=2,
        kind="vcek",
        tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
        chip_prefix="c38427a30d4c7af9",
    ),
    "trustee-vlek": dict(
        report="trustee-snp/test-vlek-report.bin",
        cert="trustee-snp/test-vlek.der",
        measurement="8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4"
        "e8c9af857f5ceeb5a493df2a570d7bf0",
        report_data=bytes.fromhex(
            "819770b7e6ea6df8dd8fd4dd146b073c0bf4f3ce5b0977ecac486e3a05ed1bd5"
            "4e2a7ac1f5d1ca02e7d7d5ef9f73b8574fd9359e3a480d741a4478e8a7bc27ca"),
        debug=False,
        policy="0x30000",
        version=3,
        kind="vlek",
        tcb={"bootloader": 4, "tee": 0, "snp": 24, "microcode": 217},
        chip_prefix="0000000000000000",
    ),
}
# Inside every window: VCEKs 2022-09-24/2023-01-24 -> 2029/2030, VLEK 2024-12-10 -> 2025-12-10.
REAL_AT = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_vector_verifies_with_provenance_values(name: str) -> None:
    v = REAL[name]
    claims = verify_snp_report(vector(v["report"]), vector(v["cert"]), at=REAL_AT)
    assert claims.platform is Platform.SEV_SNP
    assert claims.measurement == v["measurement"]
    assert claims.report_data == v["report_data"]
    assert claims.debug is v["debug"]
    assert claims.tcb_status is TcbStatus.UNKNOWN
    assert (claims.signer, claims.product_id, claims.svn) == (None, None, None)
    extra = claims.extra
    assert extra["reported_tcb"] == v["tcb"]
    assert extra["policy"] == v["policy"]
    assert extra["report_version"] == v["version"]
    assert extra["signing_key"] == v["kind"]
    assert extra["product"] == "milan"
    assert extra["chip_id"].startswith(v["chip_prefix"])
    assert len(claims.to_json()["measurement"]) == 96


def test_vlek_vector_reports_its_csp_and_cpuid() -> None:
    v = REAL["trustee-vlek"]
    extra = verify_snp_report(vector(v["report"]), vector(v["cert"]), at=REAL_AT).extra
    assert extra["csp_id"] == "CN=cc-us-east-2.amazonaws.com"
    assert extra["cpuid"] == {"family": 0x19, "model": 1, "stepping": 1}
    assert extra["chip_id_masked"] is True
    assert extra["vmpl"] == 1


def test_reported_tcb_not_current_tcb_is_compared() -> None:
    # test-report.bin's CURRENT_TCB (ucode 0xce) differs from its REPORTED_TCB and VCEK.
    v = REAL["trustee-vcek"]
    extra = verify_snp_report(vector(v["report"]), vector(v["cert"]), at=REAL_AT).extra
    assert extra["current_tcb"]["microcode"] == 0xCE
    assert extra["reported_tcb"]["microcode"] == 115


def test_evidence_json_with_pem_and_with_extra_certs() -> None:
    v = REAL["go-sev-guest"]
    report, der = vector(v["report"]), vector(v["cert"])
    b64 = base64.b64encode(report).decode()
    a = verify_snp_evidence({"report": b64, "certs": pem_of(der)}, at=REAL_AT)
    b = verify_snp_evidence({"report": b64}, at=REAL_AT, extra_certs=der)
    kds = vector("go-sev-guest/ask_ark_milan.pem")
    c = verify_snp_evidence({"report": b64, "certs": pem_of(der)}, at=REAL_AT, extra_certs=kds)
    d = verify_snp_report(report, der + vector("trustee-snp/milan_ask_ark_asvk.pem"), at=REAL_AT)
    assert a == b == c == d


def test_vlek_with_trustee_bundle_order_ask_ark_asvk() -> None:
    v = REAL["trustee-vlek"]
    certs = pem_of(vector(v["cert"])).encode() + vector("trustee-snp/milan_ask_ark_asvk.pem")
    claims = verify_snp_report(vector(v["report"]), certs, at=REAL_AT)
    assert claims.extra["signing_key"] == "vlek"


@pytest.mark.parametrize(
    ("name", "at", "role", "state"),
    [
        ("go-sev-guest", datetime(2022, 1, 1, tzinfo=UTC), "VCEK", "is not yet valid"),
        ("go-sev-guest", datetime(2029, 9, 25, tzinfo=UTC), "VCEK", "has expired"),
        ("trustee-vlek", datetime(2026, 1, 1, tzinfo=UTC), "VLEK", "has expired"),
        ("trustee-vlek", datetime(2024, 12, 10, tzinfo=UTC), "VLEK", "is not yet valid"),
        ("go-sev-guest", datetime(2046, 1, 1, tzinfo=UTC), "ARK", "has expired"),
    ],
)
def test_outside_a_window_names_the_certificate(
    name: str, at: datetime, role: str, state: str
) -> None:
    v = REAL[name]
    err = refused(CHAIN, verify_snp_report, vector(v["report"]), vector(v["cert"]), at=at)
    assert err.message.count(role) >= 1 and state in err.message
    assert re.search(r"valid from \d{4}-\d\d-\d\dT\S+Z to \d{4}-\d\d-\d\dT\S+Z", err.message)


def test_expired_vlek_message_names_its_window() -> None:
    v = REAL["trustee-vlek"]
    err = refused(CHAIN, verify_snp_report, vector(v["report"]), vector(v["cert"]),
                  at=datetime(2026, 1, 1, tzinfo=UTC))
    assert "VLEK (CN=SEV-VLEK" in err.message
    assert "2024-12-10T22:14:21Z to 2025-12-10T22:14:21Z" in err.message


@pytest.mark.parametrize(
    "cert", ["trustee-snp/test-vcek-invalid-legacy.der", "trustee-snp/test-vcek-invalid-new.der"]
)
def test_invalid_vceks_are_chain_invalid(cert: str) -> None:
    refused(CHAIN, verify_snp_report, vector("trustee-snp/test-report.bin"), vector(cert),
            at=REAL_AT, match="does not verify with the key of ASK")


def test_another_chips_vcek_is_signature_invalid() -> None:
    refused(SIG, verify_snp_report, vector("go-sev-guest/attestation.bin"),
            vector("trustee-snp/test-vcek.der"), at=REAL_AT)


def test_naive_time_is_utc() -> None:
    v = REAL["go-sev-guest"]
    claims = verify_snp_report(vector(v["report"]), vector(v["cert"]), at=datetime(2025, 6, 1))
    assert claims.measurement == v["measurement"]


def test_unpinned_self_signed_root_in_the_evidence_is_refused() -> None:
    pki = SynthPki(Product.MILAN)
    v = REAL["go-sev-guest"]
    certs = vector(v["cert"]) + pki.ark.public_bytes(serialization.Encoding.PEM)
    refused(CHAIN, verify_snp_report, vector(v["report"]), certs, at=REAL_AT,
            match="not a pinned AMD ARK")


def test_test_chain_is_refused_without_injected_roots() -> None:
    pki = SynthPki(Product.MILAN)
    leaf = pki.leaf()
    report = sign_report(build_report(), leaf.key)
    refused(CHAIN, verify_snp_report, report, leaf.pem + pki.chain_pem(), at=AT)
    refused(CHAIN, verify_snp_report, report, leaf.pem, at=AT)  # falls back to AMD's ASK


def test_no_roots_trusts_nothing() -> None:
    v = REAL["go-sev-guest"]
    refused(CHAIN, verify_snp_report, vector(v["report"]), vector(v["cert"]), at=REAL_AT,
            roots=[])


# --- bit flips, truncation, other platforms ------------------------------------------------

FIELD_OFFSETS = [0x000, 0x001, 0x004, 0x008, 0x00A, 0x00F, 0x010, 0x030, 0x034, 0x038, 0x040,
                 0x048, 0x04C, 0x050, 0x08F, 0x090, 0x0BF, 0x0C0, 0x0E0, 0x110, 0x140, 0x160,
                 0x180, 0x186, 0x187, 0x188, 0x18A, 0x19F, 0x1A0, 0x1DF, 0x1E0, 0x1E8, 0x1EB,
                 0x1EC, 0x1EF, 0x1F0, 0x1F8, 0x200, 0x208, 0x29F]


@pytest.mark.parametrize("name", ["go-sev-guest", "trustee-vlek"])
def test_every_bit_of_sampled_offsets_never_verifies(name: str) -> None:
    v = REAL[name]
    report, cert = vector(v["report"]), vector(v["cert"])
    offsets = sorted(set(FIELD_OFFSETS + list(range(0, 0x2A0, 23))))
    seen: dict[Reason, int] = {}
    for off in offsets:
        for bit in range(8):
            bad = bytearray(report)
            bad[off] ^= 1 << bit
            with pytest.raises(EvidenceError) as info:
                verify_snp_report(bytes(bad), cert, at=REAL_AT)
            assert info.value.reason in (SIG, MALFORMED), (hex(off), bit, info.value)
            seen[info.value.reason] = seen.get(info.value.reason, 0) + 1
    assert seen[SIG] > seen.get(MALFORMED, 0)


@pytest.mark.parametrize(
    ("offset", "reason", "match"),
    [
        (0x090, SIG, "signature does not verify"),  # MEASUREMENT
        (0x050, SIG, "signature does not verify"),  # REPORT_DATA
        (0x180, SIG, "signature does not verify"),  # REPORTED_TCB: signature first
        (0x1A0, SIG, "signature does not verify"),  # CHIP_ID
        (0x000, MALFORMED, "VERSION at offset 0x000"),
        (0x034, MALFORMED, "SIGNATURE_ALGO at offset 0x034"),
        (0x04C, MALFORMED, "offset 0x04c"),
        (0x190, MALFORMED, "offset 0x190"),
        (0x1EB, MALFORMED, "offset 0x1eb"),
        (0x250, MALFORMED, "offset 0x250"),
        (0x2A0, SIG, "signature does not verify"),  # R
        (0x2E8, SIG, "signature does not verify"),  # S
        (0x400, MALFORMED, "offset 0x400"),  # reserved part of the signature
    ],
)
def test_flip_reasons(offset: int, reason: Reason, match: str) -> None:
    v = REAL["go-sev-guest"]
    bad = bytearray(vector(v["report"]))
    bad[offset] ^= 0x02
    refused(reason, verify_snp_report, bytes(bad), vector(v["cert"]), at=REAL_AT, match=match)


def test_policy_bits() -> None:
    v = REAL["go-sev-guest"]
    report = vector(v["report"])
    bad = bytearray(report)
    bad[0x00A] &= ~0x02  # bit 17 (must be one)
    refused(MALFORMED, verify_snp_report, bytes(bad), vector(v["cert"]), at=REAL_AT,
            match="bit 17 clear")
    bad = bytearray(report)
    bad[0x00F] |= 0x80  # bit 63
    refused(MALFORMED, verify_snp_report, bytes(bad), vector(v["cert"]), at=REAL_AT,
            match="reserved bit 63")


def test_every_truncation_and_extension_is_malformed() -> None:
    report = vector("go-sev-guest/attestation.bin")
    cert = vector("go-sev-guest/vcek.testcer")
    for n in range(len(report)):
        refused(MALFORMED, verify_snp_report, report[:n], cert, at=REAL_AT)
    refused(MALFORMED, verify_snp_report, report + b"\0", cert, at=REAL_AT, match="trailing")


def test_random_bytes_are_malformed() -> None:
    cert = vector("go-sev-guest/vcek.testcer")
    for seed in range(32):
        junk = hashlib.shake_256(seed.to_bytes(2, "big")).digest(0x4A0)
        refused(MALFORMED, verify_snp_report, junk, cert, at=REAL_AT)


@pytest.mark.parametrize(
    "quote",
    ["go-tdx-guest/tdx_prod_quote_SPR_E4.dat", "trustee-tdx/tdx_quote_5.dat",
     "trustee-sgx/occlum_quote.dat"],
)
def test_intel_quotes_offered_as_snp_are_malformed(quote: str) -> None:
    q = vector(quote)
    cert = vector("go-sev-guest/vcek.testcer")
    refused(MALFORMED, verify_snp_report, q, cert, at=REAL_AT)
    refused(MALFORMED, verify_snp_report, q[:0x4A0], cert, at=REAL_AT, match="VERSION")
    b64 = base64.b64encode(q).decode()
    refused(MALFORMED, verify_snp_evidence, {"quote": b64}, at=REAL_AT, match="tdx or sgx")
    refused(MALFORMED, verify_snp_evidence, {"report": b64, "certs": pem_of(cert)}, at=REAL_AT)


def test_intel_certificates_offered_as_vcek() -> None:
    chain = vector("go-tdx-guest/pckcrl_issuer_chain.pem")
    report = vector("go-sev-guest/attestation.bin")
    refused(CHAIN, verify_snp_report, report, chain, at=REAL_AT, match="Intel SGX Root CA")
    intermediate = chain[: chain.index(b"-----END CERTIFICATE-----") + 26]
    refused(MALFORMED, verify_snp_report, report, intermediate, at=REAL_AT,
            match="no VCEK or VLEK")


@pytest.mark.parametrize(
    ("evidence", "match"),
    [
        ([], "JSON object"),
        ("report", "JSON object"),
        ({}, '"report"'),
        ({"report": "AAAA"}, '"certs"'),
        ({"report": 5, "certs": ""}, "base64 string"),
        ({"report": "AAAA", "certs": "", "extra": 1}, "unexpected"),
        ({"report": "AAB=", "certs": ""}, "canonical"),
        ({"report": "A A=", "certs": ""}, "base64"),
        ({"report": "é", "certs": ""}, "base64"),
        ({"report": "A" * 2000, "certs": ""}, "at most"),
        ({"report": "AAAA", "signature": "AAAA"}, "sim evidence"),
        ({"report": "AAAA", "certs": 7}, "PEM string"),
    ],
)
def test_evidence_shape(evidence: object, match: str) -> None:
    refused(MALFORMED, verify_snp_evidence, evidence, at=REAL_AT, match=match)


def test_bad_certificate_bytes() -> None:
    report = vector("go-sev-guest/attestation.bin")
    der = vector("go-sev-guest/vcek.testcer")
    for certs in (b"", b"\x00\x00", b"junk", der[:100], der[:-1], der + b"junk",
                  b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                  b"\x30\x84\x00\x00\x00\x01", b"x" * 70000):
        refused(MALFORMED, verify_snp_report, report, certs, at=REAL_AT)


# --- synthetic layouts (test chain injected as roots) ----------------------------------------


@pytest.fixture(scope="module")
def pkis() -> dict[Product, SynthPki]:
    return {p: SynthPki(p) for p in Product}


def synth_verify(pki: SynthPki, report: bytes, leaf_pem: bytes, kind: str = "vcek"):  # type: ignore[no-untyped-def]
    return verify_snp_report(report, leaf_pem + pki.chain_pem(kind), at=AT, roots=pki.roots)


@pytest.mark.parametrize(
    ("product", "version"),
    [(p, v) for p in Product for v in (2, 3, 5)],  # v2 on Turin: the VCEK names the product
)
def test_synthetic_vcek_layouts(pkis: dict[Product, SynthPki], product: Product,
                                version: int) -> None:
    pki = pkis[product]
    leaf = pki.leaf(tcb=(7, 1, 22, 0xD5), fmc=4)
    report = sign_report(build_report(product, version=version, tcb=(7, 1, 22, 0xD5), fmc=4),
                         leaf.key)
    claims = synth_verify(pki, report, leaf.pem)
    expected = {"bootloader": 7, "tee": 1, "snp": 22, "microcode": 0xD5}
    if product is Product.TURIN:
        expected["fmc"] = 4
    assert claims.extra["reported_tcb"] == expected
    assert claims.extra["product"] == product.value
    assert claims.extra["report_version"] == version
    assert claims.measurement == bytes(range(48)).hex()
    assert claims.extra["host_data"] == "5a" * 32
    assert ("cpuid" in claims.extra) is (version >= 3)
    if version == 5:
        assert claims.extra["launch_mit_vector"] == "0x3"
        assert claims.extra["current_mit_vector"] == "0x7"
    else:
        assert "launch_mit_vector" not in claims.extra


@pytest.mark.parametrize("product", list(Product))
def test_synthetic_vlek(pkis: dict[Product, SynthPki], product: Product) -> None:
    pki = pkis[product]
    leaf = pki.leaf("vlek")
    report = sign_report(build_report(product, version=5, signing_key=1), leaf.key)
    claims = synth_verify(pki, report, leaf.pem, "vlek")
    assert claims.extra["signing_key"] == "vlek"
    assert claims.extra["csp_id"] == "CN=cloud.example"


def test_turin_tcb_layout_is_not_milans(pkis: dict[Product, SynthPki]) -> None:
    pki = pkis[Product.TURIN]
    leaf = pki.leaf(tcb=(7, 1, 22, 0xD5), fmc=4)
    good = build_report(Product.TURIN, tcb=(7, 1, 22, 0xD5), fmc=4)
    assert decode_tcb(bytes(good[0x180:0x188]), Product.TURIN).fmc == 4
    milan_style = bytearray(good)
    milan_style[0x180:0x188] = bytes([7, 1, 0, 0, 0, 0, 22, 0xD5])
    refused(CHAIN, synth_verify, pki, sign_report(milan_style, leaf.key), leaf.pem,
            match="REPORTED_TCB")


@pytest.mark.parametrize(
    ("product", "leaf_kw", "report_kw", "match"),
    [
        (Product.MILAN, {"tcb": (3, 0, 8, 114)}, {}, "microcode is 115 but"),
        (Product.GENOA, {"tcb": (2, 0, 8, 115)}, {}, "bootloader is 3 but"),
        (Product.TURIN, {"fmc": 2}, {"fmc": 1}, "fmc is 1 but"),
        (Product.MILAN, {"omit": (".3.3",)}, {}, "no snp SPL extension"),
        (Product.TURIN, {"omit": (".3.9",)}, {}, "no fmc SPL extension"),
        (Product.MILAN, {"hwid": bytes(range(2, 66))}, {}, "another chip"),
        (Product.TURIN, {"hwid": bytes(8)}, {}, "another chip"),
        (Product.MILAN, {"omit": (".4",)}, {}, "no hwID"),
        (Product.MILAN, {"hwid": b"\x04\x14" + b"\x01" * 20}, {}, "hwID is 20 bytes"),
        (Product.MILAN, {"hwid": b"\x01" * 20}, {}, "hwID extension .* is not DER"),
        (Product.MILAN, {}, {"cpuid": CPUID[Product.GENOA]}, "CPUID is that of Genoa"),
        (Product.GENOA, {}, {"cpuid": CPUID[Product.TURIN]}, "CPUID is that of Turin"),
        (Product.MILAN, {"product_name": "Genoa-B1"}, {}, "names product"),
        (Product.MILAN, {}, {"signing_key": 1, "chip_id": default_chip_id(Product.MILAN)},
         "SIGNING_KEY says"),
    ],
)
def test_report_certificate_disagreement_is_chain_invalid(
    pkis: dict[Product, SynthPki], product: Product, leaf_kw: dict, report_kw: dict, match: str
) -> None:
    pki = pkis[product]
    leaf = pki.leaf(**leaf_kw)
    report = sign_report(build_report(product, **report_kw), leaf.key)
    refused(CHAIN, synth_verify, pki, report, leaf.pem, match=match)


def test_hwid_as_der_octet_string_and_masked_chip_id(pkis: dict[Product, SynthPki]) -> None:
    pki = pkis[Product.GENOA]
    chip = default_chip_id(Product.GENOA)
    leaf = pki.leaf(hwid=b"\x04\x40" + chip)
    claims = synth_verify(pki, sign_report(build_report(Product.GENOA), leaf.key), leaf.pem)
    assert claims.extra["chip_id"] == chip.hex() and not claims.extra["chip_id_masked"]
    masked = sign_report(build_report(Product.GENOA, mask_chip_key=True), leaf.key)
    assert synth_verify(pki, masked, leaf.pem).extra["chip_id_masked"] is True
    host_masked = sign_report(build_report(Product.GENOA, chip_id=bytes(64)), leaf.key)
    assert synth_verify(pki, host_masked, leaf.pem).extra["chip_id_masked"] is True


def test_mask_chip_key_with_a_chip_id_is_malformed(pkis: dict[Product, SynthPki]) -> None:
    pki = pkis[Product.MILAN]
    leaf = pki.leaf()
    report = build_report(mask_chip_key=True, chip_id=default_chip_id(Product.MILAN))
    refused(MALFORMED, synth_verify, pki, sign_report(report, leaf.key), leaf.pem,
            match="MASK_CHIP_KEY")


@pytest.mark.parametrize(
    ("report_kw", "reason", "match"),
    [
        ({"version": 4}, MALFORMED, "supported versions are 2, 3, 5"),
        ({"version": 1}, MALFORMED, "VERSION"),
        ({"version": 6}, MALFORMED, "VERSION"),
        ({"sig_algo": 2}, MALFORMED, "SIGNATURE_ALGO"),
        ({"signing_key": 3}, MALFORMED, "values 2-6 are reserved"),
        ({"signing_key": 7}, SIG, "unsigned"),
        ({"version": 3, "mit": (1, 1)}, None, None),  # ignored below v5: zero bytes written
    ],
)
def test_synthetic_field_rules(pkis: dict[Product, SynthPki], report_kw: dict,
                               reason: Reason | None, match: str | None) -> None:
    pki = pkis[Product.MILAN]
    leaf = pki.leaf()
    report = sign_report(build_report(**report_kw), leaf.key)
    if reason is None:
        synth_verify(pki, report, leaf.pem)
    else:
        refused(reason, synth_verify, pki, report, leaf.pem, match=match)


def test_v3_report_with_mitigation_bytes_is_malformed(pkis: dict[Product, SynthPki]) -> None:
    pki = pkis[Product.TURIN]
    leaf = pki.leaf()
    report = build_report(Product.TURIN, version=5)
    report[0x000] = 3  # the mitigation vectors at 0x1f8 are reserved before version 5
    refused(MALFORMED, synth_verify, pki, sign_report(report, leaf.key), leaf.pem,
            match="offset 0x1f8")


def test_zero_signature_is_signature_invalid(pkis: dict[Product, SynthPki]) -> None:
    pki = pkis[Product.MILAN]
    leaf = pki.leaf()
    refused(SIG, synth_verify, pki, bytes(build_report()), leaf.pem)


@pytest.mark.parametrize(
    ("leaf_kw", "match"),
    [
        ({"not_after": datetime(2025, 1, 1, tzinfo=UTC)}, "VCEK .* has expired"),
        ({"pss": False}, "RSASSA-PSS"),
        ({"issuer_key": rsa_key(7)}, "does not verify with the key of ASK"),
        ({"key": ec.generate_private_key(ec.SECP256R1()).public_key()}, "P-384"),
    ],
)
def test_synthetic_chain_faults(pkis: dict[Product, SynthPki], leaf_kw: dict, match: str) -> None:
    pki = pkis[Product.MILAN]
    leaf = pki.leaf(**leaf_kw)
    report = sign_report(build_report(), leaf.key)
    refused(CHAIN, synth_verify, pki, report, leaf.pem, match=match)


def test_intermediate_must_be_a_ca(pkis: dict[Product, SynthPki]) -> None:
    from snp_synth import sign_cert

    pki = pkis[Product.MILAN]
    not_ca = sign_cert(pki.ask_name, pki.ark_name, rsa_key(1).public_key(), rsa_key(0), ca=False)
    leaf = pki.leaf()
    certs = leaf.pem + not_ca.public_bytes(serialization.Encoding.PEM)
    refused(CHAIN, verify_snp_report, sign_report(build_report(), leaf.key), certs, at=AT,
            roots=pki.roots, match="not a CA")


def test_vlek_issuer_name_decides_the_intermediate(pkis: dict[Product, SynthPki]) -> None:
    # A VLEK presented with only the ASK (not the ASVK) falls back to AMD's shipped ASVK,
    # which did not sign the test VLEK.
    pki = pkis[Product.GENOA]
    leaf = pki.leaf("vlek")
    report = sign_report(build_report(Product.GENOA, signing_key=1), leaf.key)
    refused(CHAIN, verify_snp_report, report, leaf.pem + pki.chain_pem("vcek"), at=AT,
            roots=pki.roots)


# --- pinned roots -----------------------------------------------------------------------------


def test_pinned_roots_match_files_and_readme() -> None:
    readme = (REPO / "certs" / "README.md").read_text()
    pins = {f"amd_ark_{p.value}.pem": sha for p, sha in snp_chain.AMD_ARK_SHA256.items()}
    for (p, kind), sha in snp_chain.AMD_INTERMEDIATE_SHA256.items():
        pins[f"amd_{'ask' if kind == 'vcek' else 'asvk'}_{p.value}.pem"] = sha
    for name, sha in pins.items():
        cert = roots.load_pinned_root(name, sha)
        assert hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest() == sha
        assert re.search(rf"\| {re.escape(name)} \|.*\| {sha} \|", readme), name
    arks = snp_chain.pinned_arks()
    assert [a.subject.rfc4514_string().split(",")[0] for a in arks] == [
        "CN=ARK-Milan", "CN=ARK-Genoa", "CN=ARK-Turin"]


def test_package_finds_certs_through_the_symlink() -> None:
    path = roots.vendor_root_path("amd_ark_milan.pem")
    assert path.parent.name == "certs" and path.is_file()
    assert (REPO / "meshshield" / "certs").is_symlink()


def test_load_pinned_root_refusals() -> None:
    refused(CHAIN, roots.load_pinned_root, "amd_ark_milan.pem", "00" * 32, match="pinned")
    refused(CHAIN, roots.vendor_root_path, "../README.md", match="plain file name")
    refused(CHAIN, roots.vendor_root_path, "no_such_root.pem", match="not installed")


def test_parse_exposes_fields() -> None:
    r = parse_snp_report(vector("go-sev-guest/attestation.bin"))
    assert r.firmware_json() == {"current": "1.49.3", "committed": "1.49.3"}
    assert r.cpuid is None and r.cpuid_product is None
    assert r.debug is True


def test_the_intermediate_that_signed_the_leaf_is_chosen(pkis: dict[Product, SynthPki]) -> None:
    from snp_synth import sign_cert

    pki = pkis[Product.MILAN]
    impostor = sign_cert(pki.ask_name, pki.ark_name, rsa_key(7).public_key(), rsa_key(0), ca=True)
    leaf = pki.leaf()
    certs = leaf.pem + impostor.public_bytes(serialization.Encoding.PEM) + pki.chain_pem()
    report = sign_report(build_report(), leaf.key)
    assert verify_snp_report(report, certs, at=AT, roots=pki.roots).extra["product"] == "milan"
    refused(CHAIN, verify_snp_report, report,
            leaf.pem + impostor.public_bytes(serialization.Encoding.PEM), at=AT,
            roots=pki.roots, match="does not verify")
