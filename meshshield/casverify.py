"""Verify the CAS before trusting it: its own evidence, against an `--expect` file.

Trust on first use is replaced by attestation. The client opens a TLS connection to the
CAS WITHOUT trusting any bundle (it accepts the server's certificate for this one
connection and records its public key), asks `POST /v1/cas/attestation` for evidence
over a fresh nonce, and accepts the answer only if, in this order:

1. the evidence verifies (`attestation.verify.verify_evidence`, the service verifiers);
2. its report_data is `cas_report_data(nonce, sha256(SPKI of THIS connection's key),
   sha256 of each CA of the answer's bundle)`: so the TLS connection ends at the
   attested CAS, not at a proxy forwarding its evidence, and the bundle is the one the
   attested CAS holds;
3. the CAS's certificate on this connection is issued by a CA of that bundle;
4. the claims satisfy the expect file (`policy.decide.decide_tee`, the service decision).

Only then is the bundle usable (`meshshield cas verify --out`, the sidecar's
`--cas-expect`). Every refusal is a MeshError with the usual reason codes.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import secrets
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshshield.attestation.claims import NONCE_SIZE, Claims, Platform, cas_report_data
from meshshield.attestation.verify import VerifierConfig, platform_of, verify_evidence
from meshshield.errors import MeshError, PolicyError, Reason
from meshshield.pki.ca import issued_by_bundle, load_pem_chain
from meshshield.pki.keys import spki_der
from meshshield.policy.decide import decide_tee
from meshshield.policy.expect import CasExpectation
from meshshield.policy.model import TeeEntry

MAX_ANSWER = 4 * 1024 * 1024
TIMEOUT = 10.0


class CasUnreachableError(MeshError):
    """The CAS could not be reached at all (no refusal of its evidence)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.TLS_HANDSHAKE_FAILED, message)


@dataclass(frozen=True)
class CasAttestation:
    """A CAS that passed verification: what it runs, its TLS key and its bundle."""

    url: str
    claims: Claims
    entry: TeeEntry
    tls_spki_sha256: str
    bundle_pem: str
    ca_fingerprints: tuple[str, ...]
    verified_at: datetime

    @property
    def simulated(self) -> bool:
        return self.claims.simulated or self.claims.platform is Platform.SIM

    def to_json(self) -> dict[str, Any]:
        c = self.claims
        return {
            "cas": self.url,
            "verified": True,
            "platform": c.platform.value,
            "measurement": c.measurement,
            "tcb_status": c.tcb_status.value,
            "debug": c.debug,
            "simulated": self.simulated,
            "tls_spki_sha256": self.tls_spki_sha256,
            "bundle_ca_fingerprints": list(self.ca_fingerprints),
            "verified_at": self.verified_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "claims": c.to_json(),
        }

    def summary(self) -> str:
        c = self.claims
        label = " (SIMULATED: no hardware guarantee)" if self.simulated else ""
        return (f"verified CAS {self.url}: platform {c.platform.value}{label}, measurement "
                f"{c.measurement}, tcb_status {c.tcb_status.value}, debug "
                f"{str(c.debug).lower()}; TLS key sha256:{self.tls_spki_sha256}; bundle of "
                f"{len(self.ca_fingerprints)} CA(s)")


def cert_spki_sha256(cert_der: bytes) -> str:
    """SHA-256 (hex) of the SPKI DER of a DER certificate's key."""
    cert = x509.load_der_x509_certificate(cert_der)
    return hashlib.sha256(spki_der(cert.public_key())).hexdigest()


def decide_cas(expect: CasExpectation, claims: Claims, who: str = "the CAS") -> TeeEntry:
    """The expect file's decision on verified claims (the service decision, reused)."""
    try:
        return decide_tee(expect.tee, expect.tolerate, expect.ignore_advisories, claims,
                          who=who, where=f"the expect file {expect.source}")
    except PolicyError as e:
        # The decision's words are a policy's; here the rules come from the expect file.
        message = (e.message.replace(" and apply it", "")
                   .replace("the policy", f"the expect file {expect.source}"))
        raise PolicyError(e.reason, message) from None


