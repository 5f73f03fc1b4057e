"""The fault-injection suite: real processes, real faults, and a leak check after each.

Every scenario here is a test named for the behaviour it proves, run against real
processes on loopback: a CAS subprocess (tests/harness.py `CasProcess`), sidecar
subprocesses (`SidecarProcess`), backends and clients from tests/e2e/meshpeers.py
(`TcpBackend`, `echo`, `start_mesh`, `connect`, `roundtrip`, `wait_until`...). This
conftest puts both folders on sys.path, so a scenario imports them by name:

    from harness import CasProcess
    from meshpeers import connect, roundtrip, status, wait_until

and it offers these fixtures:

- ``fault_cas``: a CAS on a fixed loopback port (a relaunch on the same data comes
  back at the same URL, where the sidecars look for it); stopped at teardown. More
  `cas serve` flags with a marker: ``@pytest.mark.cas_args("--max-cert-ttl", "20s")``;
  a small descriptor limit for it with ``@pytest.mark.cas_fd_limit(1024)``.
- ``echo_port``: an echo TCP backend (every byte back, EOF passed on).
- ``meshes``: ``meshes(cas, session, {"echo": port}, **start_mesh_kwargs) -> Mesh``
  starts a backend and a frontend sidecar; all are stopped at teardown, and a
  traceback in any sidecar's log fails the test.
- ``shop_mesh``: ``shop_mesh(**start_mesh_kwargs) -> Mesh``, the common case: the sim
  policy "shop" applied on fault_cas and a mesh of it in front of echo_port.
- ``sidecar``: ``sidecar(cas, session, service, **SidecarProcess.start_kwargs)``, one
  sidecar on its own, stopped and checked for tracebacks the same way.
- ``cas_front``: ``cas_front(cas) -> CasFront`` (casfront.py), a CAS front whose
  answers and event stream the scenario writes; closed at teardown.
- ``onpath_mesh`` (one per module): onpath.py's ``OnPathMesh``, two sidecars with an
  on-path host between them.
- ``dataplane`` (one per module): the data plane the sidecars of ``meshes``,
  ``shop_mesh``, ``sidecar`` and ``onpath_mesh`` run (``--dataplane``; the default one
  unless parametrised); a module runs on both with ``pytestmark =
  pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True)``.
- ``leak_check``: ``leak_check.watch(proc)`` takes a baseline of a long-lived process
  (a ``CasProcess``, a ``SidecarProcess``, or any other subprocess, counted by its
  descriptors only): its open descriptors (``/proc/PID/fd``) and its asyncio tasks
  (the sidecar's ``GET /status`` ``runtime.tasks``, the CAS's ``meshshield_cas_tasks``
  gauge). After the scenario every watched process must come back to its baseline
  within a tolerance, polled against a deadline, as ghostunnel's churn test does; the
  failure lists the descriptors that appeared.

faultlib.py has the small helpers (``warm_up``, ``metric``, descriptor limits, /proc
readings).

A scenario:

    def test_many_short_connections_leave_nothing_behind(
            fault_cas, shop_mesh, leak_check):
        m = shop_mesh()
        warm_up(m.outbound["echo"])       # one connection: lazy state is built now
        for p in (fault_cas, m.backend, m.frontend):
            leak_check.watch(p)
        ... the fault ...
        leak_check.verify()               # optional: teardown verifies what is left

Request ``leak_check`` last among the fixtures, so its teardown (the check) runs
before the other fixtures stop the processes. A watched process that exits, or is
restarted, before it was verified fails the check: after a deliberate restart,
``watch`` it again to take a new baseline. When the scenario itself failed, the
teardown check is skipped (its failure is the one worth reading).

Baselines are taken after warm-up: the first connection builds caches (TLS contexts,
thread pools) that are not leaks. Nothing here sleeps to wait for a process: every
wait polls a condition with a deadline (``wait_until``).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_TESTS = Path(__file__).resolve().parents[1]
for _folder in (_TESTS, _TESTS / "e2e"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from casfront import CasFront, FrontCas  # noqa: E402
from faultlib import soft_fd_limit  # noqa: E402
from harness import CasProcess, SidecarProcess  # noqa: E402
from meshpeers import (  # noqa: E402
    DEFAULT_DATAPLANE,
    LOOPBACK,
    LoopThread,
    Mesh,
    echo_server,
    free_ports,
    no_traceback,
    plane_args,
    start_mesh,
)
from onpath import OnPathMesh  # noqa: E402

LEAK_DEADLINE = 20.0  # seconds for counts to come back to their baseline
FD_TOLERANCE = 4
TASK_TOLERANCE = 3


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cas_args(*flags): extra `meshshield cas serve` flags for fault_cas")
    config.addinivalue_line(
        "markers", "cas_fd_limit(n): fault_cas starts with a soft descriptor limit of n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Note each phase's report on the item, so a fixture can tell the test failed."""
    rep = yield
    setattr(item, f"_faults_rep_{rep.when}", rep)
    return rep


