"""The engine's process (``python -m edgetune.resident``), started by ``edgetune engine
start`` in the project folder; the client side and the wire are in ``edgetune.engine``.

It sets up what every command of the project sets up (the Prefect location and the
project's Prefect server, as ``edgetune.cli`` does), imports what the commands import,
and then serves: each command is a fork of this warm process. Two forks per command keep
the engine itself single-threaded and free of the command's state:

- the monitor: tells the client the command started, passes the client's signals to the
  command's process group (a vanished client hangs the command up: ``_hung_up``), then
  sends the exit code;
- the command: in its own process group, with the client's standard streams, folder,
  arguments and environment; Prefect's settings and logging are read again from that
  environment; it ends as an interpreter ends (threads joined, exit hooks run).

The engine never runs torch, CUDA or any thread before it forks (checked: it logs the
threads it finds), so each command starts as a new interpreter would.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import importlib
import io
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune import engine, prefect_server

#: Imported once by the engine: what ``edgetune tune`` and the other commands import,
#: including what they import inside functions (figures, ONNX, MLflow's model flavour).
WARM = (
    "edgetune.cli",
    "edgetune.progress",
    "edgetune.tables",
    "flows.tune",
    "flows.stages",
    "tasks.hpo.campaign",
    "tasks.hpo.recovery",
    "tasks.hpo.reports",
    "tasks.workloads.registry",
    "tasks.workloads.classifier",
    "tasks.workloads.evaluation",
    "tasks.config.variants",
    "tasks.compilers.onnxruntime_int8",
    "tasks.devices.local",
    "tasks.devices.ssh",
    "tasks.report",
    "tasks.packaging",
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "onnxruntime.quantization",
    "mlflow",
    "mlflow.onnx",
    "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store",
    "alembic.command",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "plotly.graph_objects",
    "plotly.subplots",
    "PIL.PngImagePlugin",
)
#: Seconds between the engine's checks (idle time, finished commands, its server).
TICK_S = 0.5
#: How long an engine waits for the lock of one that is stopping.
LOCK_WAIT_S = 10.0
#: How often a monitor looks for its command's end (its exit code's latency).
WAIT_S = 0.02

log = logging.getLogger("edgetune.engine")


@dataclass
class Engine:
    """The engine's state: its reference environment, its code, its commands."""

    project: Path
    idle_s: float
    reference: dict[str, str]
    stamp: str
    #: What the engine set for the Prefect server (and the command sets no more).
    added: dict[str, str] = field(default_factory=dict)
    #: Defaults its imports set (a command would set them when it imports the same).
    imported: dict[str, str] = field(default_factory=dict)
    commands: set[int] = field(default_factory=set)
    served: int = 0
    started: float = field(default_factory=time.time)
    stopping: str = ""
    lock: int = -1

    def refusal(self, env: dict[str, str]) -> str | None:
        """Why a command with environment ``env`` cannot run here, or None."""
        if self.stopping:
            return f"the project's engine is stopping ({self.stopping})"
        if engine.code_stamp() != self.stamp:
            self.stopping = "the code or the installed packages changed"
            return (
                "the code or the installed packages changed since the project's engine "
                "started; it stops now ('edgetune engine start' starts a fresh one)"
            )
        theirs = engine.import_time_environment(env)
        differ = sorted(
            k for k in {*theirs, *self.reference} if theirs.get(k) != self.reference.get(k)
        )
        if differ:
            return (
                f"the project's engine started with other values of {', '.join(differ)} "
                "(restart it in this environment: edgetune engine stop; edgetune engine start)"
            )
        return None

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "since": self.started,
            "idle_minutes": self.idle_s / 60,
            "running": len(self.commands),
            "served": self.served,
            "prefect": self.added.get("PREFECT_API_URL", "the user's"),
            "stopping": self.stopping,
        }


def _changed(before: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if before.get(k) != v}


def _prepare(project: Path, idle_s: float) -> Engine:
    """What a command would do before its work, done once: the Prefect location and the
    project's server (started first, so it comes up while the imports run), the imports."""
    from edgetune import cli

    given = dict(os.environ)
    state = Engine(project, idle_s, engine.import_time_environment(given), engine.code_stamp())
    cli._project_prefect_state()  # in the order a command takes: the server gets its defaults
    cli._quiet_services(verbose=False)
    quiet = dict(os.environ)
    prefect_server.serve_session()  # a killed engine's commands keep their server
    cli._prefect_in_background()
    places = (*engine.PREFECT_PLACES, cli._PROJECT_STATE, prefect_server.EMBEDDED_URL_ENV)
    state.added = {k: v for k, v in _changed(given).items() if k in places}
    clock = time.monotonic()
    for name in WARM:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional extra that is not installed
            log.info("not imported: %s (%s)", name, exc)
    log.info("imports: %.1f s", time.monotonic() - clock)
    # defaults modules set when imported (a command would set them when it imports them)
    state.imported = {k: v for k, v in _changed(quiet).items() if k not in places}
    prefect_server.ready()
    if threading.active_count() > 1:
        log.warning("threads before the first fork: %s", threading.enumerate())
    return state


