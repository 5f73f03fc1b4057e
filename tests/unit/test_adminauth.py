"""Signed admin requests: who signed, and every way a request can be wrong."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshield.adminauth import (
    MAX_SKEW,
    load_admin_key,
    sign_request,
    verify_signature,
    write_admin_key,
)
from meshshield.errors import MeshError, Reason
from meshshield.pki.keys import spki_fingerprint

NOW = 1_800_000_000.0


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _verify(header: str | None, method: str = "POST", path: str = "/v1/sessions",
            body: bytes = b"x", now: float = NOW) -> str:
    return verify_signature(header, method, path, body, now).fingerprint


def test_round_trip_names_the_signer(key: ec.EllipticCurvePrivateKey) -> None:
    h = sign_request(key, "POST", "/v1/sessions", b"x", now=NOW)
    assert _verify(h) == spki_fingerprint(key.public_key())


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("PUT", "/v1/sessions", b"x"), ("POST", "/v1/sessions/other", b"x"),
     ("POST", "/v1/sessions", b"y"), ("POST", "/v1/sessions?x=1", b"x")],
)
def test_signature_binds_method_path_and_body(
    key: ec.EllipticCurvePrivateKey, method: str, path: str, body: bytes
) -> None:
    h = sign_request(key, "POST", "/v1/sessions", b"x", now=NOW)
    with pytest.raises(MeshError) as e:
        _verify(h, method, path, body)
    assert e.value.reason is Reason.UNAUTHENTICATED
    assert "does not verify" in e.value.message


def test_signed_request_names_its_nonce_and_window(key: ec.EllipticCurvePrivateKey) -> None:
    """The replay guard itself is the CAS store's (tests/unit/test_request_nonces.py);
    the signature check hands it the nonce and when the request stops being valid."""
    h = sign_request(key, "GET", "/v1/edges", b"", now=NOW)
    a = verify_signature(h, "GET", "/v1/edges", b"", NOW)
    b = verify_signature(h, "GET", "/v1/edges", b"", NOW + 1)
    assert a == b and a.expires_at == int(NOW) + MAX_SKEW
    assert len(base64.b64decode(a.nonce)) == 16


@pytest.mark.parametrize("nonce", ["", "AAAA", "!!!!", "A" * 64])
def test_nonce_must_be_16_to_32_bytes(key: ec.EllipticCurvePrivateKey, nonce: str) -> None:
    good = sign_request(key, "GET", "/v1/edges", b"", now=NOW)
    fields = dict(p.strip().split("=", 1) for p in good.split(" ", 1)[1].split(","))
    h = (f"MeshShield-Sig key={fields['key']}, ts={fields['ts']}, nonce={nonce}, "
         f"sig={fields['sig']}")
    with pytest.raises(MeshError, match="nonce must be base64 of 16 to 32"):
        verify_signature(h, "GET", "/v1/edges", b"", NOW)


@pytest.mark.parametrize("skew", [MAX_SKEW + 5, -(MAX_SKEW + 5)])
def test_old_or_future_timestamps_are_refused(key: ec.EllipticCurvePrivateKey, skew: float) -> None:
    h = sign_request(key, "POST", "/v1/sessions", b"x", now=NOW + skew)
    with pytest.raises(MeshError, match="clock"):
        _verify(h)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [(None, "found none"), ("", "found none"), ("Bearer abc", "scheme"),
     ("MeshShield-Sig key=a", "fields"), ("MeshShield-Sig key=a, key=b", "malformed"),
     ("MeshShield-Sig key=!!, ts=1, nonce=a, sig=!!", "base64"),
     ("MeshShield-Sig key=AAAA, ts=x, nonce=a, sig=AAAA", "integer"),
     ("MeshShield-Sig " + "a" * 5000, "bytes")],
)
def test_malformed_headers(header: str | None, fragment: str) -> None:
    with pytest.raises(MeshError) as e:
        _verify(header)
    assert e.value.reason is Reason.UNAUTHENTICATED
    assert fragment in e.value.message


def test_non_p256_key_is_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    from cryptography.hazmat.primitives import serialization

    spki = p384.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    h = (f"MeshShield-Sig key={base64.b64encode(spki).decode()}, ts={int(NOW)}, nonce=abc, "
         "sig=AAAA")
    with pytest.raises(MeshError, match="P-256"):
        _verify(h)


def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    key, fp = write_admin_key(tmp_path / "a")
    assert (tmp_path / "a" / "admin.key").stat().st_mode & 0o777 == 0o600
    assert spki_fingerprint(load_admin_key(tmp_path / "a").public_key()) == fp
    with pytest.raises(FileExistsError):
        write_admin_key(tmp_path / "a")
    (tmp_path / "junk").write_text("nope")
    with pytest.raises(ValueError, match="not an unencrypted PEM"):
        load_admin_key(tmp_path / "junk")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_header_text_is_a_clean_refusal(header: str) -> None:
    with pytest.raises(MeshError) as e:
        _verify("MeshShield-Sig " + header)
    assert e.value.reason is Reason.UNAUTHENTICATED
