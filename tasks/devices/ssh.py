"""`ssh`: run the device evaluator on a board over SSH (asyncssh), host keys checked.

Layout on the board under `work_dir` (a relative `work_dir` is relative to the remote
user's home; `RemoteLayout` is the one statement of this rule, which
`infra/device/install-evaluator.sh` follows too):

    evaluator/<version>/edgetune_eval.py   uploaded when missing or different (sha256)
    bundles/<sha256>.npz                   evaluation bundles cached by content hash
    runs/<run id>/<artifact name>          this evaluation's artifact
    runs/<run id>/out/                     probs.npy + result.json, fetched over SFTP
    staged/<key>/<artifact name>           an evaluation's artifact sent ahead (`prestage`)

Every upload goes to a temporary name first and is renamed into place, so a half upload
never counts. Staging (connect, evaluator, bundle, artifact into `runs/<run id>/`) does
not need the board to itself, so it happens before the board's slot is taken, while
another evaluation may be running; the staging's connection stays open for the run.
`runs/<run id>/` is removed when the staging ends, whatever the outcome. An artifact sent
ahead by `prestage` (another process, while the board runs another evaluation) waits in
`staged/<key>/`; the staging given that key renames the folder into its run folder, so
only one staging ever takes it, and sends the artifact itself when the folder is not
there or holds another size. Folders in `staged/` nobody took are removed after an hour.
The evaluator
runs with a time limit: the controller kills its process group when `timeout_s`
expires, and the remote `timeout` command (where the board has one) kills it a little
later should the connection be lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import asyncssh

from tasks.devices.base import (
    OUTPUT_FILES,
    DeviceConfigError,
    DeviceError,
    DeviceRunner,
    DeviceUnreachableError,
    EvalJob,
    Placed,
    check_files,
    evaluator_failure,
    evaluator_path,
    evaluator_version,
    job_argv,
    remove_results,
)
from tasks.devices.edgetune_eval import sha256_file
from tasks.digest import file_sha256

_log = logging.getLogger(__name__)


class SessionLostError(DeviceUnreachableError):
    """The connection to the board dropped mid-session; the evaluation can be run again."""


_T = TypeVar("_T")

RUN_OUT = "out"  # inside runs/<run id>/
KILL_GRACE_S = 30  # the remote `timeout` backstop fires this long after timeout_s
EXIT_NOT_FOUND = 127  # the shell could not find device.ssh.python
EXIT_TIMEOUT = (124, 137)  # `timeout` expired (TERM / KILL)
KEEPALIVE_INTERVAL_S = 15
KEEPALIVE_COUNT_MAX = 4
#: A `.part` upload untouched for this long (board clock) was left by a dead session; a
#: younger one may be another controller's staging in progress.
STALE_PARTIAL_S = 300.0

#: Seconds after which a folder in `staged/` that no staging took is removed.
STALE_STAGED_S = 3600.0

#: What a staging key may be: the folder name under `staged/`.
_KEY = re.compile(r"[0-9a-f]{16,64}")
#: How long a cancelled call (Ctrl-C) may take to kill the remote evaluator.
CANCEL_WAIT_S = 30.0


@dataclass(frozen=True)
class RemoteLayout:
    """Where the runner keeps things on the board, all under `work_dir`."""

    work_dir: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "work_dir", check_work_dir(self.work_dir))

    @property
    def bundles(self) -> str:
        return posixpath.join(self.work_dir, "bundles")

    @property
    def runs(self) -> str:
        return posixpath.join(self.work_dir, "runs")

    def evaluator(self, version: str | None = None) -> str:
        """The evaluator file of `version` (default: the one this controller ships)."""
        version = version or evaluator_version()
        return posixpath.join(self.work_dir, "evaluator", version, evaluator_path().name)

    def bundle(self, sha256: str) -> str:
        return posixpath.join(self.bundles, f"{sha256}.npz")

    def run(self, run_id: str) -> str:
        return posixpath.join(self.runs, run_id)

    @property
    def staging(self) -> str:
        return posixpath.join(self.work_dir, "staged")

    def staged(self, key: str) -> str:
        return posixpath.join(self.staging, key)


def check_key(key: str) -> str:
    """A staging key names a folder on the board: hex digits only."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"staging key {key!r} is not 16 to 64 lowercase hex digits")
    return key


