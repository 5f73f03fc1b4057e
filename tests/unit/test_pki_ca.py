"""CA generation and issuance, checked by parsing back and by the real openssl CLI."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki_helpers import make_csr, valid_claims

from meshshield.pki import (
    CLAIMS_OID,
    CaRecord,
    cas_spiffe_id,
    cert_pem,
    claims_from_certificate,
    generate_ca,
    generate_p256,
    issue_leaf,
    issue_server_cert,
    load_pem_chain,
    normalize_serial,
    public_key_from_csr,
    serial_hex,
    spiffe_id,
    spiffe_id_of,
    spki_der,
    spki_fingerprint,
)
from meshshield.pki.csr import MAX_CSR_BYTES

TD = "mesh.example"
NOW = datetime.now(UTC).replace(microsecond=0)
OID = "1.3.6.1.5.5.7.1.35"  # id-pe-cmw
openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not found")


@pytest.fixture(scope="module")
def ca() -> CaRecord:
    cert, key = generate_ca(TD, NOW)
    return CaRecord(cert, key, "active")


def ext(cert: x509.Certificate, cls: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(cls)


@pytest.fixture(scope="module")
def leaf(ca: CaRecord) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = generate_p256()
    public_key = public_key_from_csr(make_csr(key))
    cert = issue_leaf(
        ca, public_key, spiffe_id=spiffe_id(TD, "shop", "backend"),
        dns=["backend", "backend.shop.svc.cluster.local", "backend"],
        not_before=NOW - timedelta(minutes=1), not_after=NOW + timedelta(hours=1),
        claims=valid_claims(),
    )
    return cert, key


def test_keys() -> None:
    key = generate_p256()
    assert isinstance(key.curve, ec.SECP256R1)
    fp = spki_fingerprint(key.public_key())
    assert len(fp) == 64 and fp == fp.lower() and int(fp, 16) >= 0
    assert spki_der(key.public_key()).startswith(b"\x30\x59")  # 91-byte P-256 SPKI


def test_ca_certificate(ca: CaRecord) -> None:
    c = ca.cert
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey)
    assert c.subject == c.issuer
    assert c.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "meshshield"
    cn = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"meshshield CA {TD} {spki_fingerprint(c.public_key())[:8]}"
    bc = ext(c, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(c, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert ext(c, x509.SubjectKeyIdentifier)
    assert spiffe_id_of(c) == f"spiffe://{TD}"
    assert c.not_valid_before_utc <= NOW < c.not_valid_after_utc
    assert c.not_valid_after_utc == NOW + timedelta(days=3650)
    assert len(ca.fingerprint) == 64


def test_generate_ca_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="lowercase"):
        generate_ca("Mesh.Example", NOW)
    with pytest.raises(ValueError, match="validity_days"):
        generate_ca(TD, NOW, validity_days=0)


def test_leaf_contents(ca: CaRecord, leaf: tuple[x509.Certificate, Any]) -> None:
    cert, key = leaf
    assert spki_der(cert.public_key()) == spki_der(key.public_key())
    assert cert.issuer == ca.cert.subject
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://mesh.example/shop/backend"
    ]
    assert san.get_values_for_type(x509.DNSName) == [
        "backend", "backend.shop.svc.cluster.local"
    ]
    assert len(list(san)) == 3
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ext(
        ca.cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.SubjectKeyIdentifier)
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=1)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "backend"
    assert 0 < cert.serial_number and cert.serial_number.bit_length() > 64
    claims_ext = cert.extensions.get_extension_for_oid(CLAIMS_OID)
    assert not claims_ext.critical
    assert isinstance(claims_ext.value, x509.UnrecognizedExtension)
    # DER UTF8String (0x0c, two length bytes) holding the JSON record of the claims
    value = claims_ext.value.value
    assert value.startswith(b"\x0c\x82")
    assert value[4:].startswith(b'["application/vnd.meshshield.claims+json","')
    assert claims_from_certificate(cert) == valid_claims()
    assert spiffe_id_of(cert) == "spiffe://mesh.example/shop/backend"


def test_leaf_without_claims(ca: CaRecord) -> None:
    cert = issue_leaf(ca, generate_p256().public_key(), spiffe_id=spiffe_id(TD, "s", "a"),
                      dns=[], not_before=NOW, not_after=NOW + timedelta(minutes=5),
                      claims=None)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(CLAIMS_OID)
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == []


def test_leaf_not_after_clamped_to_ca() -> None:
    cert, key = generate_ca(TD, NOW, validity_days=1)
    leaf = issue_leaf(CaRecord(cert, key, "active"), generate_p256().public_key(),
                      spiffe_id=spiffe_id(TD, "s", "a"), dns=[], not_before=NOW,
                      not_after=NOW + timedelta(days=30), claims=None)
    assert leaf.not_valid_after_utc == cert.not_valid_after_utc


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"claims": valid_claims(service="other")}, "claims name session/service shop/other"),
        ({"claims": valid_claims(debug="no")}, "debug: expected true or false"),
        ({"spiffe_id": "spiffe://mesh.example"}, "has no path"),
        ({"spiffe_id": "spiffe://mesh.example/shop//backend"}, "empty path segment"),
        ({"dns": ["bad name"]}, "invalid DNS SAN"),
        ({"not_after": NOW - timedelta(minutes=2)}, "no validity"),
        ({"not_before": NOW.replace(tzinfo=None)}, "timezone-aware"),
    ],
)
def test_issue_leaf_refuses(ca: CaRecord, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "spiffe_id": spiffe_id(TD, "shop", "backend"), "dns": ["backend"],
        "not_before": NOW - timedelta(minutes=1), "not_after": NOW + timedelta(hours=1),
        "claims": valid_claims(),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        issue_leaf(ca, generate_p256().public_key(), **args)


def test_cannot_sign_without_key(ca: CaRecord) -> None:
    with pytest.raises(ValueError, match="no private key loaded"):
        issue_leaf(CaRecord(ca.cert, None, "active"), generate_p256().public_key(),
                   spiffe_id=spiffe_id(TD, "s", "a"), dns=[], not_before=NOW,
                   not_after=NOW + timedelta(hours=1), claims=None)


def test_server_cert(ca: CaRecord) -> None:
    cert = issue_server_cert(
        ca, generate_p256().public_key(), spiffe_id=cas_spiffe_id(TD), dns=["cas.local"],
        ips=[ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        not_before=NOW, not_after=NOW + timedelta(days=1),
    )
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/cas"]
    assert san.get_values_for_type(x509.DNSName) == ["cas.local"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    ]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_serials(leaf: tuple[x509.Certificate, Any]) -> None:
    cert = leaf[0]
    s = serial_hex(cert)
    assert s == format(cert.serial_number, "x") and not s.startswith("0") and s == s.lower()
    colon_form = ":".join(f"{cert.serial_number:042x}"[i : i + 2] for i in range(0, 42, 2))
    assert normalize_serial(colon_form.upper()) == s
    assert normalize_serial("0x" + s) == s
    assert normalize_serial("000A") == "a"
    with pytest.raises(ValueError, match="not hex"):
        normalize_serial("xyz")


def test_pem_round_trip(ca: CaRecord, leaf: tuple[x509.Certificate, Any]) -> None:
    text = cert_pem(leaf[0]) + cert_pem(ca.cert)
    assert load_pem_chain(text) == [leaf[0], ca.cert]
    assert load_pem_chain(text.encode()) == [leaf[0], ca.cert]
    with pytest.raises(ValueError, match="not a PEM certificate chain"):
        load_pem_chain("nothing here")


def test_csr_limit_is_64k() -> None:
    assert MAX_CSR_BYTES == 64 * 1024


# --- the real openssl CLI -----------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30,
                          check=False)


@openssl
def test_openssl_reads_the_leaf(
    tmp_path: Path, ca: CaRecord, leaf: tuple[x509.Certificate, Any]
) -> None:
    (tmp_path / "leaf.pem").write_text(cert_pem(leaf[0]))
    out = run("x509", "-noout", "-text", "-in", str(tmp_path / "leaf.pem"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "URI:spiffe://mesh.example/shop/backend" in text
    assert "DNS:backend, DNS:backend.shop.svc.cluster.local" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert f"{OID}:" in text
    assert "application/vnd.meshshield.claims+json" in text  # the CMW record's type
    assert "CA:FALSE" in text and "Digital Signature" in text


@openssl
def test_openssl_verifies_the_leaf(
    tmp_path: Path, ca: CaRecord, leaf: tuple[x509.Certificate, Any]
) -> None:
    (tmp_path / "ca.pem").write_text(cert_pem(ca.cert))
    (tmp_path / "leaf.pem").write_text(cert_pem(leaf[0]))
    for extra in ([], ["-purpose", "sslserver"], ["-purpose", "sslclient"]):
        out = run("verify", *extra, "-CAfile", str(tmp_path / "ca.pem"),
                  str(tmp_path / "leaf.pem"))
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip() == f"{tmp_path / 'leaf.pem'}: OK"


@openssl
def test_openssl_verifies_the_server_cert(tmp_path: Path, ca: CaRecord) -> None:
    cert = issue_server_cert(
        ca, generate_p256().public_key(), spiffe_id=cas_spiffe_id(TD), dns=["localhost"],
        ips=[ipaddress.ip_address("127.0.0.1")], not_before=NOW - timedelta(minutes=1),
        not_after=NOW + timedelta(days=1),
    )
    (tmp_path / "ca.pem").write_text(cert_pem(ca.cert))
    (tmp_path / "cas.pem").write_text(cert_pem(cert))
    out = run("verify", "-purpose", "sslserver", "-verify_ip", "127.0.0.1",
              "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "cas.pem"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_ca_carries_no_name_constraints(ca: CaRecord) -> None:
    # A critical URI name constraint is refused by verifiers that do not implement URI
    # constraints (pyca/cryptography's among them); the peer check enforces the trust
    # domain instead (test_peercheck: "other trust domain").
    with pytest.raises(x509.ExtensionNotFound):
        ca.cert.extensions.get_extension_for_class(x509.NameConstraints)


@openssl
def test_openssl_rejects_leaf_of_another_ca(
    tmp_path: Path, leaf: tuple[x509.Certificate, Any]
) -> None:
    other, _ = generate_ca(TD, NOW)
    (tmp_path / "other.pem").write_text(cert_pem(other))
    (tmp_path / "leaf.pem").write_text(cert_pem(leaf[0]))
    out = run("verify", "-CAfile", str(tmp_path / "other.pem"), str(tmp_path / "leaf.pem"))
    assert out.returncode != 0
