"""The attested CAS's key-encryption key: the wrapped-KEK blob, the peer-recovery request
and answer (all untrusted bytes: malformed, truncated, oversized, tampered, and a
hypothesis property each), the TEE sealing keys (sim derived for real; SEV-SNP's
MSG_KEY_REQ structure and its honest "needs /dev/sev-guest"; Gramine's key file), and
the start-up decision `obtain_kek` on a real SQLite store."""

from __future__ import annotations

import base64
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshield.attestation.claims import Platform
from meshshield.attestation.sim import generate_sim_platform_key
from meshshield.cas import kekwrap, sealing
from meshshield.cas.kekstore import (
    RECOVERY_KEY,
    TEE_SEALED,
    KekPlan,
    KekUnavailable,
    obtain_kek,
    parse_recovery_answer,
    parse_recovery_request,
    peer_report_data,
)
from meshshield.cas.recoverykey import (
    load_recovery_private,
    load_recovery_public,
    write_recovery_key,
)
from meshshield.cas.sqlite_store import SqliteStore
from meshshield.cas.store import CaStoredRecord
from meshshield.errors import MeshError, Reason
from meshshield.pki.ca import CaRecord, cert_pem, generate_ca
from meshshield.pki.keys import generate_p256, spki_der
from meshshield.pki.seal import seal_private_key

KEK = bytes(range(32))
SEAL = bytes(range(32, 64))
CTX = b"tee:sim:x"


# -- the wrapped-KEK blob ---------------------------------------------------------------------

def test_sealed_round_trip_and_context_binding() -> None:
    blob = kekwrap.seal_kek(KEK, SEAL, CTX)
    assert len(blob) == kekwrap.SEALED_SIZE
    assert kekwrap.unseal_kek(blob, SEAL, CTX) == KEK
    with pytest.raises(kekwrap.KekWrapError, match="does not open"):
        kekwrap.unseal_kek(blob, SEAL, b"tee:sim:other")
    with pytest.raises(kekwrap.KekWrapError, match="does not open"):
        kekwrap.unseal_kek(blob, bytes(32), CTX)


def test_to_key_round_trip_and_binding() -> None:
    k = generate_p256()
    blob = kekwrap.wrap_to_key(KEK, k.public_key(), b"peer:n")
    assert len(blob) == kekwrap.TO_KEY_SIZE
    assert kekwrap.unwrap_with_key(blob, k, b"peer:n") == KEK
    with pytest.raises(kekwrap.KekWrapError, match="does not open"):
        kekwrap.unwrap_with_key(blob, k, b"peer:m")
    with pytest.raises(kekwrap.KekWrapError, match="does not open"):
        kekwrap.unwrap_with_key(blob, generate_p256(), b"peer:n")
    with pytest.raises(kekwrap.KekWrapError, match="not one wrapped to a key"):
        kekwrap.unwrap_with_key(kekwrap.seal_kek(KEK, SEAL, CTX), k, b"peer:n")
    with pytest.raises(kekwrap.KekWrapError, match="not a sealed one"):
        kekwrap.unseal_kek(blob, SEAL, CTX)


@pytest.mark.parametrize(("blob", "message"), [
    (b"", "truncated before its header"),
    (b"MSKEKW", "truncated before its header"),
    (b"XXKEKW\x01\x01" + bytes(60), "magic"),
    (b"MSKEKW\x02\x01" + bytes(60), "format version 2"),
    (b"MSKEKW\x01\x07" + bytes(60), "unknown kind 7"),
    (b"MSKEKW\x01\x01" + bytes(10), "truncated or corrupted"),
    (b"MSKEKW\x01\x02" + bytes(100), "truncated or corrupted"),
    (b"MSKEKW\x01\x02" + b"\x02" + bytes(kekwrap.TO_KEY_SIZE - 9), "uncompressed"),
    (bytes(kekwrap.MAX_BLOB + 1), "more than"),
])
def test_malformed_blobs_are_refused_before_any_cryptography(blob: bytes, message: str) -> None:
    with pytest.raises(kekwrap.KekWrapError, match=message):
        kekwrap.parse_wrap(blob)


def test_truncated_and_tampered_blobs_never_open() -> None:
    k = generate_p256()
    for blob, opener in (
        (kekwrap.seal_kek(KEK, SEAL, CTX), lambda b: kekwrap.unseal_kek(b, SEAL, CTX)),
        (kekwrap.wrap_to_key(KEK, k.public_key(), b"c"),
         lambda b: kekwrap.unwrap_with_key(b, k, b"c")),
    ):
        for n in range(len(blob)):
            with pytest.raises(kekwrap.KekWrapError):
                opener(blob[:n])
        for i in range(len(blob)):
            bad = bytearray(blob)
            bad[i] ^= 0x01
            with pytest.raises(kekwrap.KekWrapError):
                opener(bytes(bad))


