"""The CAS attests itself: its own TEE's evidence, bound to a client's nonce, to the TLS
key of the client's connection and to every CA certificate of its bundle.

`POST /v1/cas/attestation {"nonce": b64 32 bytes}` (anyone) answers
`{"platform", "evidence", "tls_spki_sha256", "bundle", "simulated", "self_reported"}`
where the evidence's report_data is `claims.cas_report_data(nonce, sha256(TLS SPKI),
[sha256(CA DER) for each CA of "bundle"])`. The TLS key is the one of the connection
the request came in on (the CAS re-issues its serving certificate, and the context is
chosen per handshake), so evidence is produced per request, on worker threads, a few
at a time. `self_reported` is what the CAS read from its own evidence at start; it is a
display aid, and a client decides only on what it verified itself (`casverify`).

A CAS started without `--platform` answers every such request with `cas_not_attested`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from meshshield.attestation.claims import NONCE_SIZE, Claims, Platform, cas_report_data
from meshshield.attestation.measure import MeasureError, measure_paths
from meshshield.attestation.sim import SimKeyError, load_sim_private_key, make_sim_evidence
from meshshield.attestation.sources import EvidenceSourceError, collect_evidence
from meshshield.attestation.verify import VerifierConfig, verify_evidence
from meshshield.errors import MeshError, Reason
from meshshield.pki.ca import load_pem_chain

log = logging.getLogger("meshshield.cas")

MAX_REQUEST = 4096
# Evidence requests in flight at once; the rest wait (each is bounded by the CAS's
# connection limits and timeouts). Hardware sources take tens of milliseconds each.
CONCURRENT_EVIDENCE = 4
BINDING = ('SHA-512("meshshield/cas/v1" || nonce || tls_spki_sha256 || '
           "sha256(DER of each CA certificate of bundle, in order))")


@dataclass(frozen=True)
class SelfAttestConfig:
    """The CAS's own evidence flags, as the sidecar's (`--platform`, `--workload`,
    `--sim-key`, `--evidence-source`, `--coco-aa-url`)."""

    platform: Platform
    workload: tuple[str, ...] = ()
    sim_key: Path | None = None
    evidence_source: str | None = None
    coco_aa_url: str | None = None


def ca_digests(bundle_pem: str) -> list[bytes]:
    """SHA-256 of each CA certificate's DER, in bundle order."""
    return [hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).digest()
            for c in load_pem_chain(bundle_pem)]


