"""TCB status from Intel collateral: the real go-tdx-guest samples and synthetic collateral."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import dcap_synth as synth
import pytest
from vectors import vector, vectors_dir

from meshshield.attestation.claims import Claims, TcbStatus
from meshshield.attestation.collateral import Collateral, load_collateral, load_collateral_files
from meshshield.attestation.sgx import verify_sgx_quote
from meshshield.attestation.tdx import verify_tdx_quote
from meshshield.errors import EvidenceError, Reason

AT_2023 = datetime(2023, 6, 20, tzinfo=UTC)
SPR = "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"
# vector file -> the name the collateral folder convention recommends
SAMPLE_FILES = {
    "sample_tcbInfo_response": "tcb_info_50806f000000.json",
    "sample_qeIdentity_response": "td_qe_identity.json",
    "tcbinfo_issuer_chain.pem": "tcb_info_issuer_chain.pem",
    "qeidentity_issuer_chain.pem": "qe_identity_issuer_chain.pem",
    "pckcrl": "pck_crl_platform.der",
    "pckcrl_issuer_chain.pem": "pck_crl_issuer_chain.pem",
    "rootcrl.der": "root_ca_crl.der",
}


def sample_paths(*names: str) -> list[Path]:
    folder = vectors_dir() / "go-tdx-guest"
    return [folder / n for n in (names or tuple(SAMPLE_FILES))]


def sample_folder(tmp_path: Path, *skip: str) -> Path:
    for src, dst in SAMPLE_FILES.items():
        if src not in skip:
            shutil.copyfile(vectors_dir() / "go-tdx-guest" / src, tmp_path / dst)
    return tmp_path


def check_spr_e4(claims: Claims) -> None:
    # The SPR_E4 platform is below every level of its TCB info (SGX components 3,3,2,2,2,...
    # against 5,5,2,2,3,..., TEE_TCB_SVN[2] 4 against 5): Intel calls that "TCB level not
    # supported"; meshshield reports it as out_of_date, with the oldest level's advisories.
    assert claims.tcb_status is TcbStatus.OUT_OF_DATE
    assert claims.extra["intel_tcb_status"] == "TcbLevelNotSupported"
    assert claims.extra["qe_tcb_status"] == "UpToDate"
    assert claims.extra["fmspc"] == "50806f000000"
    assert claims.extra["tcb_evaluation_data_number"] == 15
    assert "INTEL-SA-00477" in claims.advisories and len(claims.advisories) == 13
    assert claims.to_json()["tcb_status"] == "out_of_date"


def test_spr_e4_with_the_sample_collateral_folder(tmp_path: Path) -> None:
    folder = sample_folder(tmp_path)
    (folder / "README.md").write_text("fetched from Intel PCS on 2023-06-20\n")
    (folder / ".hidden").write_text("ignored")
    collateral = load_collateral(folder)
    assert len(collateral.tcb_infos) == 1 and len(collateral.qe_identities) == 1
    assert len(collateral.crls) == 2
    check_spr_e4(verify_tdx_quote(vector(SPR), at=AT_2023, collateral=collateral))


def test_spr_e4_with_explicit_files() -> None:
    collateral = load_collateral_files(sample_paths())
    claims = verify_tdx_quote(vector(SPR), at=AT_2023, collateral=collateral)
    check_spr_e4(claims)
    # without collateral the same quote is simply unknown
    assert verify_tdx_quote(vector(SPR), at=AT_2023).tcb_status is TcbStatus.UNKNOWN


def test_issuer_chain_as_the_url_encoded_pcs_header(tmp_path: Path) -> None:
    folder = sample_folder(tmp_path, "tcbinfo_issuer_chain.pem", "qeidentity_issuer_chain.pem")
    chain = (vectors_dir() / "go-tdx-guest" / "tcbinfo_issuer_chain.pem").read_text()
    (folder / "tcb_info_issuer_chain.txt.hdr").write_text(urllib.parse.quote(chain))
    check_spr_e4(verify_tdx_quote(vector(SPR), at=AT_2023, collateral=load_collateral(folder)))


def refused_with(
    quote: bytes, collateral: Collateral, at: datetime, reason: Reason, **kw: object
) -> str:
    with pytest.raises(EvidenceError) as info:
        if quote[4] == 0x81:
            verify_tdx_quote(quote, at=at, collateral=collateral, **kw)  # type: ignore[arg-type]
        else:
            verify_sgx_quote(quote, at=at, collateral=collateral, **kw)  # type: ignore[arg-type]
    assert info.value.reason is reason, info.value
    return info.value.message


def test_stale_collateral_is_refused_with_its_window() -> None:
    later = datetime(2023, 7, 20, tzinfo=UTC)
    msg = refused_with(
        vector(SPR), load_collateral_files(sample_paths()), later, Reason.CHAIN_INVALID
    )
    assert "CRL in pckcrl" in msg and "2023-07-08T07:27:52Z" in msg
    no_crls = load_collateral_files(
        sample_paths("sample_tcbInfo_response", "tcbinfo_issuer_chain.pem")
    )
    msg = refused_with(vector(SPR), no_crls, later, Reason.CHAIN_INVALID)
    assert "tcbInfo in sample_tcbInfo_response" in msg and "2023-07-18T08:42:58Z" in msg


def test_2025_collateral_meets_the_expired_tcb_signing_certificate() -> None:
    # PROVENANCE.md: trustee's 2025 TCB info is signed by the same key as the only TCB
    # signing certificate available, which expired on 2025-05-21.
    folder = vectors_dir()
    collateral = load_collateral_files(
        [
            folder / "trustee-tdx" / "tcbInfo.json",
            folder / "trustee-tdx" / "enclaveIdentity.json",
            folder / "go-tdx-guest" / "tcbinfo_issuer_chain.pem",
        ]
    )
    msg = refused_with(
        vector("trustee-tdx/tdx_quote_6.dat"),
        collateral,
        datetime(2025, 11, 1, tzinfo=UTC),
        Reason.CHAIN_INVALID,
    )
    assert "Intel SGX TCB Signing" in msg and "expired" in msg and "2025-05-21" in msg


def test_signature_covers_the_raw_bytes_not_the_meaning(tmp_path: Path) -> None:
    original = vector("go-tdx-guest/sample_tcbInfo_response")
    chain = sample_paths("tcbinfo_issuer_chain.pem")
    doc = json.loads(original)

    def evaluate(data: bytes) -> Claims:
        (tmp_path / "t.json").write_bytes(data)
        c = load_collateral_files([tmp_path / "t.json", *chain])
        return verify_tdx_quote(vector(SPR), at=AT_2023, collateral=c)

    # whitespace and member order outside the signed value do not matter
    moved = (
        b'\n  {  "signature" : "'
        + doc["signature"].encode()
        + b'" ,\n "tcbInfo":'
        + original[len(b'{"tcbInfo":') : original.rindex(b',"signature"')]
        + b"}\n"
    )
    assert evaluate(moved).extra["tcb_evaluation_data_number"] == 15
    # the same meaning, re-serialised, is not what Intel signed
    with pytest.raises(EvidenceError) as info:
        evaluate(json.dumps(doc, indent=1).encode())
    assert info.value.reason is Reason.SIGNATURE_INVALID
    # one changed character inside the value
    with pytest.raises(EvidenceError) as info:
        evaluate(original.replace(b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"'))
    assert info.value.reason is Reason.SIGNATURE_INVALID


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"tcbInfo":{},"tcbInfo":{},"signature":""}', "duplicate"),
        (b'{"tcbInfo":{"a":1,"a":2},"signature":"00"}', "duplicate"),
        (b'{"tcbInfo":{"id":"TDX"},"signature":"' + b"00" * 64 + b'"}', "issueDate"),
        (b'{"signature":"00"}', "expected"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a TCB info"),
        (b"hello", "not a TCB info"),
        (b"\x30\x03\x02\x01\x00", "not a TCB info"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a TCB info"),
    ],
)
def test_malformed_collateral_files_are_named(tmp_path: Path, content: bytes, needle: str) -> None:
    (tmp_path / "weird.bin").write_bytes(content)
    with pytest.raises(EvidenceError) as info:
        load_collateral(tmp_path)
    assert info.value.reason is Reason.EVIDENCE_MALFORMED
    assert "weird.bin" in info.value.message and needle in info.value.message


def test_a_missing_folder_or_issuer_chain(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError) as info:
        load_collateral(tmp_path / "nope")
    assert info.value.reason is Reason.EVIDENCE_MALFORMED
    collateral = load_collateral_files(sample_paths("sample_tcbInfo_response"))
    msg = refused_with(vector(SPR), collateral, AT_2023, Reason.SIGNATURE_INVALID)
    assert "issuer chain" in msg


# --- synthetic collateral: every status, CRLs, module identities ---------------------------


def synth_collateral(
    tmp_path: Path,
    *,
    info: dict[str, object] | None = None,
    qe: dict[str, object] | None = None,
    crls: tuple[bytes, ...] = (),
    chain: bytes | None = None,
) -> Collateral:
    paths = []
    if info is not None:
        (tmp_path / "tcb_info.json").write_bytes(synth.signed_json("tcbInfo", info))
        paths.append(tmp_path / "tcb_info.json")
    if qe is not None:
        (tmp_path / "qe_identity.json").write_bytes(synth.signed_json("enclaveIdentity", qe))
        paths.append(tmp_path / "qe_identity.json")
    for i, crl in enumerate(crls):
        (tmp_path / f"crl{i}.der").write_bytes(crl)
        paths.append(tmp_path / f"crl{i}.der")
    (tmp_path / "chain.pem").write_bytes(chain if chain is not None else synth.issuer_chain())
    paths.append(tmp_path / "chain.pem")
    return load_collateral_files(paths)


def tdx_claims(collateral: Collateral, **spec: object) -> Claims:
    quote = synth.make_quote(synth.QuoteSpec(**spec))  # type: ignore[arg-type]
    return verify_tdx_quote(quote, at=synth.AT, collateral=collateral, roots=synth.ROOTS)


@pytest.mark.parametrize(
    ("platform", "qe_status", "expected"),
    [
        ("UpToDate", "UpToDate", TcbStatus.UP_TO_DATE),
        ("SWHardeningNeeded", "UpToDate", TcbStatus.SW_HARDENING_NEEDED),
        ("ConfigurationNeeded", "UpToDate", TcbStatus.CONFIGURATION_NEEDED),
        ("ConfigurationAndSWHardeningNeeded", "UpToDate", TcbStatus.CONFIGURATION_NEEDED),
        ("OutOfDate", "UpToDate", TcbStatus.OUT_OF_DATE),
        ("OutOfDateConfigurationNeeded", "UpToDate", TcbStatus.OUT_OF_DATE),
        ("Revoked", "UpToDate", TcbStatus.REVOKED),
        ("UpToDate", "OutOfDate", TcbStatus.OUT_OF_DATE),
        ("SWHardeningNeeded", "Revoked", TcbStatus.REVOKED),
    ],
)
def test_intel_statuses_map_to_spec_values(
    tmp_path: Path, platform: str, qe_status: str, expected: TcbStatus
) -> None:
    info = synth.tcb_info([synth.tdx_level(platform, advisories=("INTEL-SA-00001",))])
    collateral = synth_collateral(tmp_path, info=info, qe=synth.qe_identity([(8, qe_status)]))
    claims = tdx_claims(collateral)
    assert claims.tcb_status is expected
    assert claims.advisories == ("INTEL-SA-00001",)
    worst = platform if qe_status == "UpToDate" else qe_status
    if (platform, qe_status) == ("SWHardeningNeeded", "Revoked"):
        worst = "Revoked"
    assert claims.extra["intel_tcb_status"] == worst


def test_the_first_level_the_platform_meets_is_chosen(tmp_path: Path) -> None:
    levels = [
        synth.tdx_level("UpToDate", tdx=(5, 0, 3) + (0,) * 13),  # needs TEE_TCB_SVN[2] >= 3
        synth.tdx_level("SWHardeningNeeded", pce_svn=14),  # needs PCESVN 14
        synth.tdx_level("OutOfDate", advisories=("INTEL-SA-00002",)),
    ]
    collateral = synth_collateral(tmp_path, info=synth.tcb_info(levels), qe=synth.qe_identity())
    claims = tdx_claims(collateral)
    assert claims.tcb_status is TcbStatus.OUT_OF_DATE and claims.advisories == ("INTEL-SA-00002",)
    assert claims.extra["tcb_date"] == "2024-03-13T00:00:00Z"
    upgraded = tdx_claims(collateral, tee_tcb_svn=bytes([5, 0, 3]) + bytes(13))
    assert upgraded.tcb_status is TcbStatus.UP_TO_DATE and upgraded.advisories == ()
    # QE ISVSVN below every QE level
    assert tdx_claims(collateral, qe_isv_svn=2).tcb_status is TcbStatus.OUT_OF_DATE


def test_missing_pieces_are_unknown_unless_something_is_worse(tmp_path: Path) -> None:
    up = synth.tcb_info([synth.tdx_level("UpToDate")])
    assert tdx_claims(synth_collateral(tmp_path, info=up)).tcb_status is TcbStatus.UNKNOWN
    old = synth.tcb_info([synth.tdx_level("OutOfDate")])
    assert tdx_claims(synth_collateral(tmp_path, info=old)).tcb_status is TcbStatus.OUT_OF_DATE
    claims = tdx_claims(synth_collateral(tmp_path, qe=synth.qe_identity()))
    assert claims.tcb_status is TcbStatus.UNKNOWN and "none for TDX" in claims.extra["tcb_info"]
    other_fmspc = synth.tcb_info([synth.tdx_level("UpToDate")], fmspc="00606a000000")
    claims = tdx_claims(synth_collateral(tmp_path, info=other_fmspc, qe=synth.qe_identity()))
    assert claims.tcb_status is TcbStatus.UNKNOWN


def test_crl_revocation(tmp_path: Path) -> None:
    info, qe = synth.tcb_info([synth.tdx_level("UpToDate")]), synth.qe_identity()
    leaf = synth.pck_leaf()
    pck_crl = synth.crl(synth.CA_CN, "ca", [leaf.serial_number])
    claims = tdx_claims(synth_collateral(tmp_path, info=info, qe=qe, crls=(pck_crl,)))
    assert claims.tcb_status is TcbStatus.REVOKED
    assert "Intel SGX PCK Certificate" in claims.extra["revoked_certificate"]

    root_crl = synth.crl(synth.ROOT_CN, "root", [synth.CA.serial_number])
    claims = tdx_claims(synth_collateral(tmp_path, info=info, qe=qe, crls=(root_crl,)))
    assert (
        claims.tcb_status is TcbStatus.REVOKED and "PCK CA" in claims.extra["revoked_certificate"]
    )

    clean = synth.crl(synth.CA_CN, "ca", [12345])
    claims = tdx_claims(synth_collateral(tmp_path, info=info, qe=qe, crls=(clean,)))
    assert claims.tcb_status is TcbStatus.UP_TO_DATE

    forged = synth.crl(synth.CA_CN, "pck", [leaf.serial_number])
    with pytest.raises(EvidenceError) as e:
        tdx_claims(synth_collateral(tmp_path, info=info, qe=qe, crls=(forged,)))
    assert e.value.reason is Reason.CHAIN_INVALID and "CRL in crl0.der" in e.value.message

    stale = synth.crl(synth.CA_CN, "ca", [], next_update=synth.ISSUE)
    with pytest.raises(EvidenceError) as e:
        tdx_claims(synth_collateral(tmp_path, info=info, qe=qe, crls=(stale,)))
    assert e.value.reason is Reason.CHAIN_INVALID and "fetch a current CRL" in e.value.message


def module_info(levels: list[tuple[int, str]], mrsigner: str = "00" * 48) -> dict[str, object]:
    identities = [
        {
            "id": "TDX_01",
            "mrsigner": mrsigner,
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
            "tcbLevels": [
                {"tcb": {"isvsvn": svn}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": st}
                for svn, st in levels
            ],
        }
    ]
    # TEE_TCB_SVN[0..1] are the module's own SVN and version: the level need not match them
    level = synth.tdx_level("UpToDate", tdx=(9, 9, 2) + (0,) * 13)
    return synth.tcb_info([level], tdxModuleIdentities=identities)


@pytest.mark.parametrize(
    ("module_svn", "expected", "intel"),
    [
        (6, TcbStatus.UP_TO_DATE, "UpToDate"),
        (3, TcbStatus.OUT_OF_DATE, "OutOfDate"),
        (1, TcbStatus.OUT_OF_DATE, "TcbLevelNotSupported"),
    ],
)
def test_tdx_module_identities(
    tmp_path: Path, module_svn: int, expected: TcbStatus, intel: str
) -> None:
    collateral = synth_collateral(
        tmp_path, info=module_info([(4, "UpToDate"), (2, "OutOfDate")]), qe=synth.qe_identity()
    )
    claims = tdx_claims(collateral, tee_tcb_svn=bytes([module_svn, 1, 2]) + bytes(13))
    assert claims.tcb_status is expected and claims.extra["intel_tcb_status"] == intel
    # a module version the TCB info does not describe
    claims = tdx_claims(collateral, tee_tcb_svn=bytes([6, 7, 2]) + bytes(13))
    assert claims.extra["intel_tcb_status"] == "TcbLevelNotSupported"


def test_identity_mismatches_are_chain_invalid(tmp_path: Path) -> None:
    info = synth.tcb_info([synth.tdx_level("UpToDate")])
    collateral = synth_collateral(tmp_path, info=info, qe=synth.qe_identity())
    with pytest.raises(EvidenceError) as e:
        tdx_claims(collateral, mr_signer_seam=bytes([1]) * 48)
    assert e.value.reason is Reason.CHAIN_INVALID and "TDX module" in e.value.message

    collateral = synth_collateral(
        tmp_path, info=module_info([(0, "UpToDate")], mrsigner="11" * 48), qe=synth.qe_identity()
    )
    with pytest.raises(EvidenceError) as e:
        tdx_claims(collateral, tee_tcb_svn=bytes([1, 1, 2]) + bytes(13))
    assert e.value.reason is Reason.CHAIN_INVALID and "TDX_01" in e.value.message

    collateral = synth_collateral(tmp_path, info=info, qe=synth.qe_identity(isvprodid=9))
    with pytest.raises(EvidenceError) as e:
        tdx_claims(collateral)
    assert e.value.reason is Reason.CHAIN_INVALID and "ISVPRODID 2 != 9" in e.value.message


def test_forged_and_foreign_collateral(tmp_path: Path) -> None:
    info = synth.tcb_info([synth.tdx_level("UpToDate")])
    other_signer = synth.cert("Intel SGX TCB Signing", synth.ROOT_CN, "tcb", "other-root", ca=False)
    collateral = synth_collateral(
        tmp_path, info=info, chain=synth.pem(other_signer, synth.OTHER_ROOT)
    )
    with pytest.raises(EvidenceError) as e:
        tdx_claims(collateral)
    assert e.value.reason is Reason.CHAIN_INVALID and "not issued by the trusted" in e.value.message

    (tmp_path / "tcb_info.json").write_bytes(synth.signed_json("tcbInfo", info, signer="attest"))
    forged = load_collateral_files([tmp_path / "tcb_info.json", tmp_path / "chain.pem"])
    with pytest.raises(EvidenceError) as e:
        tdx_claims(forged)
    assert e.value.reason is Reason.SIGNATURE_INVALID


def test_the_newest_valid_document_is_used(tmp_path: Path) -> None:
    old = synth.tcb_info([synth.tdx_level("OutOfDate")], tcbEvaluationDataNumber=16)
    new = synth.tcb_info([synth.tdx_level("UpToDate")], tcbEvaluationDataNumber=17)
    stale = synth.tcb_info(
        [synth.tdx_level("Revoked")], tcbEvaluationDataNumber=18, nextUpdate="2025-05-02T00:00:00Z"
    )
    paths = []
    for n, doc in enumerate((old, new, stale)):
        (tmp_path / f"t{n}.json").write_bytes(synth.signed_json("tcbInfo", doc))
        paths.append(tmp_path / f"t{n}.json")
    (tmp_path / "qe.json").write_bytes(synth.signed_json("enclaveIdentity", synth.qe_identity()))
    (tmp_path / "chain.pem").write_bytes(synth.issuer_chain())
    collateral = load_collateral_files([*paths, tmp_path / "qe.json", tmp_path / "chain.pem"])
    assert tdx_claims(collateral).tcb_status is TcbStatus.UP_TO_DATE


def test_sgx_quotes_use_sgx_tcb_info_and_the_qe3_identity(tmp_path: Path) -> None:
    v3_level = synth.tdx_level("SWHardeningNeeded", advisories=("INTEL-SA-00615",))
    del v3_level["tcb"]["tdxtcbcomponents"]
    v2_level = {
        "tcb": {f"sgxtcbcomp{i:02d}svn": 0 for i in range(1, 17)} | {"pcesvn": 0},
        "tcbDate": "2020-01-01T00:00:00Z",
        "tcbStatus": "OutOfDate",
    }
    info = synth.tcb_info([v3_level, v2_level], tdx=False)
    collateral = synth_collateral(tmp_path, info=info, qe=synth.qe_identity(tdx=False))
    quote = synth.make_quote(synth.QuoteSpec(version=3))
    claims = verify_sgx_quote(quote, at=synth.AT, collateral=collateral, roots=synth.ROOTS)
    assert claims.tcb_status is TcbStatus.SW_HARDENING_NEEDED
    assert claims.advisories == ("INTEL-SA-00615",)
    # the TDX TCB info and TD QE identity do not apply to SGX
    tdx_only = synth_collateral(
        tmp_path, info=synth.tcb_info([synth.tdx_level("UpToDate")]), qe=synth.qe_identity()
    )
    claims = verify_sgx_quote(quote, at=synth.AT, collateral=tdx_only, roots=synth.ROOTS)
    assert claims.tcb_status is TcbStatus.UNKNOWN


@pytest.mark.parametrize(
    ("quote", "tcb_info", "module", "platform"),
    [
        (
            "go-tdx-guest/quote_v5_sample.dat",
            "go-tdx-guest/sample_tcbinfo_response_v5",
            "UpToDate",
            "UpToDate",
        ),
        (
            "trustee-tdx/tdx_quote_5.dat",
            "go-tdx-guest/sample_tcbinfo_response_v5",
            "OutOfDate",
            None,
        ),
        ("trustee-tdx/tdx_quote_6.dat", "trustee-tdx/tcbInfo.json", "UpToDate", "OutOfDate"),
    ],
)
def test_level_matching_on_real_tdx15_tcb_info(
    quote: str, tcb_info: str, module: str, platform: str | None
) -> None:
    # These TCB infos cannot pass the time checks (their only signing certificate expired
    # before they were issued), so the matching itself is checked here on the real data.
    from meshshield.attestation.collateral import _module_status, _platform_level
    from meshshield.attestation.pck import pck_tcb
    from meshshield.attestation.tdx import parse_tdx_quote

    info = load_collateral_files([vectors_dir() / tcb_info]).tcb_infos[0]
    q, td = parse_tdx_quote(vector(quote))
    tcb = pck_tcb(q.sig.pck_chain[0])
    assert tcb.fmspc == info.fmspc and td.tee_tcb_svn[1] > 0
    skip, module_status, _ = _module_status(
        info, (td.tee_tcb_svn, td.mr_signer_seam, td.seam_attributes)
    )
    assert skip and module_status == module
    level = _platform_level(info, tcb, td.tee_tcb_svn, skip)
    assert (level.status if level else None) == platform


def test_a_crl_whose_issuer_name_cryptography_rejects_late(tmp_path: Path) -> None:
    # Found by the property tests: a name attribute re-tagged as BIT STRING makes
    # `cryptography` raise TypeError when the issuer is first read.
    der = bytearray(synth.crl(synth.CA_CN, "ca", [1]))
    at = der.index(b"\x0c\x19" + synth.CA_CN.encode())
    der[at] = 0x03
    (tmp_path / "crl.der").write_bytes(bytes(der))
    with pytest.raises(EvidenceError) as info:
        load_collateral(tmp_path)
    assert info.value.reason is Reason.EVIDENCE_MALFORMED and "crl.der" in info.value.message
