"""A real SSH "board" on 127.0.0.1 for the SSH runner's tests.

`start_board(tmp_path)` starts an SSH server on a free loopback port with its own host
key, one authorised client key, a known_hosts file for the client and a work dir:

- `openssh`: Debian's OpenSSH server (`/usr/sbin/sshd -D -e -f <config>`), preferred;
  install it with `apt-get install -y openssh-server`.
- `asyncssh`: an in-process asyncssh server (exec requests run in a real shell, SFTP
  served by `asyncssh.SFTPServer`) in a background thread with its own event loop, used
  when `/usr/sbin/sshd` is absent.

Both are real SSH: the client speaks to them over TCP and the keys are verified. Commands
run as the current user with this interpreter on PATH, so the device-side evaluator uses
a Python that has numpy and onnxruntime (pass `python=sys.executable` to the runner, as
`Board.runner_options()` does). `EDGETUNE_TEST_SSH_BACKEND=openssh|asyncssh` forces one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

SSHD = "/usr/sbin/sshd"
BACKENDS = ("openssh", "asyncssh")
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0


def available_backends() -> list[str]:
    """The backends this machine can run (asyncssh always; openssh when sshd is installed)."""
    return [b for b in BACKENDS if b != "openssh" or os.access(SSHD, os.X_OK)]


def default_backend() -> str:
    forced = os.environ.get("EDGETUNE_TEST_SSH_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"EDGETUNE_TEST_SSH_BACKEND={forced!r}; expected one of {BACKENDS}")
        return forced
    return available_backends()[0]


@dataclass
class Board:
    """A running SSH server and what a client needs to reach it."""

    backend: str
    host: str
    port: int
    user: str
    key_file: Path  # authorised client key (private, OpenSSH format)
    known_hosts: Path  # holds this server's host key for [host]:port
    host_key: Path
    work_dir: Path  # absolute; the runner's work_dir in tests
    home: Path  # where relative remote paths land
    root: Path  # everything this board wrote
    python: str = sys.executable
    _stop: list[Any] = field(default_factory=list, repr=False)

    def runner_options(self, **overrides: Any) -> dict[str, Any]:
        """SshRunner options for this board: fast failure, this interpreter, no retries."""
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_file": str(self.key_file),
            "known_hosts": str(self.known_hosts),
            "work_dir": str(self.work_dir),
            "python": self.python,
            "connect_timeout_s": 5,
            "retries": 0,
            "backoff_s": 0.0,
        }
        options.update(overrides)
        return options

    def stop(self) -> None:
        """Stop the server and every process it started."""
        while self._stop:
            self._stop.pop()()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_board(tmp_path: Path, backend: str | None = None) -> Board:
    """Start an SSH server on 127.0.0.1 (see the module docstring); `.stop()` it after."""
    backend = backend or default_backend()
    root = Path(tmp_path) / f"board-{backend}"
    root.mkdir(parents=True, exist_ok=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key_file = _write_private(root / "ssh_host_ed25519_key", host_key)
    key_file = _write_private(root / "id_ed25519", client_key)
    authorized = root / "authorized_keys"
    authorized.write_bytes(client_key.export_public_key())
    work_dir = root / "work"
    work_dir.mkdir(exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    if backend == "openssh":
        board = _start_openssh(root, host_key_file, authorized, key_file, user, work_dir)
    elif backend == "asyncssh":
        board = _start_asyncssh(root, host_key, authorized, key_file, user, work_dir)
    else:
        raise ValueError(f"unknown SSH board backend {backend!r}; expected one of {BACKENDS}")
    board.known_hosts.write_text(known_hosts_line(board.host, board.port, host_key))
    return board


def known_hosts_line(host: str, port: int, key: asyncssh.SSHKey) -> str:
    """The line `ssh-keyscan -p PORT HOST` would print for `key`."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key.export_public_key().decode().strip()}\n"


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _write_private(path: Path, key: asyncssh.SSHKey) -> Path:
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    return path


def _wait_for_port(port: int, alive: Any = lambda: True) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and alive():
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"SSH board did not listen on {HOST}:{port}")


# --------------------------------------------------------------------------- OpenSSH