def check_cas_answer(
    answer: object,
    *,
    url: str,
    nonce: bytes,
    tls_cert_der: bytes,
    expect: CasExpectation,
    verifier: VerifierConfig,
    at: datetime | None = None,
) -> CasAttestation:
    """Steps 1-4 of the module docstring on one answer, received on a connection whose
    server certificate was `tls_cert_der`. MeshError on refusal."""
    at = at or datetime.now(UTC)
    who = f"the CAS at {url}"
    if not isinstance(answer, dict):
        raise _bad(f"{who} answered {type(answer).__name__}, expected a JSON object")
    for key in ("platform", "evidence", "tls_spki_sha256", "bundle"):
        if key not in answer:
            raise _bad(f"{who}'s attestation answer has no {key!r}")
    evidence, bundle_pem = answer["evidence"], answer["bundle"]
    if not isinstance(bundle_pem, str) or not isinstance(answer["tls_spki_sha256"], str):
        raise _bad(f"{who}'s attestation answer: bundle and tls_spki_sha256 must be strings")
    try:
        declared = Platform(str(answer["platform"]))
    except ValueError:
        raise _bad(f"{who} names an unknown platform {str(answer['platform'])[:20]!r}") from None
    platform = platform_of(evidence)
    if declared is Platform.SGX and platform is Platform.TDX:
        platform = declared
    if platform is not declared:
        raise MeshError(Reason.EVIDENCE_MALFORMED,
                        f"{who} says platform {declared.value} but sent evidence of the shape "
                        f"of {platform.value} evidence")
    if platform is Platform.SIM and not verifier.sim_platform_keys:
        raise MeshError(
            Reason.SIGNATURE_INVALID,
            f"{who} presents SIMULATED evidence, signed by a sim platform key, and no sim "
            "platform key is trusted here; pass the key the CAS was given "
            "(--trust-sim-platform sim-platform.pub.pem) if you accept simulation")
    # 1. the evidence itself
    claims = verify_evidence(platform, evidence, verifier, at)
    # 2. the binding: this connection's key, this bundle, our nonce
    spki_here = cert_spki_sha256(tls_cert_der)
    if answer["tls_spki_sha256"].lower() != spki_here:
        raise MeshError(
            Reason.REPORT_DATA_MISMATCH,
            f"the TLS connection to {url} ends at key sha256:{spki_here}, but the CAS's "
            f"evidence is for key sha256:{answer['tls_spki_sha256'][:64]}: something between "
            "you and the CAS terminates TLS (a proxy, or an attacker relaying the CAS's "
            "evidence). Connect to the CAS directly, without TLS-terminating proxies")
    try:
        cas = load_pem_chain(bundle_pem)
    except ValueError as e:
        raise _bad(f"{who}'s bundle is not PEM certificates: {e}") from None
    ca_der = [c.public_bytes(serialization.Encoding.DER) for c in cas]
    want = cas_report_data(nonce, bytes.fromhex(spki_here),
                           [hashlib.sha256(d).digest() for d in ca_der])
    if not secrets.compare_digest(want, claims.report_data):
        raise MeshError(
            Reason.REPORT_DATA_MISMATCH,
            f"{who}'s evidence report_data is {claims.report_data.hex()[:32]}..., expected "
            f"{want.hex()[:32]}... = SHA-512(\"meshshield/cas/v1\" || nonce || sha256(TLS key "
            f"of this connection) || sha256 of each of the {len(cas)} CA(s) of its bundle): "
            "the evidence was made for another nonce, TLS key or bundle. Do not trust this "
            "CAS; connect to it directly and verify again")
    # 3. the certificate on this connection comes from that bundle
    if not issued_by_bundle(x509.load_der_x509_certificate(tls_cert_der), bundle_pem):
        raise MeshError(Reason.CHAIN_INVALID,
                        f"{who}'s TLS certificate is not issued by a CA of the bundle it "
                        "attested; do not trust this CAS")
    # 4. what it runs
    entry = decide_cas(expect, claims, who)
    return CasAttestation(
        url=url, claims=claims, entry=entry, tls_spki_sha256=spki_here,
        bundle_pem=bundle_pem,
        ca_fingerprints=tuple(hashlib.sha256(d).hexdigest() for d in ca_der),
        verified_at=at,
    )


