"""The CAS's secrets in-process (both store engines): made once, stable until rotated,
sealed to the attested key, released only after a passing attestation, audited."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshshield.attestation.measure import measure_paths
from meshshield.attestation.sim import generate_sim_platform_key, write_sim_platform_key
from meshshield.attestclient import AttestRequest, build_attest_body
from meshshield.cas.authority import Authority, CasConfig
from meshshield.cas.secrets import ASCII_ALPHABET, secrets_key
from meshshield.cas.stores import open_store
from meshshield.clock import FixedClock
from meshshield.errors import MeshError, Reason
from meshshield.pki.keys import generate_p256
from meshshield.policy import PolicyInvalid
from meshshield.sidecar.secrets import ReleasedSecret, issuer_key, open_released

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ADMIN = "a" * 64
READER = "b" * 64
KEK = b"k" * 32


def shop_policy(m: str, predecessor: str | None = None) -> bytes:
    return f"""name: shop
version: "1"
predecessor: {predecessor or "null"}
services:
  - name: db
    tee: [{{platform: sim, measurement: "{m}"}}]
    secrets:
      - {{name: db-password, env: DB_PASSWORD, file: /run/secrets/db-password}}
      - {{name: salt, file: /run/secrets/salt}}
      - {{name: tls, file: /run/secrets/tls.pem}}
  - name: web
    tee: [{{platform: sim, measurement: "{m}"}}]
    secrets:
      - {{name: api-key, env: API_KEY}}
  - name: plain
    tee: [{{platform: sim, measurement: "{m}"}}]
security: {{attestation: {{tolerate: [simulation]}}}}
access_policy: {{read: [CREATOR, "{READER}"], update: [CREATOR]}}
secrets:
  - {{name: db-password, kind: ascii, size: 24, export: [billing]}}
  - {{name: salt, kind: random, size: 16}}
  - {{name: tls, kind: x509, dns: [db.shop.svc]}}
  - {{name: api-key, kind: value}}
""".encode()


def billing_policy(m: str) -> bytes:
    return f"""name: billing
version: "1"
services:
  - name: client
    tee: [{{platform: sim, measurement: "{m}"}}]
    secrets:
      - {{name: shop-db, env: PGPASSWORD}}
security: {{attestation: {{tolerate: [simulation]}}}}
secrets:
  - {{name: shop-db, import: {{session: shop, secret: db-password}}}}
