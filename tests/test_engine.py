"""The project's resident engine (``edgetune engine``) as a user runs it: the installed
command, a project folder, no Prefect server configured (the embedded default)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgetune import engine, resident
from edgetune.resident import Engine

from conftest import tiny_config

EDGETUNE = str(Path(sys.executable).parent / "edgetune")


def _environment(home: Path, **more: str) -> dict[str, str]:
    """No Prefect server configured, a home of the test's own, a running engine used but
    none started (``EDGETUNE_ENGINE=on``); ``more`` on top (an empty value removes the
    variable)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        {
            "HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "EDGETUNE_ENGINE": "on",
            **more,
        }
    )
    return {key: value for key, value in env.items() if value}


def _edgetune(
    project: Path, *argv: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGETUNE, *argv],
        cwd=project,
        env=_environment(project.parent / "home", **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ended(pid: int, timeout: float = 30) -> bool:
    """Whether process ``pid`` ended (gone, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _status(project: Path) -> dict[str, Any]:
    status = engine.control(project, "status")
    assert status is not None, "no engine answers"
    return status


def _until_idle(project: Path, timeout: float = 60) -> None:
    """Until the engine runs no command (a monitor ends a moment after its exit code)."""
    deadline = time.monotonic() + timeout
    while _status(project)["running"]:
        assert time.monotonic() < deadline, "a command outlived its client"
        time.sleep(0.1)


def _write_study(project: Path, digits_root: Path, name: str, **train: Any) -> str:
    raw = tiny_config(
        digits_root, project / "runs" / name, study={"n_trials": 1, "parallel": 1}, train=train
    )
    (project / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return f"{name}.yaml"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project folder with its engine running (started as a user starts it)."""
    root = tmp_path_factory.mktemp("engine")
    (root / "home").mkdir()
    project = root / "project"
    project.mkdir()
    started = _edgetune(project, "engine", "start", "--idle", "10")
    assert started.returncode == 0, started.stderr
    assert "the engine is ready" in started.stdout
    pid = _status(project)["pid"]
    yield project
    stopped = _edgetune(project, "engine", "stop")
    assert (stopped.returncode, stopped.stdout.strip()) == (0, f"the engine (pid {pid}) stopped")
    assert not engine.socket_path(project).exists()
    assert _ended(pid)


def _trial_states(project: Path, name: str) -> list[str]:
    database = project / "runs" / name / "optuna.db"
    if not database.exists():
        return []
    try:
        with sqlite3.connect(database, timeout=30) as db:
            return [row[0] for row in db.execute("select state from trials order by number")]
    except sqlite3.OperationalError:  # made, its tables not yet
        return []


def _start_long_study(project: Path, digits_root: Path, name: str) -> subprocess.Popen[str]:
    """A study whose one trial trains for minutes, through the engine; returned once its
    trial runs."""
    config = _write_study(project, digits_root, name, epochs=500, swa_start=499)
    client = subprocess.Popen(
        [EDGETUNE, "tune", config],
        cwd=project,
        env=_environment(project.parent / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while _trial_states(project, name) != ["RUNNING"]:
        assert client.poll() is None, client.communicate()
        assert time.monotonic() < deadline, "the trial never started"
        time.sleep(0.2)
    return client


@pytest.mark.integration
@pytest.mark.slow
def test_a_study_through_the_engine_runs_on_its_server_and_prints_as_a_cold_one(
    project: Path, digits_root: Path
) -> None:
    config = _write_study(project, digits_root, "warm")
    served = _status(project)["served"]
    done = _edgetune(project, "tune", config, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["counts"]["COMPLETE"] == 1
    assert _status(project)["served"] == served + 1  # it ran in the engine
    with sqlite3.connect(project / ".prefect" / "prefect.db") as db:
        names = [row[0] for row in db.execute("select name from flow_run")]
    assert "tune-warm" in names  # on the project's own Prefect database
    assert not (project.parent / "home" / ".prefect" / "prefect.db").exists()

    cold = _edgetune(project, "tune", config, "--json", EDGETUNE_ENGINE="off")
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert _status(project)["served"] == served + 1  # not in the engine
    assert json.loads(cold.stdout)["counts"] == result["counts"]  # the study was complete


@pytest.mark.integration
@pytest.mark.slow
def test_a_verbose_command_in_the_engine_logs_as_a_cold_one(
    project: Path, digits_root: Path
) -> None:
    """The engine imported Prefect, Optuna and alembic quieted (as a command without
    --verbose does); a --verbose command gets their logs all the same."""
    config = _write_study(project, digits_root, "verbose")
    served = _status(project)["served"]
    done = _edgetune(project, "tune", config, "--verbose")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _status(project)["served"] == served + 1
    assert "A new study created in RDB with name: verbose" in done.stderr  # Optuna's INFO
    assert "| INFO    | Flow run 'tune-verbose' - View at http://127.0.0.1:" in done.stderr
    quiet = _edgetune(project, "tune", config, "--restart")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "INFO" not in quiet.stderr and "A new study created" not in quiet.stderr


@pytest.mark.integration
def test_bad_input_through_the_engine_is_the_same_line_and_exit_code(project: Path) -> None:
    served = _status(project)["served"]
    warm = _edgetune(project, "tune", "absent.yaml")
    cold = _edgetune(project, "tune", "absent.yaml", EDGETUNE_ENGINE="off")
    assert _status(project)["served"] == served + 1
    assert warm.returncode == cold.returncode == 2
    assert (warm.stdout, warm.stderr) == (cold.stdout, cold.stderr)
    assert warm.stderr.startswith("error: ") and warm.stderr.count("\n") == 1


@pytest.mark.integration
def test_an_environment_read_at_import_time_runs_the_command_cold_with_a_note(
    project: Path,
) -> None:
    served = _status(project)["served"]
    done = _edgetune(project, "tune", "absent.yaml", PYTHONHASHSEED="7")
    assert done.returncode == 2
    note, error = done.stderr.splitlines()
    assert note.startswith("note: the project's engine started with other values of PYTHONHASHSEED")
    assert note.endswith("; running without it")
    assert error.startswith("error: ")
    assert _status(project)["served"] == served  # refused: run by the client itself


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_of_the_client_interrupts_the_command_in_the_engine(
    project: Path, digits_root: Path
) -> None:
    """The terminal's Ctrl-C reaches the client only; the command in the engine ends as a
    cold one does: its trial told FAIL, exit 130."""
    client = _start_long_study(project, digits_root, "interrupted")
    client.send_signal(signal.SIGINT)
    _, stderr = client.communicate(timeout=120)
    assert client.returncode == 130, stderr
    assert "error: interrupted; trials in flight were told FAIL, re-run to continue" in stderr
    states = _trial_states(project, "interrupted")
    assert states[0] == "FAIL" and "RUNNING" not in states, states  # a re-run continues it
    _until_idle(project, timeout=10)


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_client_interrupts_its_command(project: Path, digits_root: Path) -> None:
    client = _start_long_study(project, digits_root, "orphaned")
    assert _status(project)["running"] == 1
    client.kill()
    client.communicate(timeout=30)
    _until_idle(project)
    states = _trial_states(project, "orphaned")
    assert states[0] == "FAIL" and "RUNNING" not in states, states  # as after a Ctrl-C


@pytest.mark.integration
@pytest.mark.slow
def test_an_idle_engine_stops_with_its_server(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    started = _edgetune(
        project, "engine", "start", "--idle", "0.05", PREFECT_SERVER_ANALYTICS_ENABLED=""
    )
    assert started.returncode == 0, started.stderr
    status = _status(project)
    # Its Prefect server has the settings a command's own gets (no analytics, offline).
    children = Path(f"/proc/{status['pid']}/task/{status['pid']}/children").read_text().split()
    (server,) = children
    environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
    assert b"PREFECT_SERVER_ANALYTICS_ENABLED=false" in environ
    again = _edgetune(project, "engine", "start")
    assert (
        again.stdout.strip()
        == f"the engine runs already (pid {status['pid']}); edgetune engine status"
    )
    assert engine.wait_stopped(project, 60)
    log = engine.log_path(project).read_text()
    assert "idle for 0 min: stopping" in log
    assert "stopped (idle); 0 commands served" in log
    none = _edgetune(project, "engine", "status")
    assert (none.returncode, none.stdout.strip()) == (
        1,
        "no engine runs in this folder (edgetune engine start)",
    )
    assert _ended(status["pid"])
    port = int(status["prefect"].rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as probe:  # the project's Prefect server stopped with it
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_an_engine_that_could_not_listen_ends_before_its_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A unix socket's path has at most 107 bytes: in a folder deeper than that (seen from
    here too) the engine ends at once, not after its imports and its Prefect server."""
    project = tmp_path / ("deep" * 30)
    project.mkdir()
    monkeypatch.chdir("/")
    monkeypatch.setattr(resident, "_prepare", lambda *_: pytest.fail("prepared"))
    with caplog.at_level("ERROR", logger=resident.log.name):
        assert resident.serve(project, 60.0) == 1
    [record] = caplog.records
    assert record.getMessage().startswith(f"no socket at {project / '.prefect'} (")
    assert sorted(p.name for p in (project / ".prefect").iterdir()) == ["engine.lock"]
    spawned: list[Path] = []
    monkeypatch.setattr(engine, "spawn", lambda where, *_: spawned.append(where))
    monkeypatch.setitem(sys.modules, engine.PREFECT_CLIENT, sys)
    engine.start_after(project, {})  # after a cold command there: none started, no note
    assert spawned == [] and engine.cannot_listen(engine.socket_path(project))
    engine.start_after(tmp_path, {})
    assert spawned == [tmp_path] and engine.cannot_listen(engine.socket_path(tmp_path)) is None
    assert sorted(p.name for p in (tmp_path / ".prefect").iterdir()) == []  # probe gone


def test_changed_code_is_refused_and_stops_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    state = Engine(Path("."), 60.0, {"PYTHONPATH": "a"}, stamp="before")
    monkeypatch.setattr(engine, "code_stamp", lambda: "before")
    assert state.refusal({"PYTHONPATH": "a", "TERM": "xterm"}) is None  # other names: free
    assert "PYTHONPATH" in (state.refusal({}) or "")
    assert "PYTHONPATH, TORCH_HOME" in (
        state.refusal({"PYTHONPATH": "b", "TORCH_HOME": "/x"}) or ""
    )
    assert not state.stopping
    monkeypatch.setattr(engine, "code_stamp", lambda: "after")
    reason = state.refusal({"PYTHONPATH": "a"})
    assert reason is not None and reason.startswith("the code or the installed packages changed")
    assert state.stopping == "the code or the installed packages changed"
    assert "is stopping" in (state.refusal({"PYTHONPATH": "a"}) or "")


def test_the_code_stamp_follows_the_source_files(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "module.py"
    source.write_text("x = 1\n")
    os.utime(source, ns=(10**18, 10**18))
    before = engine.code_stamp([tmp_path])
    assert engine.code_stamp([tmp_path]) == before
    os.utime(source, ns=(10**18, 10**18 + 1))
    edited = engine.code_stamp([tmp_path])
    assert edited != before
    (tmp_path / "pkg" / "new.py").write_text("")
    os.utime(tmp_path / "pkg" / "new.py", ns=(1, 1))  # older than the rest, still counted
    assert engine.code_stamp([tmp_path]) != edited
    assert engine.code_stamp() != engine.code_stamp([tmp_path])  # the packages by default


def test_a_socket_left_by_a_killed_engine_runs_the_command_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = engine.socket_path(tmp_path)
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(str(path))  # bound, never listening again: as after a SIGKILL
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(engine.SWITCH, "on")
    assert engine.run_in_engine(["edgetune", "tune", "x.yaml"]) is None
    assert engine.control(tmp_path, "status") is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "auto"),
        ({"CI": "true"}, "off"),
        ({"CI": "1", "EDGETUNE_ENGINE": "auto"}, "auto"),
        ({"CI": "false"}, "auto"),
        ({"EDGETUNE_ENGINE": "on"}, "on"),
        ({"EDGETUNE_ENGINE": "yes", "CI": "true"}, "on"),
        ({"EDGETUNE_ENGINE": " AUTO "}, "auto"),
        ({"EDGETUNE_ENGINE": "No"}, "off"),
        ({"EDGETUNE_ENGINE": "0", "CI": ""}, "off"),
    ],
)
def test_the_engine_is_on_by_default_but_in_continuous_integration(
    env: dict[str, str], expected: str
) -> None:
    assert engine.switch(env) == expected


def test_a_command_that_finds_no_engine_starts_one_when_it_ends_not_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(engine.SWITCH, raising=False)
    monkeypatch.delenv("CI", raising=False)
    at_exit: list[tuple[Any, ...]] = []
    monkeypatch.setattr(engine.atexit, "register", lambda *call: at_exit.append(call))
    spawned: list[tuple[Path, float]] = []
    monkeypatch.setattr(engine, "spawn", lambda where, idle, env: spawned.append((where, idle)))

    assert engine.run_in_engine(["edgetune", "tune", "x.yaml"]) is None  # runs cold
    assert spawned == []  # not while the command runs
    [(call, where, env)] = at_exit
    assert where == tmp_path and env == dict(os.environ)
    monkeypatch.delitem(sys.modules, engine.PREFECT_CLIENT, raising=False)
    call(where, env)  # a command that did not use Prefect (``data``): none
    assert spawned == [] and capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, engine.PREFECT_CLIENT, sys)  # as if it had
    call(where, env)  # as the interpreter ends
    assert spawned == [(tmp_path, engine.DEFAULT_IDLE_MINUTES)]
    note = capsys.readouterr().err
    assert note.startswith("note: started the project's engine in the background") and (
        note.count("\n") == 1 and "EDGETUNE_ENGINE=off" in note
    )

    monkeypatch.setattr(engine, "control", lambda where, what: {"pid": 1})
    engine.socket_path(tmp_path).touch()
    call(where, env)  # one answers there now (another command started it): no second
    assert len(spawned) == 1 and capsys.readouterr().err == ""
    monkeypatch.setenv(engine.SWITCH, "on")
    at_exit.clear()
    monkeypatch.setattr(engine, "_connect", lambda where: None)
    assert engine.run_in_engine(["edgetune", "tune", "x.yaml"]) is None
    assert at_exit == []  # "on" never starts one


def test_engine_and_worker_commands_never_go_to_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    asked: list[Path] = []
    monkeypatch.setattr(engine, "_connect", lambda where: asked.append(where))
    for argv in (["edgetune", "engine", "stop"], ["edgetune", "worker"], ["edgetune", "--help"]):
        assert engine.run_in_engine(argv) is None
    assert asked == []
    monkeypatch.setenv(engine.SWITCH, "off")
    assert engine.run_in_engine(["edgetune", "tune", "x.yaml"]) is None
    assert asked == []
    monkeypatch.setenv(engine.SWITCH, "on")
    assert engine.run_in_engine(["edgetune", "tune", "x.yaml"]) is None
    assert asked == [tmp_path]


@pytest.mark.integration
@pytest.mark.slow
def test_by_default_one_engine_starts_however_many_commands_find_none(tmp_path: Path) -> None:
    """By default (no EDGETUNE_ENGINE, no CI) a command that finds no engine runs cold and
    starts one as it ends, with a note; two such commands at once start two processes, and
    one of them ends before its imports."""
    (tmp_path / "home").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    env = _environment(tmp_path / "home", EDGETUNE_ENGINE="", CI="")
    clients = [
        subprocess.Popen(
            [EDGETUNE, "tune", "absent.yaml"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    started = 0
    for client in clients:
        _, stderr = client.communicate(timeout=300)
        assert client.returncode == 2 and stderr.startswith("error: "), stderr
        # the last line, unless the other's engine already answered as this one ended
        started += stderr.splitlines()[-1].startswith("note: started the project's engine")
    assert started >= 1
    deadline = time.monotonic() + 180
    while (status := engine.control(project, "status")) is None:
        assert time.monotonic() < deadline, engine.log_path(project).read_text()
        time.sleep(0.2)
    log = engine.log_path(project)
    while started == 2 and "another engine runs for this project" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    assert log.read_text().count("engine INFO ready in") == 1
    again = _edgetune(project, "tune", "absent.yaml", EDGETUNE_ENGINE="", CI="")
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert "note: " not in again.stderr  # it ran in the engine
    assert _status(project)["served"] == 1 and _status(project)["pid"] == status["pid"]
    assert _edgetune(project, "engine", "stop").returncode == 0
    assert engine.wait_stopped(project, 30)


def test_a_message_sent_whole_is_not_followed_by_an_empty_send() -> None:
    """The engine answers a refusal or a control request and closes at once; a send of
    the nothing left after ``sendmsg`` then failed (EPIPE), and the client took the
    engine for absent (about one request in three)."""

    class AnsweredAndClosed:
        def sendmsg(self, buffers: list[bytes], ancillary: object) -> int:
            return len(buffers[0])

        def sendall(self, data: bytes) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    engine.send(AnsweredAndClosed(), {"control": "status"}, [0])  # type: ignore[arg-type]


@pytest.mark.integration
def test_many_control_requests_all_get_an_answer(project: Path) -> None:
    pid = _status(project)["pid"]
    answers = [engine.control(project, "status") for _ in range(100)]
    assert [a and a["pid"] for a in answers] == [pid] * 100


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_engine_leaves_its_commands_their_server(
    tmp_path: Path, digits_root: Path
) -> None:
    """The engine killed (the OOM killer's pick: it is the largest process) while a study
    runs through it: the study ends as it would have, on the engine's Prefect server,
    which stops once the last of the engine's commands is gone; the next engine starts."""
    (tmp_path / "home").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    assert _edgetune(project, "engine", "start").returncode == 0
    status = _status(project)
    config = _write_study(project, digits_root, "survivor", epochs=12, swa_start=10)
    client = subprocess.Popen(
        [EDGETUNE, "tune", config, "--json"],
        cwd=project,
        env=_environment(tmp_path / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while _trial_states(project, "survivor") != ["RUNNING"]:
        assert client.poll() is None and time.monotonic() < deadline, client.communicate()
        time.sleep(0.1)
    os.kill(status["pid"], signal.SIGKILL)
    stdout, stderr = client.communicate(timeout=300)
    assert client.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["counts"]["COMPLETE"] == 1
    port = int(status["prefect"].rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + 30
    while True:  # its server ends with the last command of the killed engine
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.monotonic() < deadline, "the killed engine's server outlived its commands"
        time.sleep(0.2)
    again = _edgetune(project, "engine", "start")  # over the socket it left behind
    assert again.returncode == 0, again.stderr
    assert _status(project)["pid"] != status["pid"]
    assert _edgetune(project, "engine", "stop").returncode == 0
