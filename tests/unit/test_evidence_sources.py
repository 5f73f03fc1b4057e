"""Evidence sources (SPEC §4): configfs-tsm and Gramine over fake trees, the CoCo
attestation agent over a fake local HTTP server. These test the plumbing (what is
written, read, requested, cleaned up, and the errors), not the TEEs: the fakes hand
back real vectors, whose report_data then stands in for our binding."""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors import vector

from meshshield.attestation.claims import Platform
from meshshield.attestation.sgx import verify_sgx_evidence
from meshshield.attestation.snp import verify_snp_evidence
from meshshield.attestation.source_coco import aa_to_evidence, snp_report_from_sev_json
from meshshield.attestation.source_gramine import gramine_evidence
from meshshield.attestation.source_tsm import (
    GUID_ARK,
    GUID_ASK,
    GUID_VCEK,
    GUID_VLEK,
    parse_cert_table,
    tsm_evidence,
)
from meshshield.attestation.sources import (
    EvidenceSource,
    EvidenceSourceError,
    collect_evidence,
    resolve_source,
)
from meshshield.attestation.tdx import verify_tdx_evidence

AT = datetime(2025, 6, 1, tzinfo=UTC)
SNP_REPORT = "go-sev-guest/attestation.bin"
SNP_VCEK = "go-sev-guest/vcek.testcer"
SNP_ASK_ARK = "go-sev-guest/ask_ark_milan.pem"
VLEK_REPORT = "trustee-snp/test-vlek-report.bin"
VLEK = "trustee-snp/test-vlek.der"
TDX_QUOTE = "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"
SGX_QUOTE = "trustee-sgx/occlum_quote.dat"


def snp_report_data(report: bytes) -> bytes:
    return report[0x50:0x90]


def tdx_report_data(quote: bytes) -> bytes:
    return quote[48 + 520 : 48 + 584]


def sgx_report_data(quote: bytes) -> bytes:
    return quote[48 + 320 : 48 + 384]


def ask_ark_der() -> list[bytes]:
    return [c.public_bytes(Encoding.DER)
            for c in x509.load_pem_x509_certificates(vector(SNP_ASK_ARK))]


def cert_table(entries: list[tuple[Any, bytes]], pad: int = 0) -> bytes:
    """A GHCB certificate table: headers, an all-zero terminator, then the blobs."""
    head = 24 * (len(entries) + 1)
    out, blobs = b"", b""
    for guid, blob in entries:
        out += guid.bytes + struct.pack("<II", head + len(blobs), len(blob) + pad)
        blobs += blob + bytes(pad)
    return out + bytes(24) + blobs


# --- configfs-tsm over a fake tree ----------------------------------------------------------


@dataclass
class FakeTsm:
    """A temp folder standing in for /sys/kernel/config/tsm/report. The kernel's parts
    are emulated: mkdir fills the entry with attribute files, writes bump
    `generation`, rmdir removes the entry with its files."""

    root: Path
    provider: str
    outblob: bytes
    auxblob: bytes = b""
    concurrent_writer: bool = False
    log: list[tuple[str, str, bytes]] = field(default_factory=list)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)  # FileNotFoundError when the root is missing, as on a real system
        self.log.append(("mkdir", path.name, b""))
        for name, data in (("provider", self.provider.encode() + b"\n"), ("generation", b"0\n"),
                           ("inblob", b""), ("privlevel", b""), ("outblob", b""),
                           ("auxblob", self.auxblob)):
            (path / name).write_bytes(data)

    def write(self, path: Path, data: bytes) -> None:
        self.log.append(("write", path.name, data))
        path.write_bytes(data)
        gen = path.parent / "generation"
        gen.write_text(f"{int(gen.read_text()) + 1}\n")

    def read(self, path: Path, limit: int) -> bytes:
        self.log.append(("read", path.name, b""))
        if path.name == "outblob":
            path.write_bytes(self.outblob)  # the kernel asks the TEE on this read
            if self.concurrent_writer:
                self.write(path.parent / "inblob", bytes(64))
        return path.read_bytes()[: limit + 1]

    def rmdir(self, path: Path) -> None:
        self.log.append(("rmdir", path.name, b""))
        for f in path.iterdir():
            f.unlink()
        os.rmdir(path)

    def ops(self) -> list[tuple[str, str]]:
        return [(op, name) for op, name, _ in self.log]


