"""Malformed input on every CAS endpoint gets a 4xx with the error JSON (issue 2, point 4).

One real CAS subprocess serves the whole module. Each row of the tables below is one
request and the answer it must get: a 4xx status, `{"error": {"code", "message"}}` with
the expected code, no stack trace in the body, and none in the CAS's stderr. At the end
the CAS still answers /v1/health, still issues certificates, and never counted a 500.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import re
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from harness import CasProcess, HttpResult, env_without_proxies
from hypothesis import given, settings
from hypothesis import strategies as st
from pki_helpers import csr_signed_by_other_key, make_csr

from meshshield.adminauth import load_admin_key, sign_request
from meshshield.pki.keys import generate_p256

MIB = 1024 * 1024
SESSION = "shop"


@dataclass
class Env:
    cas: CasProcess
    stranger: ec.EllipticCurvePrivateKey  # a well-formed admin key the CAS does not know
    mesh_cert: Path
    mesh_key: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    cas = CasProcess.start(tmp_path_factory.mktemp("cas"))
    try:
        r = cas.apply_policy(cas.sim_policy(SESSION))
        assert r.returncode == 0, r.stderr
        key, body = cas.attest_body(SESSION, "backend")
        issued = cas.post_json("/v1/attest", body)
        assert issued.status == 200, issued.body
        cert, keyfile = cas.root / "mesh.crt", cas.root / "mesh.key"
        cert.write_text(issued.json()["certificate"])
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        yield Env(cas, generate_p256(), cert, keyfile)
    finally:
        cas.stop()


# -- requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    mesh: bool = False  # present the mesh client certificate
    chunked: bool = False  # send the body with Transfer-Encoding: chunked, no length


def send(env: Env, req: Req) -> HttpResult:
    host, port = env.cas.url.removeprefix("https://").rsplit(":", 1)
    ctx: ssl.SSLContext = (
        env.cas.ssl_context(env.mesh_cert, env.mesh_key) if req.mesh else env.cas.ssl_context()
    )
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    headers = {"Content-Type": "application/json", **req.headers}
    try:
        try:
            if req.chunked:
                data = req.body or b""
                chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
                conn.request(req.method, req.path, chunks, headers, encode_chunked=True)
            else:
                conn.request(req.method, req.path, req.body, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the CAS may answer (413) before it has read the whole body
        resp = conn.getresponse()
        return HttpResult(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


Builder = Callable[[Env], Req]


@dataclass(frozen=True)
class Case:
    id: str
    build: Builder
    status: int
    codes: frozenset[str]
    problems: bool = False  # the error must also list every policy problem

    def param(self) -> Any:
        return pytest.param(self, id=self.id)


def case(
    id: str, build: Builder, status: int, *codes: str, problems: bool = False
) -> Any:
    return Case(id, build, status, frozenset(codes), problems).param()


def check_error(env: Env, r: HttpResult, status: int, codes: frozenset[str]) -> dict[str, Any]:
    assert 400 <= r.status < 500, (r.status, r.body[:300])
    assert b"Traceback" not in r.body
    assert r.status == status, (r.status, r.body[:300])
    body = json.loads(r.body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str), err
    assert err["message"], err
    assert err["code"] in codes, err
    assert "Traceback" not in env.cas.stderr()
    return err


# -- attest bodies ---------------------------------------------------------------------

DROP = object()  # remove the key from the body

Change = Any  # a value, DROP, or a function (csr key, valid body) -> value


def attest_body(env: Env, changes: dict[str, Change]) -> dict[str, Any]:
    """A valid attest body (fresh nonce, sim evidence, CSR) with `changes` applied."""
    key, body = env.cas.attest_body(SESSION, "backend")
    out = dict(body)
    for k, v in changes.items():
        if v is DROP:
            out.pop(k, None)
        elif callable(v):
            out[k] = v(key, body)
        else:
            out[k] = v
    return out


def attest(changes: dict[str, Change]) -> Builder:
    return lambda env: Req("POST", "/v1/attest", json.dumps(attest_body(env, changes)).encode())


def raw_attest(body: bytes) -> Builder:
    return lambda env: Req("POST", "/v1/attest", body)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def p384_csr(_key: Any, _body: Any) -> str:
    return make_csr(ec.generate_private_key(ec.SECP384R1())).decode()


def ed25519_csr(_key: Any, _body: Any) -> str:
    return make_csr(ed25519.Ed25519PrivateKey.generate()).decode()


def csr_by_other_key(key: ec.EllipticCurvePrivateKey, _body: Any) -> str:
    return csr_signed_by_other_key(key, generate_p256()).decode()


def truncated_csr(_key: Any, body: dict[str, Any]) -> str:
    csr: str = body["csr"]
    return csr[: len(csr) // 2]


def csr_body_cut(_key: Any, body: dict[str, Any]) -> str:
    """The PEM envelope intact, the DER inside cut short."""
    lines = body["csr"].strip().splitlines()
    return "\n".join([lines[0], *lines[1:3], lines[-1]]) + "\n"


def evidence_with(**fields: Any) -> Callable[[Any, dict[str, Any]], Any]:
    def f(_key: Any, body: dict[str, Any]) -> Any:
        return {**body["evidence"], **fields}

    return f


SNP_LIKE = {
    "report": b64(bytes(1184)),
    "certs": "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n",
}
OTHER_PLATFORM = frozenset({"evidence_malformed", "platform_not_allowed", "chain_invalid"})
WRONG_TYPES: list[tuple[str, Any]] = [
    ("int", 1), ("float", 1.5), ("bool", True), ("null", None), ("list", ["shop"]),
    ("object", {"name": "shop"}),
]

ATTEST_CASES = [
    # the body as a whole
    case("bad-json", raw_attest(b'{"session": '), 400, "bad_request"),
    case("not-utf8", raw_attest(b"\xff\xfe{}"), 400, "bad_request"),
    case("empty", raw_attest(b""), 400, "bad_request"),
    case("json-list", raw_attest(b"[]"), 400, "bad_request"),
    case("json-number", raw_attest(b"42"), 400, "bad_request"),
    case("json-string", raw_attest(b'"attest me"'), 400, "bad_request"),
    case("json-null", raw_attest(b"null"), 400, "bad_request"),
    case("json-true", raw_attest(b"true"), 400, "bad_request"),
    case("nested-too-deep", raw_attest(b"[" * 100_000), 400, "bad_request"),
    case("huge-integer", raw_attest(b'{"session": ' + b"7" * 5000 + b"}"), 400, "bad_request"),
    case("trailing-garbage", raw_attest(b"{} {}"), 400, "bad_request"),
    case("just-under-1mib", raw_attest(b" " * (MIB - 2) + b"{}"), 400, "bad_request"),
    # fields of the wrong type
    *[
        case(f"{name}-is-{tid}", attest({name: v}), 400, "bad_request")
        for name in ("session", "service", "csr", "nonce")
        for tid, v in WRONG_TYPES
    ],
    case("evidence-is-null", attest({"evidence": None}), 400, "bad_request"),
    *[
        case(f"evidence-is-{tid}", attest({"evidence": v}), 400, "evidence_malformed")
        for tid, v in [("int", 1), ("string", "x"), ("list", [{}]), ("bool", False)]
    ],
    *[
        case(f"platform-is-{tid}", attest({"platform": v}), 400, "bad_request")
        for tid, v in [("int", 1), ("list", ["sim"]), ("object", {}), ("unknown", "sgx2"),
                       ("uppercase", "SIM")]
    ],
    # missing and unknown keys
    *[
        case(f"missing-{name}", attest({name: DROP}), 400, "bad_request")
        for name in ("session", "service", "csr", "nonce", "evidence")
    ],
    case("unknown-key", attest({"extra": 1}), 400, "bad_request"),
    case("unknown-key-case", attest({"Session": SESSION}), 400, "bad_request"),
    case("session-too-long", attest({"session": "s" * 64}), 400, "bad_request"),
    case("unknown-session", attest({"session": "nope"}), 403, "session_unknown"),
    case("unknown-service", attest({"service": "nope"}), 403, "service_unknown"),
    # CSRs
    case("csr-garbage", attest({"csr": "hello, CAS"}), 400, "csr_invalid"),
    case("csr-empty", attest({"csr": ""}), 400, "csr_invalid"),
    case("csr-truncated", attest({"csr": truncated_csr}), 400, "csr_invalid"),
    case("csr-der-cut", attest({"csr": csr_body_cut}), 400, "csr_invalid"),
    case(
        "csr-junk-base64",
        attest({"csr": "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n"
                       "-----END CERTIFICATE REQUEST-----\n"}),
        400, "csr_invalid",
    ),
    case("csr-non-ascii", attest({"csr": "-----BEGIN CERTIFICATE REQUEST-----\né"}), 400,
         "csr_invalid"),
    case("csr-signed-by-other-key", attest({"csr": csr_by_other_key}), 400, "csr_invalid"),
    case("csr-p384", attest({"csr": p384_csr}), 400, "csr_invalid"),
    case("csr-ed25519", attest({"csr": ed25519_csr}), 400, "csr_invalid"),
    # nonces
    case("nonce-junk-base64", attest({"nonce": "!!not base64!!"}), 403, "nonce_invalid"),
    case("nonce-empty", attest({"nonce": ""}), 403, "nonce_invalid"),
    case("nonce-16-bytes", attest({"nonce": b64(bytes(16))}), 403, "nonce_invalid"),
    case("nonce-never-issued", attest({"nonce": b64(secrets.token_bytes(32))}), 403,
         "nonce_invalid"),
    case("nonce-urlsafe-alphabet", attest({"nonce": "-_" * 21 + "A="}), 403, "nonce_invalid"),
    # evidence
    case("evidence-empty-object", attest({"evidence": {}}), 400, "evidence_malformed"),
    case("evidence-junk-base64",
         attest({"evidence": {"report": "@@@@", "signature": "####"}}), 400,
         "evidence_malformed"),
    case("evidence-report-junk-base64", attest({"evidence": evidence_with(report="%%%%")}),
         400, "evidence_malformed"),
    case("evidence-signature-junk-base64",
         attest({"evidence": evidence_with(signature="not*base64")}), 400,
         "evidence_malformed"),
    case("evidence-fields-wrong-type",
         attest({"evidence": {"report": 1, "signature": [2]}}), 400, "evidence_malformed"),
    case("evidence-short-report", attest({"evidence": evidence_with(report=b64(b"x" * 7))}),
         400, "evidence_malformed"),
    case("evidence-extra-key", attest({"evidence": evidence_with(quote="AAAA")}), 400,
         "evidence_malformed"),
    case("evidence-over-512k",
         attest({"evidence": evidence_with(padding="A" * (600 * 1024))}), 413,
         "body_too_large"),
    # evidence for another platform
    case("tdx-shape-declared-sim", attest({"evidence": {"quote": b64(bytes(64))}}), 400,
         "evidence_malformed"),
    case("tdx-shape-undeclared",
         attest({"evidence": {"quote": b64(bytes(64))}, "platform": DROP}), 400,
         *OTHER_PLATFORM),
    case("snp-shape-declared-sim", attest({"evidence": SNP_LIKE}), 400, "evidence_malformed"),
    case("snp-shape-declared-snp", attest({"evidence": SNP_LIKE, "platform": "sev-snp"}), 400,
         *OTHER_PLATFORM),
    case("sim-evidence-declared-tdx", attest({"platform": "tdx"}), 400, "evidence_malformed"),
]


# -- body size ---------------------------------------------------------------------------

BIG = b"{" + b" " * MIB + b"}"


def big(method: str, path: str, *, chunked: bool = False, mesh: bool = False) -> Builder:
    return lambda env: Req(method, path, BIG, mesh=mesh, chunked=chunked)


SIZE_CASES = [
    case(f"{m}-{p}{'-chunked' if c else ''}", big(m, p, chunked=c, mesh=p == "/v1/reports"),
         413, "body_too_large")
    for m, p in [
        ("POST", "/v1/attest"),
        ("POST", "/v1/attest/nonce"),
        ("POST", "/v1/sessions"),
        ("PUT", f"/v1/sessions/{SESSION}"),
        ("POST", f"/v1/sessions/{SESSION}/revocations"),
        ("POST", "/v1/reports"),
        ("POST", "/v1/ca/rotate"),
    ]
    for c in (False, True)
]


# -- methods and paths -------------------------------------------------------------------


def plain(method: str, path: str, body: bytes | None = None) -> Builder:
    return lambda env: Req(method, path, body)


ROUTE_CASES = [
    *[
        case(f"{m}-{p}", plain(m, p), 405, "bad_request")
        for m, p in [
            ("GET", "/v1/attest"), ("PUT", "/v1/attest/nonce"), ("DELETE", "/v1/health"),
            ("POST", "/v1/bundle"), ("PATCH", f"/v1/sessions/{SESSION}"),
            ("GET", "/v1/sessions"), ("GET", "/v1/reports"), ("POST", "/v1/events"),
            ("POST", "/metrics"), ("GET", f"/v1/sessions/{SESSION}/revocations"),
            ("GET", "/v1/ca/rotate"),
        ]
    ],
    *[
        case(f"GET-{p}", plain("GET", p), 404, "not_found")
        for p in ["/", "/v1/nope", "/v2/health", "/v1/attest/", f"/v1/sessions/{SESSION}/x",
                  "/v1/health/../../etc/passwd", "/v1/%00", "/v1/sessions/" + "a" * 3000 + "/x"]
    ],
]


# -- admin authentication ------------------------------------------------------------------

POLICY_PLACEHOLDER = b"name: shop\n"


def _fields(header: str) -> dict[str, str]:
    _, _, rest = header.partition(" ")
    return dict(part.strip().split("=", 1) for part in rest.split(","))


def _join(fields: dict[str, str]) -> str:
    return "MeshShield-Sig " + ", ".join(f"{k}={v}" for k, v in fields.items())


def _tamper_sig(header: str) -> str:
    f = _fields(header)
    sig = bytearray(base64.b64decode(f["sig"]))
    sig[-1] ^= 0x01
    f["sig"] = b64(bytes(sig))
    return _join(f)


def auth_variant(env: Env, kind: str, method: str, path: str, body: bytes) -> str | None:
    """An Authorization header that must not authenticate `method path body`."""
    key = load_admin_key(env.cas.admin_dir)
    good = sign_request(key, method, path, body)
    other_method = "POST" if method != "POST" else "PUT"
    match kind:
        case "none":
            return None
        case "bearer":
            return "Bearer " + secrets.token_hex(16)
        case "scheme-only":
            return "MeshShield-Sig"
        case "garbage":
            return "MeshShield-Sig \xe9t\xe9=\xff"
        case "missing-sig":
            f = _fields(good)
            del f["sig"]
            return _join(f)
        case "duplicate-field":
            return good + ", ts=1"
        case "extra-field":
            return good + ", role=admin"
        case "junk-base64":
            return "MeshShield-Sig key=!!, ts=1, nonce=x, sig=??"
        case "ts-not-integer":
            return _join({**_fields(good), "ts": "soon"})
        case "ts-huge":  # beyond a float: the skew check must not overflow
            return _join({**_fields(good), "ts": "9" * 400})
        case "ts-negative":
            return _join({**_fields(good), "ts": "-" + _fields(good)["ts"]})
        case "stale":
            return sign_request(key, method, path, body, now=time.time() - 3600)
        case "future":
            return sign_request(key, method, path, body, now=time.time() + 3600)
        case "other-path":
            return sign_request(key, method, path + "x", body)
        case "other-body":
            return sign_request(key, method, path, body + b"#")
        case "other-method":
            return sign_request(key, other_method, path, body)
        case "tampered-sig":
            return _tamper_sig(good)
        case "key-not-der":
            return _join({**_fields(good), "key": b64(b"not a key")})
        case "key-swapped":  # a valid signature by admin, claiming the stranger's key
            spki = env.stranger.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return _join({**_fields(good), "key": b64(spki)})
        case "p384-key":
            return sign_request(ec.generate_private_key(ec.SECP384R1()), method, path, body)
        case "too-long":
            return good + ", pad=" + "x" * 5000
    raise AssertionError(kind)


AUTH_VARIANTS = [
    "none", "bearer", "scheme-only", "garbage", "missing-sig", "duplicate-field",
    "extra-field", "junk-base64", "ts-not-integer", "ts-huge", "ts-negative", "stale", "future",
    "other-path", "other-body", "other-method", "tampered-sig", "key-not-der",
    "key-swapped", "p384-key", "too-long",
]
ADMIN_ENDPOINTS: list[tuple[str, str, bytes]] = [
    ("POST", "/v1/sessions", POLICY_PLACEHOLDER),
    ("GET", f"/v1/sessions/{SESSION}", b""),
    ("PUT", f"/v1/sessions/{SESSION}", POLICY_PLACEHOLDER),
    ("DELETE", f"/v1/sessions/{SESSION}", b""),
    ("POST", f"/v1/sessions/{SESSION}/revocations", b'{"serial": "01"}'),
    ("GET", "/v1/edges", b""),
    ("POST", "/v1/ca/rotate", b'{"activate_after_seconds": 3600}'),
]


def unauthenticated(kind: str, method: str, path: str, body: bytes) -> Builder:
    def build(env: Env) -> Req:
        header = auth_variant(env, kind, method, path, body)
        headers = {} if header is None else {"Authorization": header}
        return Req(method, path, body if method in ("POST", "PUT") else None, headers)

    return build


def replayed(env: Env) -> Req:
    path = f"/v1/sessions/{SESSION}"
    header = sign_request(load_admin_key(env.cas.admin_dir), "GET", path, b"")
    first = send(env, Req("GET", path, headers={"Authorization": header}))
    assert first.status == 200, first.body
    return Req("GET", path, headers={"Authorization": header})


def stranger(method: str, path: str, body: bytes = b"") -> Builder:
    def build(env: Env) -> Req:
        sends_body = method in ("POST", "PUT")
        data = (body or env.cas.sim_policy("intruder").encode()) if sends_body else b""
        header = sign_request(env.stranger, method, path, data)
        return Req(method, path, data if sends_body else None, {"Authorization": header})

    return build


AUTH_CASES = [
    *[
        case(f"{m}-{p}-{kind}", unauthenticated(kind, m, p, b), 401, "unauthenticated")
        for m, p, b in ADMIN_ENDPOINTS
        for kind in ("none", "garbage", "tampered-sig", "other-body")
    ],
    *[
        case(f"get-session-{kind}",
             unauthenticated(kind, "GET", f"/v1/sessions/{SESSION}", b""), 401,
             "unauthenticated")
        for kind in AUTH_VARIANTS
    ],
    case("replayed", replayed, 401, "unauthenticated"),
    case("stranger-create", stranger("POST", "/v1/sessions"), 403, "forbidden"),
    case("stranger-read", stranger("GET", f"/v1/sessions/{SESSION}"), 403, "forbidden"),
    case("stranger-update", stranger("PUT", f"/v1/sessions/{SESSION}"), 403, "forbidden"),
    case("stranger-delete", stranger("DELETE", f"/v1/sessions/{SESSION}"), 403, "forbidden"),
    case("stranger-revoke",
         stranger("POST", f"/v1/sessions/{SESSION}/revocations", b'{"serial": "01"}'), 403,
         "forbidden"),
    case("stranger-edges", stranger("GET", "/v1/edges"), 403, "forbidden"),
    case("stranger-rotate",
         stranger("POST", "/v1/ca/rotate", b'{"activate_after_seconds": 3600}'), 403,
         "forbidden"),
]


# -- admin requests with bad bodies ------------------------------------------------------


def admin(method: str, path: str, body: bytes | Callable[[Env], bytes] = b"") -> Builder:
    def build(env: Env) -> Req:
        data = body(env) if callable(body) else body
        header = sign_request(load_admin_key(env.cas.admin_dir), method, path, data)
        return Req(method, path, data if method in ("POST", "PUT") else None,
                   {"Authorization": header, "Content-Type": "application/yaml"})

    return build


def yaml_bomb() -> bytes:
    doc = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    names = "abcdefghi"
    for prev, name in zip(names, names[1:], strict=False):
        doc += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    return doc.encode()


def policy(change: Callable[[str], str]) -> Callable[[Env], bytes]:
    return lambda env: change(env.cas.sim_policy("fresh")).encode()


def update(change: Callable[[str, str], str]) -> Callable[[Env], bytes]:
    """A PUT body for session shop: `change(current policy text, current hash)`."""

    def body(env: Env) -> bytes:
        r = send(env, admin("GET", f"/v1/sessions/{SESSION}")(env))
        assert r.status == 200, r.body
        return change(r.body.decode(), r.headers["X-Policy-Hash"]).encode()

    return body


def with_predecessor(text: str, h: str) -> str:
    return text.replace("predecessor: null", f'predecessor: "{h}"')


SESSIONS = "/v1/sessions"
BAD_POLICIES: list[tuple[str, bytes | Callable[[Env], bytes]]] = [
    ("yaml-unclosed", b"name: [unclosed\n"),
    ("yaml-braces", b"{{{{"),
    ("yaml-tab-indent", b"name: shop\nservices:\n\t- name: x\n"),
    ("yaml-list", b"- a\n- b\n"),
    ("yaml-scalar", b"42\n"),
    ("yaml-empty", b""),
    ("yaml-not-utf8", b"name: \xff\xfe\n"),
    ("yaml-bomb", yaml_bomb()),
    ("yaml-python-tag", b"name: !!python/object/apply:os.system ['true']\n"),
    ("json-instead", b'{"name": 1, "services": "none"}'),
    ("unknown-key", policy(lambda t: t + "colour: red\n")),
    ("duplicate-key", policy(lambda t: t + "name: again\n")),
    ("sim-not-tolerated",
     policy(lambda t: t.replace("    tolerate: [simulation]\n", "    tolerate: []\n"))),
    ("bad-measurement", policy(lambda t: re.sub(r'measurement: "[0-9a-f]+"',
                                                 'measurement: "xyz"', t))),
    ("name-uppercase", policy(lambda t: t.replace("name: fresh", "name: Fresh"))),
]

POLICY_CASES = [
    *[
        case(f"create-{pid}", admin("POST", SESSIONS, body), 400, "policy_invalid",
             problems=True)
        for pid, body in BAD_POLICIES
    ],
    case("create-with-predecessor",
         admin("POST", SESSIONS, policy(lambda t: with_predecessor(t, "ab" * 32))), 400,
         "policy_invalid"),
    case("create-existing",
         admin("POST", SESSIONS, lambda env: env.cas.sim_policy(SESSION).encode()), 409,
         "conflict"),
    case("update-bad-yaml", admin("PUT", f"{SESSIONS}/{SESSION}", b"name: [\n"), 400,
         "policy_invalid", problems=True),
    case("update-wrong-predecessor",
         admin("PUT", f"{SESSIONS}/{SESSION}", update(lambda t, h: with_predecessor(
             t.replace("cert_ttl: 30m", "cert_ttl: 10m"), "ab" * 32))),
         409, "predecessor_mismatch"),
    case("update-names-other-session",
         admin("PUT", f"{SESSIONS}/{SESSION}", update(lambda t, h: with_predecessor(
             t.replace(f"name: {SESSION}", "name: other"), h))),
         400, "policy_invalid"),
    case("update-unknown-session",
         admin("PUT", f"{SESSIONS}/nope", lambda env: env.cas.sim_policy("nope").encode()),
         403, "session_unknown"),
    case("read-unknown-session", admin("GET", f"{SESSIONS}/nope"), 403, "session_unknown"),
    case("delete-unknown-session", admin("DELETE", f"{SESSIONS}/nope"), 403, "session_unknown"),
]

REVOKE = f"/v1/sessions/{SESSION}/revocations"
REVOCATION_CASES = [
    *[
        case(f"revoke-{rid}", admin("POST", REVOKE, body), 400, "bad_request")
        for rid, body in [
            ("bad-json", b"{"), ("empty", b""), ("not-utf8", b"\xff"), ("list", b"[]"),
            ("number", b"7"), ("null", b"null"), ("empty-object", b"{}"),
            ("serial-int", b'{"serial": 1}'), ("serial-null", b'{"serial": null}'),
            ("serial-not-hex", b'{"serial": "xyz"}'),
            ("serial-too-long", b'{"serial": "' + b"a" * 200 + b'"}'),
            ("serial-huge-int", b'{"serial": ' + b"9" * 5000 + b"}"),
            ("both-kinds", b'{"serial": "ab", "measurement": "cd"}'),
            ("unknown-kind", b'{"kind": "serial"}'),
            ("measurement-short", b'{"measurement": "abc"}'),
            ("measurement-not-hex", b'{"measurement": "' + b"zz" * 32 + b'"}'),
            ("measurement-list", b'{"measurement": ["ab"]}'),
        ]
    ],
    case("revoke-unknown-serial", admin("POST", REVOKE, b'{"serial": "deadbeef"}'), 404,
         "not_found"),
    case("revoke-unknown-session",
         admin("POST", "/v1/sessions/nope/revocations", b'{"serial": "01"}'), 403,
         "session_unknown"),
    *[
        case(f"rotate-{rid}", admin("POST", "/v1/ca/rotate", body), 400, "bad_request")
        for rid, body in [
            ("bad-json", b"{"), ("list", b"[]"), ("string", b'"now"'),
            ("after-string", b'{"activate_after_seconds": "1h"}'),
            ("after-negative", b'{"activate_after_seconds": -1}'),
            ("after-zero", b'{"activate_after_seconds": 0}'),
            ("after-bool", b'{"activate_after_seconds": true}'),
            ("after-huge", b'{"activate_after_seconds": 1e99}'),
            ("after-null", b'{"activate_after_seconds": null}'),
        ]
    ],
]


# -- mesh-certificate endpoints ------------------------------------------------------------


def mesh(method: str, path: str, body: bytes | None) -> Builder:
    return lambda env: Req(method, path, body, mesh=True)


MESH_CASES = [
    case("events-no-cert", plain("GET", "/v1/events"), 401, "certificate_missing"),
    case("reports-no-cert", plain("POST", "/v1/reports", b'{"connections": []}'), 401,
         "certificate_missing"),
    case("reports-no-cert-bad-json", plain("POST", "/v1/reports", b"{"), 401,
         "certificate_missing"),
    *[
        case(f"reports-{rid}", mesh("POST", "/v1/reports", body), 400, "bad_request")
        for rid, body in [
            ("bad-json", b"{"), ("empty", b""), ("not-utf8", b"\xff"), ("list", b"[]"),
            ("null", b"null"), ("empty-object", b"{}"),
            ("connections-int", b'{"connections": 1}'),
            ("connections-object", b'{"connections": {"a": 1}}'),
            ("connections-of-ints", b'{"connections": [1, 2]}'),
            ("connections-of-lists", b'{"connections": [[]]}'),
            ("huge-integer", b'{"connections": ' + b"1" * 5000 + b"}"),
        ]
    ],
    case("reports-too-many-connections",
         mesh("POST", "/v1/reports", b'{"connections": [' + b",".join([b"{}"] * 10_001) + b"]}"),
         413, "body_too_large"),
]


ALL_CASES = [
    *ATTEST_CASES, *SIZE_CASES, *ROUTE_CASES, *AUTH_CASES, *POLICY_CASES, *REVOCATION_CASES,
    *MESH_CASES,
]


@pytest.mark.parametrize("c", ALL_CASES)
def test_malformed_request_gets_a_4xx_error_json(env: Env, c: Case) -> None:
    r = send(env, c.build(env))
    err = check_error(env, r, c.status, c.codes)
    if c.problems:
        problems = err.get("problems")
        assert isinstance(problems, list) and problems, err
        assert all(isinstance(p, str) and p for p in problems), err


def test_reports_with_odd_values_are_accepted_and_edges_still_answer(env: Env) -> None:
    odd = {"connections": [
        {"direction": "inbound", "peer_spiffe_id": 7, "bytes_in": "many"},
        {"direction": "sideways", "peer_spiffe_id": "spiffe://x/y/z", "bytes_out": -1},
        {"direction": "outbound", "peer_spiffe_id": "spiffe://meshshield.local/shop/frontend",
         "bytes_in": True, "bytes_out": 1e300, "opened_at": ["yesterday"], "reason": {}},
        {},
    ]}
    r = send(env, mesh("POST", "/v1/reports", json.dumps(odd).encode())(env))
    assert r.status == 202, r.body
    r = send(env, admin("GET", "/v1/edges")(env))
    assert r.status == 200, r.body
    assert isinstance(r.json()["edges"], list)


# -- property test: arbitrary JSON as the attest body -----------------------------------------

JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                               max_size=4),
    max_leaves=12,
)
ATTEST_KEYS = ["session", "service", "csr", "nonce", "evidence", "platform"]
FIELD_VALUES = JSON_VALUES | st.sampled_from(
    [SESSION, "backend", "sim", "sev-snp", "tdx", b64(bytes(32)),
     {"report": "AAAA", "signature": "AAAA"}, {"quote": "AAAA"}]
)
ATTEST_SHAPED = st.dictionaries(st.sampled_from(ATTEST_KEYS), FIELD_VALUES, max_size=6)


@settings(max_examples=60, deadline=None)
@given(body=JSON_VALUES | ATTEST_SHAPED)
def test_arbitrary_json_as_attest_body_gets_a_4xx_error_json(env: Env, body: Any) -> None:
    r = send(env, Req("POST", "/v1/attest", json.dumps(body).encode()))
    check_error(env, r, r.status, frozenset({r.code or "?"}))
    assert r.status != 200


# -- real clients ----------------------------------------------------------------------------


def test_curl_gets_the_error_json(env: Env) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", "20", "--cacert", str(env.cas.bundle),
         "-H", "Content-Type: application/json", "--data-binary", '{"session": [1,2',
         "-w", "\n%{http_code}", f"{env.cas.url}/v1/attest"],
        capture_output=True, text=True, timeout=30, env=env_without_proxies(),
    )
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    assert status == "400"
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert "Traceback" not in body


def test_openssl_verifies_the_cas_certificate_and_its_spiffe_id(env: Env) -> None:
    host, port = env.cas.url.removeprefix("https://").rsplit(":", 1)
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-CAfile", str(env.cas.bundle),
         "-verify_return_error", "-verify_ip", "127.0.0.1", "-showcerts"],
        input="", capture_output=True, text=True, timeout=30,
    )
    assert "Verify return code: 0 (ok)" in out.stdout, out.stdout[-2000:] + out.stderr
    served = re.search(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out.stdout, re.S
    )
    assert served is not None
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text"], input=served.group(0),
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "URI:spiffe://meshshield.local/cas" in text, text
    assert "IP Address:127.0.0.1" in text


# -- and afterwards -------------------------------------------------------------------------------


def test_cas_still_serves_and_never_answered_500(env: Env) -> None:
    assert env.cas.proc is not None and env.cas.proc.poll() is None
    assert env.cas.get("/v1/health").status == 200
    assert env.cas.get("/v1/ready").status == 200
    r = env.cas.attest(SESSION, "backend")
    assert r.status == 200, r.body
    metrics = env.cas.get("/metrics").body.decode()
    assert 'status="500"' not in metrics
    assert re.search(r'status="4\d\d"', metrics)
    assert "Traceback" not in env.cas.stderr()
    # The SHA-256 of the policy is unchanged: no malformed request altered the session.
    got = send(env, admin("GET", f"/v1/sessions/{SESSION}")(env))
    assert got.status == 200
    assert got.headers["X-Policy-Hash"] == hashlib.sha256(
        env.cas.sim_policy(SESSION).encode()
    ).hexdigest()


# -- below HTTP: requests aiohttp's parser rejects before any CAS code runs -----------------

PROTOCOL_GARBAGE = {
    "header-line-too-long": b"GET /v1/health HTTP/1.1\r\nHost: cas\r\nX-Big: " + b"a" * 10_000
    + b"\r\n\r\n",
    "content-length-not-a-number": b"POST /v1/attest HTTP/1.1\r\nHost: cas\r\n"
    b"Content-Length: abc\r\n\r\n{}",
    "content-length-and-chunked": b"POST /v1/attest HTTP/1.1\r\nHost: cas\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "bad-chunk-size": b"POST /v1/attest HTTP/1.1\r\nHost: cas\r\nTransfer-Encoding: chunked\r\n"
    b"\r\nzz\r\n{}\r\n0\r\n\r\n",
    "invalid-method": b"G(T /v1/health HTTP/1.1\r\nHost: cas\r\n\r\n",
    "http-version-9": b"GET /v1/health HTTP/9.9\r\nHost: cas\r\n\r\n",
    "not-http": b"\x00\x01\x02 garbage\r\n\r\n",
}


def raw_exchange(cas: CasProcess, data: bytes) -> bytes:
    """Send raw bytes over TLS; what the CAS answers before closing (bounded)."""
    host, port = cas.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock, \
            cas.ssl_context().wrap_socket(sock, server_hostname=host) as tls:
        tls.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while len(out) < 65536:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, rest = out.partition(b"\r\n\r\n")
                    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                    if m and len(rest) >= int(m.group(1)):
                        break
        return out


@pytest.fixture
def lone_cas(tmp_path: Path) -> Iterator[CasProcess]:
    cas = CasProcess.start(tmp_path)
    yield cas
    cas.stop()


def test_http_protocol_garbage_gets_a_400_and_the_cas_keeps_serving(
    lone_cas: CasProcess,
) -> None:
    for name, data in PROTOCOL_GARBAGE.items():
        out = raw_exchange(lone_cas, data)
        status = re.match(rb"HTTP/1\.[01] (\d{3}) ", out)
        assert status is not None, (name, out[:200])
        assert 400 <= int(status.group(1)) < 500, (name, out[:200])
        assert b"Traceback" not in out, name
    # Plain HTTP on the TLS port: the handshake fails and the connection just closes.
    host, port = lone_cas.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: cas\r\n\r\n")
        with contextlib.suppress(OSError):
            assert not sock.recv(1024).startswith(b"HTTP/")
    assert lone_cas.get("/v1/health").status == 200
    assert lone_cas.attest("nope", "backend").code == "session_unknown"


def test_http_protocol_garbage_gets_the_error_json_and_logs_no_traceback(
    lone_cas: CasProcess,
) -> None:
    for name, data in PROTOCOL_GARBAGE.items():
        out = raw_exchange(lone_cas, data)
        head, _, body = out.partition(b"\r\n\r\n")
        assert b"application/json" in head.lower(), (name, head)
        assert "code" in json.loads(body)["error"], name
    assert "Traceback" not in lone_cas.stderr()
