"""The CMW extension carrying the claims: exact encoding, strict and bounded decoding of
untrusted bytes (malformed, truncated, oversized, tampered), and the retired format."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from pki_helpers import valid_claims

from meshshield.errors import MeshError, Reason
from meshshield.pki import (
    CLAIMS_MEDIA_TYPE,
    CMW_OID,
    EVIDENCE_MEDIA_TYPE,
    LEGACY_CLAIMS_OID,
    CmwRecord,
    attestation_from_certificate,
    claims_extension,
    claims_from_certificate,
    decode_claims_extension,
    encode_claims,
    generate_p256,
)
from meshshield.pki.claims_ext import MAX_EXTENSION_BYTES
from meshshield.pki.cmw import encode_extension_value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def der_utf8(text: str | bytes) -> bytes:
    body = text.encode() if isinstance(text, str) else text
    n = len(body)
    if n < 0x80:
        return b"\x0c" + bytes([n]) + body
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x0c" + bytes([0x80 | len(length)]) + length + body


def record_value(obj: object) -> bytes:
    return der_utf8(json.dumps(obj, separators=(",", ":")))


CLAIMS = valid_claims()
CLAIMS_BYTES = encode_claims(CLAIMS)
EVIDENCE = b'{"report":"AAAA","signature":"BBBB"}'
CLAIMS_WITH_EVIDENCE = valid_claims(evidence_sha256=hashlib.sha256(EVIDENCE).hexdigest())


def test_oid_is_id_pe_cmw_with_small_arcs() -> None:
    assert CMW_OID.dotted_string == "1.3.6.1.5.5.7.1.35"
    assert all(int(a) < 2**31 for a in CMW_OID.dotted_string.split("."))


def test_record_encoding_is_exact() -> None:
    ext = claims_extension(CLAIMS)
    assert ext.oid == CMW_OID
    text = json.dumps([CLAIMS_MEDIA_TYPE, b64url(CLAIMS_BYTES), 8], separators=(",", ":"))
    assert ext.value == der_utf8(text)
    # the value inside the record is exactly the canonical claims JSON (SPEC §5)
    assert CLAIMS_BYTES == json.dumps(CLAIMS, sort_keys=True, separators=(",", ":")).encode()
    got = decode_claims_extension(ext.value)
    assert got.claims == CLAIMS and got.evidence is None


def test_collection_carries_evidence_beside_the_claims() -> None:
    ext = claims_extension(CLAIMS_WITH_EVIDENCE, EVIDENCE)
    obj = json.loads(ext.value[4:])  # 0x0c 0x82 LL LL
    assert set(obj) == {"claims", "evidence"}
    assert obj["evidence"] == [EVIDENCE_MEDIA_TYPE, b64url(EVIDENCE), 4]
    assert obj["claims"][0] == CLAIMS_MEDIA_TYPE and obj["claims"][2] == 8
    got = decode_claims_extension(ext.value)
    assert got.claims == CLAIMS_WITH_EVIDENCE and got.evidence == EVIDENCE


def test_ind_is_optional_on_decode() -> None:
    value = record_value([CLAIMS_MEDIA_TYPE, b64url(CLAIMS_BYTES)])
    assert decode_claims_extension(value).claims == CLAIMS


GOOD_RECORD = [CLAIMS_MEDIA_TYPE, b64url(CLAIMS_BYTES), 8]
GOOD = record_value(GOOD_RECORD)
_json = GOOD[4:]

MALFORMED: list[tuple[bytes, str]] = [
    (b"", "too short"),
    (b"\x0c", "too short"),
    (b"\x04\x03abc", "CBOR CHOICE"),
    (b"\x13\x01a", "expected UTF8String"),
    (b"\x0c\x80" + _json + b"\x00\x00", "indefinite length"),
    (b"\x0c\x81\x05hello", "not minimally encoded"),
    (b"\x0c\x83\x00\x01\x00" + b"a" * 256, "not minimally encoded"),
    (b"\x0c\x85\x01\x02\x03\x04\x05", "5-byte length field"),
    (b"\x0c\x82\x01", "truncated inside its length"),
    (GOOD[:-1], "truncated: declares"),
    (GOOD[:40], "truncated: declares"),
    (GOOD + b"\x00", "1 bytes after the UTF8String"),
    (der_utf8(b"\xff\xfe"), "not valid UTF-8"),
    (der_utf8("[1,"), "not valid JSON"),
    (der_utf8("[NaN, 1]"), "not valid JSON"),
    (der_utf8("[" * 5000 + "]" * 5000), "not valid JSON|not a JSON record"),
    (der_utf8('"x"'), "is a str, expected a record or a collection"),
    (record_value([CLAIMS_MEDIA_TYPE]), "not a JSON record"),
    (record_value([CLAIMS_MEDIA_TYPE, "e30", 8, 1]), "not a JSON record"),
    (record_value([17, "e30"]), "type is not a media type"),
    (record_value(["text", "e30"]), "type is not a media type"),
    (record_value([CLAIMS_MEDIA_TYPE, 5]), "value is not a base64url string"),
    (record_value([CLAIMS_MEDIA_TYPE, ""]), "not base64url"),
    (record_value([CLAIMS_MEDIA_TYPE, b64url(CLAIMS_BYTES) + "=="]), "not base64url"),
    (record_value([CLAIMS_MEDIA_TYPE, base64.b64encode(b"\xfb\xff").decode()]),
     "not base64url"),  # standard alphabet's + and /
    (record_value([CLAIMS_MEDIA_TYPE, "e31"]), "not canonical base64url"),
    (record_value([CLAIMS_MEDIA_TYPE, "e"]), "not base64url"),
    (record_value([CLAIMS_MEDIA_TYPE, "e30", 0]), "ind is not an integer in 1..2"),
    (record_value([CLAIMS_MEDIA_TYPE, "e30", True]), "ind is not an integer"),
    (record_value([CLAIMS_MEDIA_TYPE, "e30", 2**32]), "ind is not an integer"),
    (record_value(["application/eat+jwt", b64url(CLAIMS_BYTES), 8]),
     "has type 'application/eat\\+jwt', expected application/vnd.meshshield.claims\\+json"),
    (record_value([CLAIMS_MEDIA_TYPE, b64url(CLAIMS_BYTES), 4]), "has ind 4, expected 8"),
    (record_value([CLAIMS_MEDIA_TYPE, b64url(b"{}"), 8]), "missing keys"),
    (record_value([CLAIMS_MEDIA_TYPE, b64url(b"\xff"), 8]), "not valid UTF-8"),
    (record_value({}), "collection has no entries"),
    (record_value({"__cmwc_t": "tag:x"}), "collection has no entries"),
    (record_value({"__cmwc_t": 5, "claims": GOOD_RECORD}), "__cmwc_t is not a URI"),
    (record_value({"evidence": [EVIDENCE_MEDIA_TYPE, b64url(EVIDENCE), 4]}),
     "no claims entry"),
    (record_value({"claims": GOOD_RECORD, "more": GOOD_RECORD}), "unexpected entries 'more'"),
    (record_value({"claims": {"inner": GOOD_RECORD}}), "nested collection"),
    (record_value({"claims": GOOD_RECORD,
                   "evidence": [CLAIMS_MEDIA_TYPE, b64url(EVIDENCE), 4]}),
     "evidence has type"),
    (der_utf8('{"claims":' + json.dumps(GOOD_RECORD) + ',"claims":'
              + json.dumps(GOOD_RECORD) + "}"), "duplicate key 'claims'"),
    (b"\x0c\x83\x01\x80\x00" + b" " * (MAX_EXTENSION_BYTES - 5 + 1), "at most 98304"),
]


@pytest.mark.parametrize(("value", "message"), MALFORMED)
def test_malformed_values_refused_with_reason(value: bytes, message: str) -> None:
    with pytest.raises(MeshError, match=message) as info:
        decode_claims_extension(value)
    assert info.value.reason is Reason.PEER_NOT_ALLOWED
    assert "claims extension (CMW, 1.3.6.1.5.5.7.1.35)" in info.value.message


def test_tampered_evidence_refused() -> None:
    # evidence swapped for other bytes: its hash no longer matches the signed claims
    value = encode_extension_value({
        "claims": CmwRecord(CLAIMS_MEDIA_TYPE, encode_claims(CLAIMS_WITH_EVIDENCE), 8),
        "evidence": CmwRecord(EVIDENCE_MEDIA_TYPE, EVIDENCE.replace(b"AAAA", b"AAAB"), 4),
    })
    with pytest.raises(MeshError, match="embedded evidence has SHA-256"):
        decode_claims_extension(value)


def _cert(*extensions: x509.ExtensionType) -> x509.Certificate:
    key = generate_p256()
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    b = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + timedelta(hours=1))
    )
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    return b.sign(key, hashes.SHA256())


def test_certificate_with_evidence() -> None:
    cert = _cert(claims_extension(CLAIMS_WITH_EVIDENCE, EVIDENCE))
    att = attestation_from_certificate(cert)
    assert att.claims == CLAIMS_WITH_EVIDENCE and att.evidence == EVIDENCE


def test_old_format_certificate_refused_with_clear_reason() -> None:
    cert = _cert(x509.UnrecognizedExtension(LEGACY_CLAIMS_OID, CLAIMS_BYTES))
    with pytest.raises(MeshError, match="retired claims extension 2.25.6451") as info:
        claims_from_certificate(cert)
    assert info.value.reason is Reason.PEER_NOT_ALLOWED
    assert "renew" in info.value.message


# -- properties ------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_mesh_error(value: bytes) -> None:
    for candidate in (value, der_utf8(value)):
        try:
            decode_claims_extension(candidate)
        except MeshError as e:
            assert e.reason is Reason.PEER_NOT_ALLOWED


json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_cmw_like = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["claims", "evidence", "__cmwc_t", "x"]), inner,
                      max_size=3),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(json_cmw_like)
def test_arbitrary_json_documents_only_raise_mesh_error(obj: object) -> None:
    try:
        decode_claims_extension(record_value(obj))
    except MeshError as e:
        assert e.reason is Reason.PEER_NOT_ALLOWED


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=2048), st.booleans())
def test_round_trip(evidence: bytes, embed: bool) -> None:
    claims = valid_claims(evidence_sha256=hashlib.sha256(evidence).hexdigest())
    ext = claims_extension(claims, evidence if embed else None)
    got = decode_claims_extension(ext.value)
    assert got.claims == claims
    assert got.evidence == (evidence if embed else None)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_values_never_escape_as_other_errors(data: st.DataObject) -> None:
    value = bytearray(claims_extension(CLAIMS_WITH_EVIDENCE, EVIDENCE).value)
    op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    i = data.draw(st.integers(0, len(value) - 1))
    if op == "flip":
        value[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del value[i:]
    else:
        value.insert(i, data.draw(st.integers(0, 255)))
    try:
        got = decode_claims_extension(bytes(value))
    except MeshError as e:
        assert e.reason is Reason.PEER_NOT_ALLOWED
    else:  # a change the grammar cannot see (a hex digit of the claims): still checked
        assert set(got.claims) == set(CLAIMS_WITH_EVIDENCE)


def test_sidecar_peer_check_refuses_an_old_format_peer() -> None:
    from meshshield.pki.ca import CaRecord, _build, generate_ca
    from meshshield.policy import PeerRef, Tolerance
    from meshshield.sidecar.peercheck import TrustView, check_peer

    now = datetime.now(UTC)
    ca_cert, ca_key = generate_ca("mesh.test", now)
    claims = valid_claims(platform="sim", simulated=True, service="web")
    old = _build(  # what a CAS issued before the CMW extension
        CaRecord(ca_cert, ca_key, "active"), generate_p256().public_key(),
        common_name="web", sans=[x509.UniformResourceIdentifier("spiffe://mesh.test/shop/web")],
        ekus=[x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=now - timedelta(minutes=1), not_after=now + timedelta(hours=1),
        extra=[x509.UnrecognizedExtension(LEGACY_CLAIMS_OID, encode_claims(claims))],
    )
    view = TrustView(
        trust_domain="mesh.test", session="shop", epoch=1, exists=True,
        allow_from={"api": (PeerRef.from_text("web"),)},
        tolerate=frozenset({Tolerance.SIMULATION}), ignore_advisories=(),
        revoked_serials=frozenset(), revoked_measurements=frozenset(),
    )
    with pytest.raises(MeshError, match="retired claims extension") as info:
        check_peer(old, view, local_service="api", direction="inbound", expected=None)
    assert info.value.reason is Reason.PEER_NOT_ALLOWED
