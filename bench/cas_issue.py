"""CAS issuance throughput, side by side: SQLite with one replica, PostgreSQL with one,
PostgreSQL with three.

    .venv/bin/python bench/cas_issue.py [--seconds 10] [--rounds 3] [--clients 48]
                                        [--client-procs 2] [--configs sqlite-1,pg-1,pg-3]
    .venv/bin/python bench/cas_issue.py --quick      # 3 short rounds: does it run?

Starts everything itself, on loopback: a PostgreSQL server of its own (tests/pgserver.py:
initdb into a temporary folder, stopped by its pid afterwards), then each configuration's
CAS processes (tests/harness.py), all kept running for the whole bench: `sqlite-1` one
CAS on its SQLite file; `pg-1` one CAS on a PostgreSQL database; `pg-3` three CAS
replicas on another database, sharing its CA, KEK and admin key. A sim policy is applied
to each. The rounds are interleaved (round 1 of every configuration, then round 2, ...),
so a noisy neighbour hits all of them alike; the medians of the rounds are compared.
Each configuration first serves one unmeasured round of at most 1 s (warm pools).

Clients: --client-procs processes (asyncio, each with its own pre-made P-256 keys and
CSRs), --clients concurrent HTTPS clients in all, each with one keep-alive HTTP/1.1 TLS
connection (a minimal client, `Http`) to one replica (spread round-robin over a
configuration's replicas, as
sidecars are by a Service). Each client loops: POST /v1/attest/nonce -> sim evidence
over that nonce and its key -> POST /v1/attest with the CSR. A round's latency is nonce
request start to attest response end; all client processes start on one instant.

Printed per round and as medians per configuration: certificates/s, p50/p99 latency,
errors, the CAS's CPU (utime+stime from /proc/PID/stat of every replica, summed) and per
certificate, the clients' CPU (all client processes), PostgreSQL's CPU (its postmaster
and every backend) and everything else on the machine (from /proc/stat); then
`openssl speed ecdsap256` sign/s measured in the same invocation with each
configuration's ratio certs/s / sign/s, the ratio pg-3 / sqlite-1 (target >= 1.3) and
each configuration against the floor of 400 certificates/s.

Durability is alike for the engines: SQLite runs in WAL mode with synchronous=NORMAL (no
fsync per commit), the bench's PostgreSQL with the tests' settings (fsync=off,
synchronous_commit=off). Everything shares the machine: the CAS columns show what the
CAS itself used. Not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import CasProcess  # noqa: E402
from pgserver import PgServer  # noqa: E402

from meshshield.attestation.claims import expected_report_data  # noqa: E402
from meshshield.attestation.sim import load_sim_private_key, make_sim_evidence  # noqa: E402
from meshshield.attestclient import make_csr  # noqa: E402
from meshshield.pki.keys import generate_p256, spki_der  # noqa: E402

FLOOR_CERTS_PER_S = 400.0
TARGET_PG3_OVER_SQLITE1 = 1.3
CONFIGS = {"sqlite-1": ("sqlite", 1), "pg-1": ("postgresql", 1), "pg-3": ("postgresql", 3)}
SESSION = "bench"
SERVICE = "backend"
REQUEST_TIMEOUT = 30.0
MAX_RESPONSE = 1 << 20  # bytes a response head may take
START_DELAY = 0.5  # from the command to the clients' common start instant


class BenchError(Exception):
    """The bench cannot run (no PostgreSQL, a CAS that did not start)."""


def _no_postgres(why: str) -> None:
    raise BenchError(f"cannot start PostgreSQL for the bench: {why}")


# -- /proc ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (psutil is not installed)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU of a process and its live children (PostgreSQL's postmaster and backends)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(entry.name) == root_pid or int(fields[1]) == root_pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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


# -- client processes -----------------------------------------------------------------


@dataclass(frozen=True)
class ClientKey:
    spki: bytes
    csr: str


@dataclass
class ClientStats:
    started: int = 0
    latencies: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def make_keys(n: int) -> list[ClientKey]:
    out = []
    for _ in range(n):
        key = generate_p256()
        out.append(ClientKey(spki_der(key.public_key()), make_csr(key, SERVICE)))
    return out


class Http:
    """One keep-alive HTTP/1.1 connection over TLS, as lean as a client can be (aiohttp's
    client cost about twice the CPU per request, which on a 2-core machine the CAS
    replicas then lack): requests with a Content-Length, responses read by theirs."""

    def __init__(self, url: str, ctx: ssl.SSLContext) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 443
        self.ctx = ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ctx, limit=MAX_RESPONSE)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """(status, body); OSError, asyncio.IncompleteReadError or ValueError when the
        connection or the response is broken (the connection is then closed)."""
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode() + body)
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"),
                                          REQUEST_TIMEOUT)
            status = int(head[9:12])
            m = re.search(rb"\r\ncontent-length: *(\d{1,7})\r\n", head.lower())
            if m is None:
                raise ValueError(f"response without Content-Length: {head[:200]!r}")
            data = await asyncio.wait_for(self.reader.readexactly(int(m.group(1))),
                                          REQUEST_TIMEOUT)
            if b"\r\nconnection: close\r\n" in head.lower():
                self.close()
            return status, data
        except BaseException:
            self.close()
            raise


async def client_loop(
    http: Http, keys: list[ClientKey], offset: int, measurement: str, sim_key: Any,
    deadline: float, max_count: int, stats: ClientStats,
) -> None:
    i = offset
    while time.monotonic() < deadline and stats.started < max_count:
        stats.started += 1
        k = keys[i % len(keys)]
        i += 1
        t0 = time.perf_counter()
        try:
            status, data = await http.request("POST", "/v1/attest/nonce", b"{}")
            if status != 200:
                stats.error(f"nonce {status}")
                continue
            nonce_b64 = json.loads(data)["nonce"]
            report_data = expected_report_data(base64.b64decode(nonce_b64), k.spki)
            body = {
                "session": SESSION, "service": SERVICE, "platform": "sim", "csr": k.csr,
                "nonce": nonce_b64,
                "evidence": make_sim_evidence(sim_key, measurement, report_data),
            }
            status, data = await http.request("POST", "/v1/attest", json.dumps(body).encode())
            if status != 200:
                stats.error(f"attest {status}")
                continue
            stats.latencies.append(time.perf_counter() - t0)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                KeyError, ValueError) as e:
            stats.error(type(e).__name__)


async def client_round(keys: list[ClientKey], job: dict[str, Any]) -> dict[str, Any]:
    """One round of this process's clients against `job["urls"]`, from `job["start"]`."""
    ctx = ssl.create_default_context(cafile=job["bundle"])
    sim_key = load_sim_private_key(Path(job["sim_key"]))
    stats = ClientStats()
    urls: list[str] = job["urls"]
    conns = [Http(urls[(job["first_client"] + n) % len(urls)], ctx)
             for n in range(job["clients"])]
    try:
        # Open the keep-alive connections before the clock starts.
        warm = await asyncio.gather(*(c.request("GET", "/v1/health") for c in conns))
        if any(status != 200 for status, _ in warm):
            raise BenchError(f"health checks answered {sorted({s for s, _ in warm})}")
        await asyncio.sleep(max(0.0, job["start"] - time.monotonic()))
        cpu0 = time.process_time()
        deadline = job["start"] + job["seconds"]
        await asyncio.gather(*(
            client_loop(c, keys, (job["first_client"] + n) * 7, job["measurement"], sim_key,
                        deadline, job["max_count"], stats)
            for n, c in enumerate(conns)))
        end = time.monotonic()
        cpu = time.process_time() - cpu0
    finally:
        for c in conns:
            c.close()
    return {"latencies": stats.latencies, "errors": stats.error_kinds, "cpu": cpu, "end": end}


