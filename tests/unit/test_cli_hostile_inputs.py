"""Hostile input to the command line and the dev tools: every one a clear error at once.

One table of real `python -m meshshield.cli` subprocesses: endless and special files
(/dev/zero, a FIFO), YAML bombs and deep nesting, a hostile `status` server (terminal
escapes, endless bodies, non-JSON, deep JSON, a server that dribbles), symlinks planted
in `.meshshield-dev/`, and flag values (nan, inf, negative, out of range, bad names).
Each row asserts the exit code (SPEC §2: 2 usage error, 1 refused or invalid), a message
naming the problem, no traceback, and no raw control character on the terminal.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "meshshield.cli"]
TIMEOUT = 40


@dataclass(frozen=True)
class Case:
    """argv built in a temp folder (and the hostile server's URL); what must come out."""

    id: str
    argv: Callable[[Path, str], list[str]]
    rc: int
    says: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    after: Callable[[Path], None] | None = None


# -- hostile files -------------------------------------------------------------------------

BILLION_LAUGHS = """apiVersion: v1
kind: Pod
metadata:
  name: lol
  annotations: {meshshield.io/inject: "true"}
  labels:
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
spec:
  containers: [{name: app, image: app}]
"""


def _write(name: str, text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).write_text(text)
    return setup


def _fifo(tmp: Path) -> None:
    os.mkfifo(tmp / "fifo")


def _devproj(tmp: Path) -> Path:
    """A minimal valid dev file; its state folder is tmp/.meshshield-dev."""
    (tmp / "svc").mkdir(exist_ok=True)
    (tmp / "svc" / "app.py").write_text("print('hi')\n")
    (tmp / "mesh.dev.yaml").write_text(
        "session: shop\nservices:\n  - name: a\n    workload: svc/\n    port: 18080\n")
    (tmp / "outside").mkdir(exist_ok=True)
    (tmp / "outside" / "victim").write_text("precious\n")
    return tmp / ".meshshield-dev"


def _planted(relative: str, *, to_dir: bool = False) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        state = _devproj(tmp)
        link = state / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(tmp / "outside" if to_dir else tmp / "outside" / "victim")
    return setup


def _state_is_link(tmp: Path) -> None:
    _devproj(tmp)
    (tmp / ".meshshield-dev").symlink_to(tmp / "outside")


def _victim_untouched(tmp: Path) -> None:
    assert (tmp / "outside" / "victim").read_text() == "precious\n"
    assert sorted(p.name for p in (tmp / "outside").iterdir()) == ["victim"]


def _state_world_writable(tmp: Path) -> None:
    state = _devproj(tmp)
    state.mkdir()
    state.chmod(0o777)


def _sidecar(*extra: str) -> Callable[[Path, str], list[str]]:
    def argv(tmp: Path, _url: str) -> list[str]:
        (tmp / "bundle.pem").write_text("not used\n")
        return ["sidecar", "--cas", "https://127.0.0.1:1", "--cas-bundle",
                str(tmp / "bundle.pem"), "--session", "shop", "--service", "a",
                "--platform", "sim", "--inbound", "127.0.0.1:0=127.0.0.1:1", *extra]
    return argv


def _cas_serve(*extra: str) -> Callable[[Path, str], list[str]]:
    return lambda tmp, _url: ["cas", "serve", "--data", str(tmp / "data"),
                              "--kek-file", str(tmp / "kek"), "--listen", "127.0.0.1:0",
                              *extra]


def _nothing_created(tmp: Path) -> None:
    assert not (tmp / "data").exists() and not (tmp / "kek").exists(), \
        "a refused flag still created CAS state"


def _status(path: str, *extra: str) -> Callable[[Path, str], list[str]]:
    return lambda _tmp, url: ["status", "--sidecar", url + path, *extra]


CASES = [
    # files without end, special files
    Case("policy-validate-dev-zero", lambda t, u: ["policy", "validate", "/dev/zero"], 2,
         ("/dev/zero", "not a regular file")),
    Case("policy-validate-fifo", lambda t, u: ["policy", "validate", str(t / "fifo")], 2,
         ("fifo", "not a regular file"), setup=_fifo),
    Case("policy-validate-directory", lambda t, u: ["policy", "validate", str(t)], 2,
         ("not a regular file",)),
    Case("dev-up-dev-zero", lambda t, u: ["dev", "up", "-f", "/dev/zero"], 2,
         ("/dev/zero", "not a regular file")),
    Case("dev-up-too-large", lambda t, u: ["dev", "up", "-f", str(t / "big.yaml")], 2,
         ("big.yaml", "limit"), setup=_write("big.yaml", "#" * (2 << 20))),
    Case("sidecar-config-dev-zero", _sidecar("--config", "/dev/zero"), 2,
         ("--config", "/dev/zero", "not a regular file")),
    Case("sidecar-config-too-large", lambda t, u: ["sidecar", "--config", str(t / "c.yaml")],
         2, ("--config", "limit"), setup=_write("c.yaml", "#" * (2 << 20))),
    Case("sidecar-config-alias", lambda t, u: ["sidecar", "--config", str(t / "c.yaml")], 2,
         ("--config", "alias"), setup=_write("c.yaml", "a: &x [1]\nb: *x\n")),
    Case("inject-dev-zero", lambda t, u: ["inject", "-f", "/dev/zero"], 2,
         ("/dev/zero", "not a regular file")),
    Case("inject-billion-laughs", lambda t, u: ["inject", "-f", str(t / "lol.yaml")], 1,
         ("lol.yaml", "alias"), setup=_write("lol.yaml", BILLION_LAUGHS)),
    Case("inject-deep-nesting", lambda t, u: ["inject", "-f", str(t / "deep.yaml")], 1,
         ("deep.yaml", "nested deeper"),
         setup=_write("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")),
    Case("inject-deep-block-nesting", lambda t, u: ["inject", "-f", str(t / "deep.yaml")], 1,
         ("nested deeper",),
         setup=_write("deep.yaml", "".join("  " * i + f"k{i}:\n" for i in range(300))
                      + "  " * 300 + "v\n")),
    Case("evidence-verify-dev-zero",
         lambda t, u: ["evidence", "verify", "/dev/zero", "--platform", "tdx"], 2,
         ("/dev/zero", "not a regular file")),
    Case("evidence-verify-certs-dev-zero",
         lambda t, u: ["evidence", "verify", str(t / "e.bin"), "--platform", "sev-snp",
                       "--certs", "/dev/zero"], 2, ("--certs", "not a regular file"),
         setup=_write("e.bin", "x")),
    Case("admin-key-dev-zero",
         lambda t, u: ["policy", "get", "shop", "--cas", "https://127.0.0.1:1",
                       "--cas-bundle", str(t / "b.pem"), "--admin-key", "/dev/zero"], 2,
         ("/dev/zero", "not a regular file"), setup=_write("b.pem", "x")),
    Case("cas-bundle-dev-zero",
         lambda t, u: ["attest", "--cas", "https://127.0.0.1:1", "--cas-bundle", "/dev/zero",
                       "--session", "s", "--service", "a", "--platform", "sim", "--out",
                       str(t / "o")], 2, ("--cas-bundle", "not a regular file")),
    Case("log-level-bogus", lambda t, u: ["--log-level", "loud", "measure", str(t)], 2,
         ("--log-level",)),
    # dev up's state folder
    Case("dev-up-symlinked-policy-file",
         lambda t, u: ["dev", "up", "-f", str(t / "mesh.dev.yaml")], 1,
         ("shop.policy.yaml", "symbolic link"), setup=_planted("shop.policy.yaml"),
         after=_victim_untouched),
    Case("dev-up-symlinked-log",
         lambda t, u: ["dev", "up", "-f", str(t / "mesh.dev.yaml")], 1,
         ("cas.log", "symbolic link"), setup=_planted("logs/cas.log"),
         after=_victim_untouched),
    Case("dev-up-symlinked-cas-data",
         lambda t, u: ["dev", "up", "-f", str(t / "mesh.dev.yaml")], 1,
         ("cas-data", "symbolic link"), setup=_planted("cas-data", to_dir=True),
         after=_victim_untouched),
    Case("dev-up-state-folder-is-a-symlink",
         lambda t, u: ["dev", "up", "-f", str(t / "mesh.dev.yaml")], 1,
         (".meshshield-dev", "symbolic link"), setup=_state_is_link,
         after=_victim_untouched),
    Case("dev-up-state-folder-world-writable",
         lambda t, u: ["dev", "up", "-f", str(t / "mesh.dev.yaml")], 1,
         (".meshshield-dev", "writable by others"), setup=_state_world_writable),
    # flags: numbers, durations, names
    Case("cas-nonce-ttl-nan", _cas_serve("--nonce-ttl", "nan"), 2,
         ("--nonce-ttl", "nan"), after=_nothing_created),
    Case("cas-nonce-ttl-inf", _cas_serve("--nonce-ttl", "inf"), 2, ("--nonce-ttl",),
         after=_nothing_created),
    Case("cas-nonce-ttl-zero", _cas_serve("--nonce-ttl", "0s"), 2, ("--nonce-ttl",),
         after=_nothing_created),
    Case("cas-nonce-ttl-huge", _cas_serve("--nonce-ttl", "99999999d"), 2, ("--nonce-ttl",),
         after=_nothing_created),
    Case("cas-max-cert-ttl-negative", _cas_serve("--max-cert-ttl", "-60"), 2,
         ("--max-cert-ttl", "-60"), after=_nothing_created),
    Case("cas-trust-domain-upper-case", _cas_serve("--trust-domain", "UPPER.case"), 2,
         ("--trust-domain", "UPPER.case"), after=_nothing_created),
    Case("cas-dns-bad-name", _cas_serve("--dns", "bad name!"), 2, ("--dns",),
         after=_nothing_created),
    Case("cas-listen-bad-port", _cas_serve("--listen", "127.0.0.1:99999"), 2, ("--listen",),
         after=_nothing_created),
    Case("cas-collateral-missing", _cas_serve("--collateral", "/nonexistent"), 2,
         ("--collateral",), after=_nothing_created),
    Case("cas-expect-missing", _cas_serve("--expect", "/nonexistent.yaml"), 2,
         ("/nonexistent.yaml",), after=_nothing_created),
    Case("cas-expect-bad", _cas_serve("--expect", "e.yaml"), 2, ("tee",),
         setup=_write("e.yaml", "tee: 7\n"), after=_nothing_created),
    Case("cas-peer-without-expect",
         lambda t, u: ["cas", "serve", "--data", str(t / "data"), "--platform", "sim",
                       "--sim-key", "x", "--workload", "x", "--peer", "https://127.0.0.1:1"],
         2, ("--peer needs --expect",), after=_nothing_created),
    Case("cas-peer-not-https",
         lambda t, u: ["cas", "serve", "--data", str(t / "data"), "--platform", "sim",
                       "--sim-key", "x", "--workload", "x", "--expect", "e.yaml",
                       "--peer", "http://127.0.0.1:1"],
         2, ("--peer must be an https:// URL",),
         setup=_write("e.yaml", "tee:\n  - {platform: sim, measurement: \"%s\"}\n"
                      "security: {attestation: {tolerate: [simulation]}}\n" % ("a" * 64)),
         after=_nothing_created),
    Case("cas-recovery-key-not-pem",
         lambda t, u: ["cas", "serve", "--data", str(t / "data"), "--platform", "sim",
                       "--sim-key", "x", "--workload", "x", "--recovery-key", "r.pem"],
         2, ("not a PEM public key",), setup=_write("r.pem", "garbage\n"),
         after=_nothing_created),
    Case("cas-recover-private-not-pem",
         lambda t, u: ["cas", "recover", "--data", str(t / "data"), "--platform", "sim",
                       "--sim-key", "x", "--workload", "x", "--recovery-key-private", "r.key"],
         2, ("not an unencrypted PEM private key",), setup=_write("r.key", "garbage\n"),
         after=_nothing_created),
    Case("cas-rotate-activate-after-nan",
         lambda t, u: ["cas", "rotate-ca", "--cas", "https://127.0.0.1:1", "--cas-bundle",
                       "/dev/null", "--admin-key", str(t), "--activate-after", "nan"], 2,
         ("--activate-after",)),
    Case("sidecar-handshake-timeout-nan", _sidecar("--handshake-timeout", "nan"), 2,
         ("handshake", "nan")),
    Case("sidecar-drain-timeout-negative", _sidecar("--drain-timeout", "-5s"), 2,
         ("drain",)),
    Case("sidecar-max-connections-zero", _sidecar("--max-connections", "0"), 2,
         ("max", "connections")),
    Case("sidecar-max-connections-not-a-number", _sidecar("--max-connections", "lots"), 2,
         ("--max-connections",)),
    Case("sidecar-config-timeout-nan",
         lambda t, u: [*_sidecar()(t, u), "--config", str(t / "c.yaml")], 2,
         ("connect_timeout",),
         setup=_write("c.yaml", "connect_timeout: .nan\n")),
    Case("status-interval-nan", _status("/escapes", "--watch", "--interval", "nan"), 2,
         ("--interval",)),
    Case("status-timeout-negative", _status("/escapes", "--timeout", "-1"), 2,
         ("--timeout",)),
    Case("webhook-certs-days-negative",
         lambda t, u: ["webhook", "certs", "--out", str(t / "c"), "--days", "-5"], 2,
         ("days",)),
    # a hostile sidecar admin URL
    Case("status-file-url", lambda t, u: ["status", "--sidecar", "file:///etc/passwd"], 2,
         ("--sidecar", "http")),
    Case("status-not-json", _status("/notjson"), 1, ("not JSON",)),
    Case("status-json-list", _status("/list"), 1, ("expected a JSON object",)),
    Case("status-deep-json", _status("/deep"), 1, ("not JSON",)),
    Case("status-endless-body", _status("/endless"), 1, ("limit",)),
    Case("status-dribble", _status("/dribble", "--timeout", "2s"), 1, ("timed out",)),
    Case("status-http-error-with-escapes", _status("/error"), 1, ("HTTP 500",)),
]

ESCAPE = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\r\x08"


class _Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _send(self, body: bytes, status: int = 200, length: bool = True) -> None:
        self.send_response(status, "Oops" + ESCAPE if status != 200 else None)
        self.send_header("Content-Type", "application/json")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        kind = self.path.split("/")[1]
        endpoint = self.path.split("/", 2)[2]
        if kind == "escapes":
            import json

            if endpoint.startswith("status"):
                doc: object = {"session": ESCAPE, "service": "s", "ready": ESCAPE,
                               "identity": {"spiffe_id": "spiffe://x/" + ESCAPE,
                                            "serial": ESCAPE, "not_after": ESCAPE},
                               "cas": {"reachable": True}, "epoch": ESCAPE}
            else:
                doc = {"connections": [{"direction": ESCAPE, "peer_spiffe_id": ESCAPE,
                                        "platform": ESCAPE, "measurement": ESCAPE,
                                        "tcb_status": ESCAPE, "cert_not_after": ESCAPE,
                                        "tls_version": ESCAPE, "bytes_in": 1,
                                        "bytes_out": 2, "opened_at": ESCAPE}],
                       "refused": [{"at": ESCAPE, "direction": ESCAPE, "peer": ESCAPE,
                                    "reason": ESCAPE}]}
            self._send(json.dumps(doc).encode())
        elif kind == "notjson":
            self._send(b"<html>" + ESCAPE.encode() + b"</html>")
        elif kind == "list":
            self._send(b"[1, 2, 3]")
        elif kind == "deep":
            self._send(b"[" * 200_000 + b"]" * 200_000)
        elif kind == "endless":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b" " * 65536)
            except OSError:
                return
        elif kind == "dribble":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                return
        else:
            self._send(b'{"error": "' + ESCAPE.encode("unicode_escape") + b'"}', 500)