def _lock(project: Path) -> int | None:
    """The project's engine lock (held for the engine's life), or None if another engine
    holds it for ``LOCK_WAIT_S`` (two started at once: the second ends before its imports;
    one started as another stops waits for it)."""
    path = project / engine.STATE / "engine.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, deadline = os.open(path, os.O_RDWR | os.O_CREAT, 0o600), time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.1)


def serve(project: Path, idle_s: float) -> int:
    """Prepare, then run commands until idle for ``idle_s``, stopped, or stale."""
    clock, lock = time.monotonic(), _lock(project)
    if lock is None:
        log.info("another engine runs for this project (pid %d ends)", os.getpid())
        return 0
    problem = engine.cannot_listen(engine.socket_path(project))
    if problem:
        log.error("no socket at %s (%s): commands here run cold", project / engine.STATE, problem)
        return 1
    state = _prepare(project, idle_s)
    state.lock = lock
    path = engine.socket_path(project)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # an engine that was killed left it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(engine.address(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    listener.settimeout(TICK_S)
    log.info("ready in %.1f s (pid %d); socket %s", time.monotonic() - clock, os.getpid(), path)

    def stop(number: int, _frame: object) -> None:
        state.stopping = state.stopping or f"signal {number}"

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    last = time.monotonic()
    try:
        while True:
            _reap(state)
            if state.commands:
                last = time.monotonic()
            elif state.stopping:
                break
            elif time.monotonic() - last > idle_s:
                log.info("idle for %.0f min: stopping", idle_s / 60)
                break
            _check_server(state)
            try:
                conn, _ = listener.accept()
            except (TimeoutError, InterruptedError):
                continue
            with conn:
                _handle(state, conn, listener)
            last = time.monotonic()
    finally:
        listener.close()
        prefect_server.stop()  # before the socket goes: gone means stopped
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    log.info("stopped (%s); %d commands served", state.stopping or "idle", state.served)
    return 0


def _reap(state: Engine) -> None:
    for pid in list(state.commands):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
        state.commands.discard(pid)


def _check_server(state: Engine) -> None:
    if not state.added or state.stopping:
        return
    for line in prefect_server.revive():  # its commands' clients retry meanwhile
        log.warning(line)
    if not prefect_server.alive():  # started again too often
        state.stopping = "its Prefect server ended"
        log.warning("the project's Prefect server ended; see .prefect/server.log")


