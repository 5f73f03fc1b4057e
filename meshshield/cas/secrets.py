"""The CAS's secrets: made once, stored sealed, released only to a service just attested.

Values live in the store's `secrets` table sealed under the *secrets key*, derived with
HKDF from the CAS's key-encryption key (`Authority.key_encryption_key()`) under a label
of its own, so a secrets blob and a sealed CA key never share a key. Each blob is bound to its
session, name and kind (AES-256-GCM associated data): a blob copied onto another row
does not open.

Generated values (random, ascii, x509 keys) are made on first need and stay until
`meshshield secret rotate`; `value` secrets exist only once an admin has put them. A
release happens only inside the attest response (`release`), after the evidence and the
policy passed, sealed to the CSR's key (`meshshield.pki.envelope`), and is recorded in
`secret_releases` (names and versions, never values) before the response leaves.

Sealed value, version 1:

    b"MSSECV" | 0x01 | nonce (12 bytes) | AES-256-GCM(secrets key, value) with tag
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshshield.cas.store import SecretRelease, Store, StoredSecret
from meshshield.errors import MeshError, Reason
from meshshield.pki import envelope
from meshshield.policy import SECRET_VALUE_MAX_BYTES, Policy, Secret, SecretKind, SecretUse

log = logging.getLogger("meshshield.cas")

_MAGIC = b"MSSECV\x01"
_NONCE = 12
_SECRETS_KEY_INFO = b"meshshield secrets key/v1"
_AAD = b"meshshield-secret/v1"
ASCII_ALPHABET = string.ascii_letters + string.digits + string.punctuation
"""The 94 printable ASCII characters other than space: what `ascii` values are made of."""
CA_NAME = ".ca"  # the session's x509 secrets CA (not a policy name: those have no dot)
X509_CA_DAYS = 3650


def secrets_key(kek: bytes) -> bytes:
    """The AES-256 key values are sealed under: HKDF-SHA256 of the KEK, a label of its own."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SECRETS_KEY_INFO)
    return hkdf.derive(kek)


def _aad(session: str, name: str, kind: str) -> bytes:
    return b"\0".join((_AAD, session.encode(), name.encode(), kind.encode()))


