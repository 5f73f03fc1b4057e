"""Simulated attestation: platform keys, evidence round trip, and every malformed case."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from meshshield.attestation import sim
from meshshield.attestation.claims import Platform, TcbStatus, expected_report_data
from meshshield.errors import EvidenceError, Reason

MEASUREMENT = "ab" * 32
REPORT_DATA = bytes(range(64))

# Field offsets and sizes, as documented in sim.py.
FIELDS = {
    "magic": (0, 8),
    "version": (8, 2),
    "flags": (10, 2),
    "reserved": (12, 4),
    "measurement": (16, 32),
    "report_data": (48, 64),
    "platform_key_id": (112, 32),
}


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return sim.generate_sim_platform_key()


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePrivateKey:
    return sim.generate_sim_platform_key()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s)


def refused(evidence: object, trusted: list[ec.EllipticCurvePublicKey], reason: Reason) -> str:
    with pytest.raises(EvidenceError) as info:
        sim.verify_sim_evidence(evidence, trusted)
    assert info.value.reason is reason, info.value
    return info.value.message


# --- round trip ----------------------------------------------------------------------


def test_round_trip_claims(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    assert set(ev) == {"report", "signature"}
    assert len(unb64(ev["report"])) == sim.REPORT_SIZE == 144
    claims = sim.verify_sim_evidence(ev, [key.public_key()])
    assert claims.platform is Platform.SIM
    assert claims.measurement == MEASUREMENT
    assert claims.report_data == REPORT_DATA
    assert claims.debug is False
    assert claims.tcb_status is TcbStatus.UNKNOWN
    assert (claims.signer, claims.product_id, claims.svn) == (None, None, None)
    assert claims.simulated is True
    assert dict(claims.extra) == {"platform_key_id": sim.sim_platform_key_id(key.public_key())}
    assert claims.to_json()["simulated"] is True


def test_uppercase_measurement_normalised(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT.upper(), REPORT_DATA)
    assert sim.verify_sim_evidence(ev, [key.public_key()]).measurement == MEASUREMENT


def test_debug_flag(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA, debug=True)
    assert sim.verify_sim_evidence(ev, [key.public_key()]).debug is True
    assert sim.parse_sim_report(unb64(ev["report"])).flags == 1


def test_report_data_binds_nonce_and_key(key: ec.EllipticCurvePrivateKey) -> None:
    nonce = os.urandom(32)
    leaf = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = leaf.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rd = expected_report_data(nonce, spki)
    ev = sim.make_sim_evidence(key, MEASUREMENT, rd)
    claims = sim.verify_sim_evidence(ev, [key.public_key()])
    assert claims.report_data == rd
    assert claims.report_data != expected_report_data(os.urandom(32), spki)


def test_layout_matches_docstring(key: ec.EllipticCurvePrivateKey) -> None:
    raw = unb64(sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA, debug=True)["report"])
    assert raw[0:8] == b"MSHSIMRP"
    assert raw[8:10] == b"\x01\x00"
    assert raw[10:12] == b"\x01\x00"
    assert raw[12:16] == b"\x00" * 4
    assert raw[16:48] == bytes.fromhex(MEASUREMENT)
    assert raw[48:112] == REPORT_DATA
    assert raw[112:144].hex() == sim.sim_platform_key_id(key.public_key())
    report = sim.parse_sim_report(raw)
    assert report.to_bytes() == raw
    assert report.debug


def test_several_trusted_keys(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    claims = sim.verify_sim_evidence(ev, [other_key.public_key(), key.public_key()])
    assert claims.measurement == MEASUREMENT


def test_make_rejects_bad_arguments(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="hex"):
        sim.make_sim_evidence(key, "ab" * 31, REPORT_DATA)
    with pytest.raises(ValueError, match="hex"):
        sim.make_sim_evidence(key, "zz" * 32, REPORT_DATA)
    with pytest.raises(ValueError, match="64 bytes"):
        sim.make_sim_evidence(key, MEASUREMENT, b"short")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        sim.make_sim_evidence(p384, MEASUREMENT, REPORT_DATA)


# --- malformed evidence --------------------------------------------------------------


@pytest.mark.parametrize(
    "evidence",
    [None, True, 1, 1.5, "x", [], ["report", "signature"]],
    ids=["null", "bool", "int", "float", "str", "empty-list", "list"],
)
def test_not_an_object(evidence: object, key: ec.EllipticCurvePrivateKey) -> None:
    msg = refused(evidence, [key.public_key()], Reason.EVIDENCE_MALFORMED)
    assert "JSON object" in msg


def test_missing_and_extra_keys(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    trusted = [key.public_key()]
    assert '"signature"' in refused({"report": ev["report"]}, trusted, Reason.EVIDENCE_MALFORMED)
    assert '"report"' in refused({"signature": ev["signature"]}, trusted, Reason.EVIDENCE_MALFORMED)
    assert "'extra'" in refused({**ev, "extra": 1}, trusted, Reason.EVIDENCE_MALFORMED)
    refused({}, trusted, Reason.EVIDENCE_MALFORMED)
    refused({1: 2, None: 3}, trusted, Reason.EVIDENCE_MALFORMED)


@pytest.mark.parametrize("field", ["report", "signature"])
@pytest.mark.parametrize("value", [None, 1, True, 1.0, [], {}, b"bytes"])
def test_wrong_json_types(field: str, value: object, key: ec.EllipticCurvePrivateKey) -> None:
    ev: dict[str, Any] = dict(sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA))
    ev[field] = value
    msg = refused(ev, [key.public_key()], Reason.EVIDENCE_MALFORMED)
    assert f'"{field}" must be a base64 string' in msg


@pytest.mark.parametrize("field", ["report", "signature"])
@pytest.mark.parametrize(
    "junk",
    ["!!!!", "QUJD\n", " QUJD", "QUJD====", "QUJ", "QR==", "QUJD-_", "éé", "QU\x00J"],
    ids=[
        "punct",
        "newline",
        "space",
        "overpad",
        "unpadded",
        "noncanonical",
        "urlsafe",
        "utf8",
        "nul",
    ],
)
def test_junk_base64(field: str, junk: str, key: ec.EllipticCurvePrivateKey) -> None:
    ev = dict(sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA))
    ev[field] = junk
    msg = refused(ev, [key.public_key()], Reason.EVIDENCE_MALFORMED)
    assert "base64" in msg or "bytes" in msg


@pytest.mark.parametrize("field", ["report", "signature"])
def test_oversize_string_refused_before_decoding(
    field: str, key: ec.EllipticCurvePrivateKey
) -> None:
    ev = dict(sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA))
    ev[field] = "A" * 10_000_000
    msg = refused(ev, [key.public_key()], Reason.EVIDENCE_MALFORMED)
    assert "characters of base64" in msg


def test_truncated_and_oversized_report(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    raw = unb64(ev["report"])
    trusted = [key.public_key()]
    for bad in (b"", raw[:-1], raw[:16]):
        msg = refused({**ev, "report": b64(bad)}, trusted, Reason.EVIDENCE_MALFORMED)
        assert "144 bytes" in msg
    # One byte more still fits the base64 length bound of 144 bytes; two do not.
    refused({**ev, "report": b64(raw + b"\0")}, trusted, Reason.EVIDENCE_MALFORMED)
    refused({**ev, "report": b64(raw + b"\0\0")}, trusted, Reason.EVIDENCE_MALFORMED)


def test_empty_and_oversized_signature(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    trusted = [key.public_key()]
    assert "empty" in refused({**ev, "signature": ""}, trusted, Reason.EVIDENCE_MALFORMED)
    big = b64(unb64(ev["signature"]) + b"\0" * 200)
    refused({**ev, "signature": big}, trusted, Reason.EVIDENCE_MALFORMED)


def test_parse_strict_header_fields(key: ec.EllipticCurvePrivateKey) -> None:
    raw = bytearray(unb64(sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)["report"]))
    cases = {
        "magic": (0, b"MSHSIMRQ"),
        "version": (8, b"\x02\x00"),
        "flags": (10, b"\x02\x00"),
        "reserved": (12, b"\x00\x00\x00\x01"),
    }
    for field, (offset, value) in cases.items():
        bad = bytearray(raw)
        bad[offset : offset + len(value)] = value
        with pytest.raises(EvidenceError) as info:
            sim.parse_sim_report(bytes(bad))
        assert info.value.reason is Reason.EVIDENCE_MALFORMED
        assert field in info.value.message


@pytest.mark.parametrize("field", list(FIELDS))
def test_tampered_byte_in_each_field(field: str, key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    offset, size = FIELDS[field]
    for pos in (offset, offset + size - 1):
        raw = bytearray(unb64(ev["report"]))
        raw[pos] ^= 0x04
        with pytest.raises(EvidenceError) as info:
            sim.verify_sim_evidence({**ev, "report": b64(bytes(raw))}, [key.public_key()])
        expected = (
            Reason.EVIDENCE_MALFORMED
            if field in ("magic", "version", "flags", "reserved")
            else Reason.SIGNATURE_INVALID
        )
        assert info.value.reason is expected


def test_flipped_bit_in_signature(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    sig = unb64(ev["signature"])
    for i in range(len(sig) * 8):
        bad = bytearray(sig)
        bad[i // 8] ^= 1 << (i % 8)
        refused({**ev, "signature": b64(bytes(bad))}, [key.public_key()], Reason.SIGNATURE_INVALID)


def test_debug_flag_cannot_be_cleared(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA, debug=True)
    raw = bytearray(unb64(ev["report"]))
    raw[10] = 0
    refused({**ev, "report": b64(bytes(raw))}, [key.public_key()], Reason.SIGNATURE_INVALID)


def test_unknown_platform_key(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    key_id = sim.sim_platform_key_id(key.public_key())
    for trusted in ([other_key.public_key()], []):
        msg = refused(ev, trusted, Reason.SIGNATURE_INVALID)
        assert "--trust-sim-platform" in msg and key_id in msg


def test_wrong_key_with_forged_key_id(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    """An attacker's key signing a report that names the trusted key's id."""
    ev = sim.make_sim_evidence(other_key, MEASUREMENT, REPORT_DATA)
    raw = bytearray(unb64(ev["report"]))
    raw[112:144] = bytes.fromhex(sim.sim_platform_key_id(key.public_key()))
    sig = other_key.sign(bytes(raw), ec.ECDSA(hashes.SHA256()))
    forged = {"report": b64(bytes(raw)), "signature": b64(sig)}
    msg = refused(forged, [key.public_key()], Reason.SIGNATURE_INVALID)
    assert "does not verify" in msg


def test_other_platforms_evidence(key: ec.EllipticCurvePrivateKey) -> None:
    trusted = [key.public_key()]
    for ev in ({"quote": "AAAA"}, {"quote": 5, "x": 1}):
        msg = refused(ev, trusted, Reason.EVIDENCE_MALFORMED)
        assert "tdx or sgx" in msg and "not sim" in msg
    msg = refused({"report": "AAAA", "certs": "-----BEGIN"}, trusted, Reason.EVIDENCE_MALFORMED)
    assert "sev-snp" in msg and "not sim" in msg
    snp_sized = {"report": b64(b"\0" * 1184), "signature": "AAAA"}
    msg = refused(snp_sized, trusted, Reason.EVIDENCE_MALFORMED)
    assert "144 bytes" in msg


def test_trusted_keys_must_be_p256(key: ec.EllipticCurvePrivateKey) -> None:
    ev = sim.make_sim_evidence(key, MEASUREMENT, REPORT_DATA)
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(sim.SimKeyError, match="P-256"):
        sim.verify_sim_evidence(ev, [p384])


# --- platform key files --------------------------------------------------------------


def test_write_and_load_keys(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    old = os.umask(0)
    try:
        priv, pub = sim.write_sim_platform_key(key, tmp_path / "keys")
    finally:
        os.umask(old)
    assert priv.name == "sim-platform.key" and pub.name == "sim-platform.pub.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes()  # PKCS8
    loaded = sim.load_sim_private_key(priv)
    assert loaded.private_numbers() == key.private_numbers()
    assert sim.load_sim_public_key(pub).public_numbers() == key.public_key().public_numbers()
    ev = sim.make_sim_evidence(loaded, MEASUREMENT, REPORT_DATA)
    assert sim.verify_sim_evidence(ev, [sim.load_sim_public_key(pub)]).simulated


def test_private_key_created_with_0600(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mode is given to open(2) itself, never tightened afterwards."""
    real_open = os.open
    modes: dict[str, int] = {}

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        modes[os.path.basename(os.fspath(path))] = mode
        assert flags & os.O_EXCL
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", spy)
    sim.write_sim_platform_key(key, tmp_path)
    assert modes["sim-platform.key"] == 0o600