def check_work_dir(work_dir: str) -> str:
    """Normalise `work_dir` ("~/x" → "x", relative to the home) or raise ValueError."""
    raw = work_dir
    if work_dir == "~":
        work_dir = "."
    elif work_dir.startswith("~/"):
        work_dir = work_dir[2:] or "."
    problem = None
    if not work_dir.strip():
        problem = "is empty"
    elif ".." in work_dir.split("/"):
        problem = "contains '..'"
    elif work_dir.startswith(("-", "~")):
        problem = "starts with '-' or '~user'"
    elif any(c in work_dir for c in "\0\n\r"):
        problem = "contains a control character"
    if problem:
        raise ValueError(
            f"device.ssh.work_dir {raw!r} {problem}; use a plain directory such as "
            "'edgetune' (relative to the remote home) or an absolute path"
        )
    return posixpath.normpath(work_dir)


class SshRunner(DeviceRunner):
    """The shipped evaluator on a board reached over SSH (asyncssh client)."""

    name: ClassVar[str] = "ssh"

    def __init__(
        self,
        *,
        host: str,
        port: int = 22,
        user: str,
        key_file: str | None = None,
        known_hosts: str | None = None,
        check_host_key: bool = True,
        work_dir: str = "edgetune",
        python: str = "python3",
        connect_timeout_s: float = 15,
        timeout_s: float = 600,
        retries: int = 3,
        backoff_s: float = 2.0,
        batch_size: int = 1,
        warmup: int = 5,
        threads: int | None = None,
    ) -> None:
        problems = []
        if not host or not user:
            problems.append("host and user must not be empty")
        if not 0 < port < 65536:
            problems.append(f"port {port} is not in 1..65535")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            problems.append("timeout_s and connect_timeout_s must be > 0")
        if retries < 0 or backoff_s < 0:
            problems.append("retries and backoff_s must be >= 0")
        if batch_size < 1 or warmup < 0 or (threads is not None and threads < 1):
            problems.append("batch_size and threads must be >= 1, warmup >= 0")
        if not python.strip():
            problems.append("python must not be empty")
        if problems:
            raise ValueError(f"ssh runner: {'; '.join(problems)}")
        self.layout = RemoteLayout(work_dir)
        self.host = host
        self.port = int(port)
        self.user = user
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.check_host_key = check_host_key
        self.work_dir = work_dir
        self.python = python
        self.connect_timeout_s = float(connect_timeout_s)
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.backoff_s = float(backoff_s)
        self.batch_size = batch_size
        self.warmup = warmup
        self.threads = threads
        if not check_host_key:
            _log.warning(
                "device.ssh.check_host_key is false: the host key of %s is NOT verified, "
                "so anyone on the path to the board can impersonate it",
                self.address,
            )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ contract

    @contextmanager
    def _stage(self, artifact: Path, bundle: Path, key: str | None = None) -> Iterator[Placed]:
        """Stage over one connection kept open for the runs; a lost session is staged
        again with exponential backoff, into the same run folder."""
        session = _Session(self, artifact, bundle, None if key is None else check_key(key))
        loop = _LoopThread()
        try:
            self._retrying(loop, session.open)
            yield Placed(
                lambda job, out_dir: self._run_staged(loop, session, job, out_dir),
                session.run_dir,
            )
        finally:
            with suppress(Exception):
                loop.run(session.close())
            loop.stop()

    def prestage(self, artifact: Path, bundle: Path, key: str) -> bool:
        """The evaluator, `bundle` and `artifact` on the board for the staging given `key`
        (see the module docstring): once, without retries (the staging sends what is not
        there). False when the folder was already there."""
        artifact, bundle = Path(artifact), Path(bundle)
        check_files(artifact, bundle)
        check_key(key)
        loop = _LoopThread()
        try:
            return loop.run(self._guard(self._prestage(artifact, bundle, key)))
        finally:
            loop.stop()

    async def _prestage(self, artifact: Path, bundle: Path, key: str) -> bool:
        tag = uuid.uuid4().hex
        part = posixpath.join(self.layout.staging, f".{key}.{tag}")
        conn = await self._connect()
        try:
            async with conn.start_sftp_client() as sftp:
                await self._ensure_evaluator(sftp, tag)
                await sftp.makedirs(part)
                board_now = float((await sftp.stat(part)).mtime or 0)
                await _sweep_staged(sftp, self.layout.staging, board_now - STALE_STAGED_S)
                await self._ensure_bundle(sftp, bundle, file_sha256(bundle), board_now, tag)
                there = posixpath.join(self.layout.staged(key), artifact.name)
                try:
                    if await _has_size(sftp, there, artifact.stat().st_size):
                        raise asyncssh.SFTPFailure("sent ahead already")
                    await sftp.put(str(artifact), posixpath.join(part, artifact.name))
                    await sftp.rename(part, self.layout.staged(key))
                except asyncssh.SFTPFailure:  # sent ahead already: ours goes
                    await sftp.rmtree(part)
                    return False
                except BaseException:
                    with suppress(asyncssh.Error, OSError):
                        await sftp.rmtree(part)
                    raise
                return True
        finally:
            conn.close()

    def _run_staged(
        self, loop: _LoopThread, session: _Session, job: EvalJob, out_dir: Path
    ) -> None:
        def attempt() -> Coroutine[Any, Any, None]:
            remove_results(out_dir)
            return session.run(job, out_dir)

        try:
            self._retrying(loop, attempt)
        except BaseException:
            remove_results(out_dir)
            raise

    def _retrying(self, loop: _LoopThread, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `make()` in `loop`; a lost session is tried again with exponential backoff."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                loop.run(self._guard(make()))
                return
            except SessionLostError as exc:
                if attempt == attempts:
                    raise
                delay = self.backoff_s * 2 ** (attempt - 1)
                _log.warning(
                    "%s; trying again in %.3gs (attempt %d of %d)",
                    exc,
                    delay,
                    attempt + 1,
                    attempts,
                )
                time.sleep(delay)

    def info(self) -> dict[str, Any]:
        stdout = self._run_sync(self._info)
        try:
            report: dict[str, Any] = json.loads(stdout)
        except json.JSONDecodeError as exc:
            raise DeviceError(
                f"evaluator info on {self.address} printed no JSON ({exc}): {stdout[-500:]!r}"
            ) from exc
        report.update(host=self.host, work_dir=self.layout.work_dir)
        return report

    def check_config(self) -> None:
        """The key file and known_hosts file exist and load; nothing is sent to the board."""
        self._connect_options()

    # ------------------------------------------------------------------ async core

    def _run_sync(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run the coroutine `make()` to completion, also from inside a running loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._guard(make()))
        # a loop runs in this thread (an async caller): run ours in a thread of its own
        with ThreadPoolExecutor(1, thread_name_prefix="edgetune-ssh") as pool:
            return pool.submit(lambda: asyncio.run(self._guard(make()))).result()

    async def _guard(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """SSH and SFTP failures after connecting become DeviceError."""
        try:
            return await coro
        except DeviceError:
            raise
        except (asyncssh.ConnectionLost, asyncssh.SFTPConnectionLost, OSError) as exc:
            raise SessionLostError(
                f"SSH session with {self.user}@{self.address} was lost: {_describe(exc)}"
            ) from exc
        except asyncssh.Error as exc:
            raise DeviceError(
                f"SSH session with {self.user}@{self.address} failed: {_describe(exc)}"
            ) from exc

    async def _info(self) -> str:
        async with await self._connect() as conn, conn.start_sftp_client() as sftp:
            script = await self._ensure_evaluator(sftp)
            stdout = await self._run_evaluator(conn, script, ["info"], "evaluator info")
        return stdout

    async def _connect(self) -> asyncssh.SSHClientConnection:
        """Connect, retrying refused/reset/timed-out attempts with exponential backoff."""
        options = self._connect_options()
        attempts = self.retries + 1
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                _log.warning(
                    "SSH to %s failed (%s); attempt %d of %d in %.3gs",
                    self.address,
                    _describe(last),
                    attempt + 1,
                    attempts,
                    delay,
                )
                await asyncio.sleep(delay)
            try:
                return await asyncssh.connect(self.host, self.port, **options)
            except asyncssh.HostKeyNotVerifiable as exc:
                raise DeviceConfigError(self._host_key_message(exc)) from exc
            except asyncssh.PermissionDenied as exc:
                raise DeviceConfigError(
                    f"SSH authentication failed for {self.user}@{self.address} with key file "
                    f"{self.key_file or '(default keys and agent)'}: add its public key to "
                    f"~/.ssh/authorized_keys of {self.user} on the board, or set "
                    "device.ssh.key_file / device.ssh.user"
                ) from exc
            except TimeoutError as exc:  # no SSH handshake within connect_timeout_s
                last = TimeoutError(
                    f"no SSH handshake within device.ssh.connect_timeout_s="
                    f"{self.connect_timeout_s:g}s{f' ({exc})' if str(exc) else ''}"
                )
            except (OSError, asyncssh.ConnectionLost) as exc:  # refused, reset, unreachable
                last = exc
            except asyncssh.Error as exc:
                raise DeviceError(
                    f"SSH to {self.user}@{self.address} failed: {_describe(exc)}"
                ) from exc
        raise DeviceUnreachableError(
            f"cannot reach the device at {self.address} after {attempts} attempt(s) "
            f"(device.ssh.retries={self.retries}); last error: {_describe(last)}"
        )

    def _connect_options(self) -> dict[str, Any]:
        """asyncssh.connect options; local key and known_hosts files are checked first."""
        known_hosts: Any = ()  # asyncssh's default: ~/.ssh/known_hosts
        if not self.check_host_key:
            known_hosts = None
        elif self.known_hosts is not None:
            known_hosts = os.path.expanduser(self.known_hosts)
            if not os.path.isfile(known_hosts):
                raise DeviceConfigError(
                    f"known_hosts file {known_hosts} does not exist; create it with "
                    f"`ssh-keyscan -p {self.port} {self.host} >> {known_hosts}` "
                    "(check the key with the board's owner)"
                )
        options: dict[str, Any] = {
            "username": self.user,
            "known_hosts": known_hosts,
            "connect_timeout": self.connect_timeout_s,
            "keepalive_interval": KEEPALIVE_INTERVAL_S,
            "keepalive_count_max": KEEPALIVE_COUNT_MAX,
            "preferred_auth": "publickey",
        }
        if self.key_file is not None:
            key_file = os.path.expanduser(self.key_file)
            if not os.path.isfile(key_file):
                raise DeviceConfigError(
                    f"SSH key file {key_file} (device.ssh.key_file) does not exist; give the "
                    "path of the private key the board accepts, or unset key_file to use "
                    "ssh-agent"
                )
            try:  # fail here, not as an unreachable board, on an unreadable or locked key
                asyncssh.read_private_key(key_file)
            except (OSError, asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
                raise DeviceConfigError(
                    f"cannot load SSH key file {key_file} (device.ssh.key_file): {exc}; edgetune "
                    "needs a key without a passphrase, or unset key_file to use ssh-agent"
                ) from exc
            options.update(client_keys=[key_file], agent_path=None)
        return options

    def _host_key_message(self, exc: BaseException) -> str:
        file = self.known_hosts or "~/.ssh/known_hosts"
        return (
            f"the host key of {self.address} is not trusted ({_describe(exc)}); if this is "
            f"the right board, add its key to known_hosts with "
            f"`ssh-keyscan -p {self.port} {self.host} >> {file}`, or set "
            "device.ssh.check_host_key: false knowingly"
        )

    # ------------------------------------------------------------------ uploads

    async def _ensure_evaluator(self, sftp: asyncssh.SFTPClient, tag: str | None = None) -> str:
        """The evaluator of this version on the board, uploaded unless identical."""
        remote = self.layout.evaluator()
        local = evaluator_path()
        wanted = sha256_file(local)
        with suppress(asyncssh.SFTPNoSuchFile):
            async with sftp.open(remote, "rb") as f:
                content: bytes = await f.read()  # "rb": bytes
                if hashlib.sha256(content).hexdigest() == wanted:
                    return remote
        _log.info("uploading evaluator %s to %s:%s", evaluator_version(), self.address, remote)
        try:
            await _upload(sftp, local, remote, tag)
        except asyncssh.SFTPConnectionLost:
            raise
        except asyncssh.SFTPError as exc:  # the first write under work_dir: the board's setup
            raise DeviceConfigError(
                f"{self.user}@{self.address} cannot write the evaluator under "
                f"device.ssh.work_dir {self.layout.work_dir} ({_describe(exc)}); make it a "
                f"folder {self.user} may write on the board, or set device.ssh.work_dir to one "
                "(relative to its home, e.g. edgetune)"
            ) from exc
        return remote

    async def _ensure_bundle(
        self, sftp: asyncssh.SFTPClient, bundle: Path, sha256: str, board_now: float, tag: str
    ) -> str:
        """The bundle on the board under its content hash, uploaded only when missing."""
        remote = self.layout.bundle(sha256)
        await _sweep_partials(sftp, self.layout.bundles, board_now - STALE_PARTIAL_S)
        with suppress(asyncssh.SFTPNoSuchFile):
            if (await sftp.stat(remote)).size == bundle.stat().st_size:
                return remote
        _log.info("uploading bundle %s to %s:%s", bundle.name, self.address, remote)
        await _upload(sftp, bundle, remote, tag)
        return remote

    async def _fetch_results(self, sftp: asyncssh.SFTPClient, remote_out: str, out: Path) -> None:
        """The output arrays then result.json, each to a temp name renamed into place."""
        for name in OUTPUT_FILES:
            partial = out / f".{name}.{uuid.uuid4().hex}.part"
            try:
                await sftp.get(posixpath.join(remote_out, name), str(partial))
            except asyncssh.SFTPNoSuchFile:
                continue  # the reader reports a missing file
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            os.replace(partial, out / name)

    async def _remove_run(self, sftp: asyncssh.SFTPClient, run_dir: str) -> None:
        try:
            await sftp.rmtree(run_dir)
        except asyncssh.SFTPNoSuchFile:
            pass
        except (asyncssh.Error, OSError) as exc:
            _log.warning("could not remove %s on %s: %s", run_dir, self.address, exc)

    # ------------------------------------------------------------------ the evaluator

    def _command(self, script: str, argv: list[str]) -> str:
        """Shell line: print the shell's pid, then exec the evaluator (under `timeout`)."""
        python = self.python
        if python.startswith("~/"):
            exe = '"$HOME"/' + shlex.quote(python[2:])
        else:
            exe = shlex.quote(python)
        line = " ".join([exe, shlex.quote(script), *map(shlex.quote, argv)])
        backstop = math.ceil(self.timeout_s) + KILL_GRACE_S
        return (
            "echo $$; "
            "if timeout -s KILL 5 true >/dev/null 2>&1; "
            f"then exec timeout -s KILL {backstop} {line}; "
            f"else exec {line}; fi"
        )

    async def _run_evaluator(
        self, conn: asyncssh.SSHClientConnection, script: str, argv: list[str], what: str
    ) -> str:
        """Run the evaluator within timeout_s; its stdout; DeviceError on failure."""
        proc = await conn.create_process(
            self._command(script, argv), stdin=asyncssh.DEVNULL, encoding="utf-8", errors="replace"
        )
        pid: list[int] = []

        async def communicate() -> tuple[str, str]:
            first = await proc.stdout.readline()
            if first.strip().isdigit():
                pid.append(int(first))
            stdout, stderr = await proc.communicate()
            return str(stdout or ""), str(stderr or "")

        try:
            stdout, stderr = await asyncio.wait_for(communicate(), self.timeout_s)
        except TimeoutError:
            await self._kill(conn, proc, pid)
            raise DeviceError(
                f"device evaluation on {self.address} timed out after {self.timeout_s:g}s "
                f"({what}); the evaluator was killed. Raise device.timeout_s, or evaluate "
                "fewer images or with a larger batch size"
            ) from None
        except BaseException:
            await self._kill(conn, proc, pid)
            raise
        returncode = proc.exit_status
        if returncode == 0:
            return stdout
        if returncode is None or returncode < 0:
            signal = proc.exit_signal[0] if proc.exit_signal else "unknown"
            raise DeviceError(
                f"device evaluator ({what}) on {self.address} was killed by signal {signal}:\n"
                + (stderr.strip()[-2000:] or "(no stderr)")
            )
        if returncode == EXIT_NOT_FOUND:  # the board's setup: every evaluation would fail
            said = " ".join(stderr.split())[-300:]
            raise DeviceConfigError(
                f"cannot start the evaluator with {self.python!r} on {self.address} "
                f"(exit code 127: {said}); set device.ssh.python to a Python "
                "with numpy and onnxruntime on the board"
            )
        if returncode in EXIT_TIMEOUT and not stderr.strip():
            raise DeviceError(
                f"device evaluation on {self.address} was killed by the board's `timeout` "
                f"({what}); raise device.timeout_s"
            )
        raise evaluator_failure(f"device evaluator ({what}) on {self.address}", returncode, stderr)

    async def _kill(
        self,
        conn: asyncssh.SSHClientConnection,
        proc: asyncssh.SSHClientProcess[Any],
        pid: list[int],
    ) -> None:
        """Kill the remote evaluator's process group and wait for its channel to close."""
        if pid:
            group = shlex.quote(f"-{pid[0]}")
            command = (
                f"kill -s KILL -- {group} 2>/dev/null || kill -s KILL {pid[0]} 2>/dev/null; true"
            )
            with suppress(asyncssh.Error, OSError, TimeoutError):
                await asyncio.wait_for(conn.run(command, check=False), 10)
        else:
            _log.warning("no pid from the evaluator on %s; closing its channel", self.address)
        proc.close()
        with suppress(asyncssh.Error, OSError, TimeoutError):
            await asyncio.wait_for(proc.wait_closed(), 10)


async def _sweep_partials(sftp: asyncssh.SFTPClient, folder: str, before: float) -> None:
    """Remove uploads a dead session left half-written: those untouched since `before`
    (board clock). Younger ones may be other stagings uploading now, board slot or not."""
    with suppress(asyncssh.SFTPNoSuchFile):
        for entry in await sftp.readdir(folder):
            name = str(entry.filename)
            stale = entry.attrs.mtime is not None and entry.attrs.mtime < before
            if name.startswith(".") and name.endswith(".part") and stale:
                with suppress(asyncssh.SFTPError):
                    await sftp.remove(posixpath.join(folder, name))


async def _sweep_staged(sftp: asyncssh.SFTPClient, folder: str, before: float) -> None:
    """Remove what `prestage` left in `folder` that no staging took since `before`."""
    with suppress(asyncssh.SFTPNoSuchFile):
        for entry in await sftp.readdir(folder):
            name = str(entry.filename)
            stale = entry.attrs.mtime is not None and entry.attrs.mtime < before
            if name not in (".", "..") and stale:
                with suppress(asyncssh.SFTPError):
                    await sftp.rmtree(posixpath.join(folder, name))


def partial_name(remote: str, tag: str) -> str:
    """The temporary name an upload of `remote` tagged `tag` is written to."""
    folder, name = posixpath.split(remote)
    return posixpath.join(folder, f".{name}.{tag}.part")


async def _upload(
    sftp: asyncssh.SFTPClient, local: Path, remote: str, tag: str | None = None
) -> None:
    """Upload to a temporary name in the target folder, then rename over the target.

    A staging tags its uploads with its run id, so that after a lost session it writes the
    same temporary name again (or removes it) instead of leaving it to the sweep.
    """
    folder = posixpath.dirname(remote)
    await sftp.makedirs(folder, exist_ok=True)
    partial = partial_name(remote, tag or uuid.uuid4().hex)
    try:
        await sftp.put(str(local), partial)
        try:
            await sftp.posix_rename(partial, remote)
        except asyncssh.SFTPOpUnsupported:
            with suppress(asyncssh.SFTPNoSuchFile):
                await sftp.remove(remote)
            await sftp.rename(partial, remote)
    except BaseException:
        with suppress(asyncssh.Error, OSError):
            await sftp.remove(partial)
        raise


class _Session:
    """One staging on the board: its connection, SFTP client and run folder.

    `open` (again after a lost session) connects and puts the evaluator, the bundle and the
    artifact in place; `run` runs one job and fetches its outputs; `close` removes the run
    folder and disconnects.
    """

    def __init__(
        self, runner: SshRunner, artifact: Path, bundle: Path, key: str | None = None
    ) -> None:
        self.runner, self.artifact, self.bundle = runner, artifact, bundle
        self.bundle_sha = file_sha256(bundle)
        #: The folder a `prestage` put the artifact in, taken over at the first `open`.
        self.key = key
        self.run_id = uuid.uuid4().hex
        self.run_dir = runner.layout.run(self.run_id)
        self.lost_before = False
        self.remote_artifact = posixpath.join(self.run_dir, artifact.name)
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None
        self.script = self.remote_bundle = ""

    async def open(self) -> None:
        await self._drop()
        runner = self.runner
        self.conn = await runner._connect()
        self.sftp = sftp = await self.conn.start_sftp_client()
        try:
            if self.lost_before:  # half uploads of the lost session
                await self._remove_partials(sftp)
            self.script = await runner._ensure_evaluator(sftp, self.run_id)
            if self.key is not None:  # sent ahead: the folder becomes this run's (once)
                key, self.key = self.key, None
                await sftp.makedirs(runner.layout.runs, exist_ok=True)
                with suppress(asyncssh.SFTPError):
                    await sftp.rename(runner.layout.staged(key), self.run_dir)
            await sftp.makedirs(self.run_dir, exist_ok=True)
            board_now = float((await sftp.stat(self.run_dir)).mtime or 0)
            self.remote_bundle = await runner._ensure_bundle(
                sftp, self.bundle, self.bundle_sha, board_now, self.run_id
            )
            size = self.artifact.stat().st_size
            if not await _has_size(sftp, self.remote_artifact, size):
                await sftp.put(str(self.artifact), self.remote_artifact)
        except _LOST:
            await self._drop()
            raise

    async def _remove_partials(self, sftp: asyncssh.SFTPClient) -> None:
        layout = self.runner.layout
        for remote in (layout.evaluator(), layout.bundle(self.bundle_sha)):
            with suppress(asyncssh.SFTPError):
                await sftp.remove(partial_name(remote, self.run_id))

    async def run(self, job: EvalJob, out_dir: Path) -> None:
        if self.conn is None or self.sftp is None:  # the last session was lost
            await self.open()
        assert self.conn is not None and self.sftp is not None
        runner = self.runner
        remote_out = posixpath.join(self.run_dir, RUN_OUT)
        argv = job_argv(
            job,
            self.remote_artifact,
            self.remote_bundle,
            remote_out,
            runner.batch_size,
            runner.warmup,
            runner.threads,
        )
        try:
            with suppress(asyncssh.SFTPNoSuchFile):  # outputs of an earlier job
                await self.sftp.rmtree(remote_out)
            what = f"{job.command} {self.artifact.name}"
            await runner._run_evaluator(self.conn, self.script, argv, what)
            await runner._fetch_results(self.sftp, remote_out, out_dir)
        except _LOST:
            await self._drop()
            raise

    async def close(self) -> None:
        if self.sftp is not None:
            await self.runner._remove_run(self.sftp, self.run_dir)
        await self._drop()

    async def _drop(self) -> None:
        """Forget the connection (closing it if it still lives)."""
        sftp, conn, self.sftp, self.conn = self.sftp, self.conn, None, None
        self.lost_before = self.lost_before or conn is not None
        if sftp is not None:
            sftp.exit()
        if conn is not None:
            conn.close()
            with suppress(asyncssh.Error, OSError, TimeoutError):
                await asyncio.wait_for(conn.wait_closed(), 5)


_LOST = (asyncssh.ConnectionLost, asyncssh.SFTPConnectionLost, OSError)


async def _has_size(sftp: asyncssh.SFTPClient, remote: str, size: int) -> bool:
    try:
        return (await sftp.stat(remote)).size == size
    except asyncssh.SFTPNoSuchFile:
        return False


class _LoopThread:
    """An event loop in a thread of its own: a staged connection lives across calls, from
    synchronous code and from inside a running loop alike."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="edgetune-ssh", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` there; an interrupt here cancels it and waits for its clean-up."""
        done = threading.Event()

        async def tracked() -> _T:
            try:
                return await coro
            finally:
                done.set()

        future = asyncio.run_coroutine_threadsafe(tracked(), self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                done.wait(CANCEL_WAIT_S)
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _describe(exc: BaseException | None) -> str:
    """`Type: message` (some network errors have an empty message)."""
    if exc is None:
        return "unknown error"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
