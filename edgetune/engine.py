"""The project's resident engine: ``edgetune`` commands that start warm.

A cold ``edgetune tune`` spends its first ten seconds or so before the first trial on
work that is the same for every command of a project: importing Prefect, Optuna, MLflow,
torch, torchvision and ONNX Runtime (about 9 s of CPU) and starting the project's own
Prefect server. ``edgetune engine start`` does that work once, in a background process
per project folder (the engine), and every later ``edgetune`` command in that folder
starts as a fork of it instead of as a new interpreter:

- the engine owns the project's Prefect server (``edgetune.prefect_server``) and keeps it
  between commands, so Prefect's runs of one command stay browsable by the next; a killed
  engine's commands keep it until the last of them ends;
- the command (the client) sends its arguments, folder and environment over a unix
  socket in the project's ``.prefect/`` folder, with its standard input, output and error
  (``SCM_RIGHTS``): what the command prints goes straight to the client's terminal or
  pipe, and the client exits with the command's exit code;
- a Ctrl-C (or SIGTERM, SIGHUP) of the client reaches the command's whole process group,
  as it would in a terminal; a client that is killed or hung up ends it as a Ctrl-C does
  (its trials are told FAIL), its output dropped;
- the engine refuses a command (the client then runs it cold, with a one-line note) when
  the code or the installed packages changed since it started, or when an environment
  variable read at import time differs (``IMPORT_TIME`` and the Prefect server's
  location): then it stops, and ``edgetune engine start`` starts a fresh one;
- it stops after ``--idle`` minutes without a command, on ``edgetune engine stop`` (after
  the commands it runs), and never leaves its socket behind when it ends cleanly.

By default (``EDGETUNE_ENGINE=auto``) a command that finds no engine runs cold and, when
it ends, if it used Prefect (a study, not ``data``), starts the project's engine in the
background with a one-line note: the next commands in that folder start warm, and the
engine ends after ``--idle`` minutes without one. Where the ``CI`` variable is set
(continuous integration), the default is ``off``. ``EDGETUNE_ENGINE=off`` (or 0, no,
false) runs every command cold and starts nothing; ``on`` (or any other value) uses a
running engine but never starts one. Only the user who started the engine may use it
(its socket's folder and the peer's credentials).

This module imports only the standard library (and ``edgetune.prefect_server``, which
imports no more) at the top: the client side runs before anything else in every
``edgetune`` command.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgetune import prefect_server

#: The engine's files, in the project's Prefect state folder.
STATE = Path(".prefect")
SOCKET_NAME, LOG_NAME = "engine.sock", "engine.log"
#: ``EDGETUNE_ENGINE=off`` (or 0, no, false): never use a running engine; ``auto`` (the
#: default, but where ``CI`` is set): use one, and start one after a command that found
#: none; ``on`` (any other value): use a running one, never start one.
SWITCH = "EDGETUNE_ENGINE"
OFF = frozenset({"off", "0", "no", "false"})
#: Commands that always run in their own process.
COLD_COMMANDS = frozenset({"engine", "worker"})
#: Environment variables read when a library is imported (or by the interpreter): a
#: command whose values differ from the engine's would not see its own.
IMPORT_TIME = (
    "PYTHON",
    "TORCH",
    "PYTORCH",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "LD_",
    "CUDA_",
    "NVIDIA_",
    "MPL",
    "VIRTUAL_ENV",
)
#: Where the Prefect server is: the engine keeps the project's own only where none is set.
PREFECT_PLACES = (*prefect_server.LOCATION_VARIABLES, "PREFECT_PROFILE")
DEFAULT_IDLE_MINUTES = 30.0
#: Imported by a command that used Prefect (``start_after``).
PREFECT_CLIENT = "prefect.client.orchestration"
#: How long ``edgetune engine start`` waits for the engine (a first start migrates).
START_TIMEOUT_S = 180.0
_FDS = struct.calcsize("i")


class EngineError(RuntimeError):
    """The engine could not be started or reached."""


def socket_path(project: Path) -> Path:
    return project / STATE / SOCKET_NAME


def address(path: Path) -> str:
    """A socket's address: relative to this folder where that is shorter (a unix socket's
    path has at most 107 bytes, a project's folder may be deeper)."""
    relative = os.path.relpath(path)
    return relative if len(relative) < len(str(path)) else str(path)


