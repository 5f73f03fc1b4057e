"""`--cas-expect`: the sidecar trusts the CAS only after verifying its attestation.

Before every attestation (first one and renewals) and every event-stream connect, the
sidecar verifies the CAS on a fresh connection (`casverify.verify_cas`: its evidence,
the binding to that connection's TLS key and to its bundle, the expect file's
decision), then pins the attested TLS key: each answer that follows must come over a
connection ending at that key (`PinnedConnector`); one that does not is refused, the
pin is dropped and the next request verifies again. A CAS that fails is not talked to:
the sidecar gets no certificate from it (`/ready` 503 until it holds one), and `/status`
shows why under `cas.verification`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from typing import Any

import aiohttp

from meshshield.attestation.sim import SimKeyError
from meshshield.attestation.verify import VerifierConfig
from meshshield.casverify import (
    CasAttestation,
    cert_spki_sha256,
    load_expectation,
    sim_keys,
    verify_cas,
)
from meshshield.errors import MeshError, Reason
from meshshield.policy import PolicyInvalid
from meshshield.policy.expect import CasExpectation
from meshshield.sidecar.config import ConfigError, SidecarConfig

log = logging.getLogger("meshshield.sidecar")

VERIFY_TIMEOUT = 10.0


def check_trust_settings(config: SidecarConfig) -> None:
    """Read the expect file and sim keys at start; ConfigError (a usage error) if bad."""
    if config.cas_expect is None:
        if config.cas_trust_sim_platform:
            raise ConfigError("--cas-trust-sim-platform needs --cas-expect")
        return
    _load(config)


def _load(config: SidecarConfig) -> tuple[CasExpectation, VerifierConfig]:
    assert config.cas_expect is not None
    try:
        expect = load_expectation(str(config.cas_expect))
    except ValueError as e:
        raise ConfigError(f"--cas-expect: {e}") from None
    except PolicyInvalid as e:
        raise ConfigError("--cas-expect: " + "\n".join(str(p) for p in e.problems)) from None
    try:
        keys = sim_keys([str(p) for p in config.cas_trust_sim_platform])
    except (SimKeyError, ValueError) as e:
        raise ConfigError(f"--cas-trust-sim-platform: {e}") from None
    return expect, VerifierConfig(sim_platform_keys=keys)


class CasTrust:
    """The CAS's verified attestation, pinned TLS key, and how verification went."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.expect, self.verifier = _load(config)
        self.attested: CasAttestation | None = None
        self.pinned: str | None = None
        self.state = "pending"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.verified_at: float | None = None
        self.results: Counter[str] = Counter()
        self._lock = asyncio.Lock()

    @property
    def bundle_pem(self) -> str:
        return self.attested.bundle_pem if self.attested is not None else ""

    async def verify(self) -> CasAttestation:
        """Verify the CAS now, on a fresh connection, and pin its TLS key; MeshError if
        it fails (the pin is dropped: nothing from the CAS is trusted until it passes)."""
        asked = time.monotonic()
        async with self._lock:
            # Another caller verified while we waited: that verification is as fresh.
            if (self.attested is not None and self.pinned is not None
                    and self.verified_at is not None and self._verified_mono >= asked):
                return self.attested
            try:
                att = await asyncio.to_thread(verify_cas, self.config.cas, self.expect,
                                              self.verifier, timeout=VERIFY_TIMEOUT)
            except MeshError as e:
                self._failed(e)
                raise
            self.attested, self.pinned = att, att.tls_spki_sha256
            self.state = "verified"
            self.last_error = None
            self.verified_at = time.time()
            self._verified_mono = time.monotonic()
            self.results["verified"] += 1
            return att

    _verified_mono = 0.0

    def _failed(self, e: MeshError) -> None:
        self.pinned = None
        unreachable = e.reason is Reason.TLS_HANDSHAKE_FAILED and "cannot reach" in e.message
        self.state = "unreachable" if unreachable else "refused"
        self.last_error = f"{e.reason.value}: {e.message}"
        self.last_error_at = time.time()
        self.results[e.reason.value] += 1
        cfg = self.config
        log.warning("%s/%s: the CAS at %s %s: %s", cfg.session, cfg.service, cfg.cas,
                    "is unreachable for verification" if unreachable
                    else "FAILED verification; not talking to it", self.last_error)

    def check_connection(self, ssl_obj: object) -> None:
        """A new connection to the CAS ends at the attested TLS key, or MeshError (and the
        pin is dropped, so the next attestation or event connect verifies again)."""
        der = (ssl_obj.getpeercert(binary_form=True)
               if isinstance(ssl_obj, ssl.SSLObject | ssl.SSLSocket) else None)
        found = cert_spki_sha256(der) if der else None
        if self.pinned is not None and found == self.pinned:
            return
        if self.pinned is None:
            e = MeshError(Reason.REPORT_DATA_MISMATCH,
                          "the CAS has not passed verification (yet); not talking to it")
        else:
            e = MeshError(
                Reason.REPORT_DATA_MISMATCH,
                f"the CAS answered over a connection to TLS key sha256:{found}, not the "
                f"attested key sha256:{self.pinned}; verifying the CAS again before "
                "trusting it")
        self._failed(e)
        raise e

    def status(self) -> dict[str, Any]:
        from meshshield.sidecar.registry import rfc3339_from

        att = self.attested if self.state == "verified" else None
        return {
            "expect": str(self.config.cas_expect),
            "state": self.state,
            "verified": self.state == "verified",
            "platform": None if att is None else att.claims.platform.value,
            "measurement": None if att is None else att.claims.measurement,
            "tcb_status": None if att is None else att.claims.tcb_status.value,
            "debug": None if att is None else att.claims.debug,
            "simulated": None if att is None else att.simulated,
            "tls_spki_sha256": self.pinned,
            "verified_at": None if self.verified_at is None
            else rfc3339_from(self.verified_at),
            "last_error": self.last_error,
            "last_error_at": None if self.last_error_at is None
            else rfc3339_from(self.last_error_at),
            "results": dict(self.results),
        }


class PinnedConnector(aiohttp.TCPConnector):
    """A connector whose every new connection must end at the CAS's attested TLS key,
    checked right after the handshake, before a byte of the request is sent."""

    def __init__(self, trust: CasTrust, **kw: Any) -> None:
        super().__init__(**kw)
        self._trust = trust

    # aiohttp has no public hook between the TLS handshake and the request; this one
    # (stable across aiohttp 3.x) sees each new connection once.
    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        proto = await super()._create_connection(req, traces, timeout)
        transport = proto.transport
        try:
            self._trust.check_connection(
                transport.get_extra_info("ssl_object") if transport is not None else None)
        except MeshError:
            proto.close()
            raise
        return proto


def cas_connector(trust: CasTrust | None, **kw: Any) -> aiohttp.TCPConnector:
    """The connector for requests to the CAS: pinned to its attested key with
    --cas-expect, a plain one otherwise."""
    return aiohttp.TCPConnector(**kw) if trust is None else PinnedConnector(trust, **kw)