def _peer_uid(conn: socket.socket) -> int:
    """The connecting user (Linux); elsewhere the socket's mode (0600) keeps others out."""
    if not hasattr(socket, "SO_PEERCRED"):
        return os.getuid()
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _handle(state: Engine, conn: socket.socket, listener: socket.socket) -> None:
    """One connection: a control request, or a command to fork (or refuse)."""
    if _peer_uid(conn) != os.getuid():
        return
    conn.settimeout(10)
    lines = engine.Lines(conn, with_fds=True)
    try:
        request = lines.read()
    except (OSError, ValueError):
        request = None
    fds = lines.fds
    try:
        if request is None:
            return
        if "control" in request:
            _reap(state)
            if request["control"] == "stop":
                state.stopping = state.stopping or "edgetune engine stop"
            engine.send(conn, state.status())
            return
        reason = state.refusal(request["env"])
        if reason:
            engine.send(conn, {"refused": reason, "stopping": bool(state.stopping)})
            return
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            listener.close()
            _monitor(conn, lines, request, fds, state)  # never returns
        state.commands.add(pid)
        state.served += 1
    except OSError as exc:  # the client went away
        log.info("a request failed: %s", exc)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _default_signals() -> None:
    for kind in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(kind, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _monitor(
    conn: socket.socket,
    lines: engine.Lines,
    request: dict[str, Any],
    fds: list[int],
    state: Engine,
) -> None:
    """The monitor's life (a fork of the engine): start the command, pass signals on,
    report its exit code; never returns."""
    try:
        _default_signals()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(state.lock)  # the engine's alone: a command may outlive it
        pid = os.fork()
        if pid == 0:
            conn.close()
            _command(request, fds, state)  # never returns
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # as the command does: no signal may miss its group
        for fd in fds:
            os.close(fd)
        engine.send(conn, {"started": pid})
        code = _wait(conn, lines, pid)
        with contextlib.suppress(OSError):
            engine.send(conn, {"exit": code})
    except BaseException:  # a monitor never returns into the engine's loop
        traceback.print_exc()
    finally:
        os._exit(0)


def _wait(conn: socket.socket, lines: engine.Lines, pid: int) -> int:
    """The command's exit code (128 + N for signal N, as a shell says), passing on the
    client's signals meanwhile; a client that is gone (killed) hangs the command up: it
    lets go of the client's streams and ends as after a Ctrl-C (its trials told FAIL)."""
    client = True
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code
        if not client:
            time.sleep(WAIT_S)
            continue
        if not lines.pending():
            readable, _, _ = select.select([conn], [], [], WAIT_S)
            if not readable:
                continue
        try:
            message = lines.read()
        except (OSError, ValueError):
            message = None
        client = message is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if not client:
                os.kill(pid, signal.SIGHUP)  # the command's ``_hung_up``
            elif message and message.get("signal"):
                os.killpg(pid, int(message["signal"]))


def _command(request: dict[str, Any], fds: list[int], state: Engine) -> None:
    """The command's life (a fork of the monitor): run ``edgetune`` as the client would
    have; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        _streams(request["fds"], fds)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(state.added)
        for key, value in state.imported.items():
            os.environ.setdefault(key, value)
        sys.argv = list(request["argv"])
        log.handlers.clear()  # the engine's log is not the command's
        _default_signals()
        signal.signal(signal.SIGHUP, _hung_up)
        code = _run(state.added)
    except SystemExit as exc:  # as the interpreter reads it: a message is printed, then 1
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # on the client's stderr, as Python would print it
        traceback.print_exc()
    _finish(code)


def _hung_up(_number: int, _frame: object) -> None:
    """SIGHUP in a command: its client is gone (killed, or its terminal closed). Writing
    to the client's streams would fail from here on (a broken pipe, a hung-up terminal),
    and with it the command's own clean-up; so they become /dev/null, and the command ends
    as after a Ctrl-C."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    raise KeyboardInterrupt


def _streams(numbers: list[int], fds: list[int]) -> None:
    """The client's standard streams as this process's 0, 1 and 2 (/dev/null for one it
    had closed), and Python's ``sys.std*`` made anew over them (line-buffered on a
    terminal, as at an interpreter's start)."""
    given = dict(zip(numbers, fds, strict=False))
    for target in (0, 1, 2):
        source = given.get(target)
        if source is None:
            source = os.open(os.devnull, os.O_RDWR)
        os.dup2(source, target)
        if source not in (0, 1, 2):
            os.close(source)
    encoding = sys.stdout.encoding if sys.stdout else "utf-8"

    def stream(fd: int, mode: str, errors: str, line: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        buffered: Any = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=line)

    sys.stdin = stream(0, "r", "strict", False)
    sys.stdout = stream(1, "w", "strict", os.isatty(1))
    sys.stderr = stream(2, "w", "backslashreplace", True)
    for name in ("stdin", "stdout", "stderr"):
        setattr(sys, f"__{name}__", getattr(sys, name))


def _run(added: dict[str, str]) -> int:
    """The command, in this process's new environment."""
    from edgetune import cli

    if "PREFECT_API_URL" in added:
        prefect_server.adopt()  # the engine's server: used here, never stopped here
    else:
        prefect_server.forget()
    verbose = any(word in ("--verbose", "-v") for word in sys.argv[2:])
    if verbose:  # the engine quieted Optuna; a verbose command keeps its default
        import optuna

        optuna.logging.set_verbosity(optuna.logging.INFO)
    cli._quiet_services(verbose)  # as the command would, before Prefect reads its settings
    import mlflow.utils.logging_utils
    import prefect.context
    import prefect.logging.configuration

    # What Prefect and MLflow read from the environment when they are imported, read
    # again from the command's, in the order a command imports them.
    prefect.context.refresh_global_settings_context()
    prefect.logging.configuration.setup_logging(incremental=False)
    mlflow.utils.logging_utils._configure_mlflow_loggers("mlflow")
    cli.run_here()
    return 0


def _finish(code: int) -> None:
    """End as an interpreter ends: non-daemon threads joined (Prefect's last logs and
    events are sent there), exit hooks run, streams flushed."""
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune.resident")
    parser.add_argument("--idle", type=float, default=engine.DEFAULT_IDLE_MINUTES)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s engine %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return serve(Path.cwd(), args.idle * 60)


if __name__ == "__main__":
    sys.exit(main())
