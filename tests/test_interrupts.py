"""Ctrl-C and kill, on real processes: the command, its temporary Prefect server, its
scratch folders. A terminal's Ctrl-C is SIGINT to the whole foreground process group."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgetune import prefect_server
from tasks.host import SCRATCH_PREFIX, pid_alive, scratch_folder, sweep_scratch

from conftest import tiny_config

EDGETUNE = str(Path(sys.executable).parent / "edgetune")
SERVER_MARKS = ("edgetune.prefect_server", "prefect.server.api.server")


def _gone(pid: int) -> bool:
    """Dead, or a zombie waiting for its parent to read its status."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return not pid_alive(pid)


def _servers_of(parent: int) -> list[int]:
    """The Prefect servers that ``parent`` started (Prefect's own or edgetune's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and any(mark in command for mark in SERVER_MARKS):
            found.append(int(entry.name))
    return found


def _wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


def _project(tmp_path: Path, digits_root: Path, name: str, **settings: Any) -> Path:
    """A project folder with the tiny study ``name``.yaml (``settings``: its sections)."""
    project = tmp_path / "project"
    project.mkdir()
    raw = tiny_config(digits_root, project / "runs" / name, **settings)
    (project / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return project


def _environment(home: Path) -> dict[str, str]:
    """A user's shell: no Prefect server configured, a home of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") or key == "PREFECT_SERVER_ANALYTICS_ENABLED"
    }
    env["HOME"] = str(home)
    return env


def test_sweep_removes_only_the_folders_of_processes_that_are_gone() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead = int(done.stdout)
    assert not pid_alive(dead)
    left = Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{dead}-study-train-x1"
    left.mkdir()
    (left / "model.onnx").write_bytes(b"0")
    mine = scratch_folder("study-train")  # sweeps first
    try:
        assert not left.exists()
        assert mine.name.startswith(f"{SCRATCH_PREFIX}{os.getpid()}-study-train-")
        assert sweep_scratch() == [] and mine.is_dir()  # a live owner's folder stays
    finally:
        mine.rmdir()