def log_path(project: Path) -> Path:
    return project / STATE / LOG_NAME


def cannot_listen(path: Path) -> str | None:
    """Why no unix socket can be made where ``path`` goes (a filesystem without them, a
    path too long), or None; checked before an engine starts, so one that could never
    serve is not started (or ends before its imports)."""
    probe = path.with_name(f"{os.getpid():07d}.tst"[-len(path.name) :])  # as long
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address(probe))
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def import_time_environment(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment a warm process cannot take from a command."""
    return {
        key: value
        for key, value in env.items()
        if key.startswith(IMPORT_TIME) or key in PREFECT_PLACES
    }


def _package_roots() -> list[Path]:
    import importlib.util

    roots = []
    for name in ("edgetune", "flows", "tasks"):
        spec = importlib.util.find_spec(name)
        roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return roots


def code_stamp(roots: list[Path] | None = None) -> str:
    """Changes when edgetune's code (the source files under ``roots``: its packages by
    default) or the installed packages (the folders they install into) change."""
    import site

    newest, count = 0, 0
    for root in _package_roots() if roots is None else roots:
        for path in root.rglob("*.py"):
            newest, count = max(newest, path.stat().st_mtime_ns), count + 1
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    installed = [str(os.stat(f).st_mtime_ns) for f in folders if os.path.isdir(f)]
    return f"{sys.executable}:{newest}:{count}:{','.join(installed)}"


# --- the wire: one JSON object per line; the first request carries the client's fds ---


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = (json.dumps(message) + "\n").encode()
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        data = data[sock.sendmsg([data], ancillary) :]
    if data:  # (a send of nothing to an engine that answered and closed fails: EPIPE)
        sock.sendall(data)


class Lines:
    """The JSON lines of a connection, and the fds its first bytes carried."""

    def __init__(self, sock: socket.socket, with_fds: bool = False) -> None:
        self.sock, self.buffer, self.fds, self.with_fds = sock, b"", list[int](), with_fds

    def _more(self) -> bool:
        if self.with_fds:  # the fds come with the first bytes
            self.with_fds = False
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(3 * _FDS))
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    usable = len(payload) - len(payload) % _FDS
                    self.fds.extend(array.array("i", payload[:usable]))
        else:
            data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def pending(self) -> bool:
        """Whether a whole message was read already (a reader waiting on the socket would
        not see it)."""
        return b"\n" in self.buffer

    def read(self) -> dict[str, Any] | None:
        """The next message; None at the end of the connection."""
        while b"\n" not in self.buffer:
            if not self._more():
                return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message


# --- the client: an ``edgetune`` command handed to the project's engine ---


def _connect(project: Path) -> socket.socket | None:
    path = socket_path(project)
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address(path))
    except OSError:  # an engine that ended without cleaning up (killed)
        sock.close()
        return None
    return sock


def _open_fds() -> list[int]:
    """The client's standard streams that are open (a closed one is /dev/null there)."""
    fds = []
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.fstat(fd)
            fds.append(fd)
    return fds


def switch(env: dict[str, str]) -> str:
    """``off``, ``on`` or ``auto``: what ``EDGETUNE_ENGINE`` (or its default) says."""
    value = env.get(SWITCH, "").strip().lower()
    if not value:
        in_ci = env.get("CI", "").strip().lower() not in {"", *OFF}
        return "off" if in_ci else "auto"
    return "off" if value in OFF else "auto" if value == "auto" else "on"