_SEALED = kekwrap.seal_kek(KEK, SEAL, CTX)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=80).map(lambda b: b"MSKEKW\x01" + b),
                 st.tuples(st.integers(0, len(_SEALED) - 1), st.integers(1, 255)).map(
                     lambda t: _SEALED[:t[0]] + bytes([_SEALED[t[0]] ^ t[1]])
                     + _SEALED[t[0] + 1:])))
def test_any_bytes_parse_or_refuse_and_never_open_wrongly(data: bytes) -> None:
    try:
        kekwrap.parse_wrap(data)
    except kekwrap.KekWrapError:
        pass
    try:
        assert kekwrap.unseal_kek(data, SEAL, CTX) == KEK and data == _SEALED
    except kekwrap.KekWrapError:
        pass


# -- the peer-recovery request and answer -------------------------------------------------------

def _request(**over: object) -> bytes:
    key = generate_p256()
    doc: dict[str, object] = {
        "nonce": base64.b64encode(bytes(32)).decode(), "platform": "sim",
        "evidence": {"type": "sim"}, "key": base64.b64encode(spki_der(key.public_key())).decode(),
    }
    doc.update(over)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_a_well_formed_request_parses() -> None:
    r = parse_recovery_request(_request())
    assert r.platform is Platform.SIM and isinstance(r.key, ec.EllipticCurvePublicKey)


@pytest.mark.parametrize(("body", "reason", "message"), [
    (b"", Reason.BAD_REQUEST, "not a JSON object"),
    (b"[1]", Reason.BAD_REQUEST, "not a JSON object"),
    (b'{"nonce": ', Reason.BAD_REQUEST, "not a JSON object"),
    (b"[" * 600_000, Reason.BODY_TOO_LARGE, "at most"),
    (_request(extra=1), Reason.BAD_REQUEST, "exactly"),
    (_request(key=...), Reason.BAD_REQUEST, "exactly"),
    (_request(platform="sgx2"), Reason.BAD_REQUEST, "platform must be"),
    (_request(platform=7), Reason.BAD_REQUEST, "platform must be"),
    (_request(nonce=5), Reason.BAD_REQUEST, "nonce"),
    (_request(key="***"), Reason.BAD_REQUEST, "base64"),
    (_request(key="A" * 1000), Reason.BAD_REQUEST, "at most"),
    (_request(key=base64.b64encode(b"\x30\x03\x02\x01\x01").decode()), Reason.BAD_REQUEST,
     "SubjectPublicKeyInfo"),
    (_request(key=base64.b64encode(spki_der(
        ec.generate_private_key(ec.SECP384R1()).public_key())).decode()),
     Reason.BAD_REQUEST, "P-256"),
])
def test_malformed_requests_are_refused(body: bytes, reason: Reason, message: str) -> None:
    with pytest.raises(MeshError) as e:
        parse_recovery_request(body)
    assert e.value.reason is reason and message in e.value.message


def _answer(**over: object) -> bytes:
    doc: dict[str, object] = {
        "wrapped_kek": base64.b64encode(kekwrap.wrap_to_key(
            KEK, generate_p256().public_key(), b"c")).decode(),
        "ca_fingerprint": "ab" * 32}
    doc.update(over)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_answers_parse_and_malformed_ones_are_refused() -> None:
    blob, fp = parse_recovery_answer(_answer(), "peer")
    assert len(blob) == kekwrap.TO_KEY_SIZE and fp == "ab" * 32
    for bad, message in (
        (b"{}", "expected wrapped_kek"), (b"nope", "not a JSON object"),
        (_answer(ca_fingerprint="AB" * 32), "lowercase hex"),
        (_answer(ca_fingerprint=...), "expected wrapped_kek"),
        (_answer(wrapped_kek="A" * 400), "at most"),
        (_answer(wrapped_kek="!!"), "base64"),
        (b" " * 20_000, "at most"),
    ):
        with pytest.raises(MeshError, match=message):
            parse_recovery_answer(bad, "peer")


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=400),
    st.dictionaries(st.sampled_from(["nonce", "platform", "evidence", "key", "x"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=40),
                              st.binary(max_size=120).map(lambda b: base64.b64encode(b)
                                                          .decode()))).map(
        lambda d: json.dumps(d).encode())))
