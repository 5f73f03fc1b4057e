"""pki/jwt.py: ES256 JWT-SVIDs signed, parsed strictly and validated."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshield.errors import Reason
from meshshield.pki.jwt import (
    MAX_TOKEN_BYTES,
    JwtError,
    b64url,
    b64url_decode,
    check_audience,
    jwk_thumbprint,
    jwt_authorities,
    jwt_svid_claims,
    jwt_svid_jwk,
    parse_jwt,
    sign_jwt,
    validate_jwt_svid,
)
from meshshield.pki.keys import generate_p256

TD = "meshshield.local"
SUB = f"spiffe://{TD}/shop/frontend"
NOW = 1_800_000_000
KEY = generate_p256()
KEYS = {jwk_thumbprint(KEY.public_key()): KEY.public_key()}


def token(**over: object) -> str:
    claims = jwt_svid_claims(SUB, ["backend"], NOW, NOW + 300,
                             {"measurement": "ab" * 32, "simulated": True, "sub": "evil"})
    claims.update(over)
    return sign_jwt(KEY, claims)


def _part(obj: object) -> str:
    return b64url(json.dumps(obj).encode())


DUP_HEADER = b64url(b'{"alg":"ES256","kid":"k","kid":"j"}')
NAN = b64url(b'{"exp":NaN}')
NOT_UTF8 = b64url(b"\xff")


def test_a_signed_token_validates_with_its_claims() -> None:
    svid = validate_jwt_svid(token(), KEYS, "backend", NOW + 1, TD)
    assert svid.spiffe_id == SUB and svid.audience == ("backend",)
    assert svid.claims["measurement"] == "ab" * 32 and svid.claims["simulated"] is True
    assert svid.claims["sub"] == SUB  # an attestation claim never overrides a registered one


def test_header_names_the_key_by_its_thumbprint() -> None:
    parsed = parse_jwt(token())
    assert parsed.header == {"alg": "ES256", "kid": jwk_thumbprint(KEY.public_key()),
                             "typ": "JWT"}


@pytest.mark.parametrize(("audience", "now", "td", "reason"), [
    ("other", NOW + 1, TD, Reason.FORBIDDEN),
    ("backend", NOW + 300, TD, Reason.UNAUTHENTICATED),
    ("backend", NOW + 1, "other.example", Reason.PEER_NOT_ALLOWED),
])
def test_audience_expiry_and_trust_domain(audience: str, now: int, td: str,
                                          reason: Reason) -> None:
    with pytest.raises(JwtError) as e:
        validate_jwt_svid(token(), KEYS, audience, now, td)
    assert e.value.reason is reason


def test_an_unknown_key_and_a_tampered_payload_fail_the_signature() -> None:
    other = generate_p256()
    with pytest.raises(JwtError) as e:
        validate_jwt_svid(sign_jwt(other, {"sub": SUB, "aud": ["backend"], "exp": NOW + 9}),
                          KEYS, "backend", NOW, TD)
    assert e.value.reason is Reason.SIGNATURE_INVALID
    h, _, s = token().split(".")
    forged = f"{h}.{_part({'sub': SUB, 'aud': ['backend'], 'exp': NOW + 10**6})}.{s}"
    with pytest.raises(JwtError) as e:
        validate_jwt_svid(forged, KEYS, "backend", NOW, TD)
    assert e.value.reason is Reason.SIGNATURE_INVALID


def test_a_valid_signature_by_a_key_posing_under_a_known_kid_fails() -> None:
    other = generate_p256()
    header = {"alg": "ES256", "kid": next(iter(KEYS))}
    signing_input = f"{_part(header)}.{_part({'sub': SUB, 'aud': 'backend', 'exp': NOW + 9})}"
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    r, s = decode_dss_signature(other.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    sig = b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    with pytest.raises(JwtError) as e:
        validate_jwt_svid(f"{signing_input}.{sig}", KEYS, "backend", NOW, TD)
    assert e.value.reason is Reason.SIGNATURE_INVALID


@pytest.mark.parametrize("header", [
    {"alg": "none", "kid": "k"},
    {"alg": "HS256", "kid": "k"},
    {"alg": "ES384", "kid": "k"},
    {"kid": "k"},
])
def test_only_es256_is_accepted(header: dict[str, str]) -> None:
    t = f"{_part(header)}.{_part({'sub': SUB})}.{b64url(bytes(64))}"
    with pytest.raises(JwtError) as e:
        parse_jwt(t)
    assert e.value.reason is Reason.SIGNATURE_INVALID


@pytest.mark.parametrize("bad", [
    "",
    "a.b",
    "a.b.c.d",
    token()[:-1] + "=",                       # padding
    token().replace(".", "..", 1),            # empty part
    token()[: len(token()) // 2],             # truncated
    "x" * (MAX_TOKEN_BYTES + 1),              # oversized
    f"{_part({'alg': 'ES256'})}.{_part({})}.{b64url(bytes(64))}",              # no kid
    f"{_part({'alg': 'ES256', 'kid': 'k', 'typ': 'xx'})}.{_part({})}.{b64url(bytes(64))}",
    f"{_part({'alg': 'ES256', 'kid': 'k', 'crit': ['b64']})}.{_part({})}.{b64url(bytes(64))}",
    f"{_part({'alg': 'ES256', 'kid': 'k'})}.{_part([])}.{b64url(bytes(64))}",  # not an object
    f"{_part({'alg': 'ES256', 'kid': 'k'})}.{_part({})}.{b64url(bytes(63))}",  # short sig
    f"{DUP_HEADER}.{_part({})}.{b64url(bytes(64))}",                        # duplicate key
    f"{_part({'alg': 'ES256', 'kid': 'k'})}.{NAN}.{b64url(bytes(64))}",
    f"{_part({'alg': 'ES256', 'kid': 'k'})}.{NOT_UTF8}.{b64url(bytes(64))}",
])
def test_malformed_tokens_are_refused(bad: str) -> None:
    with pytest.raises(JwtError) as e:
        validate_jwt_svid(bad, KEYS, "backend", NOW, TD)
    assert e.value.reason in (Reason.BAD_REQUEST, Reason.SIGNATURE_INVALID)


@pytest.mark.parametrize("claims", [
    {"aud": ["backend"], "exp": NOW + 9},                       # no sub
    {"sub": "https://x/y", "aud": ["backend"], "exp": NOW + 9},  # not a SPIFFE ID
    {"sub": f"spiffe://{TD}", "aud": ["backend"], "exp": NOW + 9},  # the trust domain itself
    {"sub": SUB, "exp": NOW + 9},                               # no aud
    {"sub": SUB, "aud": [1], "exp": NOW + 9},
    {"sub": SUB, "aud": ["backend"]},                           # no exp
    {"sub": SUB, "aud": ["backend"], "exp": "soon"},
    {"sub": SUB, "aud": ["backend"], "exp": True},
    {"sub": SUB, "aud": ["backend"], "exp": NOW + 9, "nbf": NOW + 3600},
])
def test_claims_a_jwt_svid_must_have(claims: dict[str, object]) -> None:
    with pytest.raises(JwtError):
        validate_jwt_svid(sign_jwt(KEY, claims), KEYS, "backend", NOW, TD)


def test_base64url_is_canonical() -> None:
    assert b64url_decode("AQ", "x") == b"\x01"
    for bad in ("AR", "A", "AQ==", "A+", "A/"):
        with pytest.raises(JwtError):
            b64url_decode(bad, "x")


def test_audience_requests() -> None:
    assert check_audience(["a", "b", "a"]) == ["a", "b"]
    for bad in ([], [""], ["x" * 513], [str(i) for i in range(33)]):
        with pytest.raises(JwtError):
            check_audience(bad)


def test_jwks_round_trip_and_refusals() -> None:
    jwk = jwt_svid_jwk(KEY.public_key())
    doc = {"keys": [{"use": "x509-svid", "kty": "EC", "x5c": []}, jwk]}
    assert jwt_authorities(doc) == {jwk["kid"]: KEY.public_key()}
    for broken in ({**jwk, "kid": ""}, {**jwk, "crv": "P-384"},
                   {**jwk, "x": jwk["y"]},                      # not on the curve
                   {**jwk, "x": b64url(b"\x01" * 31)}):
        with pytest.raises(ValueError):
            jwt_authorities({"keys": [broken]})
    with pytest.raises(ValueError):
        jwt_authorities({"keys": [jwk, jwk]})


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_refused_or_parsed_never_crashes(text: str) -> None:
    try:
        validate_jwt_svid(text, KEYS, "backend", NOW, TD)
    except JwtError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(token()) - 1), st.sampled_from("AZaz09-_."))
def test_any_one_character_change_is_refused(pos: int, ch: str) -> None:
    t = token()
    changed = t[:pos] + ch + t[pos + 1:]
    if changed == t:
        return
    with pytest.raises(JwtError):
        validate_jwt_svid(changed, KEYS, "backend", NOW, TD)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10),
                       st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000),
                                 st.text(max_size=20)), max_size=8),
       st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4))
def test_signed_claims_round_trip(extra: dict[str, object], auds: list[str]) -> None:
    claims = jwt_svid_claims(SUB, auds, NOW, NOW + 60, extra)
    svid = validate_jwt_svid(sign_jwt(KEY, claims), KEYS, auds[-1], NOW, TD)
    assert svid.claims == claims


def test_signature_is_raw_r_s() -> None:
    sig = base64.urlsafe_b64decode(token().split(".")[2] + "==")
    assert len(sig) == 64