def run_in_engine(argv: list[str]) -> int | None:
    """Run the command in the project's engine; its exit code, or None where no engine
    runs here or it refused the command (then the caller runs it itself, and, by default,
    starts the engine when it ends)."""
    mode = switch(dict(os.environ))
    if mode == "off":
        return None
    if len(argv) < 2 or argv[1] in COLD_COMMANDS or argv[1].startswith("-"):
        return None
    sock = _connect(Path.cwd())
    if sock is None:
        if mode == "auto":
            atexit.register(start_after, Path.cwd(), dict(os.environ))
        return None
    with sock, _forwarding(sock) as received:
        fds = _open_fds()
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "fds": fds}
        try:
            send(sock, request, fds)
            lines = Lines(sock)
            first = lines.read()
        except OSError:
            first = None
        if first is None or "refused" in first:
            if first is not None:
                print(f"note: {first['refused']}; running without it", file=sys.stderr)
                if mode == "auto" and first.get("stopping"):  # a fresh one for the next
                    atexit.register(start_after, Path.cwd(), dict(os.environ))
            if received:  # a Ctrl-C before the command started: it ends here
                print("error: interrupted", file=sys.stderr)
                return 128 + received[0]
            return None
        last = lines.read()
    if last is None:
        where = log_path(Path.cwd()).relative_to(Path.cwd())
        print(f"error: the project's engine ended during the command; see {where}", file=sys.stderr)
        return 1
    return int(last["exit"])


@contextlib.contextmanager
def _forwarding(sock: socket.socket) -> Iterator[list[int]]:
    """Ctrl-C, SIGTERM and SIGHUP of the client go to the command's process group (the
    engine's monitor passes them on); the signals received, in order."""
    received: list[int] = []

    def forward(number: int, _frame: object) -> None:
        received.append(number)
        with contextlib.suppress(OSError):
            send(sock, {"signal": number})

    kinds = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {kind: signal.signal(kind, forward) for kind in kinds}
    try:
        yield received
    finally:
        for kind, handler in before.items():
            signal.signal(kind, handler)


def control(project: Path, what: str) -> dict[str, Any] | None:
    """Ask the engine of ``project`` for its ``status`` or to ``stop``; None if none runs."""
    sock = _connect(project)
    if sock is None:
        return None
    with sock:
        try:
            send(sock, {"control": what})
            return Lines(sock).read()
        except OSError:
            return None


def spawn(project: Path, idle_minutes: float, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The engine's process for ``project``, started in the background; ``env``: the
    environment the commands it serves will have."""
    (project / STATE).mkdir(parents=True, exist_ok=True)
    with log_path(project).open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgetune.resident", "--idle", f"{idle_minutes:g}"],
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not stopped by the terminal's Ctrl-C
        )


def start_after(project: Path, env: dict[str, str]) -> None:
    """At the end of a cold command (``auto``) that used Prefect (the commands whose start
    the engine shortens; not ``data`` or a usage error): start the engine of ``project`` in
    the background unless one runs there now, with a one-line note. Not while the command
    runs: the engine would take CPU from it, and idle out under a long study."""
    if PREFECT_CLIENT not in sys.modules:
        return
    if control(project, "status") is not None:
        return
    try:
        if cannot_listen(socket_path(project)):  # it could never serve: all run cold
            return
        spawn(project, DEFAULT_IDLE_MINUTES, env)
    except OSError:  # a folder the user cannot write: the next command runs cold too
        return
    print(
        "note: started the project's engine in the background: the next edgetune commands "
        f"in this folder start warm (it stops after {DEFAULT_IDLE_MINUTES:g} idle minutes, "
        "or on 'edgetune engine stop'; EDGETUNE_ENGINE=off runs without it)",
        file=sys.stderr,
    )


def start(project: Path, idle_minutes: float, env: dict[str, str]) -> dict[str, Any]:
    """Start the engine of ``project`` and wait until it answers; its status."""
    process, log = spawn(project, idle_minutes, env), log_path(project)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        status, code = control(project, "status"), process.poll()
        if status is not None and (status.get("pid") == process.pid or code is not None):
            return status  # this one, or one another command started meanwhile
        if code is not None:
            raise EngineError(
                f"the engine exited with code {code} ({prefect_server.last_line(log)}); see {log}"
            )
        time.sleep(0.1)
    process.terminate()
    raise EngineError(f"the engine gave no answer in {START_TIMEOUT_S:.0f} s; see {log}")


def wait_stopped(project: Path, timeout: float) -> bool:
    """Whether the engine of ``project`` ended (its socket gone) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while socket_path(project).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not socket_path(project).exists()
