"""The secrets envelope (pki/envelope.py) and the released-secrets parser
(sidecar/secrets.py): malformed, truncated, oversized and tampered input, and properties."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshshield.errors import MeshError, Reason
from meshshield.pki import envelope
from meshshield.pki.envelope import EnvelopeError, open_envelope, seal
from meshshield.sidecar.secrets import open_released, parse_released

KEY = ec.generate_private_key(ec.SECP256R1())
CTX = envelope.context_for("spiffe://d/shop/db", "0a1b")
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def test_round_trip_and_layout() -> None:
    blob = seal(KEY.public_key(), b"hello", CTX)
    assert blob[:6] == b"MSENV\x01" and len(blob) == envelope.OVERHEAD + 5
    assert b"hello" not in blob
    assert open_envelope(KEY, blob, CTX) == b"hello"
    assert seal(KEY.public_key(), b"hello", CTX) != blob  # a fresh ephemeral key each time


@pytest.mark.parametrize(("blob", "message"), [
    (b"", "shorter than the"),
    (b"MSENV\x01" + b"\x04" * 50, "truncated"),
    (b"XXENV\x01" + b"\x00" * 200, "magic"),
    (b"MSENV\x02" + b"\x00" * 200, "format version 2"),
    (b"MSENV\x01" + b"\x04" + b"\x00" * 64 + b"\x00" * 40, "not a P-256 point"),
    (b"MSENV\x01" + b"\x00" * (envelope.MAX_ENVELOPE), "at most"),
])
def test_malformed_truncated_and_oversized_envelopes_are_refused(blob: bytes, message: str
                                                                  ) -> None:
    with pytest.raises(EnvelopeError) as e:
        open_envelope(KEY, blob, CTX)
    assert message in e.value.message
    assert e.value.reason is Reason.SECRETS_ENVELOPE_INVALID


def test_every_byte_is_authenticated() -> None:
    blob = seal(KEY.public_key(), b"value", CTX)
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(EnvelopeError):
            open_envelope(KEY, bytes(tampered), CTX)
    with pytest.raises(EnvelopeError):
        open_envelope(KEY, blob[:-1], CTX)
    with pytest.raises(EnvelopeError):
        open_envelope(KEY, blob, envelope.context_for("spiffe://d/shop/db", "0a1c"))
    with pytest.raises(EnvelopeError):
        open_envelope(ec.generate_private_key(ec.SECP256R1()), blob, CTX)


def test_sealing_refuses_oversized_plaintext_and_other_curves() -> None:
    with pytest.raises(ValueError, match="at most"):
        seal(KEY.public_key(), b"x" * (envelope.MAX_PLAINTEXT + 1), CTX)
    with pytest.raises(ValueError, match="P-256"):
        seal(ec.generate_private_key(ec.SECP384R1()).public_key(), b"x", CTX)


@SETTINGS
@given(st.binary(max_size=4096), st.binary(max_size=64))
def test_any_plaintext_and_context_round_trip(plaintext: bytes, context: bytes) -> None:
    assert open_envelope(KEY, seal(KEY.public_key(), plaintext, context), context) == plaintext


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_refused_with_an_envelope_error(blob: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_envelope(KEY, blob, CTX)


@SETTINGS
@given(st.integers(0, 200), st.integers(1, 255))
def test_any_single_byte_change_is_refused(position: int, flip: int) -> None:
    blob = bytearray(seal(KEY.public_key(), b"p" * 64, CTX))
    blob[position % len(blob)] ^= flip
    with pytest.raises(EnvelopeError):
        open_envelope(KEY, bytes(blob), CTX)


# -- the released secrets inside -----------------------------------------------------

GOOD = {"name": "db-password", "kind": "ascii", "version": 1,
        "value": base64.b64encode(b"pw").decode(), "env": "PGPASSWORD",
        "file": "/run/secrets/db-password"}


def doc(*items: object) -> bytes:
    return json.dumps({"secrets": list(items)}).encode()


def test_a_good_release_parses() -> None:
    (s,) = parse_released(doc(GOOD))
    assert (s.name, s.kind, s.version, s.value, s.env, s.file_name) == (
        "db-password", "ascii", 1, b"pw", "PGPASSWORD", "db-password")


@pytest.mark.parametrize(("data", "message"), [
    (b"not json", "not JSON"),
    (b"[" * 100000, "not JSON"),
    (json.dumps({"other": []}).encode(), 'must hold {"secrets"'),
    (doc(*([GOOD] * 65)), "at most 64"),
    (doc({**GOOD, "extra": 1}), "must be an object"),
    (doc({k: v for k, v in GOOD.items() if k != "value"}), "must be an object"),
    (doc({**GOOD, "kind": "password"}), "kind must be one of"),
    (doc({**GOOD, "version": 0}), "version must be a positive integer"),
    (doc({**GOOD, "version": True}), "version must be a positive integer"),
    (doc({**GOOD, "value": "***"}), "not valid base64"),
    (doc({**GOOD, "env": "1X"}), "env is not an environment variable name"),
    (doc({**GOOD, "file": "/etc/passwd"}), "must be a file directly in /run/secrets"),
    (doc({**GOOD, "file": "/run/secrets/../x"}), "must be a file directly in /run/secrets"),
    (doc({k: v for k, v in GOOD.items() if k not in ("env", "file")}), "neither env nor file"),
    (doc(GOOD, {**GOOD, "file": "/run/secrets/other"}), "repeats a name"),
    (doc(GOOD, {**GOOD, "name": "b", "env": None}), "repeats a file"),
])
def test_malformed_releases_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(MeshError) as e:
        parse_released(data)
    assert message in e.value.message


CA_KEY = ec.generate_private_key(ec.SECP256R1())
M = envelope.MEDIA_TYPE


def signed_field(plaintext: bytes, signer: ec.EllipticCurvePrivateKey = CA_KEY
                 ) -> dict[str, str]:
    blob = seal(KEY.public_key(), plaintext, CTX)
    sig = signer.sign(envelope.signed_message(blob, CTX), ec.ECDSA(hashes.SHA256()))
    return {"media_type": M, "envelope": base64.b64encode(blob).decode(),
            "signature": base64.b64encode(sig).decode()}


@pytest.mark.parametrize(("field", "message"), [
    ("text", 'must be {"media_type", "envelope", "signature"}'),
    ({"media_type": M, "envelope": ""}, 'must be {"media_type", "envelope", "signature"}'),
    ({"media_type": "text/plain", "envelope": "", "signature": ""}, "secrets media type"),
    ({"media_type": M, "envelope": 5, "signature": ""}, "base64 text of at most"),
    ({"media_type": M, "envelope": "A" * (4 * 1024 * 1024), "signature": ""},
     "base64 text of at most"),
    ({"media_type": M, "envelope": "AAAA", "signature": 7}, "signature must be base64"),
    ({"media_type": M, "envelope": "AAAA", "signature": "A" * 300},
     "signature must be base64"),
    ({"media_type": M, "envelope": "!!", "signature": ""}, "not valid base64"),
    ({"media_type": M, "envelope": "AAAA", "signature": "AAAA"}, "not signed by the CA"),
])
def test_malformed_response_fields_are_refused(field: object, message: str) -> None:
    with pytest.raises(MeshError) as e:
        open_released(KEY, field, "spiffe://d/shop/db", "0a1b", CA_KEY.public_key())
    assert message in e.value.message


def test_a_signed_envelope_opens_and_one_signed_by_another_key_does_not() -> None:
    good = signed_field(doc(GOOD))
    (s,) = open_released(KEY, good, "spiffe://d/shop/db", "0a1b", CA_KEY.public_key())
    assert s.value == b"pw"
    forged = signed_field(doc(GOOD), ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(MeshError, match="not signed by the CA"):
        open_released(KEY, forged, "spiffe://d/shop/db", "0a1b", CA_KEY.public_key())
    with pytest.raises(MeshError, match="not signed by the CA"):  # another certificate
        open_released(KEY, good, "spiffe://d/shop/db", "0a1c", CA_KEY.public_key())


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4)
                    | st.dictionaries(st.sampled_from(list(GOOD) + ["secrets", "x"]), c,
                                      max_size=6), max_leaves=30))
def test_arbitrary_json_is_parsed_or_refused_with_a_reason(value: object) -> None:
    try:
        parse_released(json.dumps({"secrets": value}).encode())
    except MeshError as e:
        assert e.reason is Reason.SECRETS_ENVELOPE_INVALID
