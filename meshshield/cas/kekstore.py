"""Where an attested CAS gets its key-encryption key (KEK) from, and how it gives it to
another replica. The CA key (and every other sealed secret) is sealed under the KEK
(`pki/seal.py`); the KEK itself is kept in the store's `kek_wraps` table, wrapped
(`cas/kekwrap.py`) for each holder, never in the clear:

- "tee-sealed", one per TEE identity (`cas/sealing.py` key_id: platform, chip or sim
  key, measurement): opened by that TEE's sealing key alone;
- "recovery-key", one per `--recovery-key PUB.pem` (key_id: SHA-256 of its SPKI):
  opened by the administrator's private key (`meshshield cas recover`).

At start (`obtain_kek`), in this order: the store holds a wrap sealed to this TEE and it
opens: use it. `cas recover`: open a recovery-key wrap with the given private key(s).
An empty store (no wrap, no CA): make a new KEK; of replicas initialising one database
together one stores its wrap first, the others recover from it. Otherwise: peer
recovery from the `--peer` URLs, bounded in time, with backoff. Whatever worked, the
KEK is then sealed to this TEE (so the next start needs no peer) and wrapped to every
`--recovery-key` not yet stored. Nothing works: the CAS refuses to start, naming the
recovery paths that exist.

Peer recovery (`POST /v1/cas/kek`), on ONE TLS connection to a running replica:

1. the requester verifies the replica: `POST /v1/cas/attestation` (its evidence binds
   this connection's TLS key), checked against the `--expect` file by `casverify`;
2. it takes a nonce (`POST /v1/attest/nonce`), makes a fresh P-256 key and its own
   evidence with report_data = SHA-512("meshshield/cas-kek/v1" || nonce ||
   SHA-256(SPKI DER of that key)), and sends `{"nonce", "platform", "evidence", "key"}`;
3. the replica consumes the nonce, verifies the evidence, checks the binding and decides
   it with the same expect file and decision code (`casverify.decide_cas`); only then it
   answers `{"wrapped_kek", "ca_fingerprint"}`, the KEK wrapped (ECDH P-256 + HKDF +
   AES-GCM) to that attested key, bound to the nonce. Every release and every refusal
   is an audit record: to whom (address, key), which evidence (platform, measurement,
   TCB status, simulated, SHA-256 of the evidence JSON).

The requester's attested key is an ECDH key, not a TLS client certificate: the CAS's
listener verifies client certificates against the mesh bundle, which a new replica has
no certificate of; the KEK is encrypted end to end to the key its evidence binds, so a
relay or a TLS-terminating proxy learns nothing, and the answer comes over the very
connection whose server key the requester verified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import logging
import os
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.core import CounterMetricFamily

from meshshield.attestation.claims import NONCE_SIZE, Platform
from meshshield.attestation.verify import VerifierConfig, verify_evidence
from meshshield.cas.kekwrap import (
    MAX_BLOB,
    KekWrapError,
    key_fingerprint,
    seal_kek,
    unseal_kek,
    unwrap_with_key,
    wrap_to_key,
)
from meshshield.cas.sealing import Sealing, SealingUnavailable
from meshshield.cas.store import KekWrapRecord, Store, StoreUnavailable
from meshshield.casverify import (
    CasAttestation,
    CasUnreachableError,
    _unverified_context,
    check_cas_answer,
    decide_cas,
    split_url,
)
from meshshield.errors import MeshError, Reason
from meshshield.pki.keys import generate_p256, spki_der
from meshshield.pki.seal import KEK_SIZE, SealedKeyError, unseal_private_key
from meshshield.policy.expect import CasExpectation

if TYPE_CHECKING:
    from aiohttp import web

    from meshshield.cas.authority import Authority

log = logging.getLogger("meshshield.cas")

TEE_SEALED = "tee-sealed"
RECOVERY_KEY = "recovery-key"
PEER_DOMAIN = b"meshshield/cas-kek/v1"
# As the service's evidence bound (authority.MAX_EVIDENCE_JSON), plus the other fields.
MAX_REQUEST = 512 * 1024 + 4096
MAX_ANSWER = 16 * 1024
MAX_SPKI = 256
PEER_TIMEOUT = 60.0
REQUEST_TIMEOUT = 10.0


class KekUnavailable(MeshError):
    """No KEK could be had: the CAS refuses to start (the message names the ways)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.INTERNAL, message)


