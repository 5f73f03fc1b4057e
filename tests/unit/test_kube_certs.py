"""`meshshield webhook certs`: a CA and a serving certificate the API server accepts."""

from __future__ import annotations

import base64
import io
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshshield.kube.cli_support import run_webhook_certs


def test_writes_ca_cert_and_private_key_and_prints_the_ca_bundle(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_webhook_certs("hook", "mesh", str(tmp_path), days=30, stdout=out, stderr=err) == 0
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    assert base64.b64decode(out.getvalue().strip()) == ca_pem
    assert out.getvalue().count("\n") == 1  # stdout is the caBundle and nothing else
    assert "kubectl -n mesh create secret tls hook-tls" in err.getvalue()

    ca = x509.load_pem_x509_certificate(ca_pem)
    leaf = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hook.mesh.svc" in sans.get_values_for_type(x509.DNSName)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30
    assert stat.S_IMODE((tmp_path / "tls.key").stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*ca*.key"))  # the CA key is not kept


def test_existing_files_are_kept_unless_forced(tmp_path: Path) -> None:
    assert run_webhook_certs("hook", "mesh", str(tmp_path), stdout=io.StringIO(),
                             stderr=io.StringIO()) == 0
    key = (tmp_path / "tls.key").read_bytes()
    err = io.StringIO()
    assert run_webhook_certs("hook", "mesh", str(tmp_path), stdout=io.StringIO(),
                             stderr=err) == 1
    assert "--force" in err.getvalue()
    assert (tmp_path / "tls.key").read_bytes() == key
    assert run_webhook_certs("hook", "mesh", str(tmp_path), force=True, stdout=io.StringIO(),
                             stderr=io.StringIO()) == 0
    assert (tmp_path / "tls.key").read_bytes() != key


def test_bad_names_are_a_usage_error(tmp_path: Path) -> None:
    err = io.StringIO()
    assert run_webhook_certs("Hook_1", "mesh", str(tmp_path), stdout=io.StringIO(),
                             stderr=err) == 2
    assert "service: expected a DNS label" in err.getvalue()
    assert not list(tmp_path.iterdir())
