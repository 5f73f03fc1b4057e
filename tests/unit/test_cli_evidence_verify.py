"""`meshshield evidence verify FILE --platform sev-snp|tdx|sgx [--certs PATH]
[--collateral DIR] [--at RFC3339] [--json]` exactly as SPEC §4 says, on the real
vectors (expected values from PROVENANCE.md). A few runs are real subprocesses; the
rest call meshshield.cli.main in-process."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vectors import vector, vectors_dir

from meshshield.cli import main

SNP = "go-sev-guest/attestation.bin"
VCEK = "go-sev-guest/vcek.testcer"
TRUSTEE_SNP = "trustee-snp/test-report.bin"
TRUSTEE_VCEK = "trustee-snp/test-vcek.der"
TDX = "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"
TDX_V5 = "go-tdx-guest/quote_v5_sample.dat"
SGX = "trustee-sgx/occlum_quote.dat"
AT = "2025-06-01T00:00:00Z"
Z48 = "00" * 48

# PROVENANCE.md §1: go-sev-guest/attestation.bin (policy 0xb0000: bit 19, DEBUG, set)
SNP_EXPECTED: dict[str, Any] = {
    "platform": "sev-snp",
    "measurement": "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
                   "6bdf8a9ece31a5a608eb0cf2e4872b01",
    "signer": None, "product_id": None, "svn": None, "debug": True, "tcb_status": "unknown",
    "report_data": "0102030405" + "00" * 59,
    "host_data": "00" * 32,
    "chip_id": "3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e5378618"
               "4ca39e359669a2b76a1936776b564ea464cdce40c05f63c9b610c5068b006b5d",
    "reported_tcb": {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44},
    "policy": "0xb0000", "report_version": 2, "vmpl": 0, "signing_key": "vcek",
    "product": "milan", "simulated": False,
}
# PROVENANCE.md §2: tdx_prod_quote_SPR_E4.dat
TDX_EXPECTED: dict[str, Any] = {
    "platform": "tdx",
    "measurement": "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f"
                   "22fc00b8dcd404bc10d5e119d7215cbb",
    "signer": None, "product_id": None, "svn": None, "debug": False, "tcb_status": "unknown",
    "report_data": "6c62dec1b8191749a31dab490be532a35944dea47caef1f980863993d9899545"
                   "eb7406a38d1eed313b987a467dacead6f0c87a6d766c66f6f29f8acb281f1113",
    "mrconfigid": Z48,
    "rtmr0": "2927da70461cd63266f43230cc1849c03ef25ebe490062a801d8fcc80af42976823adf08f833c1e5"
             "0b51779c6593f32a",
    "rtmr1": "2c700b8ba9b85783f8be9fb9443647bdc0bb3c50747f06297cc6538c25a5f589c4b56d035c59107c"
             "6bc5800db2cacb61",
    "rtmr2": "8652f0caaba7e215ea442dc36a4499d8fec3362f3a0b2ca151cbe4b3e6466fe59c7368b3c2287fc7"
             "c3bf5c924eb4424e",
    "rtmr3": Z48,
    "quote_version": 4,
}
# PROVENANCE.md §3: trustee-sgx/occlum_quote.dat (ATTRIBUTES 0x07: DEBUG)
SGX_EXPECTED: dict[str, Any] = {
    "platform": "sgx",
    "measurement": "8f173e4613ff05c52aaf04162d234edae8c9977eae47eb2299ae16a553011c68",
    "signer": "83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e",
    "mrenclave": "8f173e4613ff05c52aaf04162d234edae8c9977eae47eb2299ae16a553011c68",
    "mrsigner": "83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e",
    "product_id": 0, "svn": 0, "debug": True, "tcb_status": "unknown",
    "report_data": "74657374" + "00" * 60,
    "attributes": "0700000000000000e700000000000000",
    "quote_version": 3,
}


def path(rel: str) -> str:
    vector(rel)  # skips when the vectors are absent
    return str(vectors_dir() / rel)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["evidence", "verify", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def subprocess_run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshshield.cli", "evidence", "verify", *argv],
        capture_output=True, text=True, timeout=120,
    )


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def assert_fields(out: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("platform", "measurement", "signer", "product_id", "svn", "debug",
                "tcb_status", "report_data"):
        assert key in out, key
    for key, value in expected.items():
        assert out[key] == value, key
    assert out["report_data"] == out["report_data"].lower()


# --- valid vectors, --json ----------------------------------------------------------------


def test_snp_subprocess_json_has_the_provenance_values() -> None:
    p = subprocess_run(path(SNP), "--platform", "sev-snp", "--certs", path(VCEK),
                       "--at", AT, "--json")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert_fields(json.loads(p.stdout), SNP_EXPECTED)


def test_tdx_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, path(TDX), "--platform", "tdx", "--at", AT, "--json")
    assert rc == 0
    assert_fields(json.loads(out), TDX_EXPECTED)


def test_sgx_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, path(SGX), "--platform", "sgx", "--at", AT, "--json")
    assert rc == 0
    assert_fields(json.loads(out), SGX_EXPECTED)


def test_more_vectors_and_the_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, path(TRUSTEE_SNP), "--platform", "sev-snp",
                     "--certs", path(TRUSTEE_VCEK), "--at", AT, "--json")
    view = json.loads(out)
    assert rc == 0 and view["measurement"].startswith("a1f3930413247bb3")
    assert view["reported_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert view["report_data"] == (
        "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2" + "00" * 32)
    assert view["debug"] is False  # policy 0x3001f
    rc, out, _ = run(capsys, path(TDX_V5), "--platform", "tdx", "--at", "2026-02-03T00:00:00Z",
                     "--json")
    assert rc == 0 and json.loads(out)["quote_version"] == 5
    rc, out, _ = run(capsys, path(SGX), "--platform", "sgx", "--at", AT)
    assert rc == 0
    assert out.startswith("verified sgx evidence at 2025-06-01T00:00:00+00:00\n")
    assert "  measurement: 8f173e46" in out and "  debug: true" in out


def test_tdx_tcb_status_from_collateral(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "collateral"
    folder.mkdir()
    for name in ("sample_tcbInfo_response", "sample_qeIdentity_response",
                 "tcbinfo_issuer_chain.pem", "qeidentity_issuer_chain.pem"):
        shutil.copyfile(vectors_dir() / "go-tdx-guest" / name, folder / name)
    rc, out, _ = run(capsys, path(TDX), "--platform", "tdx", "--collateral", str(folder),
                     "--at", "2023-06-20T00:00:00Z", "--json")
    view = json.loads(out)
    assert rc == 0 and view["tcb_status"] == "out_of_date"
    assert "INTEL-SA-00477" in view["advisories"]


def test_evidence_json_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = base64.b64encode(vector(SNP)).decode()
    only_report = write(tmp_path, "snp.json", json.dumps({"report": report}).encode())
    # --certs as DER next to JSON evidence (used to be decoded as text and refused)
    rc, out, err = run(capsys, only_report, "--platform", "sev-snp", "--certs", path(VCEK),
                       "--at", AT, "--json")
    assert rc == 0, err
    assert json.loads(out)["measurement"] == SNP_EXPECTED["measurement"]
    rc, _, err = run(capsys, only_report, "--platform", "sev-snp", "--at", AT)
    assert rc == 1 and "evidence_malformed" in err and "--certs" in err
    quote = write(tmp_path, "tdx.json",
                  b'\n {"quote": "' + base64.b64encode(vector(TDX)) + b'"}\n')
    rc, out, _ = run(capsys, quote, "--platform", "tdx", "--at", AT, "--json")
    assert rc == 0 and json.loads(out)["measurement"] == TDX_EXPECTED["measurement"]
    broken = write(tmp_path, "broken.json", b'{"report": ')
    rc, _, err = run(capsys, broken, "--platform", "sev-snp", "--certs", path(VCEK))
    assert rc == 1 and "evidence_malformed" in err and "not valid JSON" in err


# --- refusals -------------------------------------------------------------------------


def test_outside_the_window_is_chain_invalid_naming_the_certificate() -> None:
    p = subprocess_run(path(SNP), "--platform", "sev-snp", "--certs", path(VCEK),
                       "--at", "2035-06-01T00:00:00Z", "--json")
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("meshshield: chain_invalid: ")
    assert "VCEK" in p.stderr and "2029-09-24T00:55:28Z" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize(
    ("rel", "platform", "at", "names"),
    [
        (TDX, "tdx", "2030-01-01T00:00:00Z", ("PCK", "2029-09-20")),
        (SGX, "sgx", "2031-01-01T00:00:00Z", ("PCK", "2030-04-26")),
        (TDX_V5, "tdx", AT, ("PCK", "2026-01-27")),  # before its PCK was issued
    ],
)
def test_dcap_outside_the_window(capsys: pytest.CaptureFixture[str], rel: str, platform: str,
                                 at: str, names: tuple[str, ...]) -> None:
    rc, out, err = run(capsys, path(rel), "--platform", platform, "--at", at, "--json")
    assert rc == 1 and out == "" and "chain_invalid" in err
    for name in names:
        assert name in err


@pytest.mark.parametrize(
    ("rel", "platform", "offset"),
    [(SNP, "sev-snp", 0x90), (TDX, "tdx", 48 + 136), (SGX, "sgx", 48 + 64)],  # measurement
)
def test_tampered_is_signature_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       rel: str, platform: str, offset: int) -> None:
    data = bytearray(vector(rel))
    data[offset] ^= 0x01
    certs = ["--certs", path(VCEK)] if platform == "sev-snp" else []
    rc, out, err = run(capsys, write(tmp_path, "t.bin", bytes(data)), "--platform", platform,
                       *certs, "--at", AT, "--json")
    assert rc == 1 and out == ""
    assert err.startswith("meshshield: signature_invalid: ")


@pytest.mark.parametrize(("rel", "platform"), [(SNP, "sev-snp"), (TDX, "tdx"), (SGX, "sgx")])
def test_truncated_and_random_are_evidence_malformed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rel: str, platform: str,
) -> None:
    certs = ["--certs", path(VCEK)] if platform == "sev-snp" else []
    data = vector(rel)
    for blob in (data[: len(data) // 2], data[:47], b"\x02" + bytes(range(200))):
        rc, _, err = run(capsys, write(tmp_path, "x.bin", blob), "--platform", platform,
                         *certs, "--at", AT)
        assert rc == 1 and err.startswith("meshshield: evidence_malformed: "), err


def test_one_platforms_evidence_offered_as_another(capsys: pytest.CaptureFixture[str]) -> None:
    for rel, platform in ((SGX, "tdx"), (TDX, "sgx"), (TDX, "sev-snp")):
        certs = ["--certs", path(VCEK)] if platform == "sev-snp" else []
        rc, _, err = run(capsys, path(rel), "--platform", platform, *certs, "--at", AT)
        assert rc == 1 and "evidence_malformed" in err


# --- usage errors: exit 2 --------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--at", "yesterday"], "--at:"),
        (["--at", "2025-06-01T00:00:00"], "no timezone"),
        (["--at", "2025-13-01T00:00:00Z"], "--at:"),
    ],
)
def test_bad_at_is_a_usage_error(capsys: pytest.CaptureFixture[str], extra: list[str],
                                 message: str) -> None:
    rc, out, err = run(capsys, path(TDX), "--platform", "tdx", *extra)
    assert rc == 2 and out == "" and message in err


def test_other_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, path(SNP), "--platform", "sev-snp", "--at", AT)
    assert rc == 2 and "needs --certs" in err
    rc, _, err = run(capsys, path(TDX), "--platform", "tdx", "--certs", path(VCEK))
    assert rc == 2 and "--certs is for sev-snp" in err
    rc, _, err = run(capsys, path(TDX), "--platform", "tdx", "--collateral",
                     str(tmp_path / "none"))
    assert rc == 2 and "--collateral" in err
    with pytest.raises(SystemExit) as info:
        main(["evidence", "verify", path(TDX)])  # --platform is required
    assert info.value.code == 2


def test_unknown_platform_and_missing_file_in_a_subprocess(tmp_path: Path) -> None:
    p = subprocess_run(path(TDX), "--platform", "sim")
    assert p.returncode == 2 and "invalid choice: 'sim'" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess_run(str(tmp_path / "missing.bin"), "--platform", "tdx")
    assert p.returncode == 1 and "cannot read" in p.stderr and "missing.bin" in p.stderr
    assert "Traceback" not in p.stderr