def seal_value(key: bytes, session: str, name: str, kind: str, value: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return _MAGIC + nonce + AESGCM(key).encrypt(nonce, value, _aad(session, name, kind))


def unseal_value(key: bytes, row: StoredSecret) -> bytes:
    blob = row.sealed
    if len(blob) < len(_MAGIC) + _NONCE + 16 or not blob.startswith(_MAGIC):
        raise MeshError(Reason.INTERNAL, f"session {row.session}: stored secret {row.name} is "
                                         "not a sealed value of this release (corrupted?)")
    try:
        return AESGCM(key).decrypt(blob[len(_MAGIC):len(_MAGIC) + _NONCE],
                                   blob[len(_MAGIC) + _NONCE:],
                                   _aad(row.session, row.name, row.kind))
    except InvalidTag:
        raise MeshError(
            Reason.INTERNAL,
            f"session {row.session}: stored secret {row.name} does not unseal: wrong "
            "key-encryption key, or the row was altered or moved",
        ) from None


def generate(kind: SecretKind, size: int | None) -> bytes:
    """A fresh value of a generated kind (x509: the PKCS#8 PEM of a new P-256 key)."""
    if kind is SecretKind.RANDOM:
        return secrets.token_bytes(size or 32)
    if kind is SecretKind.ASCII:
        return "".join(secrets.choice(ASCII_ALPHABET) for _ in range(size or 32)).encode()
    if kind is SecretKind.X509:
        return _key_pem(ec.generate_private_key(ec.SECP256R1()))
    raise ValueError(f"{kind} values are uploaded, not generated")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Resolved:
    """One secret a service receives, ready to seal: where it came from and its value."""

    use: SecretUse
    kind: SecretKind
    session: str  # the session that holds it (the exporter, for an import)
    name: str  # its name there
    version: int
    value: bytes
    dns: tuple[str, ...] = ()  # x509: the certificate's DNS names


class SecretVault:
    """Creation, rotation, upload, release and audit of the sessions' secrets."""

    def __init__(self, store: Store, kek: bytes, trust_domain: str) -> None:
        self._store = store
        self._key = secrets_key(kek) if kek else b""
        self._trust_domain = trust_domain

    def _require_key(self) -> bytes:
        if not self._key:
            raise MeshError(Reason.INTERNAL, "this CAS has no key-encryption key, so it holds "
                                             "no secrets")
        return self._key

    # -- values ---------------------------------------------------------------------------
    def _current(self, session: str, secret: Secret, now: datetime) -> StoredSecret:
        """The stored value, made now if it is generated and has none yet."""
        assert secret.kind is not None
        row = self._store.get_secret(session, secret.name)
        if row is not None and row.kind == secret.kind.value:
            return row
        if secret.kind is SecretKind.VALUE:
            if row is None:
                raise MeshError(
                    Reason.SECRET_UNAVAILABLE,
                    f"session {session!r}: secret {secret.name!r} (kind value) has no value "
                    f"yet; an updater of the session uploads it with `meshshield secret put "
                    f"{session} {secret.name} --from-file FILE`",
                )
        key = self._require_key()
        fresh = StoredSecret(session, secret.name, 1, secret.kind.value,
                             seal_value(key, session, secret.name, secret.kind.value,
                                        generate(secret.kind, secret.size)),
                             "cas", now)
        if row is not None:  # the policy changed the secret's kind: a value of the new kind
            return self._store.replace_secret(fresh, "secret.kind-changed")
        return self._store.create_secret(fresh)

    def resolve(self, policy: Policy, service: str,
                exporter: Callable[[str], Policy | None], now: datetime) -> list[Resolved]:
        """Every secret `service` receives, values unsealed; SECRET_UNAVAILABLE if any
        cannot be released (nothing is released then)."""
        svc = policy.service(service)
        if svc is None or not svc.secrets:
            return []
        key = self._require_key()
        out = []
        for use in svc.secrets:
            local = policy.secret(use.name)
            assert local is not None  # the parser checked every use names a definition
            holder, defined = policy.name, local
            if local.source is not None:
                holder, defined = self._exported(policy.name, local, exporter)
            row = self._current(holder, defined, now)
            assert defined.kind is not None
            out.append(Resolved(use, defined.kind, holder, defined.name, row.version,
                                unseal_value(key, row), defined.dns))
        return out

    def _exported(self, session: str, local: Secret, exporter: Callable[[str], Policy | None]
                  ) -> tuple[str, Secret]:
        source = local.source
        assert source is not None
        other = exporter(source.session)
        defined = None if other is None else other.secret(source.secret)
        if defined is None or defined.kind is None or session not in defined.export:
            raise MeshError(
                Reason.SECRET_UNAVAILABLE,
                f"session {session!r}: secret {local.name!r} imports {source.secret!r} from "
                f"session {source.session!r}, which no longer exports it to {session!r}; its "
                "admins must list this session in that secret's export",
            )
        return source.session, defined

    def rotate(self, session: str, secret: Secret, actor: str, now: datetime) -> StoredSecret:
        if secret.source is not None or secret.kind is None:
            origin = secret.source.session if secret.source else "another session"
            raise MeshError(Reason.BAD_REQUEST, f"session {session!r}: secret {secret.name!r} is "
                            f"imported from session {origin}; rotate it there")
        if secret.kind is SecretKind.VALUE:
            raise MeshError(Reason.BAD_REQUEST, f"session {session!r}: secret {secret.name!r} is "
                            "an uploaded value; upload a new one with `meshshield secret put`")
        key = self._require_key()
        row = StoredSecret(session, secret.name, 0, secret.kind.value,
                           seal_value(key, session, secret.name, secret.kind.value,
                                      generate(secret.kind, secret.size)), actor, now)
        stored = self._store.replace_secret(row, "secret.rotate")
        log.info("session %s: secret %s rotated to version %d by %s…", session, secret.name,
                 stored.version, actor[:16])
        return stored

    def put(self, session: str, secret: Secret, value: bytes, actor: str, now: datetime
            ) -> StoredSecret:
        if secret.kind is not SecretKind.VALUE:
            what = "imported" if secret.source is not None else f"generated ({secret.kind})"
            raise MeshError(Reason.BAD_REQUEST, f"session {session!r}: secret {secret.name!r} "
                            f"is {what}; only kind value secrets are uploaded")
        if not value:
            raise MeshError(Reason.BAD_REQUEST, "the secret value is empty")
        if len(value) > SECRET_VALUE_MAX_BYTES:
            raise MeshError(Reason.BODY_TOO_LARGE, f"the secret value is {len(value)} bytes, "
                                                   f"at most {SECRET_VALUE_MAX_BYTES}")
        row = StoredSecret(session, secret.name, 0, SecretKind.VALUE.value,
                           seal_value(self._require_key(), session, secret.name,
                                      SecretKind.VALUE.value, value), actor, now)
        stored = self._store.replace_secret(row, "secret.put")
        log.info("session %s: secret %s uploaded as version %d by %s…", session, secret.name,
                 stored.version, actor[:16])
        return stored

    # -- release --------------------------------------------------------------------------
    def release(
        self, resolved: list[Resolved], *, session: str, service: str, measurement: str,
        serial: str, spiffe_id: str, recipient: ec.EllipticCurvePublicKey,
        signer: ec.EllipticCurvePrivateKey, x509_ttl: timedelta, now: datetime,
    ) -> dict[str, Any]:
        """The sealed envelope for the attest response, recorded in the release log first."""
        items = []
        for r in resolved:
            value = r.value
            if r.kind is SecretKind.X509:
                value = self._x509_bundle(r, x509_ttl, now)
            item: dict[str, Any] = {"name": r.use.name, "kind": r.kind.value,
                                    "version": r.version,
                                    "value": base64.b64encode(value).decode()}
            if r.use.env is not None:
                item["env"] = r.use.env
            if r.use.file is not None:
                item["file"] = r.use.file
            items.append(item)
        plaintext = json.dumps({"secrets": items}, sort_keys=True,
                               separators=(",", ":")).encode()
        if len(plaintext) > envelope.MAX_PLAINTEXT:
            raise MeshError(Reason.BODY_TOO_LARGE, f"service {service}'s secrets come to "
                            f"{len(plaintext)} bytes, more than an envelope holds "
                            f"({envelope.MAX_PLAINTEXT})")
        context = envelope.context_for(spiffe_id, serial)
        sealed = envelope.seal(recipient, plaintext, context)
        signature = signer.sign(envelope.signed_message(sealed, context),
                                ec.ECDSA(hashes.SHA256()))
        names = [{"name": r.use.name, "from": f"{r.session}/{r.name}", "version": r.version}
                 for r in resolved]
        self._store.record_secret_release(SecretRelease(
            0, now, session, service, measurement, serial,
            json.dumps(names, sort_keys=True, separators=(",", ":"))))
        log.info("session %s: released secrets %s to %s/%s (serial %s, measurement %s)",
                 session, ",".join(r.use.name for r in resolved), session, service, serial,
                 measurement)
        return {"media_type": envelope.MEDIA_TYPE, "envelope": base64.b64encode(sealed).decode(),
                "signature": base64.b64encode(signature).decode()}

    def audit(self, session: str, limit: int = 1000) -> list[dict[str, Any]]:
        from meshshield.clock import rfc3339

        return [
            {"id": r.id, "at": rfc3339(r.at), "session": r.session, "service": r.service,
             "measurement": r.measurement, "serial": r.serial,
             "secrets": json.loads(r.secrets_json)}
            for r in self._store.secret_releases(session, limit)
        ]

    # -- x509 ----------------------------------------------------------------------------
    def _session_ca(self, session: str, now: datetime
                    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The session's secrets CA: its key a stored secret (made on first need, like any
        generated value), its certificate rebuilt from it with the same subject, serial
        and validity each time."""
        key_pem = unseal_value(self._require_key(), self._current(
            session, Secret(CA_NAME, SecretKind.X509), now))
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        row = self._store.get_secret(session, CA_NAME)
        assert row is not None
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"meshshield {self._trust_domain}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{session} secrets CA"),
        ])
        start = row.created_at - timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(hashlib.sha256(key.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo)).digest()[:16], "big") >> 1)
            .not_valid_before(start).not_valid_after(start + timedelta(days=X509_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def _x509_bundle(self, r: Resolved, ttl: timedelta, now: datetime) -> bytes:
        """PEM: the secret's key, a certificate for it issued now, the session's CA."""
        key = serialization.load_pem_private_key(r.value, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        ca_key, ca_cert = self._session_ca(r.session, now)
        dns = r.dns
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        dns[0] if dns else r.name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
        )
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        pem = serialization.Encoding.PEM
        return r.value + cert.public_bytes(pem) + ca_cert.public_bytes(pem)