def peer_report_data(nonce: bytes, key_spki_sha256: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE or len(key_spki_sha256) != 32:
        raise ValueError("peer report_data needs a 32-byte nonce and a SHA-256")
    return hashlib.sha512(PEER_DOMAIN + nonce + key_spki_sha256).digest()


def _context(sealing_key_id: str) -> bytes:
    return b"tee:" + sealing_key_id.encode()


def sealed_id(identity: str, sealing_key: bytes) -> str:
    """A sealed wrap's key_id: the TEE identity plus 8 bytes derived one-way from the
    sealing key itself, so two chips that report the same identity (an SEV-SNP chip id
    masked by policy, say) never take each other's row."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    check = HKDF(algorithm=hashes.SHA256(), length=8, salt=None,
                 info=b"meshshield/cas/sealing-key-id/v1").derive(sealing_key)
    return f"{identity}:{check.hex()}"


def _recovery_context(fp: str) -> bytes:
    return b"recovery:" + fp.encode()


def _peer_context(nonce: bytes) -> bytes:
    return b"peer:" + nonce


# -- the request and answer of POST /v1/cas/kek (untrusted bytes, both ways) --------------

@dataclass(frozen=True)
class RecoveryRequest:
    nonce: str
    platform: Platform
    evidence: Any
    key: ec.EllipticCurvePublicKey
    key_spki: bytes


def _json_object(data: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(data) > limit:
        raise MeshError(Reason.BODY_TOO_LARGE, f"{what} is {len(data)} bytes, at most {limit}")
    try:
        doc = json.loads(data) if data else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise MeshError(Reason.BAD_REQUEST, f"{what} is not a JSON object")
    return doc


def _b64(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4:
        raise MeshError(Reason.BAD_REQUEST, f"{what} must be standard base64 of at most "
                        f"{limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MeshError(Reason.BAD_REQUEST, f"{what} is not standard base64") from None


def parse_recovery_request(data: bytes) -> RecoveryRequest:
    doc = _json_object(data, MAX_REQUEST, "the KEK recovery request")
    want = {"nonce", "platform", "evidence", "key"}
    if set(doc) != want:
        raise MeshError(Reason.BAD_REQUEST, "the KEK recovery request must hold exactly "
                        f"{sorted(want)}, found {sorted(str(k)[:20] for k in doc)[:8]}")
    if not isinstance(doc["nonce"], str) or len(doc["nonce"]) > 128:
        raise MeshError(Reason.BAD_REQUEST, "nonce must be the base64 text /v1/attest/nonce "
                        "gave")
    try:
        platform = Platform(doc["platform"]) if isinstance(doc["platform"], str) else None
    except ValueError:
        platform = None
    if platform is None:
        raise MeshError(Reason.BAD_REQUEST, "platform must be one of "
                        f"{[p.value for p in Platform]}")
    spki = _b64(doc["key"], "key", MAX_SPKI)
    try:
        key = serialization.load_der_public_key(spki)
    except ValueError:
        raise MeshError(Reason.BAD_REQUEST, "key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        raise MeshError(Reason.BAD_REQUEST, "key must be a P-256 public key")
    return RecoveryRequest(doc["nonce"], platform, doc["evidence"], key, spki)


def parse_recovery_answer(data: bytes, where: str) -> tuple[bytes, str]:
    """(wrapped KEK blob, CA fingerprint) from a replica's answer; MeshError if malformed."""
    doc = _json_object(data, MAX_ANSWER, f"the answer of {where}")
    if set(doc) != {"wrapped_kek", "ca_fingerprint"}:
        raise MeshError(Reason.EVIDENCE_MALFORMED,
                        f"{where} answered fields {sorted(str(k)[:20] for k in doc)[:8]}, "
                        "expected wrapped_kek and ca_fingerprint")
    blob = _b64(doc["wrapped_kek"], "wrapped_kek", MAX_BLOB)
    fp = doc["ca_fingerprint"]
    if not isinstance(fp, str) or len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise MeshError(Reason.EVIDENCE_MALFORMED, f"{where}: ca_fingerprint must be 64 "
                        "lowercase hex digits")
    return blob, fp


# -- the releasing side --------------------------------------------------------------------

def _evidence_digest(evidence: object) -> str:
    return hashlib.sha256(json.dumps(evidence, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


# Refusals are audited at most this many per window (anyone may ask, so the audit log
# must not grow at an attacker's pace); the rest are counted into the next record.
REFUSAL_AUDITS = 30
REFUSAL_WINDOW = 60.0


@dataclass(eq=False)  # hashable: /metrics registers it as a collector
class KekRelease:
    """Decides and answers `POST /v1/cas/kek` on a running replica."""

    authority: Authority
    expect: CasExpectation | None
    released: int = 0
    refused: int = 0
    malformed: int = 0
    _window: tuple[float, int] = (0.0, 0)
    _suppressed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)  # answers run on workers

    def answer(self, body: bytes, peer: str) -> dict[str, Any]:
        """Blocking (store, verification): run off the event loop."""
        a = self.authority
        now = a.clock.now()
        who = f"the CAS replica at {peer}"
        try:
            req = parse_recovery_request(body)
        except MeshError as e:
            # Not even a request: counted and logged, not audited (no evidence to name).
            with self._lock:
                self.malformed += 1
            log.info("malformed KEK recovery request from %s: %s", peer, e.message[:200])
            raise
        key_fp = hashlib.sha256(req.key_spki).hexdigest()
        to = f"{peer} key sha256:{key_fp}"
        try:
            if self.expect is None:
                raise MeshError(Reason.FORBIDDEN,
                                "this CAS was started without --expect, so it releases its "
                                "key-encryption key to no replica; start the running "
                                "replicas with --expect FILE naming what a CAS may run")
            nonce = a._consume_nonce(req.nonce)
            claims = verify_evidence(req.platform, req.evidence, a.verifier, now)
            want = peer_report_data(nonce, bytes.fromhex(key_fp))
            if not secrets.compare_digest(want, claims.report_data):
                raise MeshError(
                    Reason.REPORT_DATA_MISMATCH,
                    f"{who}'s evidence report_data is {claims.report_data.hex()[:32]}..., "
                    f"expected {want.hex()[:32]}... = SHA-512(\"meshshield/cas-kek/v1\" || "
                    "nonce || sha256(SPKI of the key sent)): made for another nonce or key")
            decide_cas(self.expect, claims, who)
        except MeshError as e:
            self._refuse(peer, to, f"{e.reason.value}: {e.message}", now,
                         evidence=req.evidence)
            raise
        blob = wrap_to_key(a.key_encryption_key(), req.key, _peer_context(nonce))
        sim = " SIMULATED" if claims.simulated or claims.platform is Platform.SIM else ""
        a.store.add_audit(
            "cas", "kek-release",
            f"released the KEK to {to}: evidence {claims.platform.value}{sim} measurement "
            f"{claims.measurement} tcb_status {claims.tcb_status.value} debug "
            f"{str(claims.debug).lower()} evidence sha256:{_evidence_digest(req.evidence)}",
            now)
        with self._lock:
            self.released += 1
        log.warning("released the KEK to %s (%s measurement %s)", to, claims.platform.value,
                    claims.measurement)
        return {"wrapped_kek": base64.b64encode(blob).decode(),
                "ca_fingerprint": a.ca.fingerprint()}

    def _refuse(self, peer: str, to: str, why: str, now: datetime,
                evidence: object = None) -> None:
        digest = "none" if evidence is None else f"sha256:{_evidence_digest(evidence)}"
        log.warning("refused the KEK to %s: %s", to, why[:300])
        with self._lock:
            self.refused += 1
            start, n = self._window
            t = time.monotonic()
            if t - start > REFUSAL_WINDOW:
                start, n = t, 0
            self._window = (start, min(n + 1, REFUSAL_AUDITS))
            if n >= REFUSAL_AUDITS:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
        more = (f"; {suppressed} more refusal(s) before this one were not audited (over "
                f"{REFUSAL_AUDITS} per {REFUSAL_WINDOW:g}s)" if suppressed else "")
        try:
            self.authority.store.add_audit(
                "cas", "kek-refused", f"refused the KEK to {to}: {why[:1500]} (evidence "
                f"{digest}){more}", now)
        except StoreUnavailable:
            pass  # the store logged it; the request answers 503/403 all the same

    def collect(self) -> Iterator[CounterMetricFamily]:
        """`meshshield_cas_kek_requests_total{result}` for /metrics."""
        m = CounterMetricFamily("meshshield_cas_kek_requests_total",
                                "KEK peer-recovery requests by result", labels=["result"])
        m.add_metric(["released"], self.released)
        m.add_metric(["refused"], self.refused)
        m.add_metric(["malformed"], self.malformed)
        yield m


def add_routes(app: web.Application, release: KekRelease,
               off_loop: Callable[..., Any]) -> None:
    import asyncio

    gate: list[asyncio.Semaphore] = []

    async def cas_kek(request: web.Request) -> web.Response:
        from aiohttp import web

        if request.content_length is not None and request.content_length > MAX_REQUEST:
            raise MeshError(Reason.BODY_TOO_LARGE, f"at most {MAX_REQUEST} bytes")
        # request.read() reads it whole, within the app's client_max_size (1 MiB);
        # the parser refuses past MAX_REQUEST.
        body = await request.read()
        if not gate:
            gate.append(asyncio.Semaphore(2))
        async with gate[0]:
            doc = await off_loop(request, release.answer, body, request.remote or "?")
        return web.json_response(doc)

    app.router.add_post("/v1/cas/kek", cas_kek)


# -- the requesting side -------------------------------------------------------------------

class PeerRefused(MeshError):
    """A replica refused us, or we refused it: retrying will not change that."""


def _request(conn: http.client.HTTPSConnection, path: str, obj: object, limit: int,
             url: str) -> dict[str, Any]:
    try:
        conn.request("POST", path, body=json.dumps(obj),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read(limit + 1)
    except (OSError, http.client.HTTPException) as e:
        raise CasUnreachableError(f"cannot reach the CAS replica at {url}: {e}") from None
    if resp.status != 200:
        try:
            err = json.loads(data[:limit]).get("error", {})
        except (ValueError, AttributeError, RecursionError):
            err = {}
        err = err if isinstance(err, dict) else {}
        try:
            reason = Reason(str(err.get("code")))
        except ValueError:
            reason = Reason.BAD_REQUEST
        message = f"{url}{path} answered HTTP {resp.status} {reason.value}: " + str(
            err.get("message", ""))[:600]
        if resp.status >= 500:
            raise CasUnreachableError(message)
        raise PeerRefused(reason, message)
    return _json_object(data, limit, f"the answer of {url}{path}")


def recover_from_peer(url: str, evidence_of: Callable[[bytes], object], platform: Platform,
                      expect: CasExpectation, verifier: VerifierConfig,
                      timeout: float = REQUEST_TIMEOUT) -> tuple[bytes, CasAttestation]:
    """The KEK from the running replica at `url` (steps 1-3 of the module docstring)."""
    host, port = split_url(url)
    conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                       context=_unverified_context())
    try:
        try:
            conn.connect()
        except OSError as e:
            raise CasUnreachableError(f"cannot reach the CAS replica at {url}: {e}") from None
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        cert = sock.getpeercert(binary_form=True)
        if not cert:
            raise CasUnreachableError(f"{url} presented no certificate")
        n1 = os.urandom(NONCE_SIZE)
        answer = _request(conn, "/v1/cas/attestation",
                          {"nonce": base64.b64encode(n1).decode()}, 4 * 1024 * 1024, url)
        try:
            peer = check_cas_answer(answer, url=url, nonce=n1, tls_cert_der=cert,
                                    expect=expect, verifier=verifier)
        except MeshError as e:
            raise PeerRefused(e.reason, f"refused the replica at {url}: {e.message}") from None
        nonce_doc = _request(conn, "/v1/attest/nonce", {}, 4096, url)
        nonce = _b64(nonce_doc.get("nonce"), "nonce", NONCE_SIZE)
        key = generate_p256()
        spki = spki_der(key.public_key())
        evidence = evidence_of(peer_report_data(nonce, hashlib.sha256(spki).digest()))
        doc = _request(conn, "/v1/cas/kek", {
            "nonce": nonce_doc["nonce"], "platform": platform.value, "evidence": evidence,
            "key": base64.b64encode(spki).decode()}, MAX_ANSWER, url)
        if conn.sock is not sock:
            raise CasUnreachableError(f"the connection to {url} was replaced mid-recovery; "
                                      "retrying")
    finally:
        conn.close()
    blob, _fp = parse_recovery_answer(json.dumps(doc).encode(), url)
    kek = unwrap_with_key(blob, key, _peer_context(nonce), where=f"the KEK from {url}")
    return kek, peer


@dataclass
class PeerState:
    """What peer recovery did, for the start-up output and /v1/cas/attestation."""

    attempts: int = 0
    last_error: dict[str, str] = field(default_factory=dict)


def recover_from_peers(peers: Sequence[str], evidence_of: Callable[[bytes], object],
                       platform: Platform, expect: CasExpectation, verifier: VerifierConfig,
                       *, deadline_s: float = PEER_TIMEOUT,
                       say: Callable[[str], None] = print,
                       state: PeerState | None = None) -> tuple[bytes, str]:
    """Try each peer in turn until one gives the KEK; backoff 0.5 s doubling to 5 s, at
    most `deadline_s` in all. A refusal (either way) is final for that peer."""
    state = state or PeerState()
    stop = time.monotonic() + deadline_s
    delay = 0.5
    live = list(peers)
    while live:
        for url in list(live):
            state.attempts += 1
            try:
                kek, peer = recover_from_peer(
                    url, evidence_of, platform, expect, verifier,
                    timeout=max(0.5, min(REQUEST_TIMEOUT, stop - time.monotonic())))
                say(f"kek: recovered from {peer.summary()}")
                return kek, url
            except PeerRefused as e:
                state.last_error[url] = f"{e.reason.value}: {e.message}"
                say(f"kek: peer {url} refused: {e.reason.value}: {e.message}")
                live.remove(url)
            except (MeshError, KekWrapError, ValueError) as e:
                text = e.message if isinstance(e, MeshError) else str(e)
                state.last_error[url] = text
                say(f"kek: peer {url} not usable yet (attempt {state.attempts}): {text[:300]}")
        if not live or time.monotonic() + delay > stop:
            break
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    tried = "; ".join(f"{u}: {m[:400]}" for u, m in state.last_error.items()) or "none given"
    raise KekUnavailable(f"peer recovery failed within {deadline_s:g}s ({tried})")


# -- at start --------------------------------------------------------------------------------

@dataclass(frozen=True)
class KekPlan:
    """`cas serve`'s KEK settings (attested mode: no --kek-file)."""

    sealing: Sealing | None
    platform: Platform
    evidence_of: Callable[[bytes], object]
    peers: tuple[str, ...] = ()
    expect: CasExpectation | None = None
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    recovery_keys: tuple[ec.EllipticCurvePublicKey, ...] = ()
    recovery_private: tuple[ec.EllipticCurvePrivateKey, ...] = ()
    peer_timeout: float = PEER_TIMEOUT


@dataclass
class KekOutcome:
    kek: bytes
    source: str  # initialised | tee-sealed | peer URL | recovery-key sha256:... | file
    sealing: str
    wraps_added: list[str] = field(default_factory=list)
    wraps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "sealing": self.sealing}

    def audit_first_start(self, store: Store, at: datetime) -> None:
        """A first start's audit record, written once the first CA exists."""
        if self.source == "initialised":
            store.add_audit("cas", "kek-init", "initialised the key-encryption key; "
                            f"{self.sealing}; wraps: {', '.join(self.wraps) or 'none'}", at)


def _sealing_text(plan: KekPlan) -> str:
    if plan.sealing is None:
        return (f"none: {plan.platform.value} offers no sealing key; the KEK is kept by peer "
                "recovery and recovery keys only")
    return plan.sealing.describe()


def _check_against_ca(store: Store, kek: bytes, how: str) -> None:
    cas = store.load_cas()
    if not cas:
        return
    try:
        unseal_private_key(cas[0].sealed_key, kek, b"ca:" + cas[0].fingerprint.encode())
    except SealedKeyError:
        raise KekUnavailable(f"the KEK obtained by {how} does not open the stored CA key "
                             f"{cas[0].fingerprint[:16]}: it belongs to another mesh; "
                             "nothing was stored") from None


def _recovery_options(plan: KekPlan, wraps: list[KekWrapRecord], mine: str | None) -> str:
    sealed = [w.key_id for w in wraps if w.kind == TEE_SEALED]
    rec = [w.key_id for w in wraps if w.kind == RECOVERY_KEY]
    lines = [
        "1. peer recovery: start it with --peer https://REPLICA:PORT (a running, attested "
        "replica started with the same --expect) "
        + (f"- tried {', '.join(plan.peers)}" if plan.peers else "- no --peer given"),
        "2. disaster recovery: `meshshield cas recover --recovery-key-private FILE|DIR` "
        "(same flags as cas serve) with the private half of a recovery key; the store "
        + (f"holds the KEK for recovery key(s) sha256:{', sha256:'.join(rec)}" if rec
           else "holds no recovery-key wrap (none was given with --recovery-key)"),
        "3. the TEE's own sealing key: "
        + (f"the store holds sealed KEKs for {', '.join(sealed)}; this CAS is {mine}"
           if sealed else "no sealed KEK is stored")
        + ("" if mine else " (no sealing key here)"),
    ]
    if not wraps:
        lines.append("4. the store holds a CA but no KEK wrap: it was made by a CAS with a "
                     "KEK file; start with that --kek-file (with --expect it can then hand "
                     "its KEK to attested replicas started with --peer)")
    return "\n  ".join(lines)


def obtain_kek(store: Store, plan: KekPlan, *, say: Callable[[str], None] = print,
               now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> KekOutcome:
    """The KEK for this attested CAS (module docstring); KekUnavailable if none."""
    wraps = store.kek_wraps()
    sealing_text = _sealing_text(plan)
    if plan.sealing is None:
        say(f"kek: {sealing_text}")
    sealing_key: bytes | None = None
    kid: str | None = None
    if plan.sealing is not None:
        try:
            sealing_key = plan.sealing.derive()
            kid = sealed_id(plan.sealing.key_id, sealing_key)
        except SealingUnavailable as e:
            say(f"kek: cannot seal here: {e}")
            sealing_text = f"unavailable: {e}"
    outcome: KekOutcome | None = None
    # 1. sealed to this TEE
    if sealing_key is not None and kid is not None:
        for w in wraps:
            if w.kind == TEE_SEALED and w.key_id == kid:
                try:
                    kek = unseal_kek(w.blob, sealing_key, _context(w.key_id),
                                     where=f"the sealed KEK for {w.key_id}")
                except KekWrapError as e:
                    say(f"kek: {e.message}")
                    break
                _check_against_ca(store, kek, "unsealing")
                outcome = KekOutcome(kek, TEE_SEALED, sealing_text)
    # 2. disaster recovery with an administrator's private key
    if outcome is None and plan.recovery_private:
        outcome = _recover_with_keys(store, plan, wraps, sealing_text, say, now)
    # 3. a first start
    if outcome is None and not wraps and not store.load_cas():
        outcome = _initialise(store, plan, sealing_key, kid, sealing_text, say, now)
    # 4. peer recovery
    if outcome is None and plan.peers:
        if plan.expect is None:
            raise KekUnavailable("--peer needs --expect FILE: the replica to recover from "
                                 "must be verified before it is trusted with anything")
        say(f"kek: recovering from {len(plan.peers)} peer(s), for at most "
            f"{plan.peer_timeout:g}s")
        try:
            kek, url = recover_from_peers(plan.peers, plan.evidence_of, plan.platform,
                                          plan.expect, plan.verifier,
                                          deadline_s=plan.peer_timeout, say=say)
        except KekUnavailable as e:
            raise KekUnavailable(
                f"this CAS cannot get its key-encryption key, so it does not start: "
                f"{e.message}. The recovery paths:\n  "
                f"{_recovery_options(plan, store.kek_wraps(), kid)}") from None
        _check_against_ca(store, kek, f"peer recovery from {url}")
        outcome = KekOutcome(kek, f"peer {url}", sealing_text)
    if outcome is None:
        raise KekUnavailable(
            "this CAS cannot unseal its key-encryption key, so it does not start (the "
            "store holds a CA or KEK wraps, and none opens here). The recovery paths:\n  "
            f"{_recovery_options(plan, wraps, kid)}")
    _add_wraps(store, plan, outcome, sealing_key, kid, say, now)
    return outcome


def _initialise(store: Store, plan: KekPlan, sealing_key: bytes | None, kid: str | None,
                sealing_text: str, say: Callable[[str], None],
                now: Callable[[], datetime]) -> KekOutcome | None:
    if sealing_key is None and not plan.recovery_keys:
        raise KekUnavailable(
            "a first start with no sealing key here ("
            f"{sealing_text}) and no --recovery-key would keep the KEK nowhere but in "
            "memory: if every replica stopped, the CA would be lost. Give --recovery-key "
            "PUB.pem (`meshshield cas recovery-key --out DIR` makes one), or --kek-file")
    kek = secrets.token_bytes(KEK_SIZE)
    if sealing_key is not None and kid is not None and plan.sealing is not None:
        first = KekWrapRecord(TEE_SEALED, kid, seal_kek(kek, sealing_key, _context(kid)),
                              plan.sealing.describe(), now())
    else:
        rk = plan.recovery_keys[0]
        fp = key_fingerprint(rk)
        first = KekWrapRecord(RECOVERY_KEY, fp, wrap_to_key(kek, rk, _recovery_context(fp)),
                              "recovery public key", now())
    if not store.put_kek_wrap(first, "cas", first=True, audit=False):
        say("kek: another replica initialised this store just now; recovering from it")
        return None
    say("kek: initialised a new key-encryption key (first start)")
    return KekOutcome(kek, "initialised", sealing_text,
                      wraps=[f"{first.kind} {first.key_id}"])


def _recover_with_keys(store: Store, plan: KekPlan, wraps: list[KekWrapRecord],
                       sealing_text: str, say: Callable[[str], None],
                       now: Callable[[], datetime]) -> KekOutcome:
    stored = {w.key_id: w for w in wraps if w.kind == RECOVERY_KEY}
    for private in plan.recovery_private:
        fp = key_fingerprint(private.public_key())
        w = stored.get(fp)
        if w is None:
            continue
        kek = unwrap_with_key(w.blob, private, _recovery_context(fp),
                              where=f"the KEK for recovery key sha256:{fp}")
        _check_against_ca(store, kek, f"recovery key sha256:{fp}")
        store.add_audit("cas", "kek-recover",
                        f"KEK recovered with recovery key sha256:{fp} ({sealing_text})", now())
        say(f"kek: recovered with recovery key sha256:{fp}")
        return KekOutcome(kek, f"recovery-key sha256:{fp}", sealing_text)
    given = ", ".join("sha256:" + key_fingerprint(k.public_key()) for k in plan.recovery_private)
    raise KekUnavailable(
        f"none of the recovery private keys given ({given}) has a KEK wrap in the store; "
        "it holds wraps for "
        + (", ".join(f"sha256:{fp}" for fp in stored) or "no recovery key")
        + ". Use the private key whose public half the CAS was started with "
        "(--recovery-key)")


def _add_wraps(store: Store, plan: KekPlan, outcome: KekOutcome, sealing_key: bytes | None,
               kid: str | None, say: Callable[[str], None],
               now: Callable[[], datetime]) -> None:
    current = {(w.kind, w.key_id): w for w in store.kek_wraps()}
    kek = outcome.kek
    audit = outcome.source != "initialised"  # audited by the CAS once its CA exists
    if sealing_key is not None and kid is not None and plan.sealing is not None:
        w = current.get((TEE_SEALED, kid))
        ok = False
        if w is not None:
            try:
                ok = unseal_kek(w.blob, sealing_key, _context(kid)) == kek
            except KekWrapError:
                ok = False
        if not ok:
            store.put_kek_wrap(KekWrapRecord(TEE_SEALED, kid,
                                             seal_kek(kek, sealing_key, _context(kid)),
                                             plan.sealing.describe(), now()), "cas",
                               audit=audit)
            outcome.wraps_added.append(f"{TEE_SEALED} {kid}")
    for rk in plan.recovery_keys:
        fp = key_fingerprint(rk)
        if (RECOVERY_KEY, fp) in current:
            continue
        store.put_kek_wrap(KekWrapRecord(RECOVERY_KEY, fp,
                                         wrap_to_key(kek, rk, _recovery_context(fp)),
                                         "recovery public key", now()), "cas",
                           audit=audit)
        outcome.wraps_added.append(f"{RECOVERY_KEY} sha256:{fp}")
    for added in outcome.wraps_added:
        say(f"kek: stored the KEK {added}")
    outcome.wraps = [*outcome.wraps, *outcome.wraps_added]
