"""Issue 6, CAS acceptance: the issuance decision on real hardware vectors.

1. In-process, with an injected clock: claims from a vector verified at a fixed time are
   accepted under a policy that pins them (measurement + host_data / mrconfigid and rtmr
   / mrenclave, mrsigner) and refused under one differing by one bit, with the SPEC §6
   reason; the vectors' real debug flags and TCB status decide the tolerances.
2. The CAS's Authority with a FixedClock: the same vector is refused with
   report_data_mismatch (it cannot carry our binding); with the binding patched out,
   the same Authority issues a certificate carrying the vector's claims, and the
   injected clock alone decides whether the vendor certificates are in their window.
3. A real CAS process over HTTPS refuses each platform's vector with
   report_data_mismatch, under a policy that would otherwise accept it.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from harness import CasProcess
from vectors import vector, vectors_dir

from meshshield.attestation.claims import Claims, TcbStatus
from meshshield.attestation.collateral import load_collateral
from meshshield.attestation.sgx import verify_sgx_quote
from meshshield.attestation.snp import verify_snp_report
from meshshield.attestation.snp_chain import load_certificates
from meshshield.attestation.tdx import verify_tdx_quote
from meshshield.attestclient import make_csr
from meshshield.cas.authority import Authority, CasConfig
from meshshield.cas.sqlite_store import SqliteStore
from meshshield.clock import FixedClock
from meshshield.errors import EvidenceError, MeshError, PolicyError, Reason
from meshshield.pki.claims_ext import claims_from_certificate
from meshshield.pki.keys import generate_p256
from meshshield.policy import decide_issuance, parse_policy

AT = datetime(2025, 6, 1, tzinfo=UTC)
ADMIN = "a" * 64
SNP, VCEK = "go-sev-guest/attestation.bin", "go-sev-guest/vcek.testcer"
SNP_PROD, VCEK_PROD = "trustee-snp/test-report.bin", "trustee-snp/test-vcek.der"
TDX = "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"
SGX = "trustee-sgx/occlum_quote.dat"


def flip(hex_value: str, bit: int = 0) -> str:
    """`hex_value` with one bit flipped."""
    raw = bytearray(bytes.fromhex(hex_value))
    raw[bit // 8] ^= 1 << (bit % 8)
    return raw.hex()


def snp_claims(rel: str = SNP, vcek: str = VCEK) -> Claims:
    return verify_snp_report(vector(rel), vector(vcek), at=AT)


def tdx_claims() -> Claims:
    return verify_tdx_quote(vector(TDX), at=AT)


def sgx_claims() -> Claims:
    return verify_sgx_quote(vector(SGX), at=AT)


def policy(entry: str, tolerate: str = "[debug-mode, unknown-tcb]", extra: str = "") -> Any:
    text = f"""name: hw
version: "1"
predecessor: null
services:
  - name: app
    tee:
      - {entry}