def client_process(conn: multiprocessing.connection.Connection, n_keys: int) -> None:
    """A client process: makes its keys, then runs each round it is sent until None."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    keys = make_keys(n_keys)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        try:
            conn.send(asyncio.run(client_round(keys, job)))
        except Exception as e:  # noqa: BLE001 - report to the bench, which says so
            conn.send({"failed": f"{type(e).__name__}: {e}"})


class Clients:
    def __init__(self, procs: int, n_keys: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        for _ in range(procs):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=client_process, args=(theirs, n_keys), daemon=True)
            p.start()
            self.pipes.append(ours)
            self.procs.append(p)
        for pipe in self.pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise BenchError("a client process did not start")

    def run(self, job: dict[str, Any], clients: int) -> list[dict[str, Any]]:
        per = [clients // len(self.pipes) + (i < clients % len(self.pipes))
               for i in range(len(self.pipes))]
        first = 0
        for pipe, n in zip(self.pipes, per, strict=True):
            pipe.send({**job, "clients": n, "first_client": first})
            first += n
        out = []
        for pipe in self.pipes:
            if not pipe.poll(job["seconds"] + REQUEST_TIMEOUT + 60):
                raise BenchError("a client process did not answer")
            res = pipe.recv()
            if "failed" in res:
                raise BenchError(f"a client process failed: {res['failed']}")
            out.append(res)
        return out

    def close(self) -> None:
        for pipe, p in zip(self.pipes, self.procs, strict=True):
            try:
                pipe.send(None)
            except OSError:
                pass
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


# -- configurations -------------------------------------------------------------------


@dataclass
class Config:
    name: str
    replicas: list[CasProcess]

    @property
    def pids(self) -> list[int]:
        return [r.proc.pid for r in self.replicas if r.proc is not None]

    def stop(self) -> None:
        for r in self.replicas:
            r.stop()


def start_config(name: str, root: Path, pg: PgServer | None) -> Config:
    engine, n = CONFIGS[name]
    extra: tuple[str, ...] = ()
    if engine == "postgresql":
        assert pg is not None
        extra = ("--database", pg.create_database())
    first = CasProcess.start(root / name, *extra)
    replicas = [first]
    try:
        for i in range(1, n):
            # Same KEK (root/cas.kek), admin key, sim key and workload: one CAS, n processes.
            replica = CasProcess(first.root, first.root / f"data{i}", first.admin_dir,
                                 first.admin_fp, first.sim_dir, first.workload,
                                 extra_args=extra)
            replica.launch()
            replicas.append(replica)
        if len({r.ca_fingerprint for r in replicas}) != 1:
            raise BenchError(f"{name}: the replicas serve different CAs")
        applied = first.apply_policy(first.sim_policy(SESSION))
        if applied.returncode != 0:
            raise BenchError(f"{name}: policy apply failed: {applied.stderr}")
    except BaseException:
        for r in replicas:
            r.stop()
        raise
    return Config(name, replicas)


@dataclass
class RunResult:
    certs: int
    wall: float
    p50_ms: float
    p99_ms: float
    errors: int
    cas_cpu: float
    client_cpu: float
    db_cpu: float
    machine_busy: float
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.certs / self.wall if self.wall else 0.0

    @property
    def cas_ms_per_cert(self) -> float:
        return 1000 * self.cas_cpu / self.certs if self.certs else float("nan")

    @property
    def client_ms_per_cert(self) -> float:
        return 1000 * self.client_cpu / self.certs if self.certs else float("nan")

    @property
    def other_cpu(self) -> float:
        return max(0.0, self.machine_busy - self.cas_cpu - self.client_cpu - self.db_cpu)


def one_run(config: Config, clients: Clients, pg: PgServer | None, args: argparse.Namespace,
            ) -> RunResult:
    first = config.replicas[0]
    start = time.monotonic() + START_DELAY
    job = {"urls": [r.url for r in config.replicas], "bundle": str(first.bundle),
           "sim_key": str(first.sim_dir / "sim-platform.key"),
           "measurement": first.measurement(), "seconds": args.seconds,
           "max_count": args.max_attestations, "start": start}
    # Counters are read at the start instant; the clients warm up their connections before.
    pg_pid = pg.proc.pid if pg is not None and pg.proc is not None else None

    def sample() -> tuple[float, float, float]:
        return (sum(cpu_seconds(p) for p in config.pids),
                tree_cpu_seconds(pg_pid) if pg_pid else 0.0, machine_busy_seconds())

    at_start: list[tuple[float, float, float]] = []

    def sample_at_start() -> None:
        time.sleep(max(0.0, start - time.monotonic()))
        at_start.append(sample())

    sampler = threading.Thread(target=sample_at_start)
    sampler.start()
    results = clients.run(job, args.clients)
    end = max(r["end"] for r in results)
    cas1, db1, busy1 = sample()
    sampler.join()
    cas0, db0, busy0 = at_start[0]
    latencies = [x for r in results for x in r["latencies"]]
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            kinds[k] = kinds.get(k, 0) + v
    return RunResult(
        certs=len(latencies), wall=end - start,
        p50_ms=1000 * percentile(latencies, 0.50), p99_ms=1000 * percentile(latencies, 0.99),
        errors=sum(kinds.values()), cas_cpu=cas1 - cas0,
        client_cpu=sum(r["cpu"] for r in results), db_cpu=db1 - db0,
        machine_busy=busy1 - busy0, error_kinds=kinds,
    )


HEADER = (f"{'config':>8} {'round':>6} {'certs':>7} {'wall s':>6} {'certs/s':>8} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'CAS cpu':>7} {'CAS %':>6} "
          f"{'CAS ms/c':>8} {'cli cpu':>7} {'cli ms/c':>8} {'db cpu':>6} {'other':>6}")
FORMATS = ("{:>7.0f}", "{:>6.2f}", "{:>8.1f}", "{:>7.1f}", "{:>7.1f}", "{:>6.0f}", "{:>7.2f}",
           "{:>5.0f}%", "{:>8.2f}", "{:>7.2f}", "{:>8.2f}", "{:>6.2f}", "{:>6.2f}")


def columns(r: RunResult) -> tuple[float, ...]:
    return (r.certs, r.wall, r.rate, r.p50_ms, r.p99_ms, r.errors, r.cas_cpu,
            100 * r.cas_cpu / r.wall, r.cas_ms_per_cert, r.client_cpu, r.client_ms_per_cert,
            r.db_cpu, r.other_cpu)


def row(config: str, label: str, values: tuple[float, ...]) -> str:
    return f"{config:>8} {label:>6} " + " ".join(
        f.format(v) for f, v in zip(FORMATS, values, strict=True))


def medians(results: list[RunResult]) -> tuple[float, ...]:
    """The median of each column over the rounds (so the median certs/s is the median of
    the rounds' rates, not median certificates over median wall time)."""
    return tuple(statistics.median(col) for col in zip(*map(columns, results), strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per configuration, interleaved; the median is reported")
    p.add_argument("--clients", type=int, default=48, help="concurrent HTTPS clients in all")
    p.add_argument("--client-procs", type=int, default=2, help="client processes")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--max-attestations", type=int, default=50_000,
                   help="upper bound on attestations per round and client process")
    p.add_argument("--key-pool", type=int, default=256,
                   help="pre-made client keys+CSRs per client process, reused round-robin")
    p.add_argument("--openssl-seconds", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="3 rounds of 1.5 s, openssl 1 s, 64 keys: checks that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.openssl_seconds, args.key_pool = 1.5, 3, 1, 64
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names or any(n not in CONFIGS for n in names) or len(set(names)) != len(names):
        p.error(f"--configs: a comma-separated list of {', '.join(CONFIGS)}")
    if not 1 <= args.client_procs <= 16 or not args.client_procs <= args.clients <= 1024:
        p.error("--client-procs 1..16, --clients from --client-procs to 1024")
    if args.rounds < 1 or args.seconds <= 0 or args.key_pool < 1:
        p.error("--rounds >= 1, --seconds > 0, --key-pool >= 1")
    if args.rounds < 3:
        print("note: fewer than 3 rounds; the medians say little", file=sys.stderr)

    print(f"meshshield CAS issuance benchmark: {', '.join(names)}; {args.clients} HTTPS "
          f"clients in {args.client_procs} processes; {args.rounds} interleaved rounds x "
          f"{args.seconds:g} s; {os.cpu_count()} CPUs; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    speed = openssl_ecdsa_p256(args.openssl_seconds)
    configs: list[Config] = []
    pg: PgServer | None = None
    clients: Clients | None = None
    results: dict[str, list[RunResult]] = {n: [] for n in names}
    try:
        with tempfile.TemporaryDirectory(prefix="cas-bench-") as tmp:
            if any(CONFIGS[n][0] == "postgresql" for n in names):
                pg = PgServer.start(unavailable=_no_postgres)
            for n in names:
                configs.append(start_config(n, Path(tmp), pg))
            t0 = time.monotonic()
            clients = Clients(args.client_procs, args.key_pool)
            print(f"client keys: {args.key_pool} P-256 keys and CSRs per client process, "
                  f"made in {time.monotonic() - t0:.1f} s before the rounds and reused "
                  "round-robin (the CAS issues per CSR and does not care)")
            print("per round on the client: nonce request, SHA-512 report_data, sim evidence "
                  "(one ECDSA sign), attest request")
            # One short unmeasured round each first: connection pools, prepared
            # statements and caches filled, as in a CAS that has been serving.
            warm = argparse.Namespace(**{**vars(args), "seconds": min(1.0, args.seconds)})
            for c in configs:
                one_run(c, clients, pg, warm)
            for i in range(args.rounds):
                for c in configs:
                    res = one_run(c, clients, pg, args)
                    results[c.name].append(res)
                    print(f"round {i + 1} {c.name}: {res.rate:,.0f} certificates/s"
                          + (f", errors {res.error_kinds}" if res.error_kinds else ""),
                          flush=True)
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        if clients is not None:
            clients.close()
        for c in configs:
            c.stop()
        if pg is not None:
            pg.close()

    print()
    print(HEADER)
    med = {}
    for n in names:
        for i, res in enumerate(results[n]):
            print(row(n, str(i + 1), columns(res)))
        med[n] = medians(results[n])
        print(row(n, "median", med[n]))
    print()
    rates = {n: statistics.median(r.rate for r in results[n]) for n in names}
    if speed:
        sign, verify = speed
        print(f"openssl speed ecdsap256 ({args.openssl_seconds} s): {sign:,.0f} sign/s, "
              f"{verify:,.0f} verify/s (one core)")
        for n in names:
            print(f"{n:>8}: certs/s / ecdsa sign/s = {rates[n]:,.1f} / {sign:,.0f} = "
                  f"{rates[n] / sign:.4f}")
    else:
        print("openssl speed ecdsap256: unavailable")
    for n in names:
        ms = statistics.median(r.cas_ms_per_cert for r in results[n])
        cli = statistics.median(r.client_ms_per_cert for r in results[n])
        cpu_share = med[n][7]
        # A client process near 100% of a core would be the bottleneck, not the CAS.
        cli_share = max(100 * r.client_cpu / r.wall / args.client_procs for r in results[n])
        verdict = "met" if rates[n] >= FLOOR_CERTS_PER_S else "NOT met"
        print(f"{n:>8}: {rates[n]:,.1f} certificates/s, floor {FLOOR_CERTS_PER_S:.0f}/s "
              f"{verdict}; CAS CPU {ms:.2f} ms/certificate (all replicas, {cpu_share:.0f}% "
              f"of a core), clients {cli:.2f} ms/certificate (at most {cli_share:.0f}% of a "
              "core per client process)")
    if "pg-3" in rates and "sqlite-1" in rates and rates["sqlite-1"]:
        ratio = rates["pg-3"] / rates["sqlite-1"]
        verdict = "met" if ratio >= TARGET_PG3_OVER_SQLITE1 else "NOT met"
        print(f"pg-3 / sqlite-1 = {rates['pg-3']:,.1f} / {rates['sqlite-1']:,.1f} = "
              f"{ratio:.2f} (target >= {TARGET_PG3_OVER_SQLITE1}: {verdict})")
    print("CAS % = CPU time of the configuration's CAS processes / wall time (100% = one "
          "core); 'cli' = all client processes; 'db' = PostgreSQL's processes; 'other' = "
          "everything else on the machine during the round (from /proc/stat)")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