def test_any_request_or_answer_parses_or_is_a_mesh_error(data: bytes) -> None:
    for parse in (parse_recovery_request, lambda d: parse_recovery_answer(d, "peer")):
        try:
            parse(data)
        except MeshError as e:
            assert e.reason in (Reason.BAD_REQUEST, Reason.BODY_TOO_LARGE,
                                Reason.EVIDENCE_MALFORMED)


def test_peer_report_data_is_domain_separated_and_checked() -> None:
    a = peer_report_data(bytes(32), bytes(32))
    assert len(a) == 64 and a != peer_report_data(bytes(31) + b"\x01", bytes(32))
    with pytest.raises(ValueError):
        peer_report_data(bytes(31), bytes(32))


# -- sealing keys -------------------------------------------------------------------------------

def test_sim_sealing_is_per_chip_and_per_measurement_and_labelled() -> None:
    chip = generate_sim_platform_key()
    a = sealing.SimSealing(chip, "aa" * 32)
    assert a.derive() == sealing.SimSealing(chip, "aa" * 32).derive()
    assert len(a.derive()) == 32
    assert a.derive() != sealing.SimSealing(chip, "ab" * 32).derive()
    assert a.derive() != sealing.SimSealing(generate_sim_platform_key(), "aa" * 32).derive()
    assert a.simulated and "SIMULATED" in a.describe() and a.key_id.endswith("aa" * 32)


def test_sealed_wraps_are_named_by_identity_and_by_the_key_itself() -> None:
    from meshshield.cas.kekstore import sealed_id

    a, b = bytes(32), bytes(31) + b"\x01"
    assert sealed_id("sev-snp:m", a) == sealed_id("sev-snp:m", a)
    assert sealed_id("sev-snp:m", a) != sealed_id("sev-snp:m", b)  # same report, 2 chips
    assert sealed_id("sev-snp:m", a).startswith("sev-snp:m:")
    assert a.hex() not in sealed_id("sev-snp:m", a)


def test_snp_key_request_structure() -> None:
    req = sealing.snp_key_request()
    assert len(req) == 32
    root, rsvd, fields, vmpl, svn, tcb = struct.unpack("<IIQIIQ", req)
    assert (root, rsvd, vmpl, svn, tcb) == (0, 0, 0, 0, 0)  # VCEK: bound to this chip
    assert fields == sealing.FIELD_GUEST_POLICY | sealing.FIELD_MEASUREMENT == 0b1001
    # _IOWR('S', 1, struct snp_guest_request_ioctl) as linux/sev-guest.h defines it
    assert sealing.SNP_GET_DERIVED_KEY == 0xC0205301
    resp = bytes(32) + bytes(range(32))
    assert sealing.parse_snp_key_response(resp) == bytes(range(32))
    with pytest.raises(sealing.SealingUnavailable, match="status 0x16"):
        sealing.parse_snp_key_response(b"\x16" + bytes(63))
    with pytest.raises(sealing.SealingUnavailable, match="expected 64"):
        sealing.parse_snp_key_response(bytes(10))


def test_snp_and_sgx_say_what_they_need_when_it_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(sealing.SealingUnavailable, match="needs .*sev-guest"):
        sealing.SnpSealing("aa" * 48, device=tmp_path / "sev-guest").derive()
    with pytest.raises(sealing.SealingUnavailable, match="Gramine"):
        sealing.GramineSealing("aa" * 32, path=tmp_path / "_sgx_mrenclave").derive()
    (tmp_path / "k").write_bytes(bytes(15))
    with pytest.raises(sealing.SealingUnavailable, match="16 bytes"):
        sealing.GramineSealing("aa" * 32, path=tmp_path / "k").derive()
    (tmp_path / "k").write_bytes(bytes(16))
    assert len(sealing.GramineSealing("aa" * 32, path=tmp_path / "k").derive()) == 32
    assert sealing.sealing_for(Platform.TDX, "aa" * 48) is None


# -- recovery key files -------------------------------------------------------------------------

def test_recovery_key_files(tmp_path: Path) -> None:
    priv, pub, fp = write_recovery_key(tmp_path / "rk")
    assert priv.stat().st_mode & 0o777 == 0o600
    assert kekwrap.key_fingerprint(load_recovery_public(str(pub))) == fp
    assert [kekwrap.key_fingerprint(k.public_key())
            for k in load_recovery_private(str(tmp_path / "rk"))] == [fp]
    with pytest.raises(FileExistsError):
        write_recovery_key(tmp_path / "rk")
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_recovery_public(str(priv))
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_recovery_private(str(pub))


# -- obtain_kek on a real store ------------------------------------------------------------------