def _bad(message: str) -> MeshError:
    return MeshError(Reason.EVIDENCE_MALFORMED, message)


def _unverified_context() -> ssl.SSLContext:
    # Deliberately no trust anchor: this one connection's server key is judged by the
    # attestation that comes over it, never by a certificate chain (see module docstring).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def split_url(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise ValueError(f"--cas must be an https:// URL, found {url!r}")
    try:
        port = parsed.port or 443
    except ValueError:
        raise ValueError(f"--cas {url!r}: bad port") from None
    return parsed.hostname, port


def fetch_cas_attestation(url: str, nonce: bytes, timeout: float = TIMEOUT
                          ) -> tuple[object, bytes]:
    """POST /v1/cas/attestation on ONE fresh, unverified TLS connection: the answer and
    the DER certificate that connection's server presented. Blocking."""
    host, port = split_url(url)
    conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                       context=_unverified_context())
    try:
        try:
            conn.connect()
            sock = conn.sock
            assert isinstance(sock, ssl.SSLSocket)
            cert = sock.getpeercert(binary_form=True)
            body = json.dumps({"nonce": base64.b64encode(nonce).decode()})
            conn.request("POST", "/v1/cas/attestation", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read(MAX_ANSWER + 1)
        except (OSError, http.client.HTTPException) as e:
            raise CasUnreachableError(f"cannot reach the CAS at {url}: {e}") from None
        if conn.sock is not sock or not cert:
            raise CasUnreachableError(f"the connection to {url} changed mid-request; retry")
    finally:
        conn.close()
    if len(data) > MAX_ANSWER:
        raise MeshError(Reason.BODY_TOO_LARGE,
                        f"the CAS at {url} answered more than {MAX_ANSWER} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise _bad(f"the CAS at {url} answered HTTP {resp.status} without JSON") from None
    if resp.status != 200:
        err = doc.get("error") if isinstance(doc, dict) else None
        err = err if isinstance(err, dict) else {}
        try:
            reason = Reason(str(err.get("code")))
        except ValueError:
            reason = Reason.BAD_REQUEST
        message = str(err.get("message", f"HTTP {resp.status}"))[:500]
        if reason is Reason.CAS_NOT_ATTESTED:
            message = f"the CAS at {url} is not attested: {message}"
        raise MeshError(reason, message)
    return doc, cert


def verify_cas(
    url: str,
    expect: CasExpectation,
    verifier: VerifierConfig,
    *,
    timeout: float = TIMEOUT,
) -> CasAttestation:
    """Fetch and verify the CAS's attestation over a fresh connection (blocking)."""
    nonce = os.urandom(NONCE_SIZE)
    answer, cert = fetch_cas_attestation(url, nonce, timeout)
    return check_cas_answer(answer, url=url, nonce=nonce, tls_cert_der=cert, expect=expect,
                            verifier=verifier)


def load_expectation(path: str) -> CasExpectation:
    """Read and parse an expect file; PolicyInvalid (problems) or ValueError (unreadable)."""
    from meshshield.inputs import InputFileError, read_bounded
    from meshshield.policy.expect import MAX_EXPECT_BYTES, parse_expect

    try:
        data = read_bounded(path, what="--expect", limit=MAX_EXPECT_BYTES + 1)
    except InputFileError as e:
        raise ValueError(str(e)) from None
    except OSError as e:
        raise ValueError(f"cannot read expect file {path}: {e.strerror}") from None
    return parse_expect(data, path)


def sim_keys(paths: Sequence[str]) -> tuple[Any, ...]:
    """Trusted sim platform public keys; ValueError naming a bad file."""
    from meshshield.attestation.sim import load_sim_public_key

    return tuple(load_sim_public_key(p) for p in paths)