def snp_fake(tmp_path: Path, **kw: Any) -> FakeTsm:
    table = cert_table([(GUID_VCEK, vector(SNP_VCEK)), (GUID_ASK, ask_ark_der()[0]),
                        (GUID_ARK, ask_ark_der()[1])])
    return FakeTsm(tmp_path, "sev_guest", vector(SNP_REPORT), **{"auxblob": table, **kw})


def test_tsm_snp_writes_inblob_reads_blobs_and_removes_the_entry(tmp_path: Path) -> None:
    fake = snp_fake(tmp_path)
    rd = snp_report_data(vector(SNP_REPORT))
    ev = tsm_evidence(Platform.SEV_SNP, rd, root=tmp_path, fs=fake)
    assert fake.ops() == [
        ("mkdir", fake.log[0][1]), ("write", "inblob"), ("read", "generation"),
        ("read", "provider"), ("read", "outblob"), ("read", "auxblob"),
        ("read", "generation"), ("rmdir", fake.log[0][1]),
    ]
    assert fake.log[0][1].startswith(f"meshshield-{os.getpid()}-")
    assert fake.log[1][2] == rd  # exactly the 64 bytes of report_data
    assert list(tmp_path.iterdir()) == []  # entry removed
    assert set(ev) == {"report", "certs"}
    assert base64.b64decode(ev["report"]) == vector(SNP_REPORT)
    assert ev["certs"].count("BEGIN CERTIFICATE") == 3  # VCEK, ASK, ARK
    claims = verify_snp_evidence(ev, at=AT)
    assert claims.measurement.startswith("b07af9620f3b839b")
    assert claims.report_data == rd


def test_tsm_privlevel_is_written_before_inblob_and_counted(tmp_path: Path) -> None:
    fake = snp_fake(tmp_path)
    tsm_evidence(Platform.SEV_SNP, snp_report_data(vector(SNP_REPORT)), root=tmp_path,
                 privlevel=2, fs=fake)
    writes = [(name, data) for op, name, data in fake.log if op == "write"]
    assert writes == [("privlevel", b"2"), ("inblob", snp_report_data(vector(SNP_REPORT)))]
    with pytest.raises(EvidenceSourceError, match="privlevel must be 0..3"):
        tsm_evidence(Platform.SEV_SNP, bytes(64), root=tmp_path, privlevel=4, fs=fake)


def test_tsm_tdx_quote_maps_to_quote_evidence(tmp_path: Path) -> None:
    quote = vector(TDX_QUOTE)
    fake = FakeTsm(tmp_path, "tdx_guest", quote)
    ev = tsm_evidence(Platform.TDX, tdx_report_data(quote), root=tmp_path, fs=fake)
    assert ev == {"quote": base64.b64encode(quote).decode()}
    assert ("read", "auxblob") not in fake.ops()
    assert verify_tdx_evidence(ev, at=AT).report_data == tdx_report_data(quote)
    assert list(tmp_path.iterdir()) == []


def test_tsm_concurrent_writer_is_detected_and_the_entry_still_removed(tmp_path: Path) -> None:
    fake = snp_fake(tmp_path, concurrent_writer=True)
    with pytest.raises(EvidenceSourceError, match=r"generation moved from 1 to 2.*another process"):
        tsm_evidence(Platform.SEV_SNP, snp_report_data(vector(SNP_REPORT)), root=tmp_path, fs=fake)
    assert fake.ops()[-1][0] == "rmdir" and list(tmp_path.iterdir()) == []


def test_tsm_refuses_a_report_that_does_not_bind_our_report_data(tmp_path: Path) -> None:
    fake = snp_fake(tmp_path)
    with pytest.raises(EvidenceSourceError, match="report_data_mismatch") as info:
        tsm_evidence(Platform.SEV_SNP, b"\x07" * 64, root=tmp_path, fs=fake)
    assert "0102030405" in str(info.value)