security:
  attestation:
    tolerate: {tolerate}
{extra}"""
    return parse_policy(text.encode())


def snp_entry(c: Claims, measurement: str | None = None, host_data: str | None = None,
              min_tcb: str = "") -> str:
    return (f'{{platform: sev-snp, measurement: "{measurement or c.measurement}", '
            f'host_data: "{host_data or c.extra["host_data"]}"{min_tcb}}}')


def tdx_entry(c: Claims, mrtd: str | None = None, mrconfigid: str | None = None,
              rtmr2: str | None = None) -> str:
    rtmr = f'["{c.extra["rtmr0"]}", null, "{rtmr2 or c.extra["rtmr2"]}", null]'
    return (f'{{platform: tdx, mrtd: "{mrtd or c.measurement}", '
            f'mrconfigid: "{mrconfigid or c.extra["mrconfigid"]}", rtmr: {rtmr}}}')


def sgx_entry(c: Claims, mrenclave: str | None = None, mrsigner: str | None = None,
              product_id: int = 0, min_svn: int = 0) -> str:
    return (f'{{platform: sgx, mrenclave: "{mrenclave or c.measurement}", '
            f'mrsigner: "{mrsigner or c.signer}", product_id: {product_id}, '
            f"min_svn: {min_svn}}}")


def refused(pol: Any, claims: Claims) -> Reason:
    with pytest.raises(PolicyError) as info:
        decide_issuance(pol, "app", claims)
    return info.value.reason


# --- 1. decide_issuance on verified vector claims -----------------------------------------


def test_snp_accepted_when_pinned_refused_when_one_bit_differs() -> None:
    c = snp_claims()
    assert c.debug is True and c.tcb_status is TcbStatus.UNKNOWN  # policy 0xb0000
    assert decide_issuance(policy(snp_entry(c)), "app", c).name == "app"
    for bit in (0, 200, 383):
        assert refused(policy(snp_entry(c, measurement=flip(c.measurement, bit))), c) is (
            Reason.MEASUREMENT_NOT_ALLOWED)
    assert refused(policy(snp_entry(c, host_data=flip(c.extra["host_data"], 255))), c) is (
        Reason.WORKLOAD_NOT_ALLOWED)


def test_snp_debug_and_tcb_decide_from_the_vectors_real_flags() -> None:
    debug = snp_claims()
    assert refused(policy(snp_entry(debug), "[unknown-tcb]"), debug) is Reason.DEBUG_NOT_TOLERATED
    assert refused(policy(snp_entry(debug), "[debug-mode]"), debug) is Reason.TCB_UNKNOWN
    # reported TCB bl=2 tee=0 snp=5 ucode=68: a min_tcb above it is tcb_out_of_date
    low = ", min_tcb: {bootloader: 2, tee: 0, snp: 5, microcode: 68}"
    high = ", min_tcb: {bootloader: 2, tee: 0, snp: 6, microcode: 68}"
    assert decide_issuance(policy(snp_entry(debug, min_tcb=low)), "app", debug)
    assert refused(policy(snp_entry(debug, min_tcb=high)), debug) is Reason.TCB_OUT_OF_DATE
    prod = snp_claims(SNP_PROD, VCEK_PROD)
    assert prod.debug is False  # policy 0x3001f
    assert decide_issuance(policy(snp_entry(prod), "[unknown-tcb]"), "app", prod)


def test_tdx_accepted_when_pinned_refused_when_one_bit_differs() -> None:
    c = tdx_claims()
    assert c.debug is False
    assert decide_issuance(policy(tdx_entry(c), "[unknown-tcb]"), "app", c)
    cases = [
        (tdx_entry(c, mrtd=flip(c.measurement, 7)), Reason.MEASUREMENT_NOT_ALLOWED),
        (tdx_entry(c, mrconfigid=flip(c.extra["mrconfigid"], 0)), Reason.WORKLOAD_NOT_ALLOWED),
        (tdx_entry(c, rtmr2=flip(c.extra["rtmr2"], 100)), Reason.WORKLOAD_NOT_ALLOWED),
    ]
    for entry, reason in cases:
        assert refused(policy(entry, "[unknown-tcb]"), c) is reason
    assert refused(policy(tdx_entry(c), "[]"), c) is Reason.TCB_UNKNOWN


def test_tdx_tcb_status_from_collateral_decides(tmp_path: Path) -> None:
    """SPR_E4 with the 2023 sample collateral is out_of_date with 13 advisories."""
    folder = collateral_folder(tmp_path)
    at = datetime(2023, 6, 20, tzinfo=UTC)
    c = verify_tdx_quote(vector(TDX), at=at, collateral=load_collateral(folder))
    assert c.tcb_status is TcbStatus.OUT_OF_DATE and c.advisories
    entry = tdx_entry(c)
    assert refused(policy(entry, "[]"), c) is Reason.TCB_OUT_OF_DATE
    assert refused(policy(entry, "[outdated-tcb]"), c) is Reason.ADVISORY_NOT_IGNORED
    ignore = f"    ignore_advisories: [{', '.join(c.advisories)}]\n"
    assert decide_issuance(policy(entry, "[outdated-tcb]", ignore), "app", c)
    revoked = replace(c, tcb_status=TcbStatus.REVOKED)
    assert refused(policy(entry, "[outdated-tcb, unknown-tcb]", ignore), revoked) is (
        Reason.TCB_REVOKED)


def test_sgx_accepted_when_pinned_refused_when_one_bit_differs() -> None:
    c = sgx_claims()
    assert c.debug is True  # ATTRIBUTES.FLAGS 0x07
    assert decide_issuance(policy(sgx_entry(c)), "app", c)
    signer_only = f'{{platform: sgx, mrsigner: "{c.signer}", product_id: 0}}'
    assert decide_issuance(policy(signer_only), "app", c)
    assert c.signer is not None
    cases = [
        (sgx_entry(c, mrenclave=flip(c.measurement, 1)), Reason.MEASUREMENT_NOT_ALLOWED),
        (sgx_entry(c, mrsigner=flip(c.signer, 255)), Reason.SIGNER_NOT_ALLOWED),
        (sgx_entry(c, product_id=1), Reason.SIGNER_NOT_ALLOWED),
        (sgx_entry(c, min_svn=1), Reason.SVN_TOO_LOW),
    ]
    for entry, reason in cases:
        assert refused(policy(entry), c) is reason
    assert refused(policy(sgx_entry(c), "[unknown-tcb]"), c) is Reason.DEBUG_NOT_TOLERATED


def test_a_platform_the_service_does_not_allow() -> None:
    c = sgx_claims()
    assert refused(policy(snp_entry(snp_claims())), c) is Reason.PLATFORM_NOT_ALLOWED


# --- 2. the Authority with an injected clock ---------------------------------------------


def collateral_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "collateral"
    folder.mkdir(exist_ok=True)
    for name in ("sample_tcbInfo_response", "sample_qeIdentity_response",
                 "tcbinfo_issuer_chain.pem", "qeidentity_issuer_chain.pem"):
        shutil.copyfile(vectors_dir() / "go-tdx-guest" / name, folder / name)
    return folder


def authority(tmp_path: Path, clock: FixedClock, policy_text: str,
              collateral: Path | None = None) -> Authority:
    cfg = CasConfig(data_dir=tmp_path / "data", admin_fingerprints=frozenset({ADMIN}),
                    nonce_ttl=60, kek=b"k" * 32, clock=clock, collateral_dir=collateral)
    cfg.data_dir.mkdir()
    a = Authority(cfg, SqliteStore(cfg.data_dir / "cas.db"))
    a.start()
    a.create_session(ADMIN, policy_text.encode())
    return a


def snp_evidence() -> dict[str, str]:
    pem = load_certificates(vector(VCEK))[0].public_bytes(Encoding.PEM)  # AMD's serial 0
    return {"report": base64.b64encode(vector(SNP)).decode(), "certs": pem.decode()}


def snp_policy_text(measurement: str, host_data: str) -> str:
    return f"""name: hw