def _plan(chip: ec.EllipticCurvePrivateKey | None, **kw: object) -> KekPlan:
    s = sealing.SimSealing(chip, "cd" * 32) if chip is not None else None
    return KekPlan(sealing=s, platform=Platform.SIM if chip else Platform.TDX,
                   evidence_of=lambda rd: {}, **kw)  # type: ignore[arg-type]


def _with_ca(store: SqliteStore, kek: bytes) -> None:
    now = datetime.now(UTC)
    cert, key = generate_ca("t.local", now)
    fp = CaRecord(cert, key, "active").fingerprint
    store.save_cas([CaStoredRecord(fp, cert_pem(cert), seal_private_key(
        key, kek, b"ca:" + fp.encode()), "active", None, None, now)], "t", now)


def test_first_start_then_unseal_then_recovery_key_then_refusal(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "cas.db")
    chip = generate_sim_platform_key()
    _, pub, fp = write_recovery_key(tmp_path / "rk")
    rk = load_recovery_public(str(pub))
    said: list[str] = []
    first = obtain_kek(store, _plan(chip, recovery_keys=(rk,)), say=said.append)
    assert first.source == "initialised"
    assert {(w.kind, w.key_id.split(":")[0]) for w in store.kek_wraps()} == {
        (TEE_SEALED, "sim"), (RECOVERY_KEY, fp)}
    assert store.record_counts()["audit record"] == 0  # audited once the CA exists
    _with_ca(store, first.kek)
    again = obtain_kek(store, _plan(chip), say=said.append)
    assert again.source == TEE_SEALED and again.kek == first.kek
    # another chip: no sealed wrap opens, no peer, no recovery key: refused, naming paths
    other = generate_sim_platform_key()
    with pytest.raises(KekUnavailable) as e:
        obtain_kek(store, _plan(other), say=said.append)
    for words in ("--peer", "cas recover --recovery-key-private", f"sha256:{fp}",
                  "sealed KEKs for sim:"):
        assert words in e.value.message
    priv = tuple(load_recovery_private(str(tmp_path / "rk")))
    rec = obtain_kek(store, _plan(other, recovery_private=priv), say=said.append)
    assert rec.kek == first.kek and rec.source == f"recovery-key sha256:{fp}"
    # and now that chip has its own sealed wrap
    assert obtain_kek(store, _plan(other), say=said.append).source == TEE_SEALED
    actions = [a.action for a in store.audit_log()]
    assert "kek-recover" in actions and "kek-wrap" in actions
    # a recovery key the store has no wrap for
    _, _, _ = write_recovery_key(tmp_path / "rk2")
    with pytest.raises(KekUnavailable, match="has a KEK wrap in the store"):
        obtain_kek(store, _plan(generate_sim_platform_key(), recovery_private=tuple(
            load_recovery_private(str(tmp_path / "rk2")))), say=said.append)
    store.close()


def test_a_platform_without_sealing_needs_a_recovery_key_to_initialise(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "cas.db")
    said: list[str] = []
    with pytest.raises(KekUnavailable, match="--recovery-key"):
        obtain_kek(store, _plan(None), say=said.append)
    assert any("tdx offers no sealing key" in s for s in said)
    assert store.kek_wraps() == []
    _, pub, _ = write_recovery_key(tmp_path / "rk")
    out = obtain_kek(store, _plan(None, recovery_keys=(load_recovery_public(str(pub)),)),
                     say=said.append)
    assert out.source == "initialised" and [w.kind for w in store.kek_wraps()] == [RECOVERY_KEY]
    store.close()


def test_a_kek_that_does_not_open_the_ca_is_never_stored(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "cas.db")
    _with_ca(store, KEK)  # a CA sealed under another KEK, and no wraps
    with pytest.raises(KekUnavailable, match="made by a CAS with a KEK file"):
        obtain_kek(store, _plan(generate_sim_platform_key()), say=lambda _s: None)
    _, pub, _ = write_recovery_key(tmp_path / "rk")
    chip = generate_sim_platform_key()
    from meshshield.cas.kekstore import _context, sealed_id
    from meshshield.cas.store import KekWrapRecord

    # a sealed wrap for this chip holding the wrong KEK
    s = sealing.SimSealing(chip, "cd" * 32)
    kid = sealed_id(s.key_id, s.derive())
    store.put_kek_wrap(KekWrapRecord(TEE_SEALED, kid, kekwrap.seal_kek(
        bytes(32), s.derive(), _context(kid)), "t", datetime.now(UTC)), "t")
    with pytest.raises(KekUnavailable, match="does not open the stored CA key"):
        obtain_kek(store, _plan(chip, recovery_keys=(load_recovery_public(str(pub)),)),
                   say=lambda _s: None)
    assert [w.kind for w in store.kek_wraps()] == [TEE_SEALED]
    store.close()