# -- counting ----------------------------------------------------------------------------

_TASKS_GAUGE = re.compile(r"^meshshield_cas_tasks(?:\{\})? ([0-9.eE+]+)$", re.M)

# A plain subprocess (the webhook) is watched by its descriptors only.
Watchable = CasProcess | SidecarProcess | subprocess.Popen[Any]


def _pid(proc: Watchable) -> int | None:
    p = proc if isinstance(proc, subprocess.Popen) else proc.proc
    return None if p is None or p.poll() is not None else p.pid


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of `pid` points at (socket:[inode], pipe:, paths)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed between listdir and readlink
            pass
    return sorted(out)


def task_count(proc: Watchable) -> int:
    """asyncio tasks on the process's event loop, as it reports them (0 for a process
    that does not report them)."""
    if isinstance(proc, subprocess.Popen):
        return 0
    if isinstance(proc, SidecarProcess):
        r = proc.get("/status")
        assert r.status == 200, r.body
        runtime = r.json().get("runtime")
        assert runtime and runtime.get("tasks") is not None, \
            f"{proc.name}: GET /status has no runtime.tasks: {r.body[:300]!r}"
        return int(runtime["tasks"])
    r = proc.get("/metrics")
    assert r.status == 200, r.body
    m = _TASKS_GAUGE.search(r.body.decode())
    assert m, "CAS /metrics has no meshshield_cas_tasks gauge"
    return int(float(m.group(1)))


@dataclass
class Watched:
    name: str
    proc: Watchable
    pid: int
    fds: list[str]
    tasks: int
    fd_tolerance: int
    task_tolerance: int
    verified: bool = False


@dataclass
class Counts:
    fds: list[str]
    tasks: int


@dataclass
class LeakCheck:
    """Baselines of long-lived processes and the check that they come back to them."""

    deadline: float = LEAK_DEADLINE
    watched: dict[int, Watched] = field(default_factory=dict)

    def watch(self, proc: Watchable, *, name: str | None = None,
              fd_tolerance: int = FD_TOLERANCE, task_tolerance: int = TASK_TOLERANCE) -> None:
        """Take (or retake, after a restart) the baseline of `proc`."""
        name = name or self._name(proc)
        pid = _pid(proc)
        assert pid is not None, f"{name} is not running"
        self.watched[id(proc)] = Watched(
            name, proc, pid, fd_targets(pid), task_count(proc), fd_tolerance, task_tolerance)

    def counts(self, proc: Watchable) -> Counts:
        pid = _pid(proc)
        assert pid is not None, f"{self._name(proc)} is not running"
        return Counts(fd_targets(pid), task_count(proc))

    def verify(self) -> None:
        """Poll until every watched process is back within tolerance of its baseline."""
        pending = [w for w in self.watched.values() if not w.verified]
        for w in pending:
            pid = _pid(w.proc)
            assert pid is not None, (
                f"{w.name} exited before its leak check; verify() before stopping it")
            assert pid == w.pid, (
                f"{w.name} was restarted (pid {w.pid} -> {pid}) after its baseline; "
                "watch() it again after a restart")
        end = time.monotonic() + self.deadline
        last: dict[str, Counts] = {}
        while pending:
            for w in list(pending):
                c = self.counts(w.proc)
                last[w.name] = c
                if (len(c.fds) <= len(w.fds) + w.fd_tolerance
                        and c.tasks <= w.tasks + w.task_tolerance):
                    w.verified = True
                    pending.remove(w)
            if not pending or time.monotonic() >= end:
                break
            time.sleep(0.2)
        if pending:
            lines = []
            for w in pending:
                c = last[w.name]
                grown = _multiset_minus(c.fds, w.fds)
                lines.append(
                    f"{w.name} (pid {w.pid}): fds {len(w.fds)} -> {len(c.fds)} "
                    f"(tolerance {w.fd_tolerance}), asyncio tasks {w.tasks} -> {c.tasks} "
                    f"(tolerance {w.task_tolerance}); new descriptors: "
                    f"{_summarise(grown)}")
            raise AssertionError(
                f"leak: not back to baseline within {self.deadline:g} s\n" + "\n".join(lines))

    @staticmethod
    def _name(proc: Watchable) -> str:
        if isinstance(proc, subprocess.Popen):
            return f"process {proc.args!r:.60}"
        return f"sidecar {proc.name}" if isinstance(proc, SidecarProcess) else "CAS"