version: "1"
predecessor: null
services:
  - name: app
    tee:
      - {{platform: sev-snp, measurement: "{measurement}", host_data: "{host_data}"}}
security:
  attestation:
    tolerate: [debug-mode, unknown-tcb]
"""


def attest(a: Authority, evidence: dict[str, str]) -> dict[str, Any]:
    nonce = a.new_nonce()["nonce"]
    body = {"session": "hw", "service": "app", "nonce": nonce,
            "csr": make_csr(generate_p256(), "app"), "evidence": evidence}
    return a.attest(body)


def bypass_binding(monkeypatch: pytest.MonkeyPatch, report_data: bytes) -> None:
    """Let the Authority accept the vector's report_data as if it were our binding:
    real TEEs bind SHA-512(domain || nonce || key); a public vector cannot."""
    monkeypatch.setattr("meshshield.cas.authority.expected_report_data",
                        lambda nonce, spki: report_data)


def test_authority_refuses_the_vector_with_report_data_mismatch(tmp_path: Path) -> None:
    c = snp_claims()
    a = authority(tmp_path, FixedClock(AT), snp_policy_text(c.measurement, c.extra["host_data"]))
    with pytest.raises(MeshError) as info:
        attest(a, snp_evidence())
    assert info.value.reason is Reason.REPORT_DATA_MISMATCH
    assert "0102030405" in info.value.message


def test_authority_issues_with_the_vectors_claims_and_the_clock_decides_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = snp_claims()
    bypass_binding(monkeypatch, c.report_data)
    clock = FixedClock(AT)
    a = authority(tmp_path, clock, snp_policy_text(c.measurement, c.extra["host_data"]))
    r = attest(a, snp_evidence())
    assert r["expires_at"].startswith("2025-06-01T01:00:00")  # the injected clock
    cert = x509.load_pem_x509_certificate(r["certificate"].encode())
    ext = claims_from_certificate(cert)
    assert ext == r["claims"]
    assert ext["platform"] == "sev-snp" and ext["measurement"] == c.measurement
    assert ext["debug"] is True and ext["tcb_status"] == "unknown" and ext["simulated"] is False
    assert ext["attested_at"] == "2025-06-01T00:00:00Z"
    clock.advance(10 * 365 * 86400)  # 2035: the VCEK (to 2029-09-24) has expired
    with pytest.raises(EvidenceError) as info:
        attest(a, snp_evidence())
    assert info.value.reason is Reason.CHAIN_INVALID and "VCEK" in info.value.message


def test_authority_refuses_when_the_policy_differs_by_one_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = snp_claims()
    bypass_binding(monkeypatch, c.report_data)
    a = authority(tmp_path, FixedClock(AT),
                  snp_policy_text(flip(c.measurement, 9), c.extra["host_data"]))
    with pytest.raises(PolicyError) as info:
        attest(a, snp_evidence())
    assert info.value.reason is Reason.MEASUREMENT_NOT_ALLOWED


def test_authority_with_collateral_judges_the_tdx_tcb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = tdx_claims()
    bypass_binding(monkeypatch, c.report_data)
    text = f"""name: hw
