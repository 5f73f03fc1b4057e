"""GET /v1/bundle/spiffe and `meshshield bundle`, against a real CAS."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import CasProcess, run_cli
from spiffe import JwtBundle, TrustDomain, X509Bundle

from meshshield.pki.jwt import jwt_authorities
from meshshield.pki.spiffe_bundle import x509_authorities


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasProcess]:
    c = CasProcess.start(tmp_path_factory.mktemp("cas"))
    yield c
    c.stop()


def pem_cas(cas: CasProcess) -> list[x509.Certificate]:
    r = cas.get("/v1/bundle")
    assert r.status == 200
    return x509.load_pem_x509_certificates(r.json()["bundle"].encode())


def test_spiffe_bundle_document(cas: CasProcess) -> None:
    r = cas.get("/v1/bundle/spiffe")
    assert r.status == 200, r.body
    doc = r.json()
    assert set(doc) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert isinstance(doc["spiffe_refresh_hint"], int) and doc["spiffe_refresh_hint"] > 0
    assert doc["spiffe_sequence"] // 1024 == cas.get("/v1/bundle").json()["epoch"]
    x509_keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_keys) + len(jwt_keys) == len(doc["keys"])
    for jwk in x509_keys:
        assert jwk["kty"] == "EC" and jwk["crv"] == "P-256"
        assert "kid" not in jwk and len(jwk["x5c"]) == 1
    # the JWT-SVID authority: one P-256 key with its kid, and no certificate
    assert len(jwt_keys) == 1 and jwt_keys[0]["kid"] and "x5c" not in jwt_keys[0]
    assert list(jwt_authorities(doc)) == [jwt_keys[0]["kid"]]
    JwtBundle.parse(TrustDomain("meshshield.local"), json.dumps({"keys": jwt_keys}).encode())
    # the same CAs, in the same order, as the JSON bundle; x/y checked against each x5c
    assert x509_authorities(doc) == pem_cas(cas)


def test_py_spiffe_loads_the_x5c_authorities(cas: CasProcess) -> None:
    # py-spiffe parses JWKS only for JWT bundles (which need a kid, forbidden for
    # x509-svid keys); its X.509 bundle parser takes the DER certificates of x5c.
    doc = cas.get("/v1/bundle/spiffe").json()
    der = b"".join(base64.b64decode(k["x5c"][0]) for k in doc["keys"] if k["use"] == "x509-svid")
    bundle = X509Bundle.parse_raw(TrustDomain("meshshield.local"), der)
    assert bundle.x509_authorities == set(pem_cas(cas))


def test_sequence_grows_with_each_bundle_change(cas: CasProcess) -> None:
    before = cas.get("/v1/bundle/spiffe").json()
    r = cas.cli("cas", "rotate-ca", "--activate-after", "1h")
    assert r.returncode == 0, r.stderr
    after = cas.get("/v1/bundle/spiffe").json()
    assert after["spiffe_sequence"] > before["spiffe_sequence"]
    assert len(after["keys"]) == len(before["keys"]) + 1  # the next CA, before it signs
    assert x509_authorities(after) == pem_cas(cas)


def test_cli_round_trips_both_formats(cas: CasProcess, tmp_path: Path) -> None:
    flags = ["--cas", cas.url, "--cas-bundle", str(cas.bundle)]
    pem = tmp_path / "bundle.pem"
    r = run_cli("bundle", *flags, "--out", str(pem))
    assert r.returncode == 0, r.stderr
    assert "CA certificate(s)" in r.stdout
    assert pem.read_text() == cas.get("/v1/bundle").json()["bundle"]

    spiffe = tmp_path / "bundle.json"
    r = run_cli("bundle", *flags, "--format", "spiffe", "--out", str(spiffe))
    assert r.returncode == 0, r.stderr
    doc = json.loads(spiffe.read_text())
    assert doc["keys"] and x509_authorities(doc) == x509.load_pem_x509_certificates(
        pem.read_bytes())

    # stdout by default, and the PEM from stdout equals the file
    r = run_cli("bundle", *flags, "--format", "pem")
    assert r.returncode == 0 and r.stdout == pem.read_text()
    r = run_cli("bundle", *flags, "--format", "spiffe")
    assert r.returncode == 0 and json.loads(r.stdout) == doc
    # a PEM bundle that works as --cas-bundle (the trust of the next call)
    r = run_cli("bundle", "--cas", cas.url, "--cas-bundle", str(pem), "--format", "pem")
    assert r.returncode == 0, r.stderr
    der = [c.public_bytes(serialization.Encoding.DER) for c in x509_authorities(doc)]
    assert [base64.b64decode(k["x5c"][0]) for k in doc["keys"]
            if k["use"] == "x509-svid"] == der


def test_cli_errors(cas: CasProcess, tmp_path: Path) -> None:
    r = run_cli("bundle", "--cas", cas.url, "--cas-bundle", str(tmp_path / "missing.pem"))
    assert r.returncode == 2 and "cannot read --cas-bundle" in r.stderr
    r = run_cli("bundle", "--cas", cas.url, "--cas-bundle", str(cas.bundle), "--format", "der")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_cli("bundle", "--cas", "https://127.0.0.1:1", "--cas-bundle", str(cas.bundle))
    assert r.returncode == 1 and "cannot reach the CAS" in r.stderr
    assert "Traceback" not in r.stderr