class SelfAttestation:
    """Makes the CAS's evidence. Construction checks the evidence source works (a CAS
    that cannot prove what it runs refuses to start); MeshError says why."""

    def __init__(self, config: SelfAttestConfig, verifier: VerifierConfig) -> None:
        self.config = config
        self._sim_key = None
        self._measurement = ""
        try:
            if config.platform is Platform.SIM:
                if config.sim_key is None or not config.workload:
                    raise EvidenceSourceError(
                        "--platform sim needs --sim-key FILE and --workload PATH (the files "
                        "whose measurement the CAS attests)")
                self._sim_key = load_sim_private_key(config.sim_key)
                # The CAS's own files are measured once, at start: that is what it runs.
                self._measurement = measure_paths(list(config.workload))
            probe = self.evidence(bytes(64))
        except (EvidenceSourceError, SimKeyError, MeasureError, ValueError, OSError) as e:
            raise MeshError(Reason.EVIDENCE_MALFORMED,
                            f"the CAS cannot obtain its own {config.platform.value} evidence: "
                            f"{e}") from None
        self.claims: Claims | None = None
        # Where the KEK came from and how it is sealed here (cas/kekstore.py), shown in
        # the attestation answer; None for a CAS whose KEK is a file.
        self.kek: dict[str, Any] | None = None
        try:
            keys = tuple(verifier.sim_platform_keys)
            if self._sim_key is not None:
                keys = (*keys, self._sim_key.public_key())
            self.claims = verify_evidence(
                config.platform, probe,
                VerifierConfig(sim_platform_keys=keys, collateral=verifier.collateral),
                datetime.now(UTC))
        except MeshError as e:
            log.warning("the CAS's own %s evidence does not verify here (%s: %s); clients "
                        "will verify it themselves", config.platform.value, e.reason.value,
                        e.message)

    @property
    def simulated(self) -> bool:
        return self.config.platform is Platform.SIM

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        """Evidence JSON binding `report_data` (blocking: run it off the event loop)."""
        if self._sim_key is not None:
            return make_sim_evidence(self._sim_key, self._measurement, report_data)
        c = self.config
        return collect_evidence(c.platform, report_data, workload=c.workload,
                                sim_key=c.sim_key, source=c.evidence_source,
                                coco_aa_url=c.coco_aa_url)

    def self_reported(self) -> dict[str, Any]:
        c = self.claims
        return {
            "platform": self.config.platform.value,
            "measurement": None if c is None else c.measurement,
            "tcb_status": None if c is None else c.tcb_status.value,
            "debug": None if c is None else c.debug,
            "simulated": self.simulated,
            "kek": self.kek or {"source": "file", "sealing": "none: a key-encryption "
                                "secret file on the host (--kek-file)"},
            "note": "reported by the CAS about itself; `meshshield cas verify` checks it",
        }

    def describe(self) -> str:
        """One line for the CAS's start-up output."""
        c = self.claims
        what = f"measurement {c.measurement}, tcb {c.tcb_status.value}" if c else (
            "its own evidence could not be verified here")
        label = " (SIMULATED: no hardware guarantee)" if self.simulated else ""
        return f"attested {self.config.platform.value}{label}: {what}"

    def answer(self, nonce: bytes, tls_spki_der: bytes, bundle_pem: str) -> dict[str, Any]:
        """The /v1/cas/attestation answer for one connection's TLS key (blocking)."""
        spki_sha256 = hashlib.sha256(tls_spki_der).digest()
        report_data = cas_report_data(nonce, spki_sha256, ca_digests(bundle_pem))
        try:
            evidence = self.evidence(report_data)
        except (EvidenceSourceError, ValueError, OSError) as e:
            log.warning("the CAS could not obtain its own evidence: %s", e)
            raise MeshError(Reason.INTERNAL, "the CAS could not obtain its own evidence "
                            "just now; try again (its log says why)") from None
        return {
            "platform": self.config.platform.value,
            "evidence": evidence,
            "tls_spki_sha256": spki_sha256.hex(),
            "bundle": bundle_pem,
            "simulated": self.simulated,
            "report_data": BINDING,
            "self_reported": self.self_reported(),
        }


TlsOf = Callable[[ssl.SSLContext], "tuple[bytes, str] | None"]


def parse_nonce(body: bytes) -> bytes:
    try:
        doc = json.loads(body) if body else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or set(doc) != {"nonce"} or not isinstance(doc["nonce"], str):
        raise MeshError(Reason.BAD_REQUEST,
                        'expected {"nonce": "<standard base64 of 32 random bytes>"}')
    try:
        nonce = base64.b64decode(doc["nonce"], validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != NONCE_SIZE:
        raise MeshError(Reason.NONCE_INVALID,
                        f"nonce must be standard base64 of {NONCE_SIZE} random bytes; make a "
                        "fresh one for each verification")
    return nonce


def add_routes(app: web.Application, attestation: SelfAttestation | None, tls_of: TlsOf,
               off_loop: Callable[..., Any]) -> None:
    """Serve `POST /v1/cas/attestation` on the CAS's app. `tls_of` maps the TLS context
    a connection was handed at its handshake to (SPKI DER of its key, bundle PEM)."""
    gate: list[asyncio.Semaphore] = []

    async def cas_attestation(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_REQUEST:
            raise MeshError(Reason.BODY_TOO_LARGE, f"at most {MAX_REQUEST} bytes")
        nonce = parse_nonce(await request.content.read(MAX_REQUEST + 1))
        if attestation is None:
            raise MeshError(
                Reason.CAS_NOT_ATTESTED,
                "this CAS is not attested: it was started without --platform, so it cannot "
                "prove what it runs. Start it in a TEE with --platform (and its evidence "
                "flags), or fetch its bundle from a source you trust (`meshshield bundle`)")
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        tls = tls_of(ssl_obj.context) if isinstance(ssl_obj, ssl.SSLObject) else None
        if tls is None:
            raise MeshError(Reason.BAD_REQUEST,
                            "cannot tell the TLS key of this connection; connect again")
        if not gate:
            gate.append(asyncio.Semaphore(CONCURRENT_EVIDENCE))
        async with gate[0]:
            doc = await off_loop(request, attestation.answer, nonce, tls[0], tls[1])
        return web.json_response(doc)

    app.router.add_post("/v1/cas/attestation", cas_attestation)