@pytest.mark.integration
def test_a_killed_command_leaves_no_prefect_server(tmp_path: Path) -> None:
    """SIGKILL gives the command no chance to clean up: its server's watchdog stops it."""
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from edgetune import prefect_server\n"
        "server = prefect_server.start(Path(sys.argv[1]))\n"
        "prefect_server.ready()\n"
        "print(server.process.pid, server.url, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = _environment(tmp_path)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path}/prefect.db"
    command = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / ".prefect")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert command.stdout is not None
    line = command.stdout.readline().split()
    assert len(line) == 2, (
        f"the server did not start: {(tmp_path / '.prefect' / 'server.log').read_text()}"
    )
    server, url = int(line[0]), line[1]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert os.getsid(server) == server  # its own session: a terminal's Ctrl-C misses it
    command.kill()
    command.wait()
    _wait_for(lambda: _gone(server), 15, "the orphaned server stops")


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_in_a_terminal_ends_the_study_cleanly(digits_root: Path, tmp_path: Path) -> None:
    """SIGINT to the terminal's process group mid-training: exit 130 within seconds, one
    line, the trials in flight told FAIL, no server and no scratch folder left."""
    import pty

    train, study = {"epochs": 60, "swa_start": 50}, {"n_trials": 2, "parallel": 2}
    project = _project(tmp_path, digits_root, "ctrlc", train=train, study=study)
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session leader with the pty as its terminal, like a shell's job
        os.chdir(project)
        os.execve(EDGETUNE, [EDGETUNE, "tune", "ctrlc.yaml"], _environment(tmp_path))
    output = b""

    def read(seconds: float) -> None:
        nonlocal output
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select([terminal], [], [], 0.2)
            if ready:
                try:
                    output += os.read(terminal, 65536)
                except OSError:  # the child closed the terminal
                    return

    deadline = time.monotonic() + 300
    while b"train epoch" not in output:
        assert time.monotonic() < deadline, output.decode(errors="replace")[-2000:]
        read(0.5)
    servers = _servers_of(pid)
    assert len(servers) == 1, servers
    os.killpg(os.getpgid(pid), signal.SIGINT)  # what the terminal does on Ctrl-C
    interrupted = time.monotonic()
    code = None
    while code is None:
        read(0.2)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
        assert time.monotonic() - interrupted < 30, output.decode(errors="replace")[-2000:]
    read(0.5)
    os.close(terminal)
    text = output.decode(errors="replace")
    assert code == 130, text[-2000:]
    assert "Traceback" not in text and "ConnectError" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and "interrupted" in errors[0], errors
    _wait_for(lambda: all(_gone(s) for s in servers), 10, "the Prefect server stops")
    leftovers = list(Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}{pid}-*"))
    assert leftovers == []

    import optuna

    study = optuna.load_study(
        study_name="ctrlc", storage=f"sqlite:///{project / 'runs' / 'ctrlc' / 'optuna.db'}"
    )
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states.count("FAIL") >= 1, states


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_prefect_server_is_started_again_and_the_study_ends(
    digits_root: Path, tmp_path: Path
) -> None:
    """The command's own Prefect server killed mid-training (out of memory, a stray kill):
    the command starts it again on its port with one warning line, the flows' clients retry
    meanwhile, and the study ends with every trial COMPLETE. (It hung before, and did not
    end on SIGTERM either.)"""
    train, study = {"epochs": 12, "swa_start": 8}, {"n_trials": 3, "parallel": 1}
    project = _project(tmp_path, digits_root, "revive", train=train, study=study)
    command = subprocess.Popen(
        [EDGETUNE, "tune", "revive.yaml"],
        cwd=project,
        env=_environment(tmp_path),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert command.stderr is not None
    lines = []
    while not any("train epoch" in line for line in lines):
        line = command.stderr.readline()
        assert line, "".join(lines)[-2000:]
        lines.append(line)
    [server] = _servers_of(command.pid)
    os.kill(server, signal.SIGKILL)
    try:
        _, rest = command.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        command.kill()
        _, rest = command.communicate()
        pytest.fail(f"the study hung after its Prefect server was killed: {rest[-2000:]}")
    text = "".join(lines) + rest
    assert command.returncode == 0, text[-3000:]
    warnings = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: the project's Prefect server ended (exit code -9); started again on port "
    ), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    port = int(warnings[0].split(" on port ")[1].split()[0])

    def closed() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) != 0

    _wait_for(closed, 15, "the server started again stops with the command")

    import optuna

    study = optuna.load_study(
        study_name="revive", storage=f"sqlite:///{project / 'runs' / 'revive' / 'optuna.db'}"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_a_server_that_ended_by_itself_is_started_again_on_its_port_a_few_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Ended:
        def poll(self) -> int:
            return -9

    launched: list[tuple[Path, int | None]] = []

    def launch(log: Path, port: int | None = None) -> prefect_server.ProjectServer:
        launched.append((log, port))
        return prefect_server.ProjectServer(Ended(), f"http://127.0.0.1:{port}/api", log)  # type: ignore[arg-type]

    log = tmp_path / "server.log"
    monkeypatch.setattr(prefect_server, "_launch", launch)
    monkeypatch.setattr(prefect_server, "_stopping", threading.Event())
    first = prefect_server.ProjectServer(Ended(), "http://127.0.0.1:4321/api", log)  # type: ignore[arg-type]
    monkeypatch.setattr(prefect_server, "_running", [first])
    said = [prefect_server.revive() for _ in range(prefect_server.RESTARTS + 2)]
    assert said[0] == [
        f"the project's Prefect server ended (exit code -9); started again on port 4321 (see {log})"
    ]
    assert [len(lines) for lines in said] == [1] * prefect_server.RESTARTS + [0, 0]
    assert launched == [(log, 4321)] * prefect_server.RESTARTS  # its port, its log
    assert not prefect_server.alive()  # given up: the engine stops, as before

    monkeypatch.setattr(prefect_server, "_running", [first])
    prefect_server._stopping.set()  # stopping at exit: a server that ends is not started
    assert prefect_server.revive() == [] and len(launched) == prefect_server.RESTARTS
