"""Leaf and chain from a real CAS, read and verified by other people's X.509 stacks:
OpenSSL, GnuTLS (certtool), pyca/cryptography's verifier and the py-spiffe library.

An X.509-SVID is both a client and a server certificate, so each verifier is asked
for both purposes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from harness import CasProcess, run_cli
from spiffe import TrustDomain, X509Bundle, X509Svid

from meshshield.attestation.claims import Platform
from meshshield.attestation.sim import load_sim_public_key
from meshshield.attestation.verify import VerifierConfig, verify_evidence
from meshshield.pki import CMW_OID, attestation_from_certificate, claims_from_certificate

SPIFFE_ID = "spiffe://meshshield.local/shop/backend"
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"

needs_certtool = pytest.mark.skipif(
    shutil.which("certtool") is None, reason="GnuTLS certtool not found (Debian gnutls-bin)")


@dataclass(frozen=True)
class Attested:
    dir: Path
    bundle: Path  # the CAS's trust bundle

    @property
    def cert(self) -> Path:  # leaf then chain
        return self.dir / "cert.pem"

    @property
    def key(self) -> Path:
        return self.dir / "key.pem"

    @property
    def leaf(self) -> Path:
        path = self.dir / "leaf.pem"
        if not path.exists():
            path.write_text(self.chain_pem()[0])
        return path

    def chain_pem(self) -> list[str]:
        end = "-----END CERTIFICATE-----\n"
        return [p + end for p in self.cert.read_text().split(end) if p.strip()]

    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.cert.read_bytes())


@pytest.fixture(scope="module")
def attested(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attested]:
    root = tmp_path_factory.mktemp("interop")
    cas = CasProcess.start(root / "cas")
    try:
        r = cas.apply_policy(cas.sim_policy("shop"))
        assert r.returncode == 0, r.stderr
        out = root / "svid"
        res = run_cli("attest", "--cas", cas.url, "--cas-bundle", str(cas.bundle),
                      "--session", "shop", "--service", "backend", "--platform", "sim",
                      "--workload", str(cas.workload),
                      "--sim-key", str(cas.sim_dir / "sim-platform.key"), "--out", str(out))
        assert res.returncode == 0, res.stderr
        yield Attested(out, out / "bundle.pem")
    finally:
        cas.stop()


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


# -- every OID arc < 2^31 ----------------------------------------------------------------


def _oids(der: bytes) -> Iterator[str]:
    """Every OBJECT IDENTIFIER in a DER structure, descending into constructed values
    and into OCTET/BIT STRINGs that hold DER themselves (extension values)."""
    i = 0
    while i < len(der):
        tag, n = der[i], der[i + 1]
        i += 2
        if n & 0x80:
            width = n & 0x7F
            n = int.from_bytes(der[i : i + width], "big")
            i += width
        body = der[i : i + n]
        i += n
        if tag == 0x06:
            arcs, value = [], 0
            for b in body:
                value = (value << 7) | (b & 0x7F)
                if not b & 0x80:
                    arcs.append(value)
                    value = 0
            first = min(arcs[0] // 40, 2)
            yield ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))
        elif tag & 0x20:
            yield from _oids(body)
        elif tag in (0x03, 0x04):
            inner = body[1:] if tag == 0x03 else body
            try:
                found = list(_oids(inner))
            except (IndexError, ValueError):
                continue
            yield from found


def test_every_oid_arc_is_below_2_to_the_31(attested: Attested) -> None:
    for cert in attested.chain():
        oids = list(_oids(cert.public_bytes(serialization.Encoding.DER)))
        assert oids and "1.2.840.10045.4.3.2" in oids  # the walker does see OIDs
        for oid in oids:
            assert all(int(a) < 2**31 for a in oid.split(".")), oid
    leaf_oids = {e.oid.dotted_string for e in attested.chain()[0].extensions}
    assert CMW_OID.dotted_string in leaf_oids
    assert not any(o.startswith("2.25.") for o in leaf_oids)  # the old format is gone


# -- OpenSSL ----------------------------------------------------------------------------


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_openssl_verifies_strictly(attested: Attested, purpose: str) -> None:
    out = tool("openssl", "verify", "-x509_strict", "-purpose", purpose,
               "-CAfile", str(attested.bundle), str(attested.leaf))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"{attested.leaf}: OK"


def test_openssl_shows_the_cmw_extension(attested: Attested) -> None:
    out = tool("openssl", "x509", "-noout", "-text", "-in", str(attested.leaf))
    assert out.returncode == 0, out.stderr
    assert f"{CMW_OID.dotted_string}:" in out.stdout
    assert "application/vnd.meshshield.claims+json" in out.stdout
    assert f"URI:{SPIFFE_ID}" in out.stdout


# -- GnuTLS -----------------------------------------------------------------------------


@needs_certtool
def test_gnutls_parses_leaf_and_ca(attested: Attested) -> None:
    for path in (attested.leaf, attested.bundle):
        out = tool("certtool", "-i", "--infile", str(path))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Error" not in out.stdout + out.stderr
    out = tool("certtool", "-i", "--infile", str(attested.leaf))
    assert f"Unknown extension {CMW_OID.dotted_string} (not critical)" in out.stdout
    assert f"URI: {SPIFFE_ID}" in out.stdout


@needs_certtool
def test_gnutls_verifies_the_chain(attested: Attested) -> None:
    out = tool("certtool", "--verify-chain", "--infile", str(attested.cert))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Chain verification output: Verified." in out.stdout


@needs_certtool
@pytest.mark.parametrize("purpose", [CLIENT_AUTH, SERVER_AUTH])
def test_gnutls_verifies_against_the_bundle(attested: Attested, purpose: str) -> None:
    out = tool("certtool", "--verify", "--load-ca-certificate", str(attested.bundle),
               "--verify-purpose", purpose, "--infile", str(attested.cert))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Chain verification output: Verified." in out.stdout


# -- pyca/cryptography's verifier ---------------------------------------------------------


def _policy(attested: Attested) -> PolicyBuilder:
    store = Store(x509.load_pem_x509_certificates(attested.bundle.read_bytes()))
    return PolicyBuilder().store(store).time(datetime.now(UTC))


def test_cryptography_verifies_as_client(attested: Attested) -> None:
    leaf, *rest = attested.chain()
    verified = _policy(attested).build_client_verifier().verify(leaf, rest)
    assert verified.subjects is not None
    assert x509.UniformResourceIdentifier(SPIFFE_ID) in verified.subjects
    assert claims_from_certificate(verified.chain[0])["service"] == "backend"


def test_cryptography_verifies_as_server(attested: Attested) -> None:
    leaf, *rest = attested.chain()
    verifier = _policy(attested).build_server_verifier(x509.DNSName("backend"))
    chain = verifier.verify(leaf, rest)
    assert chain[0] == leaf and chain[-1].subject == leaf.issuer


# -- py-spiffe ----------------------------------------------------------------------------


def test_spiffe_library_parses_the_svid(attested: Attested) -> None:
    svid = X509Svid.load(str(attested.cert), str(attested.key),
                         serialization.Encoding.PEM)
    assert str(svid.spiffe_id) == SPIFFE_ID
    assert svid.leaf == attested.chain()[0]
    svid2 = X509Svid.parse(attested.cert.read_bytes(), attested.key.read_bytes())
    assert str(svid2.spiffe_id) == SPIFFE_ID


def test_spiffe_library_parses_the_bundle(attested: Attested) -> None:
    td = TrustDomain("meshshield.local")
    bundle = X509Bundle.load(td, str(attested.bundle), serialization.Encoding.PEM)
    leaf = attested.chain()[0]
    assert any(ca.subject == leaf.issuer for ca in bundle.x509_authorities)


# -- embed_evidence: the evidence beside the claims, re-verifiable by a third party -----


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CasProcess, Path]]:
    root = tmp_path_factory.mktemp("embed")
    cas = CasProcess.start(root / "cas")
    try:
        policy = cas.sim_policy("ra").replace(
            "    cert_ttl: 30m\n", "    cert_ttl: 30m\n    embed_evidence: true\n")
        r = cas.apply_policy(policy)
        assert r.returncode == 0, r.stderr
        _key, body = cas.attest_body("ra", "backend")
        resp = cas.post_json("/v1/attest", body)
        assert resp.status == 200, resp.body
        (root / "cert.pem").write_text(resp.json()["certificate"])
        yield cas, root / "cert.pem"
    finally:
        cas.stop()


def test_embedded_evidence_verifies_again_offline(embedded: tuple[CasProcess, Path]) -> None:
    cas, cert_path = embedded
    leaf, ca = x509.load_pem_x509_certificates(cert_path.read_bytes())
    att = attestation_from_certificate(leaf)
    assert att.evidence is not None
    assert hashlib.sha256(att.evidence).hexdigest() == att.claims["evidence_sha256"]
    # a third party holding only the certificate and the platform's key re-verifies it
    evidence = json.loads(att.evidence)
    config = VerifierConfig(sim_platform_keys=(
        load_sim_public_key(cas.sim_dir / "sim-platform.pub.pem"),))
    claims = verify_evidence(Platform.SIM, evidence, config, datetime.now(UTC))
    assert claims.measurement == att.claims["measurement"] == cas.measurement()


def test_embedded_evidence_certificate_still_verifies_everywhere(
    embedded: tuple[CasProcess, Path], tmp_path: Path
) -> None:
    _cas, cert_path = embedded
    leaf, ca = x509.load_pem_x509_certificates(cert_path.read_bytes())
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out = tool("openssl", "verify", "-x509_strict", "-purpose", "sslclient",
               "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem"))
    assert out.returncode == 0, out.stdout + out.stderr
    if shutil.which("certtool"):
        out = tool("certtool", "--verify", "--load-ca-certificate", str(tmp_path / "ca.pem"),
                   "--infile", str(cert_path))
        assert out.returncode == 0, out.stdout + out.stderr
    verified = (PolicyBuilder().store(Store([ca])).time(datetime.now(UTC))
                .build_client_verifier().verify(leaf, []))
    assert verified.chain[0] == leaf
