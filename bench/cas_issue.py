"""CAS issuance throughput: attestations with issuance per second from one CAS process.

    .venv/bin/python bench/cas_issue.py [--seconds 10] [--clients 32] [--runs 3]

Starts a real CAS subprocess on a random loopback port (the integration-test harness,
tests/harness.py), applies a sim policy, then runs --clients concurrent HTTPS clients
(asyncio + aiohttp, one keep-alive TLS connection each). Each client loops: POST
/v1/attest/nonce -> sim evidence over that nonce and its key -> POST /v1/attest with
the CSR. A round's latency is nonce request start to attest response end.

Printed: per run and the median of the runs, certificates/s, p50/p99 latency, errors,
the CAS process's CPU time (utime+stime from /proc/PID/stat) and CPU per certificate;
beside it `openssl speed -seconds 3 ecdsap256` sign/s measured in the same invocation,
and the ratio certs/s / ECDSA sign/s. The clients run on the same machine as the CAS
and take CPU from it: the CAS CPU columns show how much the CAS itself used.

Target (issue 2): >= 400 certificates/s from one CAS process on a 2-core machine.
Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import CasProcess  # noqa: E402

from meshshield.attestation.claims import expected_report_data  # noqa: E402
from meshshield.attestation.sim import load_sim_private_key, make_sim_evidence  # noqa: E402
from meshshield.attestclient import make_csr  # noqa: E402
from meshshield.pki.keys import generate_p256, spki_der  # noqa: E402

TARGET_CERTS_PER_S = 400.0
SESSION = "bench"
SERVICE = "backend"
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class ClientKey:
    spki: bytes
    csr: str


@dataclass
class RunStats:
    started: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


@dataclass
class RunResult:
    certs: int
    wall: float
    p50_ms: float
    p99_ms: float
    errors: int
    cas_cpu: float
    client_cpu: float
    machine_busy: float
    error_kinds: dict[str, int]

    @property
    def rate(self) -> float:
        return self.certs / self.wall if self.wall else 0.0

    @property
    def cas_cpu_ms_per_cert(self) -> float:
        return 1000 * self.cas_cpu / self.certs if self.certs else float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (psutil is not installed)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot, from the first line of /proc/stat."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


def openssl_ecdsa_p256(seconds: int) -> tuple[float, float] | None:
    """(sign/s, verify/s) from `openssl speed -seconds N ecdsap256`, or None."""
    try:
        out = subprocess.run(
            ["openssl", "speed", "-seconds", str(seconds), "ecdsap256"],
            capture_output=True, text=True, timeout=seconds * 4 + 30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", out)
    return (float(m.group(1)), float(m.group(2))) if m else None


async def client_loop(
    http: aiohttp.ClientSession,
    url: str,
    keys: list[ClientKey],
    offset: int,
    measurement: str,
    sim_key: Any,
    deadline: float,
    max_count: int,
    stats: RunStats,
) -> None:
    i = offset
    while time.monotonic() < deadline and stats.started < max_count:
        stats.started += 1
        k = keys[i % len(keys)]
        i += 1
        t0 = time.perf_counter()
        try:
            async with http.post(f"{url}/v1/attest/nonce", json={}) as r:
                if r.status != 200:
                    stats.error(f"nonce {r.status}")
                    continue
                nonce_b64 = (await r.json())["nonce"]
            report_data = expected_report_data(base64.b64decode(nonce_b64), k.spki)
            body = {
                "session": SESSION,
                "service": SERVICE,
                "platform": "sim",
                "csr": k.csr,
                "nonce": nonce_b64,
                "evidence": make_sim_evidence(sim_key, measurement, report_data),
            }
            async with http.post(f"{url}/v1/attest", json=body) as r:
                await r.read()
                if r.status != 200:
                    stats.error(f"attest {r.status}")
                    continue
            stats.latencies.append(time.perf_counter() - t0)
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as e:
            stats.error(type(e).__name__)


async def one_run(
    cas: CasProcess, keys: list[ClientKey], clients: int, seconds: float, max_count: int
) -> RunResult:
    assert cas.proc is not None
    ctx = ssl.create_default_context(cafile=str(cas.bundle))
    measurement = cas.measurement()
    sim_key = load_sim_private_key(cas.sim_dir / "sim-platform.key")
    stats = RunStats()
    connector = aiohttp.TCPConnector(ssl=ctx, limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        # Open the keep-alive connections before the clock starts.
        async def warm() -> None:
            async with http.get(f"{cas.url}/v1/health") as r:
                await r.read()

        await asyncio.gather(*(warm() for _ in range(clients)))
        cas_cpu0, client_cpu0 = cpu_seconds(cas.proc.pid), time.process_time()
        busy0 = machine_busy_seconds()
        start = time.monotonic()
        await asyncio.gather(
            *(
                client_loop(http, cas.url, keys, n * 7, measurement, sim_key,
                            start + seconds, max_count, stats)
                for n in range(clients)
            )
        )
        wall = time.monotonic() - start
        cas_cpu = cpu_seconds(cas.proc.pid) - cas_cpu0
        client_cpu = time.process_time() - client_cpu0
        busy = machine_busy_seconds() - busy0
    lat = stats.latencies
    return RunResult(
        certs=len(lat),
        wall=wall,
        p50_ms=1000 * percentile(lat, 0.50),
        p99_ms=1000 * percentile(lat, 0.99),
        errors=stats.errors,
        cas_cpu=cas_cpu,
        client_cpu=client_cpu,
        machine_busy=busy,
        error_kinds=stats.error_kinds,
    )


def make_keys(n: int) -> list[ClientKey]:
    out = []
    for _ in range(n):
        key = generate_p256()
        out.append(ClientKey(spki_der(key.public_key()), make_csr(key, SERVICE)))
    return out


def row(label: str, r: RunResult) -> str:
    return (
        f"{label:>7} {r.certs:>8} {r.wall:>7.2f} {r.rate:>9.1f} {r.p50_ms:>8.1f} "
        f"{r.p99_ms:>8.1f} {r.errors:>6} {r.cas_cpu:>8.2f} {100 * r.cas_cpu / r.wall:>6.0f}% "
        f"{r.cas_cpu_ms_per_cert:>8.2f} {r.client_cpu:>8.2f} "
        f"{max(0.0, r.machine_busy - r.cas_cpu - r.client_cpu):>9.2f}"
    )


def median_result(results: list[RunResult]) -> RunResult:
    def med(f: Any) -> Any:
        return statistics.median(f(r) for r in results)

    return RunResult(
        certs=int(med(lambda r: r.certs)),
        wall=med(lambda r: r.wall),
        p50_ms=med(lambda r: r.p50_ms),
        p99_ms=med(lambda r: r.p99_ms),
        errors=int(med(lambda r: r.errors)),
        cas_cpu=med(lambda r: r.cas_cpu),
        client_cpu=med(lambda r: r.client_cpu),
        machine_busy=med(lambda r: r.machine_busy),
        error_kinds={},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each run")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTPS clients")
    p.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    p.add_argument("--max-attestations", type=int, default=50_000,
                   help="upper bound on attestations per run")
    p.add_argument("--key-pool", type=int, default=256,
                   help="pre-generated client keys+CSRs, reused round-robin (0: a fresh "
                        "key and CSR per attestation, made before the run)")
    p.add_argument("--openssl-seconds", type=int, default=3)
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 1024 or args.runs < 1 or args.seconds <= 0:
        p.error("--clients 1..1024, --runs >= 1, --seconds > 0")

    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"

    print(f"meshshield CAS issuance benchmark: {args.clients} HTTPS clients, "
          f"{args.runs} x {args.seconds:g} s, {os.cpu_count()} CPUs, client loop {loop_name}")
    speed = openssl_ecdsa_p256(args.openssl_seconds)

    with tempfile.TemporaryDirectory(prefix="cas-bench-") as tmp:
        cas = CasProcess.start(Path(tmp) / "cas")
        try:
            r = cas.apply_policy(cas.sim_policy(SESSION))
            if r.returncode != 0:
                print(f"policy apply failed: {r.stderr}", file=sys.stderr)
                return 1
            n_keys = args.key_pool or min(args.max_attestations, 20_000)
            t0 = time.monotonic()
            keys = make_keys(n_keys)
            print(f"client keys: {n_keys} P-256 keys and CSRs made before the runs in "
                  f"{time.monotonic() - t0:.1f} s"
                  + (", reused round-robin so key generation stays off the clients' hot "
                     "path (the CAS issues per CSR and does not care)" if args.key_pool
                     else ", one per attestation"))
            print("per round on the client: nonce request, SHA-512 report_data, sim "
                  "evidence (one ECDSA sign), attest request")
            results = []
            for i in range(args.runs):
                results.append(asyncio.run(
                    one_run(cas, keys, args.clients, args.seconds, args.max_attestations)
                ))
                if results[-1].error_kinds:
                    print(f"run {i + 1} errors: {results[-1].error_kinds}")
        finally:
            cas.stop()

    print()
    print(f"{'run':>7} {'certs':>8} {'wall s':>7} {'certs/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>6} {'CAS cpu':>8} {'CAS %':>7} {'ms/cert':>8} {'cli cpu':>8} "
          f"{'other cpu':>9}")
    for i, res in enumerate(results):
        print(row(str(i + 1), res))
    med = median_result(results)
    if len(results) > 1:
        print(row("median", med))
    print()
    rate = statistics.median(r.rate for r in results)
    if speed:
        sign, verify = speed
        print(f"openssl speed ecdsap256 ({args.openssl_seconds} s): {sign:,.0f} sign/s, "
              f"{verify:,.0f} verify/s (one core)")
        print(f"certs/s / ecdsa sign/s = {rate:,.1f} / {sign:,.0f} = {rate / sign:.4f}")
    else:
        print("openssl speed ecdsap256: unavailable")
    ms_per_cert = statistics.median(r.cas_cpu_ms_per_cert for r in results)
    print(f"CAS CPU per certificate {ms_per_cert:.2f} ms: with a core to itself one CAS "
          f"process could issue about {1000 / ms_per_cert:,.0f} certificates/s")
    verdict = "met" if rate >= TARGET_CERTS_PER_S else "NOT met"
    print(f"target >= {TARGET_CERTS_PER_S:.0f} certificates/s from one CAS process: {verdict} "
          f"(median {rate:,.1f}/s)")
    print("CAS % = CAS process CPU time / wall time (100% = one core). The clients share "
          "the machine: 'cli cpu' = CPU seconds of the client process, 'other cpu' = CPU "
          "seconds of everything else on the machine during the run (from /proc/stat)")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