@pytest.fixture(scope="module")
def hostile_url() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=cwd, env=env, stdin=subprocess.DEVNULL)


def _no_control_characters(text: str) -> None:
    bad = sorted({c for c in text if not c.isprintable() and c not in "\n\t"})
    assert not bad, f"raw control characters reached the terminal: {bad!r}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input_is_a_clear_error_at_once(
        case: Case, tmp_path: Path, hostile_url: str) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    started = time.monotonic()
    r = _run(case.argv(tmp_path, hostile_url), tmp_path)
    took = time.monotonic() - started
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == case.rc, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    for fragment in case.says:
        assert fragment in r.stderr, f"{fragment!r} not in stderr: {r.stderr[-2000:]}"
    _no_control_characters(r.stdout + r.stderr)
    assert took < 30, f"took {took:.1f} s"
    if case.after is not None:
        case.after(tmp_path)


def test_status_escapes_what_a_hostile_sidecar_sends(tmp_path: Path, hostile_url: str) -> None:
    for extra in ((), ("--json",)):
        r = _run(["status", "--sidecar", hostile_url + "/escapes", *extra], tmp_path)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        _no_control_characters(r.stdout + r.stderr)
        assert "\\x1b" in r.stdout or "\\u001b" in r.stdout, r.stdout  # shown, escaped


