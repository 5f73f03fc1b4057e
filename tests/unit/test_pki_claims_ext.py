"""The claims extension: exact encoding, strict decoding, and fuzzed input."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from pki_helpers import valid_claims

from meshshield.attestation.claims import Claims, Platform, TcbStatus
from meshshield.errors import MeshError, Reason
from meshshield.pki import (
    CLAIM_KEYS,
    CLAIMS_OID,
    certificate_claims,
    claims_extension,
    claims_from_certificate,
    decode_claims,
    encode_claims,
    generate_p256,
)


def test_claim_keys_are_the_spec_list() -> None:
    assert sorted(CLAIM_KEYS) == sorted(
        "platform measurement signer product_id svn debug tcb_status session service "
        "policy_hash evidence_sha256 attested_at simulated".split()
    )
    # id-pe-cmw (draft-ietf-rats-msg-wrap §4.4); every arc fits the 31 bits Go allows
    assert CLAIMS_OID.dotted_string == "1.3.6.1.5.5.7.1.35"
    assert all(int(arc) < 2**31 for arc in CLAIMS_OID.dotted_string.split("."))


def test_encoding_is_canonical_json() -> None:
    c = valid_claims()
    value = encode_claims(c)
    assert value == json.dumps(c, sort_keys=True, separators=(",", ":")).encode()
    assert value.startswith(b'{"attested_at":"2024-05-01T12:00:00Z","debug":false,')
    assert decode_claims(value) == c


def test_certificate_claims_from_verified_claims() -> None:
    verified = Claims(
        platform=Platform.SGX, measurement="11" * 32, report_data=b"\0" * 64, debug=False,
        tcb_status=TcbStatus.SW_HARDENING_NEEDED, signer="22" * 32, product_id=3, svn=7,
    )
    c = certificate_claims(
        verified, session="shop", service="db", policy_hash="33" * 32,
        evidence_sha256="44" * 32, attested_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    assert c == valid_claims(
        platform="sgx", measurement="11" * 32, signer="22" * 32, product_id=3, svn=7,
        tcb_status="sw_hardening_needed", service="db", policy_hash="33" * 32,
        evidence_sha256="44" * 32, attested_at="2024-01-02T03:04:05Z",
    )
    assert decode_claims(encode_claims(c)) == c


BAD: list[tuple[dict[str, Any], str]] = [
    ({"platform": "aws"}, "platform: expected one of"),
    ({"platform": ["sim"]}, "platform: expected"),
    ({"measurement": "AB" * 32}, "measurement: expected lowercase hex"),
    ({"measurement": "abc"}, "measurement"),
    ({"measurement": ""}, "measurement"),
    ({"signer": 5}, "signer: expected lowercase hex or null"),
    ({"product_id": True}, "product_id: expected a non-negative integer"),
    ({"product_id": -1}, "product_id"),
    ({"svn": "3"}, "svn"),
    ({"svn": 1.5}, "svn"),
    ({"debug": 0}, "debug: expected true or false"),
    ({"debug": None}, "debug"),
    ({"simulated": "false"}, "simulated"),
    ({"tcb_status": "fine"}, "tcb_status"),
    ({"session": "Shop"}, "session"),
    ({"service": "a" * 64}, "service"),
    ({"policy_hash": "cd" * 31}, "policy_hash: expected 64 lowercase hex"),
    ({"evidence_sha256": {"x": 1}}, "evidence_sha256"),
    ({"attested_at": "2024-05-01T12:00:00+00:00"}, "attested_at: expected an RFC 3339"),
    ({"attested_at": "2024-05-01 12:00:00Z"}, "attested_at"),
    ({"attested_at": "2024-13-01T12:00:00Z"}, "attested_at"),
    ({"attested_at": 1714564800}, "attested_at"),
    ({"platform": "sim", "measurement": "ab" * 32, "simulated": False},
     "platform is sim, so simulated must be true"),
    ({"extra": 1}, "unexpected keys: extra"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_wrong_types_refused_both_ways(overrides: dict[str, Any], message: str) -> None:
    c = valid_claims(**overrides)
    with pytest.raises(ValueError, match=message):
        encode_claims(c)
    raw = json.dumps(c, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(MeshError, match=message) as info:
        decode_claims(raw)
    assert info.value.reason is Reason.PEER_NOT_ALLOWED


def test_missing_keys_named() -> None:
    c = valid_claims()
    del c["policy_hash"], c["svn"]
    with pytest.raises(ValueError, match="missing keys: policy_hash, svn"):
        encode_claims(c)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1,2]", "JSON list, expected an object"),
        (b'"x"', "JSON str"),
        (b"{}", "missing keys"),
        (b'{"svn":NaN}', "not valid JSON"),
        (b"[" * 10_000, "not valid JSON"),
        (b" " * 20_000, "at most 16384"),
    ],
)
def test_decode_refuses(value: bytes, message: str) -> None:
    with pytest.raises(MeshError, match=message) as info:
        decode_claims(value)
    assert info.value.reason is Reason.PEER_NOT_ALLOWED


def test_duplicate_keys_refused() -> None:
    raw = encode_claims(valid_claims())
    # A second "debug" after the first: a naive parser keeps the last one.
    smuggled = raw[:-1] + b',"debug":true}'
    with pytest.raises(MeshError, match="duplicate key 'debug'"):
        decode_claims(smuggled)


def _self_signed(*extensions: x509.ExtensionType) -> x509.Certificate:
    key = generate_p256()
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    return b.sign(key, hashes.SHA256())


def test_claims_from_certificate() -> None:
    c = valid_claims()
    cert = _self_signed(claims_extension(c))
    assert claims_from_certificate(cert) == c


def test_claims_from_certificate_without_extension() -> None:
    with pytest.raises(MeshError, match="missing") as info:
        claims_from_certificate(_self_signed())
    assert info.value.reason is Reason.PEER_NOT_ALLOWED


def test_claims_from_certificate_with_garbage_extension() -> None:
    cert = _self_signed(x509.UnrecognizedExtension(CLAIMS_OID, b"\x04\x02{}"))
    with pytest.raises(MeshError, match="CBOR CHOICE"):
        claims_from_certificate(cert)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_mesh_error(value: bytes) -> None:
    try:
        decode_claims(value)
    except MeshError as e:
        assert e.reason is Reason.PEER_NOT_ALLOWED


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(CLAIM_KEYS)), json_values))
def test_arbitrary_json_objects_only_raise_mesh_error(partial: dict[str, Any]) -> None:
    c = valid_claims(**partial)
    raw = json.dumps(c).encode()
    try:
        assert decode_claims(raw) == c
    except MeshError as e:
        assert e.reason is Reason.PEER_NOT_ALLOWED
