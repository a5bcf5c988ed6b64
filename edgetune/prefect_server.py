"""The project's temporary Prefect server, for a command run without a Prefect server.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server on the first call that
needs one: the command imports the server's code (about 2.5 s), then waits for it to
answer (about 3.5 s) before its flow starts, and the server is a child in the command's
process group, so a Ctrl-C in a terminal stops it under the running study, and a killed
command leaves it running.

edgetune starts the same server itself (``start``): at once and in the background, so it
comes up while the command imports its libraries and reads its config; on the project's
own database (``.prefect/prefect.db``); in its own session, so a Ctrl-C reaches the
command only, which ends its trials and then stops the server (``stop``); and with a
watchdog that stops it when the command is gone, however the command ended (SIGKILL
included). The command waits for it (``ready``) just before its first flow runs.

This module imports nothing of Prefect: the command sets ``PREFECT_API_URL`` before
Prefect reads its settings.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks.host import EMBEDDED_PREFECT_URL_ENV as EMBEDDED_URL_ENV

HOST = "127.0.0.1"
#: How long a command waits for the server; its first start migrates a new database.
STARTUP_TIMEOUT_S = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
#: How often the server checks that its command still runs.
WATCH_INTERVAL_S = 0.5
#: How long a stopping server may take before it is killed.
STOP_TIMEOUT_S = 5.0
#: How many times a server that ended by itself is started again on its port.
RESTARTS = 3


#: Where a Prefect server and its database are: set by the user, they win over the
#: project's own server (``edgetune.cli``, ``edgetune.engine``).
LOCATION_VARIABLES = (
    "PREFECT_API_URL",
    "PREFECT_HOME",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
)


class ServerStartError(RuntimeError):
    """The project's Prefect server did not come up."""


@dataclass
class ProjectServer:
    """A running server: its process, its API URL and its log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    restarts: int = 0

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])


_running: list[ProjectServer] = []
#: A server another process owns (the project's engine) serves this command.
_adopted: list[bool] = []
#: The session whose processes a server started from here keeps serving after this
#: process is gone (the engine's: the commands it forked still use it).
_outlived_by: list[int] = []
#: Set when this process stops its servers: no server is started again after that.
_stopping = threading.Event()
_supervised: list[bool] = []


def serve_session() -> None:
    """Servers this process starts serve its whole session: they stop when the last of its
    processes ends, not with this one (the engine: its commands outlive a killed engine)."""
    _outlived_by[:] = [os.getsid(0)]


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _launch(log: Path, port: int | None = None) -> ProjectServer:
    """A server on ``port`` (a free one by default; the log is appended to when a port is
    given: the same server started again)."""
    again, port = port is not None, port or _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", EMBEDDED_URL_ENV)}
    env.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"})
    env["PREFECT__SERVER_FINAL"] = "1"
    with log.open("ab" if again else "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgetune.prefect_server", str(port), str(os.getpid())]
            + [str(session) for session in _outlived_by],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the command only
        )
    return ProjectServer(process, f"http://{HOST}:{port}/api", log)


def start(state_dir: Path) -> ProjectServer:
    """Start the server in the background and point this process's Prefect at it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    server = _launch(state_dir / "server.log")
    if not _running:
        # atexit runs after Prefect's own exit hooks (threading's), which send its last logs
        atexit.register(stop)
    _running.append(server)
    os.environ["PREFECT_API_URL"] = os.environ[EMBEDDED_URL_ENV] = server.url
    return server


def running() -> bool:
    """Whether this command has a project server of its own (its flows run there): one it
    started, or the engine's it was forked from."""
    return bool(_running or _adopted)


def alive() -> bool:
    """Whether the servers this process started still run."""
    return all(server.process.poll() is None for server in _running)


def forget() -> None:
    """In a process forked from the one that started the servers: they are not this
    process's to wait for or to stop."""
    _running.clear()
    atexit.unregister(stop)


def adopt() -> None:
    """In a command forked from the project's engine: the engine's server (already in
    ``PREFECT_API_URL``) is this command's, used as its own but never stopped by it."""
    forget()
    _adopted.append(True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1][:300] if lines else "no output"


def ready(timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until the started servers answer; a server that exits is started once more on
    another port (another process took its port between choosing and binding)."""
    for index, server in enumerate(_running):
        deadline, restarted = time.monotonic() + timeout, False
        while not _answers(server.url):
            code = server.process.poll()
            if code is not None and not restarted:
                server = _running[index] = _launch(server.log)
                os.environ["PREFECT_API_URL"] = os.environ[EMBEDDED_URL_ENV] = server.url
                restarted = True
                continue
            if code is not None or time.monotonic() > deadline:
                stop()
                what = (
                    f"exited with code {code}"
                    if code is not None
                    else f"gave no answer in {timeout:.0f} s"
                )
                raise ServerStartError(
                    f"the project's Prefect server {what} ({last_line(server.log)}); see "
                    f"{server.log}, or start a Prefect server and set PREFECT_API_URL"
                )
            time.sleep(0.05)


def revive() -> list[str]:
    """Start again, on its port, each server of this process that ended though nothing
    stopped it (killed, out of memory), at most ``RESTARTS`` times: the flows' Prefect
    clients retry their calls meanwhile, and the database on disk keeps the runs. One line
    for each server started again."""
    said: list[str] = []
    if _stopping.is_set():
        return said
    for index, server in enumerate(_running):
        code = server.process.poll()
        if code is None or server.restarts >= RESTARTS:
            continue
        _running[index] = _launch(server.log, server.port)
        _running[index].restarts = server.restarts + 1
        said.append(
            f"the project's Prefect server ended (exit code {code}); started again on port "
            f"{server.port} (see {server.log})"
        )
    return said


def supervise() -> None:
    """In a command (not the engine, which forks and runs no thread): a thread that starts
    the project's server again when it ends by itself (``revive``), until ``stop``."""

    def watch() -> None:
        while not _stopping.wait(WATCH_INTERVAL_S):
            for line in revive():
                print(f"warning: {line}", file=sys.stderr, flush=True)

    if _running and not _supervised:
        _supervised.append(True)
        threading.Thread(target=watch, name="revive-prefect-server", daemon=True).start()


def stop() -> None:
    """Stop the servers this process started (at exit; their watchdogs would too)."""
    _stopping.set()
    while _running:
        process = _running.pop().process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _session_runs(session: int) -> bool:
    """Whether a process of ``session`` runs (a zombie does not); without ``/proc`` (not
    Linux) none is known to."""
    if not os.path.isdir("/proc"):
        return False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            return True
    return False


def _serve(port: int, parent: int, session: int | None = None) -> None:
    """The server process: Prefect's API app under uvicorn, stopped when ``parent`` is gone
    (and, with ``session``, no process of that session runs any more)."""
    import uvicorn

    config = uvicorn.Config(
        "prefect.server.api.server:create_app",
        factory=True,
        host=HOST,
        port=port,
        log_level="error",
        lifespan="on",
    )
    server = uvicorn.Server(config)

    def watch() -> None:
        while os.getppid() == parent or (session is not None and _session_runs(session)):
            time.sleep(WATCH_INTERVAL_S)
        server.should_exit = True  # the command is gone: shut down cleanly, then for sure
        time.sleep(STOP_TIMEOUT_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-command", daemon=True).start()
    server.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), *(int(a) for a in sys.argv[3:4]))