def test_tsm_provider_of_another_platform(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "tdx_guest", vector(TDX_QUOTE))
    with pytest.raises(EvidenceSourceError, match=r"provider 'tdx_guest', not 'sev_guest'"):
        tsm_evidence(Platform.SEV_SNP, bytes(64), root=tmp_path, fs=fake)
    with pytest.raises(EvidenceSourceError, match="not sgx"):
        tsm_evidence(Platform.SGX, bytes(64), root=tmp_path, fs=fake)


def test_tsm_missing_root_and_permission_errors_say_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "tsm"
    with pytest.raises(EvidenceSourceError, match=r"does not exist.*coco-aa") as info:
        tsm_evidence(Platform.TDX, bytes(64), root=missing)  # the real KernelFs
    assert str(missing) in str(info.value)

    class Denied(FakeTsm):
        def mkdir(self, path: Path) -> None:
            raise PermissionError(13, "Permission denied")

    with pytest.raises(EvidenceSourceError, match=r"permission denied.*root.*coco-aa"):
        tsm_evidence(Platform.TDX, bytes(64), root=tmp_path,
                     fs=Denied(tmp_path, "tdx_guest", b""))


def test_tsm_outblob_errors_and_empty_outblob(tmp_path: Path) -> None:
    class Failing(FakeTsm):
        def read(self, path: Path, limit: int) -> bytes:
            if path.name == "outblob":
                raise OSError(5, "Input/output error")
            return super().read(path, limit)

    fake = Failing(tmp_path, "tdx_guest", b"")
    with pytest.raises(EvidenceSourceError, match=r"outblob failed: Input/output error.*dmesg"):
        tsm_evidence(Platform.TDX, bytes(64), root=tmp_path, fs=fake)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EvidenceSourceError, match="outblob was empty"):
        tsm_evidence(Platform.TDX, bytes(64), root=tmp_path,
                     fs=FakeTsm(tmp_path, "tdx_guest", b""))


def test_tsm_snp_certificate_table_problems(tmp_path: Path) -> None:
    rd = snp_report_data(vector(SNP_REPORT))
    with pytest.raises(EvidenceSourceError, match=r"auxblob is empty.*VCEK.*host"):
        tsm_evidence(Platform.SEV_SNP, rd, root=tmp_path, fs=snp_fake(tmp_path, auxblob=b""))
    only_ask = cert_table([(GUID_ASK, ask_ark_der()[0])])
    with pytest.raises(EvidenceSourceError, match=r"has no VCEK \(GUID 63da758d"):
        tsm_evidence(Platform.SEV_SNP, rd, root=tmp_path, fs=snp_fake(tmp_path, auxblob=only_ask))
    with pytest.raises(EvidenceSourceError, match="not a certificate table"):
        tsm_evidence(Platform.SEV_SNP, rd, root=tmp_path,
                     fs=snp_fake(tmp_path, auxblob=b"\x01" * 30))


def test_cert_table_parsing_padding_and_guid_byte_orders() -> None:
    vcek = vector(SNP_VCEK)
    table = cert_table([(GUID_VCEK, vcek), (GUID_VLEK, b"vlek")], pad=7)
    entries = parse_cert_table(table)
    assert entries[GUID_VCEK] == vcek + bytes(7) and entries[GUID_VLEK] == b"vlek" + bytes(7)
    mixed = GUID_ARK.bytes_le + struct.pack("<II", 48, 3) + bytes(24) + b"ark"
    assert parse_cert_table(mixed) == {GUID_ARK: b"ark"}
    for bad in (b"", bytes(23), GUID_VCEK.bytes + struct.pack("<II", 40, 100) + bytes(24)):
        with pytest.raises(ValueError):
            parse_cert_table(bad)


