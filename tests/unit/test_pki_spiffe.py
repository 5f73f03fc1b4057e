"""SPIFFE IDs: building, strict parsing, and finding the one in a certificate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshield.pki import (
    SpiffeId,
    cas_spiffe_id,
    generate_p256,
    parse_spiffe_id,
    spiffe_id,
    spiffe_id_of,
)


def test_builders() -> None:
    assert spiffe_id("mesh.example", "shop", "backend") == "spiffe://mesh.example/shop/backend"
    assert cas_spiffe_id("mesh.example") == "spiffe://mesh.example/cas"


@pytest.mark.parametrize(
    ("td", "session", "service"),
    [("Mesh.example", "shop", "backend"), ("mesh", "a/b", "c"), ("mesh", "shop", ""),
     ("mesh", "..", "x"), ("", "shop", "backend")],
)
def test_builder_refuses_bad_parts(td: str, session: str, service: str) -> None:
    with pytest.raises(ValueError):
        spiffe_id(td, session, service)


@pytest.mark.parametrize(
    ("uri", "td", "segments"),
    [
        ("spiffe://mesh.example/shop/backend", "mesh.example", ("shop", "backend")),
        ("spiffe://mesh.example", "mesh.example", ()),
        ("spiffe://a/b", "a", ("b",)),
        ("spiffe://x-1.y2/A_b.c-D", "x-1.y2", ("A_b.c-D",)),
        ("spiffe://mesh/..a/b..", "mesh", ("..a", "b..")),
    ],
)
def test_parse_accepts(uri: str, td: str, segments: tuple[str, ...]) -> None:
    parsed = parse_spiffe_id(uri)
    assert parsed == SpiffeId(td, segments)
    assert str(parsed) == uri


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "must start with"),
        ("https://mesh.example/a", "must start with"),
        ("SPIFFE://mesh.example/a", "must start with"),
        ("spiffe:/mesh.example/a", "must start with"),
        ("spiffe://", "no trust domain"),
        ("spiffe:///a/b", "no trust domain"),
        ("spiffe://Mesh.Example/a", "lowercase"),
        ("spiffe://mesh.example:443/a", "port"),
        ("spiffe://user@mesh.example/a", "user info"),
        ("spiffe://mesh.example/a?x=1", "query"),
        ("spiffe://mesh.example/a#frag", "fragment"),
        ("spiffe://mesh.example/a%2Fb", "percent"),
        ("spiffe://mesh.example/", "empty path segment"),
        ("spiffe://mesh.example/a/", "empty path segment"),
        ("spiffe://mesh.example//a", "empty path segment"),
        ("spiffe://mesh.example/./a", "'.' path segment"),
        ("spiffe://mesh.example/a/..", "'..' path segment"),
        ("spiffe://mesh.example/a b", "invalid path segment"),
        ("spiffe://mesh.example/caf\u00e9", "invalid path segment"),
        ("spiffe://mesh_example/a", "invalid label"),
        ("spiffe://-mesh.example/a", "invalid label"),
        ("spiffe://mesh-.example/a", "invalid label"),
        ("spiffe://mesh..example/a", "invalid label"),
        ("spiffe://mesh.example./a", "invalid label"),
        ("spiffe://" + "a" * 64 + "/x", "invalid label"),
        ("spiffe://m/" + "a" * 2050, "at most 2048"),
    ],
)
def test_parse_refuses(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace(".", r"\.")):
        parse_spiffe_id(uri)


def _cert_with_sans(sans: list[x509.GeneralName] | None) -> x509.Certificate:
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
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256())


URI = x509.UniformResourceIdentifier


def test_spiffe_id_of() -> None:
    one = _cert_with_sans([x509.DNSName("a"), URI("https://x"), URI("spiffe://m/s/b")])
    assert spiffe_id_of(one) == "spiffe://m/s/b"
    assert spiffe_id_of(_cert_with_sans(None)) is None
    assert spiffe_id_of(_cert_with_sans([x509.DNSName("a"), URI("https://x")])) is None


def test_spiffe_id_of_refuses_two_or_malformed() -> None:
    with pytest.raises(ValueError, match="2 SPIFFE URI SANs"):
        spiffe_id_of(_cert_with_sans([URI("spiffe://m/s/a"), URI("spiffe://m/s/b")]))
    # An upper-case scheme is refused, not ignored: otherwise another parser could see it.
    with pytest.raises(ValueError, match="2 SPIFFE URI SANs"):
        spiffe_id_of(_cert_with_sans([URI("spiffe://m/s/a"), URI("SPIFFE://m/s/b")]))
    with pytest.raises(ValueError, match="must start with"):
        spiffe_id_of(_cert_with_sans([URI("Spiffe://m/s/a")]))
    with pytest.raises(ValueError, match="empty path segment"):
        spiffe_id_of(_cert_with_sans([URI("spiffe://m/s//a")]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(alphabet="spife:/.-_aZ0?#@%", max_size=40).map(
    lambda s: "spiffe://" + s)))
def test_parse_either_refuses_or_round_trips(uri: str) -> None:
    try:
        parsed = parse_spiffe_id(uri)
    except ValueError:
        return
    assert str(parsed) == uri
    assert parse_spiffe_id(str(parsed)) == parsed
