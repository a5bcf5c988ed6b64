"""Ctrl-C and kill, on real processes: the command, its temporary Prefect server, its
scratch folders. A terminal's Ctrl-C is SIGINT to the whole foreground process group."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

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

    project = tmp_path / "project"
    project.mkdir()
    raw = tiny_config(
        digits_root,
        project / "runs" / "ctrlc",
        train={"epochs": 60, "swa_start": 50},
        study={"n_trials": 2, "parallel": 2},
    )
    (project / "ctrlc.yaml").write_text(yaml.safe_dump(raw))
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