version: "1"
predecessor: null
services:
  - name: app
    tee:
      - {tdx_entry(c)}
security:
  attestation:
    tolerate: []
"""
    a = authority(tmp_path, FixedClock(datetime(2023, 6, 20, tzinfo=UTC)), text,
                  collateral=collateral_folder(tmp_path))
    with pytest.raises(PolicyError) as info:
        attest(a, {"quote": base64.b64encode(vector(TDX)).decode()})
    assert info.value.reason is Reason.TCB_OUT_OF_DATE


# --- 3. a real CAS over HTTPS --------------------------------------------------------------


def hardware_policy() -> str:
    s, t, g = snp_claims(), tdx_claims(), sgx_claims()
    return f"""name: hw
version: "1"
predecessor: null
services:
  - name: snp
    tee:
      - {snp_entry(s)}
  - name: tdx
    tee:
      - {tdx_entry(t)}
  - name: sgx
    tee:
      - {sgx_entry(g)}
security:
  attestation:
    tolerate: [debug-mode, unknown-tcb]
"""


def test_cas_endpoint_refuses_each_vector_with_report_data_mismatch(tmp_path: Path) -> None:
    # The CAS verifies at its real time: these vendor certificates are valid until
    # 2029 (VCEK, TDX PCK) and 2030 (SGX PCK).
    evidence: dict[str, Callable[[], dict[str, str]]] = {
        "snp": snp_evidence,
        "tdx": lambda: {"quote": base64.b64encode(vector(TDX)).decode()},
        "sgx": lambda: {"quote": base64.b64encode(vector(SGX)).decode()},
    }
    cas = CasProcess.start(tmp_path)
    try:
        applied = cas.apply_policy(hardware_policy())
        assert applied.returncode == 0, applied.stderr
        for service, make in evidence.items():
            nonce = cas.post_json("/v1/attest/nonce", {}).json()["nonce"]
            r = cas.post_json("/v1/attest", {
                "session": "hw", "service": service, "nonce": nonce,
                "csr": make_csr(generate_p256(), service), "evidence": make(),
            })
            assert r.status == 403, (service, r.body)
            assert r.code == "report_data_mismatch", (service, r.body)
            message = r.json()["error"]["message"]
            assert "SHA-512" in message and "Traceback" not in message
        assert "Traceback" not in cas.stderr()
    finally:
        cas.stop()