def test_tsm_vlek_report_takes_the_vlek_from_the_table(tmp_path: Path) -> None:
    report = vector(VLEK_REPORT)
    table = cert_table([(GUID_VCEK, vector(SNP_VCEK)), (GUID_VLEK, vector(VLEK))])
    fake = FakeTsm(tmp_path, "sev_guest", report, auxblob=table)
    ev = tsm_evidence(Platform.SEV_SNP, snp_report_data(report), root=tmp_path, fs=fake)
    assert ev["certs"].count("BEGIN CERTIFICATE") == 1
    claims = verify_snp_evidence(ev, at=AT)
    assert claims.extra["signing_key"] == "vlek"


# --- Gramine /dev/attestation over a fake tree --------------------------------------------


def gramine_tree(root: Path, quote: bytes, kind: str = "dcap") -> Path:
    root.mkdir()
    (root / "attestation_type").write_text(kind + "\n")
    (root / "user_report_data").write_bytes(b"")
    (root / "quote").write_bytes(quote)
    return root


def test_gramine_writes_user_report_data_and_returns_the_quote(tmp_path: Path) -> None:
    quote = vector(SGX_QUOTE)
    root = gramine_tree(tmp_path / "attestation", quote)
    ev = gramine_evidence(sgx_report_data(quote), root=root)
    assert (root / "user_report_data").read_bytes() == sgx_report_data(quote)
    assert ev == {"quote": base64.b64encode(quote).decode()}
    assert verify_sgx_evidence(ev, at=AT).measurement.startswith("8f173e46")


def test_gramine_errors(tmp_path: Path) -> None:
    with pytest.raises(EvidenceSourceError, match=r"does not exist.*Gramine enclave"):
        gramine_evidence(bytes(64), root=tmp_path / "none")
    epid = gramine_tree(tmp_path / "epid", vector(SGX_QUOTE), kind="epid")
    with pytest.raises(EvidenceSourceError, match=r"attestation_type says 'epid'.*dcap"):
        gramine_evidence(bytes(64), root=epid)
    dcap = gramine_tree(tmp_path / "dcap", vector(SGX_QUOTE))
    with pytest.raises(EvidenceSourceError, match="report_data_mismatch"):
        gramine_evidence(bytes(64), root=dcap)
    (dcap / "quote").write_bytes(vector(TDX_QUOTE))
    with pytest.raises(EvidenceSourceError, match="does not parse.*not SGX"):
        gramine_evidence(bytes(64), root=dcap)
    (dcap / "quote").unlink()
    with pytest.raises(EvidenceSourceError, match=r"reading .*quote failed"):
        gramine_evidence(bytes(64), root=dcap)
    with pytest.raises(EvidenceSourceError, match="exactly 64 bytes"):
        gramine_evidence(bytes(32), root=dcap)


# --- the CoCo attestation agent over a fake local server ------------------------------