def test_dev_up_does_not_adopt_an_admin_key_shipped_in_the_checkout(tmp_path: Path) -> None:
    """A key found in `.meshshield-dev/` (e.g. committed to the repository) is never the
    dev CAS's admin: dev up makes its own for the run and says so."""
    from meshshield.adminauth import write_admin_key

    state = _devproj(tmp_path)
    (tmp_path / "mesh.dev.yaml").write_text(
        f"session: shop\nservices:\n  - name: a\n    workload: svc/\n    port: {_free()}\n")
    write_admin_key(state / "admin")
    shipped = (state / "admin" / "admin.key").read_bytes()
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "admin.key").write_bytes(shipped)
    out = tmp_path / "devup.out"
    with out.open("w") as f:
        proc = subprocess.Popen([*CLI, "dev", "up", "-f", str(tmp_path / "mesh.dev.yaml")],
                                stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while "\nready\n" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        text = out.read_text()
        assert (state / "admin" / "admin.key").read_bytes() != shipped
        assert "did not make" in text, text
        url = next(x.split()[1] for x in text.splitlines() if x.startswith("CAS https://"))
        bundle = state / "cas-data" / "bundle.pem"
        mine = _run(["status", "--cas", url, "--cas-bundle", str(bundle),
                     "--admin-key", str(state / "admin")], tmp_path)
        assert mine.returncode == 0, mine.stderr
        theirs = _run(["status", "--cas", url, "--cas-bundle", str(bundle),
                       "--admin-key", str(tmp_path / "shipped")], tmp_path)
        assert theirs.returncode == 1, (theirs.stdout, theirs.stderr)
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in out.read_text()


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