def _multiset_minus(a: list[str], b: list[str]) -> list[str]:
    left = list(b)
    out = []
    for x in a:
        if x in left:
            left.remove(x)
        else:
            out.append(x)
    return out


def _summarise(targets: list[str]) -> str:
    kinds: dict[str, int] = {}
    for t in targets:
        kind = t.split(":", 1)[0] if ":" in t and not t.startswith("/") else t
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def leak_check(request: pytest.FixtureRequest) -> Iterator[LeakCheck]:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("the leak check reads /proc/PID/fd (Linux)")
    lc = LeakCheck()
    yield lc
    call = getattr(request.node, "_faults_rep_call", None)
    if call is not None and call.failed:
        return
    lc.verify()


@pytest.fixture
def fault_cas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CasProcess]:
    marker = request.node.get_closest_marker("cas_args")
    extra = tuple(str(a) for a in marker.args) if marker else ()
    limit = request.node.get_closest_marker("cas_fd_limit")
    (port,) = free_ports(1)
    with soft_fd_limit(int(limit.args[0])) if limit else contextlib.nullcontext():
        cas = CasProcess.start(tmp_path / "mesh", "--listen", f"{LOOPBACK}:{port}", *extra)
    try:
        yield cas
    finally:
        cas.stop()


@pytest.fixture
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


@pytest.fixture(scope="module")
def dataplane(request: pytest.FixtureRequest) -> str:
    # A module runs on both data planes with
    # pytestmark = pytest.mark.parametrize("dataplane", DATAPLANES, indirect=True).
    plane = str(getattr(request, "param", DEFAULT_DATAPLANE))
    plane_args(plane)  # skips (fails under CI=true) without the extension
    return plane


@pytest.fixture
def meshes(dataplane: str) -> Iterator[Callable[..., Mesh]]:
    started: list[Mesh] = []

    def start(cas: CasProcess, session: str, apps: dict[str, int], **kw: Any) -> Mesh:
        kw.setdefault("dataplane", dataplane)
        m = start_mesh(cas, session, apps, **kw)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()
    for m in started:
        no_traceback(m.backend, m.frontend)


@pytest.fixture
def shop_mesh(fault_cas: CasProcess, echo_port: int,
              meshes: Callable[..., Mesh]) -> Callable[..., Mesh]:
    """``shop_mesh(**start_mesh_kwargs) -> Mesh``: the harness's sim policy "shop"
    applied on fault_cas, and a mesh of it with one route, "echo", to echo_port."""

    def start(**kw: Any) -> Mesh:
        r = fault_cas.apply_policy(fault_cas.sim_policy("shop"))
        assert r.returncode == 0, f"policy apply failed: {r.stdout}{r.stderr}"
        return meshes(fault_cas, "shop", {"echo": echo_port}, **kw)

    return start


@pytest.fixture
def sidecar(dataplane: str) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def start(cas: CasProcess | FrontCas, session: str, service: str,
              **kw: Any) -> SidecarProcess:
        kw["extra"] = (*plane_args(dataplane), *kw.get("extra", ()))
        sc = SidecarProcess.start(cas, session, service, **kw)  # type: ignore[arg-type]
        started.append(sc)
        return sc

    yield start
    for sc in started:
        sc.stop()
    no_traceback(*started)


@pytest.fixture
def cas_front() -> Iterator[Callable[..., CasFront]]:
    lt = LoopThread()
    fronts: list[CasFront] = []

    def start(cas: CasProcess, **kw: Any) -> CasFront:
        f = CasFront(cas, lt, **kw)
        fronts.append(f)
        return f

    try:
        yield start
    finally:
        for f in fronts:
            f.close()
        lt.close()


@pytest.fixture(scope="module")
def onpath_mesh(dataplane: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnPathMesh]:
    m = OnPathMesh(tmp_path_factory.mktemp("onpath"), dataplane=dataplane)
    try:
        yield m
        no_traceback(m.backend, m.frontend)
    finally:
        m.close()