def sev_json(report: bytes, *, old_names: bool = False) -> dict[str, Any]:
    """The serde JSON of the `sev` crate's AttestationReport for `report` (new field
    names as in sev 4+, or the names of older releases)."""

    def u32(o: int) -> int:
        return int(struct.unpack_from("<I", report, o)[0])

    def u64(o: int) -> int:
        return int(struct.unpack_from("<Q", report, o)[0])

    def arr(o: int, n: int) -> list[int]:
        return list(report[o : o + n])

    def tcb(o: int) -> dict[str, Any]:
        b = report[o : o + 8]
        if old_names:
            return {"bootloader": b[0], "tee": b[1], "_reserved": list(b[2:6]), "snp": b[6],
                    "microcode": b[7]}
        return {"fmc": None, "bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}

    obj: dict[str, Any] = {
        "version": u32(0), "guest_svn": u32(4), "policy": u64(8), "family_id": arr(0x10, 16),
        "image_id": arr(0x20, 16), "vmpl": u32(0x30), "sig_algo": u32(0x34),
        "current_tcb": tcb(0x38), "plat_info": u64(0x40),
        "report_data": arr(0x50, 64), "measurement": arr(0x90, 48), "host_data": arr(0xC0, 32),
        "id_key_digest": arr(0xE0, 48), "author_key_digest": arr(0x110, 48),
        "report_id": arr(0x140, 32), "report_id_ma": arr(0x160, 32),
        "reported_tcb": tcb(0x180), "chip_id": arr(0x1A0, 64), "committed_tcb": tcb(0x1E0),
        "launch_tcb": tcb(0x1F0),
        "signature": {"r": arr(0x2A0, 72), "s": arr(0x2E8, 72), "_reserved": arr(0x330, 368)},
    }
    v = report[0x1E8:0x1F0]
    if old_names:
        obj.update({"author_key_en": u32(0x48), "_reserved_0": 0,
                    "current_build": v[0], "current_minor": v[1], "current_major": v[2],
                    "committed_build": v[4], "committed_minor": v[5], "committed_major": v[6]})
    else:
        cpuid = report[0x188:0x18B] if u32(0) >= 3 else None
        obj.update({"key_info": u32(0x48),
                    "cpuid_fam_id": cpuid[0] if cpuid else None,
                    "cpuid_mod_id": cpuid[1] if cpuid else None,
                    "cpuid_step": cpuid[2] if cpuid else None,
                    "current": {"major": v[2], "minor": v[1], "build": v[0]},
                    "committed": {"major": v[6], "minor": v[5], "build": v[4]}})
    return obj


def aa_snp_answer(report: bytes, certs: list[tuple[str, bytes]], **kw: Any) -> dict[str, Any]:
    return {"attestation_report": sev_json(report, **kw),
            "cert_chain": [{"cert_type": t, "data": list(d)} for t, d in certs]}


@dataclass
class FakeAA:
    """api-server-rest on 127.0.0.1: `answer(query) -> (status, body)` decides."""

    answer: Callable[[dict[str, str]], tuple[int, bytes]]
    queries: list[dict[str, str]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def fake_aa() -> Iterator[Callable[..., FakeAA]]:
    servers: list[ThreadingHTTPServer] = []

    def start(answer: Callable[[dict[str, str]], tuple[int, bytes]]) -> FakeAA:
        aa = FakeAA(answer)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parsed = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parsed.query))
                query["_path"] = parsed.path
                aa.queries.append(query)
                status, body = aa.answer(query) if parsed.path == "/aa/evidence" else (404, b"")
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        aa.url = f"http://127.0.0.1:{server.server_address[1]}"
        return aa

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


Answer = Callable[[dict[str, str]], tuple[int, bytes]]


def modern_aa(evidence: dict[str, Any], bound: bytes) -> Answer:
    """Behaves like api-server-rest after PR #1487 in front of a TEE whose evidence binds
    `bound`: runtime_data decoded as URL-safe base64 when encoding=base64, else as text;
    more than 64 bytes refused as the attesters do."""

    def answer(q: dict[str, str]) -> tuple[int, bytes]:
        text = q.get("runtime_data")
        if text is None:
            return 400, b"BAD REQUEST"
        if q.get("encoding") == "base64":
            data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        else:
            data = text.encode()
        if len(data) > 64:
            return 500, b"Report data must be no more than 64 bytes"
        if data.ljust(64, b"\0") != bound:
            return 500, b"fake TEE: can only sign the vector's report_data"
        return 200, json.dumps(evidence).encode()

    return answer


def test_coco_tdx_sends_our_64_bytes_as_base64url_and_maps_the_quote(
    fake_aa: Callable[..., FakeAA],
) -> None:
    quote = vector(TDX_QUOTE)
    rd = tdx_report_data(quote)
    aa = fake_aa(modern_aa({"cc_eventlog": None, "quote": base64.b64encode(quote).decode()}, rd))
    ev = collect_evidence(Platform.TDX, rd, source="coco-aa", coco_aa_url=aa.url)
    (q,) = aa.queries
    assert q["_path"] == "/aa/evidence" and q["encoding"] == "base64"
    assert "=" not in q["runtime_data"] and "+" not in q["runtime_data"]
    assert base64.urlsafe_b64decode(q["runtime_data"] + "==") == rd
    assert ev == {"quote": base64.b64encode(quote).decode()}
    assert verify_tdx_evidence(ev, at=AT).report_data == rd


