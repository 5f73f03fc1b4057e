"""The admission webhook as a real process over real TLS, called by real HTTPS clients.

The serving certificate comes from `webhook certs` (for meshshield-webhook.meshshield.svc,
as the API server would dial it); clients verify it against the printed caBundle.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshshield.kube.cli_support import run_webhook_certs
from meshshield.kube.patch import apply_patch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "kube"
HOST = "meshshield-webhook.meshshield.svc"


@dataclass
class Webhook:
    process: subprocess.Popen[bytes]
    port: int
    ca: Path
    certs: Path

    def client_context(self, **kwargs: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        for key, value in kwargs.items():
            setattr(ctx, key, value)
        return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certs(directory: Path) -> Path:
    out, err = io.StringIO(), io.StringIO()
    assert run_webhook_certs("meshshield-webhook", "meshshield", str(directory),
                             stdout=out, stderr=err) == 0, err.getvalue()
    ca = directory / "ca.crt"
    assert base64.b64decode(out.getvalue().strip()) == ca.read_bytes()
    return ca


def start_webhook(certs: Path, port: int, cert: str = "tls.crt") -> subprocess.Popen[bytes]:
    code = (
        "import sys\n"
        "from meshshield.kube.cli_support import run_webhook\n"
        f"sys.exit(run_webhook('127.0.0.1:{port}', {str(certs / cert)!r}, "
        f"{str(certs / 'tls.key')!r}))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_ready(hook: Webhook, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if hook.process.poll() is not None:
            _, err = hook.process.communicate()
            raise AssertionError(f"webhook exited {hook.process.returncode}: {err.decode()}")
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", hook.port, timeout=2,
                                               context=hook.client_context(check_hostname=False))
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("webhook did not become ready")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    certs = tmp_path_factory.mktemp("webhook-certs")
    ca = make_certs(certs)
    port = free_port()
    hook = Webhook(start_webhook(certs, port), port, ca, certs)
    try:
        wait_ready(hook)
        yield hook
    finally:
        hook.process.terminate()
        hook.process.wait(timeout=10)


def review(**annotations: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "pod-create.json").read_text())
    data["request"]["object"]["metadata"]["annotations"].update(annotations)
    return data


async def post(hook: Webhook, body: bytes, path: str = "/mutate",
               **ctx: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"https://127.0.0.1:{hook.port}{path}", data=body,
            headers={"Content-Type": "application/json"},
            ssl=hook.client_context(**ctx), server_hostname=HOST,
        ) as resp:
            return resp.status, await resp.json(content_type=None)


def post_stdlib(hook: Webhook, body: bytes, **ctx: Any) -> tuple[int, dict[str, Any], str]:
    """http.client, to see the negotiated TLS version."""
    context = hook.client_context(**ctx)
    context.check_hostname = False  # we dial 127.0.0.1; the chain is still verified
    conn = http.client.HTTPSConnection("127.0.0.1", hook.port, timeout=10, context=context)
    conn.request("POST", "/mutate", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    version = conn.sock.version()  # type: ignore[union-attr]
    answer = json.loads(resp.read())
    conn.close()
    return resp.status, answer, version


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_a_jsonpatch_that_injects_the_sidecar(webhook: Webhook) -> None:
    body = json.dumps(review())
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail-with-body",
         "--cacert", str(webhook.ca), "--resolve", f"{HOST}:{webhook.port}:127.0.0.1",
         "--tlsv1.2", "-H", "Content-Type: application/json", "--data-binary", "@-",
         f"https://{HOST}:{webhook.port}/mutate"],
        input=body.encode(), capture_output=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert response["uid"] == json.loads(body)["request"]["uid"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    pod = apply_patch(json.loads(body)["request"]["object"],
                      json.loads(base64.b64decode(response["patch"])))
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == "meshshield-proxy" and sidecar["restartPolicy"] == "Always"


def test_aiohttp_client_sees_a_denial_naming_the_annotation(webhook: Webhook) -> None:
    status, answer = asyncio.run(
        post(webhook, json.dumps(review(**{"meshshield.io/inbound": "8080"})).encode()))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False
    assert "annotation meshshield.io/inbound: expected" in response["status"]["message"]


def test_tls_1_2_clients_are_served(webhook: Webhook) -> None:
    body = json.dumps(review()).encode()
    status, answer, version = post_stdlib(webhook, body,
                                          maximum_version=ssl.TLSVersion.TLSv1_2)
    assert (status, version) == (200, "TLSv1.2")
    assert answer["response"]["allowed"] is True
    assert post_stdlib(webhook, body)[2] == "TLSv1.3"


def test_a_client_that_does_not_trust_the_ca_is_refused(webhook: Webhook) -> None:
    ctx = ssl.create_default_context()  # system roots only
    conn = http.client.HTTPSConnection("127.0.0.1", webhook.port, timeout=5, context=ctx)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/healthz")


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", json.dumps({"apiVersion": "v1", "kind": "Pod"}).encode(),
     json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                 "request": {"kind": {"kind": "Pod"}}}).encode()],
)
def test_malformed_review_is_400_with_error_json(webhook: Webhook, body: bytes) -> None:
    status, answer = asyncio.run(post(webhook, body))
    assert status == 400
    assert answer["error"]["code"] == "bad_request"
    assert "malformed AdmissionReview" in answer["error"]["message"]


def test_body_over_1_mib_is_refused(webhook: Webhook) -> None:
    big = review()
    big["request"]["object"]["metadata"]["annotations"]["padding"] = "x" * (1 << 20)
    status, answer = asyncio.run(post(webhook, json.dumps(big).encode()))
    assert status == 413
    assert answer["error"]["code"] == "body_too_large"


def test_healthz_and_metrics(webhook: Webhook) -> None:
    asyncio.run(post(webhook, json.dumps(review()).encode()))

    async def get(path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{webhook.port}{path}",
                                   ssl=webhook.client_context(), server_hostname=HOST) as resp:
                return resp.status, await resp.text()

    status, text = asyncio.run(get("/healthz"))
    assert status == 200 and json.loads(text) == {"status": "ok"}
    status, text = asyncio.run(get("/metrics"))
    assert status == 200
    injected = [line for line in text.splitlines()
                if line.startswith('meshshield_webhook_reviews_total{result="injected"}')]
    assert injected and float(injected[0].split()[-1]) >= 1.0
    assert "meshshield_webhook_review_seconds_count" in text


def test_sigterm_stops_the_webhook_cleanly(tmp_path: Path) -> None:
    ca = make_certs(tmp_path)
    port = free_port()
    hook = Webhook(start_webhook(tmp_path, port), port, ca, tmp_path)
    wait_ready(hook)
    hook.process.send_signal(signal.SIGTERM)
    assert hook.process.wait(timeout=10) == 0


def test_unusable_certificate_exits_1_without_a_traceback(tmp_path: Path) -> None:
    make_certs(tmp_path)
    (tmp_path / "broken.crt").write_text("not a certificate\n")
    process = start_webhook(tmp_path, free_port(), cert="broken.crt")
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert b"meshshield webhook: cannot serve" in err
    assert b"Traceback" not in err


def test_renewed_certificate_is_served_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshshield.kube import webhook as webhook_module

    monkeypatch.setattr(webhook_module, "CERT_RELOAD_SECONDS", 0.05)
    old_ca = make_certs(tmp_path)
    renewed = tmp_path / "renewed"
    new_ca = make_certs(renewed)
    port = free_port()

    async def healthz(ca: Path) -> bool:
        ctx = ssl.create_default_context(cafile=str(ca))
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=ctx,
                                       server_hostname=HOST) as resp:
                    return resp.status == 200
        except aiohttp.ClientConnectorCertificateError:
            return False

    async def scenario() -> None:
        started, stop = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(webhook_module.serve_webhook(
            f"127.0.0.1:{port}", str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"),
            started=started, stop=stop))
        await asyncio.wait_for(started.wait(), 10)
        try:
            assert await healthz(old_ca)
            assert not await healthz(new_ca)
            # Key first, then certificate: for a moment the pair does not match, and the
            # webhook must keep serving the old one until it does.
            (renewed / "tls.key").replace(tmp_path / "tls.key")
            (renewed / "tls.crt").replace(tmp_path / "tls.crt")
            deadline = time.monotonic() + 10
            while not await healthz(new_ca):
                assert time.monotonic() < deadline, "renewed certificate never served"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await server

    asyncio.run(scenario())
