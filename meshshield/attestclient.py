"""The client side of attestation: nonce, evidence, CSR, certificate."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshshield.attestation.claims import Platform, expected_report_data
from meshshield.attestation.sources import EvidenceSourceError, collect_evidence
from meshshield.casclient import CasClient
from meshshield.errors import MeshError, Reason
from meshshield.pki.keys import generate_p256, spki_der


@dataclass(frozen=True)
class AttestRequest:
    session: str
    service: str
    platform: str
    workload: tuple[str, ...] = ()
    sim_key: Path | None = None


@dataclass(frozen=True)
class AttestResult:
    key: ec.EllipticCurvePrivateKey
    response: dict[str, Any]


def make_csr(key: ec.EllipticCurvePrivateKey, service: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def build_attest_body(
    req: AttestRequest, key: ec.EllipticCurvePrivateKey, nonce_b64: str
) -> dict[str, Any]:
    """The POST /v1/attest body for a fresh nonce: evidence bound to nonce and key."""
    nonce = base64.b64decode(nonce_b64, validate=True)
    report_data = expected_report_data(nonce, spki_der(key.public_key()))
    try:
        evidence = collect_evidence(
            Platform(req.platform), report_data, workload=req.workload, sim_key=req.sim_key
        )
    except (EvidenceSourceError, ValueError) as e:
        raise MeshError(Reason.EVIDENCE_MALFORMED, f"cannot obtain evidence: {e}") from None
    return {
        "session": req.session,
        "service": req.service,
        "platform": req.platform,
        "csr": make_csr(key, req.service),
        "nonce": nonce_b64,
        "evidence": evidence,
    }


def attest_once(client: CasClient, req: AttestRequest) -> AttestResult:
    key = generate_p256()
    nonce = client.post_json("/v1/attest/nonce", {})
    body = build_attest_body(req, key, nonce["nonce"])
    return AttestResult(key, client.post_json("/v1/attest", body))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def write_public_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary file beside it, then renamed), 0644:
    a bundle is public, but a half-written one must never be read as trusted."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_attest_output(out: Path, result: AttestResult) -> list[Path]:
    """key.pem, cert.pem, bundle.pem, claims.json, each mode 0600 (SPEC §7)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = result.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files = {
        "key.pem": key_pem,
        "cert.pem": result.response["certificate"].encode(),
        "bundle.pem": result.response["bundle"].encode(),
        "claims.json": (json.dumps(result.response["claims"], indent=2, sort_keys=True) + "\n")
        .encode(),
    }
    written = []
    for name, data in files.items():
        _write_private(out / name, data)
        written.append(out / name)
    return written