def test_coco_sgx_quote(fake_aa: Callable[..., FakeAA]) -> None:
    quote = vector(SGX_QUOTE)
    rd = sgx_report_data(quote)
    aa = fake_aa(modern_aa({"quote": base64.b64encode(quote).decode()}, rd))
    env = {"MESHSHIELD_EVIDENCE_SOURCE": "coco-aa", "MESHSHIELD_COCO_AA_URL": aa.url}
    ev = collect_evidence(Platform.SGX, rd, environ=env)
    assert verify_sgx_evidence(ev, at=AT).measurement.startswith("8f173e46")


@pytest.mark.parametrize("old_names", [False, True])
def test_coco_snp_rebuilds_the_report_byte_exact_from_sev_json(
    fake_aa: Callable[..., FakeAA], old_names: bool,
) -> None:
    report = vector(SNP_REPORT)
    rd = snp_report_data(report)
    ask, ark = ask_ark_der()
    answer = aa_snp_answer(report, [("VCEK", vector(SNP_VCEK)), ("ASK", ask), ("ARK", ark),
                                    ("CRL", b"crl")], old_names=old_names)
    aa = fake_aa(modern_aa(answer, rd))
    env = {"MESHSHIELD_EVIDENCE_SOURCE": "coco-aa", "MESHSHIELD_COCO_AA_URL": aa.url + "/"}
    ev = collect_evidence(Platform.SEV_SNP, rd, environ=env)
    assert base64.b64decode(ev["report"]) == report
    assert ev["certs"].count("BEGIN CERTIFICATE") == 3
    assert verify_snp_evidence(ev, at=AT).measurement.startswith("b07af9620f3b839b")


def test_coco_snp_v3_vlek_report_rebuilds_with_cpuid() -> None:
    report = vector(VLEK_REPORT)
    assert snp_report_from_sev_json(sev_json(report)) == report
    ev = aa_to_evidence(Platform.SEV_SNP, aa_snp_answer(report, [("VLEK", vector(VLEK))]),
                        snp_report_data(report), where="the fake AA")
    assert verify_snp_evidence(ev, at=AT).extra["signing_key"] == "vlek"


def test_coco_snp_rebuild_that_is_not_byte_exact_is_refused_before_the_cas() -> None:
    report = vector(SNP_REPORT)
    answer = aa_snp_answer(report, [("VCEK", vector(SNP_VCEK))])
    answer["attestation_report"]["guest_svn"] = 1
    with pytest.raises(EvidenceSourceError, match=r"rebuilt .* does not verify with the VCEK"):
        aa_to_evidence(Platform.SEV_SNP, answer, snp_report_data(report), where="the fake AA")
    answer["attestation_report"].pop("measurement")
    with pytest.raises(EvidenceSourceError, match=r"fields \['measurement'\] are missing"):
        aa_to_evidence(Platform.SEV_SNP, answer, snp_report_data(report), where="the fake AA")


def test_coco_snp_without_cert_chain_says_the_host_must_supply_it() -> None:
    report = vector(SNP_REPORT)
    answer = {"attestation_report": sev_json(report), "cert_chain": None}
    with pytest.raises(EvidenceSourceError, match=r"no VCEK.*host.*snphost"):
        aa_to_evidence(Platform.SEV_SNP, answer, snp_report_data(report), where="the fake AA")


def test_coco_snp_report_from_the_svsm_vtpm_service_is_refused() -> None:
    """Recent SNP attesters under an SVSM bind SHA-512(runtime_data || manifest)."""
    report = vector(SNP_REPORT)
    answer = aa_snp_answer(report, [("VCEK", vector(SNP_VCEK))])
    answer["svsm_manifest"] = base64.b64encode(b"tpmt_public").decode()
    with pytest.raises(EvidenceSourceError, match=r"SVSM vTPM.*SHA-512\(runtime_data"):
        aa_to_evidence(Platform.SEV_SNP, answer, snp_report_data(report), where="the fake AA")


