"""Child processes for the local tools: the CAS, sidecars and the user's services.

Each child is started in its own process group so that stopping it also stops what it
started; its output goes to a log file under the run's state folder; its announced
addresses ("listening https://...", "inbound ... listening HOST:PORT") are read from
its stdout as it prints them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

MESHSHIELD = [sys.executable, "-m", "meshshield.cli"]


class ChildFailed(Exception):
    """A child exited or never announced itself; the message says which and why."""


class Child:
    def __init__(self, name: str, argv: Sequence[str], log: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.log = log
        self.lines: list[str] = []
        log.parent.mkdir(parents=True, exist_ok=True)
        # never through a symbolic link planted where the log goes
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._log_file = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=self._log_file, text=True,
            env=None if env is None else {**os.environ, **env}, cwd=cwd,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._log_file.write(line)
            self._log_file.flush()

    def wait_for(self, pred: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            lines = list(self.lines)
            for line in lines[seen:]:
                if pred(line):
                    return line
            seen = len(lines)
            if self.proc.poll() is not None:
                time.sleep(0.05)  # let the reader catch the last lines
                raise ChildFailed(
                    f"{self.name} exited with status {self.proc.returncode} before {what}; "
                    f"last output:\n{self.tail()}"
                )
            time.sleep(0.02)
        raise ChildFailed(f"{self.name} did not {what} within {timeout:.0f} s; see {self.log}")

    def tail(self, n: int = 8) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace").strip().splitlines()
            return "\n".join("    " + x for x in text[-n:])
        return ""

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the child's process group, then SIGKILL what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything the child left behind
        rc = self.proc.wait(5)
        self._reader.join(2)
        self._log_file.close()
        return rc


def free_port() -> int:
    """A loopback port free right now (children are then told to bind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cas(state: Path, *, admin_fp: str, sim_pub: Path, listen: str = "127.0.0.1:0",
              timeout: float = 30.0, extra: Sequence[str] = ()) -> tuple[Child, str]:
    """A CAS child; returns it and its https URL once it serves."""
    cas = Child("CAS", [*MESHSHIELD, "cas", "serve", "--data", str(state / "cas-data"),
                        "--kek-file", str(state / "cas.kek"), "--listen", listen,
                        "--admin-fingerprint", admin_fp, "--trust-sim-platform", str(sim_pub),
                        *extra], state / "logs" / "cas.log")
    line = cas.wait_for(lambda x: x.startswith("listening "), timeout, "start serving")
    return cas, line.split()[1]


def start_sidecar(state: Path, *, cas_url: str, session: str, service: str,
                  workload: Sequence[str], sim_key: Path, inbound: Sequence[str] = (),
                  outbound: Sequence[str] = (), timeout: float = 30.0,
                  wait: bool = True, announce: bool = True,
                  extra: Sequence[str] = ()) -> Child:
    argv = [*MESHSHIELD, "sidecar", "--cas", cas_url,
            "--cas-bundle", str(state / "cas-data" / "bundle.pem"), "--session", session,
            "--service", service, "--platform", "sim", "--sim-key", str(sim_key),
            "--admin-listen", "127.0.0.1:0"]
    for w in workload:
        argv += ["--workload", w]
    for i in inbound:
        argv += ["--inbound", i]
    for o in outbound:
        argv += ["--outbound", o]
    argv += list(extra)
    sc = Child(f"sidecar of {service}", argv, state / "logs" / f"sidecar-{service}.log")
    if announce or wait:
        sc.wait_for(lambda x: x.startswith("admin http://"), timeout, "open its admin API")
    if wait:
        sc.wait_for(lambda x: x == "ready", timeout, "become ready")
    return sc


def announced(child: Child, prefix: str) -> str:
    """The address a child printed for e.g. prefix 'admin' or 'inbound 127.0.0.1:0'."""
    for line in child.lines:
        if prefix == "admin" and line.startswith("admin http://"):
            return line.split()[1]
        if line.startswith(prefix + " listening "):
            return line.rsplit(" ", 1)[1]
    raise ChildFailed(f"{child.name} did not announce {prefix}")
