"""The SPIFFE bundle document: its structure, and reading it back strictly."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshield.pki import generate_ca
from meshshield.pki.spiffe_bundle import (
    DEFAULT_REFRESH_HINT_SECONDS,
    SpiffeBundleError,
    spiffe_bundle_document,
    x509_authorities,
)

NOW = datetime.now(UTC)
CA1, _ = generate_ca("mesh.example", NOW)
CA2, _ = generate_ca("mesh.example", NOW)


def unb64url(text: str) -> bytes:
    assert "=" not in text and "+" not in text and "/" not in text
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_document_structure() -> None:
    doc = spiffe_bundle_document([CA1, CA2], sequence=7)
    assert set(doc) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == DEFAULT_REFRESH_HINT_SECONDS == 300
    assert len(doc["keys"]) == 2
    for jwk, ca in zip(doc["keys"], [CA1, CA2], strict=True):
        assert set(jwk) == {"use", "kty", "crv", "x", "y", "x5c"}  # no kid (X509-SVID §6)
        assert (jwk["use"], jwk["kty"], jwk["crv"]) == ("x509-svid", "EC", "P-256")
        assert len(jwk["x5c"]) == 1
        der = base64.b64decode(jwk["x5c"][0], validate=True)  # base64, not base64url
        assert der == ca.public_bytes(serialization.Encoding.DER)
        key = x509.load_der_x509_certificate(der).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        x, y = unb64url(jwk["x"]), unb64url(jwk["y"])
        assert len(x) == len(y) == 32  # full-width coordinates (RFC 7518 §6.2.1.2)
        n = key.public_numbers()
        assert (int.from_bytes(x, "big"), int.from_bytes(y, "big")) == (n.x, n.y)
    json.dumps(doc)  # plain JSON
    assert x509_authorities(doc) == [CA1, CA2]


def test_empty_bundle_is_valid_and_empty() -> None:
    assert x509_authorities(spiffe_bundle_document([], sequence=0)) == []


def test_builder_refuses_non_p256_and_bad_numbers() -> None:
    with pytest.raises(ValueError, match="sequence"):
        spiffe_bundle_document([CA1], sequence=-1)
    with pytest.raises(ValueError, match="refresh hint"):
        spiffe_bundle_document([CA1], sequence=1, refresh_hint_seconds=0)


def _doc() -> dict[str, Any]:
    return spiffe_bundle_document([CA1], sequence=1)


def test_foreign_keys_are_ignored() -> None:
    doc = _doc()
    doc["keys"].append({"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256"})
    doc["keys"].append({"kty": "EC"})  # no use: ignored
    doc["keys"].append({"use": "x509-svid", "kty": "OKP", "x5c": []})  # empty x5c: ignored
    doc["keys"].append({"use": "x509-svid", "kty": "EC"})  # no x5c: ignored
    assert x509_authorities(doc) == [CA1]


def _mutate(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(_doc())
    doc["keys"][0][path] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "JSON object"),
        ({}, '"keys" array'),
        ({"keys": {}}, '"keys" array'),
        ({"keys": [], "spiffe_sequence": "1"}, "spiffe_sequence"),
        ({"keys": [], "spiffe_refresh_hint": -5}, "spiffe_refresh_hint"),
        ({"keys": [5]}, "keys\\[0\\] is not a JSON object"),
        (_mutate("kid", "abc"), "MUST NOT carry a kid"),
        (_mutate("x5c", ["not base64!"]), "not a base64 DER certificate"),
        (_mutate("x5c", [base64.b64encode(b"\x30\x03\x02\x01\x01").decode()]),
         "not a base64 DER certificate"),
        (_mutate("x", spiffe_bundle_document([CA2], sequence=1)["keys"][0]["x"]),
         "keys\\[0\\].x does not match"),
        (_mutate("y", None), "keys\\[0\\].y does not match"),
        (_mutate("crv", "P-384"), "crv is 'P-384'"),
    ],
)
def test_invalid_documents_refused(doc: Any, message: str) -> None:
    with pytest.raises(SpiffeBundleError, match=message):
        x509_authorities(doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["keys", "use", "kty", "x5c", "x", "y", "crv", "kid",
                                       "spiffe_sequence"]), inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_documents_only_raise_bundle_errors(doc: object) -> None:
    try:
        x509_authorities(doc)
    except SpiffeBundleError:
        pass