def test_coco_answers_of_the_wrong_kind() -> None:
    quote_answer = {"quote": base64.b64encode(vector(TDX_QUOTE)).decode()}
    rd = tdx_report_data(vector(TDX_QUOTE))
    cases: list[tuple[Platform, object, bytes, str]] = [
        (Platform.TDX, {"svn": "1", "report_data": "eHh4eA=="}, rd, "sample attester"),
        (Platform.TDX, {"quote": {"tpm": 1}, "report": "x"}, rd, "does not know"),
        (Platform.TDX, [], rd, "JSON list"),
        (Platform.SEV_SNP, quote_answer, rd, "runs a tdx/sgx attester"),
        (Platform.SGX, quote_answer, rd, "not SGX"),
        (Platform.TDX, quote_answer, bytes(64), "report_data_mismatch"),
        (Platform.TDX, {"quote": "%%%"}, rd, "not base64"),
    ]
    for platform, answer, data, message in cases:
        with pytest.raises(EvidenceSourceError, match=message):
            aa_to_evidence(platform, answer, data, where="the fake AA")


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (405, b"Method Not Allowed", r"405 \(Method Not Allowed\).*encoding=base64.*upgrade"),
        (500, b"SNP Attester: Report data must be no more than 64 bytes", r"500.*PR #1487"),
        (500, b"boom", r"500 \(boom\).*attestation agent's log"),
        (403, b"Forbidden", "loopback callers only"),
        (200, b"not json", "not JSON evidence"),
    ],
)
def test_coco_http_failures_name_the_url_and_what_to_do(
    fake_aa: Callable[..., FakeAA], status: int, body: bytes, message: str,
) -> None:
    aa = fake_aa(lambda q: (status, body))
    with pytest.raises(EvidenceSourceError, match=message) as info:
        collect_evidence(Platform.TDX, bytes(64), source="coco-aa", coco_aa_url=aa.url)
    assert aa.url in str(info.value)


def test_coco_legacy_api_server_cannot_carry_the_binding(fake_aa: Callable[..., FakeAA]) -> None:
    """An api-server-rest before PR #1487 ignores encoding=base64 and takes the 86
    base64 characters as runtime data: more than the 64 bytes an attester accepts."""
    quote = vector(TDX_QUOTE)
    rd = tdx_report_data(quote)
    legacy = modern_aa({"quote": base64.b64encode(quote).decode()}, rd)
    aa = fake_aa(lambda q: legacy({k: v for k, v in q.items() if k != "encoding"}))
    with pytest.raises(EvidenceSourceError, match=r"no more than 64 bytes.*PR #1487"):
        collect_evidence(Platform.TDX, rd, source="coco-aa", coco_aa_url=aa.url)


def test_coco_unreachable_agent(fake_aa: Callable[..., FakeAA]) -> None:
    aa = fake_aa(lambda q: (200, b"{}"))
    url = aa.url
    with pytest.raises(EvidenceSourceError, match=r"no attestation agent API at .*127.0.0.1:8006"):
        collect_evidence(Platform.TDX, bytes(64), source="coco-aa",
                         coco_aa_url=url.rsplit(":", 1)[0] + ":1")
    with pytest.raises(EvidenceSourceError, match="not an http"):
        collect_evidence(Platform.TDX, bytes(64), source="coco-aa", coco_aa_url="ftp://x")


# --- choosing a source ------------------------------------------------------------------


