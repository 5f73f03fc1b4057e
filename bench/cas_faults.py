"""CAS under faults (issue 9, items 13 and 14): what strangers' connections cost it, and
how long one change holds up everyone else.

    .venv/bin/python bench/cas_faults.py flood [--tls 2000] [--tcp 3000] [--fd-limit 0]
    .venv/bin/python bench/cas_faults.py stall [--sessions 100 400] [--big 7000]

flood: starts a CAS (tests/harness.py), holds --tls idle TLS connections (handshake
done, no request) and --tcp idle TCP connections (no handshake), then makes 20
legitimate requests (health and nonce, a new TLS connection each, 5 s timeout).
Prints: legitimate requests served, CAS RSS before the flood, while it is held, and
12 s later (still held), and the CAS's open descriptors. --fd-limit N starts the CAS
with that soft RLIMIT_NOFILE (0: inherited).

stall: for each --sessions count, creates that many small sessions, then times 10
small policy updates (client-side PUT latency) while a thread probes /v1/health, and
prints the median PUT time and the worst probe latency; then applies one --big-service
policy for another tenant and prints how long health/nonce probes waited meanwhile, and
what the next small change costs. Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import CasProcess  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def legit(cas: CasProcess, n: int = 20) -> int:
    ok = 0
    for i in range(n):
        with contextlib.suppress(OSError):
            r = cas.get("/v1/health", timeout=5) if i % 2 else cas.post_json(
                "/v1/attest/nonce", {}, timeout=5)
            ok += r.status == 200
    return ok


def flood(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with tempfile.TemporaryDirectory() as tmp:
        if args.fd_limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.fd_limit, hard))
        cas = CasProcess.start(Path(tmp))
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        assert cas.proc is not None
        pid = cas.proc.pid
        host, port = cas.url.removeprefix("https://").rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=str(cas.bundle))
        held: list[socket.socket] = []
        try:
            before = rss_mib(pid)
            for _ in range(args.tls):
                with contextlib.suppress(OSError):
                    raw = socket.create_connection((host, int(port)), timeout=5)
                    held.append(raw)
                    held[-1] = ctx.wrap_socket(raw, server_hostname=host)
            for _ in range(args.tcp):
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection((host, int(port)), timeout=5))
            time.sleep(0.5)
            during, fd_during = rss_mib(pid), fds(pid)
            served = legit(cas)
            time.sleep(12)
            later, fd_later = rss_mib(pid), fds(pid)
            served_later = legit(cas)
        finally:
            for s in held:
                s.close()
            cas.stop()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(f"flood: {args.tls} idle TLS + {args.tcp} idle TCP (CAS fd limit "
          f"{args.fd_limit or soft}); held {len(held)}")
    print(f"  legitimate served: {served}/20 at once, {served_later}/20 12 s later")
    print(f"  CAS RSS MiB: before {before:.0f}, held {during:.0f}, 12 s later {later:.0f}")
    print(f"  CAS open fds: held {fd_during}, 12 s later {fd_later}")


def big_policy(name: str, n: int) -> bytes:
    m = "ab" * 32
    lines = [f"name: {name}", 'version: "1"', "predecessor: null", "services:"]
    lines += [f'  - name: s{i}\n    tee: [{{platform: sim, measurement: "{m}"}}]\n'
              "    allow_from: []" for i in range(n)]
    lines.append("security:\n  attestation:\n    tolerate: [simulation]\n")
    return "\n".join(lines).encode()


def put_small(cas: CasProcess, name: str, v: int) -> float:
    cur = cas.request("GET", f"/v1/sessions/{name}", admin=True)
    etag = cur.headers["ETag"].strip('"')
    body = cas.sim_policy(name, extra=f"# v{v}\n").replace(
        "predecessor: null", f"predecessor: {etag}")
    t = time.monotonic()
    r = cas.request("PUT", f"/v1/sessions/{name}", body.encode(), admin=True, timeout=120)
    assert r.status == 200, r.body
    return time.monotonic() - t


class Prober:
    def __init__(self, cas: CasProcess) -> None:
        self.cas, self.stop = cas, threading.Event()
        self.lat: list[float] = []
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            t = time.monotonic()
            (self.cas.get("/v1/health") if i % 2 else
             self.cas.post_json("/v1/attest/nonce", {}))
            self.lat.append(time.monotonic() - t)
            i += 1

    def done(self) -> float:
        self.stop.set()
        self.t.join()
        return max(self.lat)


def stall(args: argparse.Namespace) -> None:
    for n in args.sessions:
        with tempfile.TemporaryDirectory() as tmp:
            cas = CasProcess.start(Path(tmp))
            try:
                for i in range(n):
                    cas.request("POST", "/v1/sessions", cas.sim_policy(f"t{i}").encode(),
                                admin=True)
                p = Prober(cas)
                puts = [put_small(cas, f"t{i}", 2) for i in range(10)]
                worst = p.done()
                med = statistics.median(puts) * 1000
                print(f"stall: {n} sessions: small change median {med:.0f} ms; worst "
                      f"concurrent health/nonce {worst * 1000:.0f} ms")
                p = Prober(cas)
                t = time.monotonic()
                cas.request("POST", "/v1/sessions", big_policy("big", args.big), admin=True,
                            timeout=300)
                applied = time.monotonic() - t
                worst = p.done()
                later = statistics.median(put_small(cas, f"t{i}", 3) for i in range(5))
                print(f"  {args.big}-service policy applied in {applied * 1000:.0f} ms; worst "
                      f"concurrent health/nonce {worst * 1000:.0f} ms; next small change "
                      f"{later * 1000:.0f} ms")
            finally:
                cas.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("flood")
    f.add_argument("--tls", type=int, default=2000)
    f.add_argument("--tcp", type=int, default=3000)
    f.add_argument("--fd-limit", type=int, default=0)
    s = sub.add_parser("stall")
    s.add_argument("--sessions", type=int, nargs="+", default=[100, 400])
    s.add_argument("--big", type=int, default=7000)
    args = ap.parse_args()
    flood(args) if args.what == "flood" else stall(args)


if __name__ == "__main__":
    main()