""".encode()


def open_answer(key: ec.EllipticCurvePrivateKey, out: dict[str, object],
                serial: str | None = None) -> tuple[ReleasedSecret, ...]:
    leaf = x509.load_pem_x509_certificate(str(out["certificate"]).encode())
    return open_released(key, out.get("secrets"), str(out["spiffe_id"]),
                         serial or str(out["serial"]), issuer_key(leaf, str(out["bundle"])))


class World:
    def __init__(self, root: Path, location: str | None) -> None:
        self.root = root
        self.location = location
        sim = generate_sim_platform_key()
        write_sim_platform_key(sim, root / "sim")
        self.sim = sim
        (root / "app").mkdir()
        (root / "app" / "main.py").write_text("print(1)\n")
        (root / "tampered").mkdir()
        (root / "tampered" / "main.py").write_text("print('exfiltrate')\n")
        self.m = measure_paths([root / "app"])
        self.clock = FixedClock(T0)
        self.cas = self.open()

    def open(self) -> Authority:
        cfg = CasConfig(data_dir=self.root / "data", admin_fingerprints=frozenset({ADMIN}),
                        sim_platform_keys=(self.sim.public_key(),), kek=KEK, clock=self.clock)
        cfg.data_dir.mkdir(exist_ok=True)
        a = Authority(cfg, open_store(self.location, cfg.data_dir))
        a.start()
        return a

    def restart(self) -> None:
        self.cas.store.close()
        self.cas = self.open()

    def attest(self, service: str, session: str = "shop", app: str = "app"
               ) -> tuple[dict[str, object], tuple[ReleasedSecret, ...]]:
        key = generate_p256()
        req = AttestRequest(session, service, "sim", (str(self.root / app),),
                            self.root / "sim" / "sim-platform.key")
        out = self.cas.attest(build_attest_body(req, key, self.cas.new_nonce()["nonce"]))
        return out, open_answer(key, out)


@pytest.fixture
def world(tmp_path: Path, store_location: str) -> Iterator[World]:
    w = World(tmp_path, store_location or None)
    w.cas.create_session(ADMIN, shop_policy(w.m))
    yield w
    w.cas.store.close()


def by_name(got: tuple[ReleasedSecret, ...]) -> dict[str, ReleasedSecret]:
    return {s.name: s for s in got}


def test_generated_values_are_made_once_and_stay_across_renewals_and_restarts(
    world: World,
) -> None:
    _, first = world.attest("db")
    values = by_name(first)
    password = values["db-password"]
    assert len(password.value) == 24 and set(password.value.decode()) <= set(ASCII_ALPHABET)
    assert (password.env, password.file) == ("DB_PASSWORD", "/run/secrets/db-password")
    assert len(values["salt"].value) == 16 and values["salt"].kind == "random"
    _, again = world.attest("db")
    world.restart()
    _, after_restart = world.attest("db")
    for got in (again, after_restart):
        assert by_name(got)["db-password"].value == password.value
        assert by_name(got)["salt"].value == values["salt"].value
        assert by_name(got)["db-password"].version == 1


def test_rotate_changes_the_value_the_next_attestation_sees(world: World) -> None:
    _, before = world.attest("db")
    r = world.cas.rotate_secret(ADMIN, "shop", "db-password")
    assert r == {"session": "shop", "secret": "db-password", "version": 2}
    _, after = world.attest("db")
    assert by_name(after)["db-password"].value != by_name(before)["db-password"].value
    assert by_name(after)["db-password"].version == 2
    assert by_name(after)["salt"].value == by_name(before)["salt"].value  # only that one
    with pytest.raises(MeshError) as e:
        world.cas.rotate_secret(READER, "shop", "db-password")
    assert e.value.reason is Reason.FORBIDDEN
    with pytest.raises(MeshError) as e:
        world.cas.rotate_secret(ADMIN, "shop", "api-key")
    assert "upload a new one with `meshshield secret put`" in e.value.message


def test_an_uploaded_value_is_required_and_only_an_updater_puts_it(world: World) -> None:
    with pytest.raises(MeshError) as e:
        world.attest("web")
    assert e.value.reason is Reason.SECRET_UNAVAILABLE
    assert "meshshield secret put shop api-key --from-file FILE" in e.value.message
    assert world.cas.store.certificates_of("shop", T0) == []  # refused before issuing
    for who in (READER, "c" * 64):
        with pytest.raises(MeshError) as e:
            world.cas.put_secret(who, "shop", "api-key", b"sk-live-123")
        assert e.value.reason is Reason.FORBIDDEN
    with pytest.raises(MeshError) as e:
        world.cas.put_secret(ADMIN, "shop", "db-password", b"chosen")
    assert "only kind value secrets are uploaded" in e.value.message
    with pytest.raises(MeshError) as e:
        world.cas.put_secret(ADMIN, "shop", "nope", b"x")
    assert e.value.reason is Reason.NOT_FOUND
    with pytest.raises(MeshError) as e:
        world.cas.put_secret(ADMIN, "shop", "api-key", b"x" * (64 * 1024 + 1))
    assert e.value.reason is Reason.BODY_TOO_LARGE
    assert world.cas.put_secret(ADMIN, "shop", "api-key", b"sk-live-123")["version"] == 1
    _, got = world.attest("web")
    assert by_name(got)["api-key"].value == b"sk-live-123"
    assert by_name(got)["api-key"].env_value() == "sk-live-123"
    assert world.cas.put_secret(ADMIN, "shop", "api-key", b"sk-live-456")["version"] == 2
    _, got = world.attest("web")
    assert by_name(got)["api-key"].value == b"sk-live-456"


def test_a_service_without_secrets_gets_no_secrets_field(world: World) -> None:
    out, got = world.attest("plain")
    assert "secrets" not in out and got == ()


def test_x509_secret_is_a_stable_key_with_a_certificate_from_the_session_ca(
    world: World,
) -> None:
    _, a = world.attest("db")
    _, b = world.attest("db")
    pems = [by_name(g)["tls"].value for g in (a, b)]
    certs = [x509.load_pem_x509_certificates(p[p.index(b"-----BEGIN CERTIFICATE"):])
             for p in pems]
    leaf, ca = certs[0]
    assert leaf.public_key() == certs[1][0].public_key()  # the same key both times
    assert ca.public_key() == certs[1][1].public_key() and ca.subject == certs[1][1].subject
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.shop.svc"]
    assert leaf.not_valid_after_utc == T0 + timedelta(hours=1)
    assert b"PRIVATE KEY" in pems[0]


def test_a_tampered_build_and_a_revoked_measurement_get_no_secret(world: World) -> None:
    with pytest.raises(MeshError) as e:
        world.attest("db", app="tampered")
    assert e.value.reason is Reason.MEASUREMENT_NOT_ALLOWED
    world.attest("db")
    world.cas.revoke(ADMIN, "shop", {"measurement": world.m})
    with pytest.raises(MeshError) as e:
        world.attest("db")
    assert e.value.reason is Reason.REVOKED
    releases = world.cas.secret_audit(ADMIN, "shop")["releases"]
    assert len(releases) == 1  # only the attestation that passed


def test_the_audit_lists_every_release_with_serial_measurement_and_names(
    world: World,
) -> None:
    out1, _ = world.attest("db")
    world.cas.rotate_secret(ADMIN, "shop", "db-password")
    out2, _ = world.attest("db")
    audit = world.cas.secret_audit(READER, "shop")
    assert audit["session"] == "shop"
    newest, oldest = audit["releases"]
    assert [oldest["serial"], newest["serial"]] == [out1["serial"], out2["serial"]]
    for rel in (oldest, newest):
        assert rel["service"] == "db" and rel["measurement"] == world.m
    assert newest["secrets"] == [
        {"name": "db-password", "from": "shop/db-password", "version": 2},
        {"name": "salt", "from": "shop/salt", "version": 1},
        {"name": "tls", "from": "shop/tls", "version": 1},
    ]
    with pytest.raises(MeshError) as e:
        world.cas.secret_audit("c" * 64, "shop")
    assert e.value.reason is Reason.FORBIDDEN


def test_nothing_stored_or_answered_holds_a_value_in_the_clear(world: World) -> None:
    out, got = world.attest("db")
    text = json.dumps(out)
    rows = [world.cas.store.get_secret("shop", n) for n in ("db-password", "salt", "tls")]
    for secret in got:
        assert secret.value not in text.encode()
        assert all(secret.value not in row.sealed for row in rows if row is not None)
    # The secrets key is the KEK's HKDF under a label of its own, not the KEK itself.
    assert secrets_key(KEK) != KEK and len(secrets_key(KEK)) == 32


def test_a_sealed_value_moved_to_another_row_does_not_open(world: World) -> None:
    world.attest("db")
    salt = world.cas.store.get_secret("shop", "salt")
    password = world.cas.store.get_secret("shop", "db-password")
    assert salt is not None and password is not None
    from meshshield.cas.secrets import unseal_value

    moved = type(salt)(salt.session, password.name, salt.version, password.kind, salt.sealed,
                       salt.actor, salt.created_at)
    with pytest.raises(MeshError) as e:
        unseal_value(secrets_key(KEK), moved)
    assert "does not unseal" in e.value.message


# -- export / import --------------------------------------------------------------------


def test_an_imported_secret_is_the_exporters_value(world: World) -> None:
    world.cas.create_session(ADMIN, billing_policy(world.m))
    _, shop = world.attest("db")
    _, billing = world.attest("client", session="billing")
    (token,) = billing
    assert token.value == by_name(shop)["db-password"].value and token.env == "PGPASSWORD"
    rel = world.cas.secret_audit(ADMIN, "billing")["releases"][0]
    assert rel["secrets"] == [{"name": "shop-db", "from": "shop/db-password", "version": 1}]


def test_an_import_with_no_matching_export_is_refused_when_applied_and_at_release(
    world: World,
) -> None:
    no_export = shop_policy(world.m).replace(b", export: [billing]", b"")
    other = billing_policy(world.m).replace(b"session: shop", b"session: nowhere")
    with pytest.raises(PolicyInvalid) as e:
        world.cas.create_session(ADMIN, other)
    assert "session 'nowhere' does not exist on this CAS" in str(e.value)
    world.cas.create_session(ADMIN, billing_policy(world.m))
    from meshshield.policy import policy_hash

    current = world.cas.read_session(ADMIN, "shop").policy_hash
    world.cas.update_session(ADMIN, "shop", no_export.replace(
        b"predecessor: null", f"predecessor: {current}".encode()))
    with pytest.raises(MeshError) as e2:
        world.attest("client", session="billing")
    assert e2.value.reason is Reason.SECRET_UNAVAILABLE
    assert "no longer exports it to 'billing'" in e2.value.message
    assert policy_hash(no_export)  # the update went through; the release did not
    # And a new import of it is refused outright.
    with pytest.raises(PolicyInvalid) as e3:
        world.cas.create_session(ADMIN, other.replace(b"session: nowhere", b"session: shop")
                                 .replace(b"name: billing", b"name: ledger"))
    assert "does not export 'db-password' to 'ledger'" in str(e3.value)


def test_a_deleted_session_takes_its_values_with_it(world: World) -> None:
    _, first = world.attest("db")
    world.cas.delete_session(ADMIN, "shop")
    world.cas.create_session(ADMIN, shop_policy(world.m))
    _, second = world.attest("db")
    assert by_name(first)["db-password"].value != by_name(second)["db-password"].value


def test_an_envelope_opens_only_with_the_attested_key(world: World) -> None:
    key = generate_p256()
    req = AttestRequest("shop", "db", "sim", (str(world.root / "app"),),
                        world.root / "sim" / "sim-platform.key")
    out = world.cas.attest(build_attest_body(req, key, world.cas.new_nonce()["nonce"]))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(MeshError) as e:
        open_answer(other, out)
    assert e.value.reason is Reason.SECRETS_ENVELOPE_INVALID
    with pytest.raises(MeshError, match="not signed by the CA"):  # bound to its certificate
        open_answer(key, out, serial="1234")
    assert {s.name for s in open_answer(key, out)} == {"db-password", "salt", "tls"}


def test_values_sealed_to_the_key_by_someone_else_are_refused(world: World) -> None:
    """A hop that terminates TLS can seal values of its own to the CSR's public key (that
    needs no secret), but cannot sign them as the CA that issued the certificate."""
    import base64
    import json as _json

    from meshshield.pki import envelope

    key = generate_p256()
    req = AttestRequest("shop", "db", "sim", (str(world.root / "app"),),
                        world.root / "sim" / "sim-platform.key")
    out = world.cas.attest(build_attest_body(req, key, world.cas.new_nonce()["nonce"]))
    forged_plain = _json.dumps({"secrets": [{"name": "db-password", "kind": "ascii",
                                             "version": 1, "value": "ZXZpbA==",
                                             "env": "DB_PASSWORD"}]}).encode()
    context = envelope.context_for(str(out["spiffe_id"]), str(out["serial"]))
    forged = envelope.seal(key.public_key(), forged_plain, context)
    attacker = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import hashes

    signature = attacker.sign(envelope.signed_message(forged, context),
                              ec.ECDSA(hashes.SHA256()))
    secrets_field = dict(out["secrets"])  # type: ignore[call-overload]
    for sig in (secrets_field["signature"], base64.b64encode(signature).decode()):
        tampered = {**out, "secrets": {**secrets_field,
                                       "envelope": base64.b64encode(forged).decode(),
                                       "signature": sig}}
        with pytest.raises(MeshError, match="not signed by the CA"):
            open_answer(key, tampered)