def test_resolve_source_from_arguments_and_environment(tmp_path: Path) -> None:
    none = tmp_path / "absent"
    aa = {"MESHSHIELD_COCO_AA_URL": "http://127.0.0.1:8006"}
    assert resolve_source(Platform.SGX, environ={}) is EvidenceSource.GRAMINE
    assert resolve_source(Platform.TDX, environ={}, tsm_root=tmp_path) is (
        EvidenceSource.CONFIGFS_TSM)
    assert resolve_source(Platform.TDX, environ=aa, tsm_root=tmp_path) is (
        EvidenceSource.CONFIGFS_TSM)
    assert resolve_source(Platform.SEV_SNP, environ=aa, tsm_root=none) is EvidenceSource.COCO_AA
    assert resolve_source(Platform.TDX, environ={}, tsm_root=none) is EvidenceSource.CONFIGFS_TSM
    env = {"MESHSHIELD_EVIDENCE_SOURCE": " CoCo-AA "}
    assert resolve_source(Platform.SEV_SNP, environ=env) is EvidenceSource.COCO_AA
    assert resolve_source(Platform.TDX, "configfs-tsm", environ=env) is (
        EvidenceSource.CONFIGFS_TSM)
    with pytest.raises(EvidenceSourceError, match="MESHSHIELD_EVIDENCE_SOURCE='tpm'"):
        resolve_source(Platform.TDX, environ={"MESHSHIELD_EVIDENCE_SOURCE": "tpm"})
    with pytest.raises(EvidenceSourceError, match="gramine gives sgx evidence, not tdx"):
        resolve_source(Platform.TDX, "gramine", environ={})
    with pytest.raises(EvidenceSourceError, match="configfs-tsm gives sev-snp, tdx"):
        resolve_source(Platform.SGX, "configfs-tsm", environ={})


def test_collect_evidence_hardware_paths(tmp_path: Path) -> None:
    quote = vector(SGX_QUOTE)
    root = gramine_tree(tmp_path / "attestation", quote)
    ev = collect_evidence(Platform.SGX, sgx_report_data(quote), environ={}, gramine_root=root)
    assert ev["quote"] == base64.b64encode(quote).decode()
    with pytest.raises(EvidenceSourceError, match="exactly 64 bytes"):
        collect_evidence(Platform.TDX, b"short", environ={})
    with pytest.raises(EvidenceSourceError, match=r"configfs-tsm is not available"):
        collect_evidence(Platform.TDX, bytes(64), environ={}, tsm_root=tmp_path / "none")


def test_der_certificate_whose_last_byte_is_zero_loads_with_and_without_padding() -> None:
    """1 in 256 signatures end in 0x00: stripping trailing zeros before reading the DER
    length used to cut such a certificate short (snp_chain.load_certificates)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from meshshield.attestation.snp_chain import load_certificates

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zero-ended")])
    for serial in range(1, 5000):
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2030, 1, 1))
                .sign(key, hashes.SHA384()))
        der = cert.public_bytes(Encoding.DER)
        if der[-1] == 0:
            break
    assert der[-1] == 0
    for blob in (der, der + bytes(9), der + b"\n" + cert.public_bytes(Encoding.PEM) + bytes(3)):
        certs = load_certificates(blob)
        assert certs[0] == cert and len(certs) == (2 if b"BEGIN" in blob else 1)


# --- what the agent or the kernel hands back is parsed without surprises --------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=20), inner,
                                                                 max_size=8),
    max_leaves=12,
)
SNP_KEYS = st.sampled_from(["attestation_report", "cert_chain", "quote", "version", "policy",
                            "signature", "reported_tcb", "report_data", "measurement"])


@settings(max_examples=100, deadline=None)
@given(answer=JSON | st.dictionaries(SNP_KEYS, JSON, max_size=6),
       platform=st.sampled_from([Platform.SEV_SNP, Platform.TDX, Platform.SGX]))
def test_any_agent_answer_is_evidence_or_an_evidence_source_error(answer: object,
                                                                   platform: Platform) -> None:
    try:
        aa_to_evidence(platform, answer, bytes(64), where="fuzz")
    except EvidenceSourceError:
        pass


@settings(max_examples=100, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["version", "policy", "report_data", "measurement",
                                            "reported_tcb", "signature", "current",
                                            "cpuid_fam_id", "chip_id", "key_info"]), JSON))
def test_any_sev_json_rebuilds_or_is_a_value_error(obj: dict[str, Any]) -> None:
    try:
        assert len(snp_report_from_sev_json(obj)) == 1184
    except ValueError:
        pass


@settings(max_examples=300, deadline=None)
@given(table=st.binary(max_size=400))
def test_any_certificate_table_parses_or_is_a_value_error(table: bytes) -> None:
    try:
        parse_cert_table(table)
    except ValueError:
        pass
