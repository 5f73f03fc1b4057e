"""`meshshield dev up` on the example, and its errors for bad files and situations."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import free_port, run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dev"
CLI = [sys.executable, "-m", "meshshield.cli"]


def _copy_example(tmp: Path) -> tuple[Path, dict[str, int]]:
    dst = tmp / "proj"
    shutil.copytree(EXAMPLE, dst)
    ports = {"8081": free_port(), "8000": free_port(), "15001": free_port()}
    text = (dst / "mesh.dev.yaml").read_text()
    for old, new in ports.items():
        text = text.replace(f": {old}", f": {new}")
    (dst / "mesh.dev.yaml").write_text(text)
    return dst, ports


def _processes_mentioning(needle: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmd:
            found.append(f"{pid}: {cmd}")
    return found


class DevUpProcess:
    def __init__(self, devfile: Path, state: Path) -> None:
        self.out = state.parent / "devup.out"
        self.f = self.out.open("w")
        self.proc = subprocess.Popen([*CLI, "dev", "up", "-f", str(devfile), "--state",
                                      str(state)], stdout=self.f, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.out.read_text()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "\nready\n" in self.text():
                return
            assert self.proc.poll() is None, self.text()
            time.sleep(0.05)
        raise AssertionError(f"dev up not ready: {self.text()}")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevUpProcess, Path,
                                                                        dict[str, int], Path]]:
    tmp = tmp_path_factory.mktemp("devup")
    proj, ports = _copy_example(tmp)
    state = tmp / "state"
    up = DevUpProcess(proj / "mesh.dev.yaml", state)
    up.wait_ready()
    yield up, proj, ports, state
    if up.proc.poll() is None:
        up.proc.kill()
        up.proc.wait(10)


def test_request_through_the_mesh(running: tuple[DevUpProcess, Path, dict[str, int], Path]
                                  ) -> None:
    up, _proj, ports, state = running
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['8000']}/", timeout=10) as r:
        assert b"inventory via the mesh" in r.read()
    # the generated policy is written for the user to read
    policy = (state / "shop.policy.yaml").read_text()
    assert "allow_from: [frontend]" in policy and "platform: sim" in policy
    out = up.text()
    assert f"127.0.0.1:{ports['15001']}" in out and "SIDECAR mTLS" in out


def test_status_against_the_dev_cas(running: tuple[DevUpProcess, Path, dict[str, int], Path]
                                    ) -> None:
    up, _proj, ports, state = running
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['8000']}/", timeout=10) as r:
        r.read()
    line = next(x for x in up.text().splitlines() if x.startswith("mesh edges: "))
    args = line.removeprefix("mesh edges: meshshield ").split()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "SRC" in r.stdout and "ATTESTED" in r.stdout


def test_changed_workload_is_refused_on_next_attestation(
    running: tuple[DevUpProcess, Path, dict[str, int], Path], tmp_path: Path
) -> None:
    up, proj, _ports, state = running
    cas = next(x.split()[1] for x in up.text().splitlines() if x.startswith("CAS https://"))
    app = proj / "backend" / "app.py"
    app.write_text(app.read_text().replace('"tea": 12', '"tea": 13'))
    r = run_cli("attest", "--cas", cas, "--cas-bundle", str(state / "cas-data" / "bundle.pem"),
                "--session", "shop", "--service", "backend", "--platform", "sim",
                "--workload", str(proj / "backend"),
                "--sim-key", str(state / "sim" / "sim-platform.key"), "--out", str(tmp_path))
    assert r.returncode == 1
    assert "measurement_not_allowed" in r.stderr


def test_ctrl_c_leaves_no_process(running: tuple[DevUpProcess, Path, dict[str, int], Path]
                                  ) -> None:
    up, _proj, _ports, state = running
    assert _processes_mentioning(str(state))  # the children are there while it runs
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(30) == 0
    assert "stopped 5 processes" in up.text()
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(state)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(str(state)) == []


# -- errors ---------------------------------------------------------------------------


def _dev_up_fails(tmp: Path, text: str, files: dict[str, str] | None = None) -> str:
    (tmp / "svc").mkdir(exist_ok=True)
    (tmp / "svc" / "app.py").write_text("print('hi')\n")
    for name, content in (files or {}).items():
        (tmp / name).write_text(content)
    f = tmp / "mesh.dev.yaml"
    f.write_text(text)
    r = subprocess.run([*CLI, "dev", "up", "-f", str(f), "--state", str(tmp / "state")],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_unknown_keys_name_the_line_and_field(tmp_path: Path) -> None:
    err = _dev_up_fails(tmp_path, "session: s\nservices:\n  - name: a\n    workload: svc/\n"
                                  "    prot: 80\ncolour: blue\n")
    assert f"{tmp_path / 'mesh.dev.yaml'}:5: services[0].prot: unknown key 'prot'" in err
    assert ":6: colour: unknown key" in err


def test_missing_workload_path(tmp_path: Path) -> None:
    err = _dev_up_fails(tmp_path, "services:\n  - name: a\n    workload: nowhere/\n"
                                  "    port: 8080\n")
    assert ":3: services[0].workload: 'nowhere/' does not exist" in err


def test_a_service_with_nothing_to_carry(tmp_path: Path) -> None:
    err = _dev_up_fails(tmp_path, "services:\n  - name: a\n    workload: svc/\n")
    assert ":2: services[0]: service 'a' neither listens" in err


def test_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _dev_up_fails(tmp_path, f"services:\n  - name: a\n    workload: svc/\n"
                                      f"    command: [python3, svc/app.py]\n    port: {port}\n")
    assert f"port {port} (a.port" in err and "already in use" in err


def test_command_that_exits_at_once(tmp_path: Path) -> None:
    err = _dev_up_fails(tmp_path, f"services:\n  - name: a\n    workload: svc/\n"
                                  f"    port: {free_port()}\n"
                                  "    command: [python3, -c, 'import sys; print(\"boom\"); "
                                  "sys.exit(3)']\n")
    assert "service a: its command exited at once with status 3" in err
    assert "boom" in err
    assert _processes_mentioning(str(tmp_path / "state")) == []