def _start_openssh(
    root: Path, host_key: Path, authorized: Path, key_file: Path, user: str, work_dir: Path
) -> Board:
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    log = root / "sshd.log"
    for _ in range(3):  # the free port can be taken between choosing and binding it
        port = free_port()
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    f"ListenAddress {HOST}",
                    f"HostKey {host_key}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin yes",
                    "Subsystem sftp internal-sftp",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        with open(log, "ab") as log_file:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_for_port(port, alive=lambda p=proc: p.poll() is None)
        except RuntimeError:
            _terminate(proc)
            continue
        board = Board(
            backend="openssh",
            host=HOST,
            port=port,
            user=user,
            key_file=key_file,
            known_hosts=root / "known_hosts",
            host_key=host_key,
            work_dir=work_dir,
            home=Path(pwd.getpwuid(os.getuid()).pw_dir),
            root=root,
        )
        board._stop.append(lambda p=proc: _terminate(p))
        return board
    raise RuntimeError(f"sshd did not start; its log:\n{log.read_text(errors='replace')}")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the listener; its session children end with their connections."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- asyncssh


class _HomeSFTPServer(asyncssh.SFTPServer):
    """Real filesystem; relative paths are relative to the board's home, as with sshd."""

    home = b"/"

    def map_path(self, path: bytes) -> bytes:
        return path if path.startswith(b"/") else os.path.join(self.home, path)


class _AsyncsshBoard:
    """asyncssh server in a thread with its own event loop; exec requests run in `sh`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.children: set[asyncio.subprocess.Process] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ssh-board", daemon=True)
        self.server: asyncssh.SSHAcceptor | None = None

    def start(self, host_key: asyncssh.SSHKey, authorized: Path) -> int:
        self.thread.start()
        sftp = type("BoardSFTPServer", (_HomeSFTPServer,), {"home": os.fsencode(self.home)})
        create = asyncssh.create_server(
            asyncssh.SSHServer,
            HOST,
            0,
            server_host_keys=[host_key],
            authorized_client_keys=str(authorized),
            password_auth=False,
            kbdint_auth=False,
            process_factory=self._exec,
            sftp_factory=sftp,
            allow_scp=False,
            encoding=None,  # bytes: stdin may carry a file (install-evaluator.sh)
        )

        async def listen() -> asyncssh.SSHAcceptor:
            return await create

        future = asyncio.run_coroutine_threadsafe(listen(), self.loop)
        self.server = future.result(START_TIMEOUT_S)
        return int(self.server.sockets[0].getsockname()[1])

    async def _exec(self, process: asyncssh.SSHServerProcess[Any]) -> None:
        """Run the exec request in a shell in its own session (as sshd does)."""
        command = process.command
        if not command:
            process.stderr.write(b"this test board runs commands only\n")
            process.exit(1)
            return
        child = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.home,
            env={**os.environ, "HOME": str(self.home)},
            start_new_session=True,
        )
        self.children.add(child)
        feed = asyncio.create_task(_feed(process.stdin, child.stdin))
        try:
            await asyncio.gather(
                _pump(child.stdout, process.stdout), _pump(child.stderr, process.stderr)
            )
            status = await child.wait()
        finally:
            feed.cancel()
            self.children.discard(child)
        if status < 0:  # killed by a signal: report it like sshd does
            process.exit_with_signal(signal.Signals(-status).name.removeprefix("SIG"))
        else:
            process.exit(status)

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()
            for child in list(self.children):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(START_TIMEOUT_S)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(START_TIMEOUT_S)
        if not self.loop.is_running():
            self.loop.close()


async def _feed(source: Any, target: Any) -> None:
    """Channel stdin → child stdin, closed at the client's EOF."""
    try:
        while data := await source.read(1 << 16):
            target.write(data)
            await target.drain()
    except (OSError, asyncssh.Error):
        pass
    finally:
        target.close()


async def _pump(source: Any, target: Any) -> None:
    """Child output → channel until EOF; keeps reading if the client went away."""
    while data := await source.read(1 << 16):
        with contextlib.suppress(OSError, asyncssh.Error):
            target.write(data)
            await target.drain()


def _start_asyncssh(
    root: Path,
    host_key: asyncssh.SSHKey,
    authorized: Path,
    key_file: Path,
    user: str,
    work_dir: Path,
) -> Board:
    home = root / "home"
    home.mkdir(exist_ok=True)
    server = _AsyncsshBoard(home)
    try:
        port = server.start(host_key, authorized)
    except BaseException:
        server.stop()
        raise
    board = Board(
        backend="asyncssh",
        host=HOST,
        port=port,
        user=user,
        key_file=key_file,
        known_hosts=root / "known_hosts",
        host_key=root / "ssh_host_ed25519_key",
        work_dir=work_dir,
        home=home,
        root=root,
    )
    board._stop.append(server.stop)
    return board


def ssh_client_available() -> bool:
    """The OpenSSH client (`ssh`), which infra/device/install-evaluator.sh uses."""
    return shutil.which("ssh") is not None