def test_write_refuses_to_overwrite(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    sim.write_sim_platform_key(key, tmp_path)
    before = (tmp_path / "sim-platform.key").read_bytes()
    with pytest.raises(sim.SimKeyError, match="already exists"):
        sim.write_sim_platform_key(sim.generate_sim_platform_key(), tmp_path)
    assert (tmp_path / "sim-platform.key").read_bytes() == before


def test_write_refuses_symlink_in_place(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    (tmp_path / "sim-platform.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(sim.SimKeyError, match="already exists"):
        sim.write_sim_platform_key(key, tmp_path)
    assert not (tmp_path / "elsewhere").exists()


def _pem_private(k: Any, password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return k.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )


def _pem_public(k: Any) -> bytes:
    return k.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_load_errors(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    p = tmp_path / "k.pem"
    with pytest.raises(sim.SimKeyError, match="cannot read"):
        sim.load_sim_private_key(p)
    with pytest.raises(sim.SimKeyError, match="cannot read"):
        sim.load_sim_public_key(p)

    p.write_bytes(b"hello")
    with pytest.raises(sim.SimKeyError, match="not a PEM private key"):
        sim.load_sim_private_key(p)
    with pytest.raises(sim.SimKeyError, match="not a PEM public key"):
        sim.load_sim_public_key(p)

    p.write_bytes(_pem_private(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(sim.SimKeyError, match="secp384r1.*P-256"):
        sim.load_sim_private_key(p)
    p.write_bytes(_pem_public(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(sim.SimKeyError, match="secp384r1.*P-256"):
        sim.load_sim_public_key(p)

    p.write_bytes(_pem_private(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(sim.SimKeyError, match="not an EC key"):
        sim.load_sim_private_key(p)
    p.write_bytes(_pem_public(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(sim.SimKeyError, match="not an EC key"):
        sim.load_sim_public_key(p)

    p.write_bytes(_pem_private(key, b"secret"))
    with pytest.raises(sim.SimKeyError, match="encrypted"):
        sim.load_sim_private_key(p)

    p.write_bytes(_pem_private(key))
    with pytest.raises(sim.SimKeyError, match="holds a private key"):
        sim.load_sim_public_key(p)
    p.write_bytes(_pem_public(key))
    with pytest.raises(sim.SimKeyError, match="it is a public key"):
        sim.load_sim_private_key(p)

    p.write_bytes(b"x" * 100_000)
    with pytest.raises(sim.SimKeyError, match="larger than"):
        sim.load_sim_private_key(p)
    with pytest.raises(sim.SimKeyError):
        sim.load_sim_private_key(tmp_path)  # a directory
