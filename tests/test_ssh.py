"""The SSH runner against a real SSH server on 127.0.0.1 (tests/board.py).

Every test runs against each board backend this machine has: OpenSSH's sshd (when
installed) and the in-process asyncssh server. The board is on this host, so the tests
look at its files and processes directly. Each test uses its own remote work dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncssh
import numpy as np
import onnxruntime as ort
import pytest

import tasks.devices.ssh as ssh_module
from tasks.devices import (
    DeviceError,
    DeviceUnreachableError,
    RemoteLayout,
    SshRunner,
    create_runner,
    evaluator_path,
    evaluator_version,
)
from tasks.devices.ssh import check_work_dir

from board import (
    Board,
    available_backends,
    free_port,
    known_hosts_line,
    ssh_client_available,
    start_board,
)
from fakes import export_onnx, tiny_classifier, write_bundle

pytestmark = pytest.mark.integration

INSTALL_SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "device" / "install-evaluator.sh"
N_IMAGES = 9


@pytest.fixture(scope="module", params=available_backends())
def board(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Board]:
    with start_board(tmp_path_factory.mktemp("board"), request.param) as running:
        yield running


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def float_onnx(models: Path) -> Path:
    return export_onnx(tiny_classifier(), models / "model.onnx")


@pytest.fixture(scope="module")
def bundle(models: Path) -> Path:
    return write_bundle(models / "bundle.npz", n=N_IMAGES, seed=11)


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    """This test's remote work dir (absolute; the board shares this filesystem)."""
    return tmp_path / "remote"


def make_runner(board: Board, work_dir: Path, **overrides: Any) -> SshRunner:
    options = board.runner_options(work_dir=str(work_dir), warmup=0, timeout_s=30)
    runner = create_runner("ssh", **{**options, **overrides})
    assert isinstance(runner, SshRunner)
    return runner


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Remote paths the runner uploads to, in order."""
    recorded: list[str] = []
    real = ssh_module._upload

    async def spy(sftp: Any, local: Path, remote: str, tag: str | None = None) -> None:
        recorded.append(remote)
        await real(sftp, local, remote, tag)

    monkeypatch.setattr(ssh_module, "_upload", spy)
    return recorded


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """monotonic() of every SSH connection attempt."""
    attempts: list[float] = []
    real = asyncssh.connect

    def spy(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(asyncssh, "connect", spy)
    return attempts


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes on this host that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


KEY = "5e" * 16


class TestSentAhead:
    """`prestage` sends an evaluation's artifact to the board while another evaluation
    holds it; the staging given the same key takes the folder instead of sending again."""

    def test_the_staging_takes_what_was_sent_ahead_and_sends_nothing(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path, tmp_path: Path,
        puts: list[str],
    ) -> None:  # fmt: skip
        runner = make_runner(board, work_dir)
        assert runner.prestage(float_onnx, bundle, KEY) is True
        ahead = work_dir / "staged" / KEY / float_onnx.name
        assert ahead.read_bytes() == float_onnx.read_bytes()
        assert runner.prestage(float_onnx, bundle, KEY) is False  # there already
        assert _listing(work_dir / "staged") == [KEY, f"{KEY}/{float_onnx.name}"]
        sha = ssh_module.sha256_file(bundle)
        assert (work_dir / "bundles" / f"{sha}.npz").read_bytes() == bundle.read_bytes()
        artifact_puts = [p for p in puts if p.endswith(float_onnx.name)]
        assert len(artifact_puts) == 1

        with runner.stage(float_onnx, bundle, KEY) as staged:
            assert not (work_dir / "staged" / KEY).exists()  # taken: the run folder now
            assert Path(staged.location, float_onnx.name).read_bytes() == float_onnx.read_bytes()
            taken = staged.evaluate(tmp_path / "taken")
        assert [p for p in puts if p.endswith(float_onnx.name)] == artifact_puts  # none sent

        sent = runner.evaluate(float_onnx, bundle, tmp_path / "sent")
        assert len([p for p in puts if p.endswith(float_onnx.name)]) == 2  # no key: sent
        np.testing.assert_array_equal(taken.probs, sent.probs)
        assert taken.probs.shape[0] == N_IMAGES
        assert _listing(work_dir / "runs") == [] and _listing(work_dir / "staged") == []

    def test_a_folder_of_another_size_is_replaced_by_the_staging(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path, tmp_path: Path,
        puts: list[str],
    ) -> None:  # fmt: skip
        wrong = work_dir / "staged" / KEY / float_onnx.name
        wrong.parent.mkdir(parents=True)
        wrong.write_bytes(b"half a model")
        runner = make_runner(board, work_dir)
        with runner.stage(float_onnx, bundle, KEY) as staged:
            result = staged.evaluate(tmp_path / "out")
        assert [p for p in puts if p.endswith(float_onnx.name)] != []
        expected = runner.evaluate(float_onnx, bundle, tmp_path / "expected")
        np.testing.assert_array_equal(result.probs, expected.probs)

    def test_only_what_nobody_took_for_an_hour_is_swept(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path
    ) -> None:
        staging = work_dir / "staged"
        old, young, half = staging / ("0a" * 16), staging / ("0b" * 16), staging / ".0c.part"
        for folder in (old, young, half):
            (folder / "model.onnx").parent.mkdir(parents=True)
            (folder / "model.onnx").write_bytes(b"m")
        hours_ago = time.time() - ssh_module.STALE_STAGED_S - 60
        for folder in (old, half):
            os.utime(folder, (hours_ago, hours_ago))
        make_runner(board, work_dir).prestage(float_onnx, bundle, KEY)
        assert sorted(p.name for p in staging.iterdir()) == sorted([young.name, KEY])

    def test_a_key_that_is_not_hex_is_refused_before_anything_is_sent(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path
    ) -> None:
        runner = make_runner(board, work_dir)
        with pytest.raises(ValueError, match=r"staging key '\.\./x' is not 16 to 64"):
            runner.prestage(float_onnx, bundle, "../x")
        with (
            pytest.raises(ValueError, match="is not 16 to 64"),
            runner.stage(float_onnx, bundle, "../x"),
        ):
            pass
        assert not work_dir.exists()


class TestCaching:
    def test_bundle_cached_by_hash(
        self,
        board: Board,
        work_dir: Path,
        float_onnx: Path,
        bundle: Path,
        tmp_path: Path,
        uploads: list[str],
    ) -> None:
        runner = make_runner(board, work_dir)
        layout = RemoteLayout(str(work_dir))
        sha = ssh_module.sha256_file(bundle)

        first = runner.evaluate(float_onnx, bundle, tmp_path / "one")
        remote_bundle = work_dir / "bundles" / f"{sha}.npz"
        assert uploads == [layout.evaluator(), layout.bundle(sha)]
        assert layout.bundle(sha) == str(remote_bundle)
        assert remote_bundle.read_bytes() == bundle.read_bytes()
        stamp = _stamp(remote_bundle)

        second = runner.evaluate(float_onnx, bundle, tmp_path / "two")

        assert uploads == [layout.evaluator(), layout.bundle(sha)]  # nothing new
        assert _stamp(remote_bundle) == stamp
        np.testing.assert_array_equal(first.probs, second.probs)
        assert second.info["bundle_sha256"] == sha

        other = write_bundle(tmp_path / "other.npz", n=5, seed=3)
        runner.evaluate(float_onnx, other, tmp_path / "three")
        other_sha = ssh_module.sha256_file(other)
        assert uploads[2:] == [layout.bundle(other_sha)]
        assert _listing(work_dir / "bundles") == sorted([f"{sha}.npz", f"{other_sha}.npz"])

    def test_evaluator_uploaded_once_per_version(
        self,
        board: Board,
        work_dir: Path,
        float_onnx: Path,
        bundle: Path,
        tmp_path: Path,
        uploads: list[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        runner = make_runner(board, work_dir)
        remote = work_dir / "evaluator" / evaluator_version() / "edgetune_eval.py"

        runner.info()
        runner.evaluate(float_onnx, bundle, tmp_path / "a")
        runner.info()

        assert uploads[0] == str(remote) and uploads[1].endswith(".npz")
        del uploads[1]  # the bundle
        assert uploads == [str(remote)]
        assert remote.read_bytes() == evaluator_path().read_bytes()
        stamp = _stamp(remote)

        # same version, different content on the board (edited, truncated): replaced
        remote.write_text("# not the shipped evaluator\n")
        runner.info()
        assert uploads == [str(remote), str(remote)]
        assert remote.read_bytes() == evaluator_path().read_bytes()
        assert _stamp(remote) != stamp

        # another version goes next to it
        monkeypatch.setattr(ssh_module, "evaluator_version", lambda: "9.9.9")
        runner.info()
        assert uploads[-1] == str(work_dir / "evaluator" / "9.9.9" / "edgetune_eval.py")
        assert _listing(work_dir / "evaluator") == [
            evaluator_version(),
            f"{evaluator_version()}/edgetune_eval.py",
            "9.9.9",
            "9.9.9/edgetune_eval.py",
        ]  # no half uploads (.part files) left behind


class TestRunsFolder:
    def test_runs_empty_after_success_and_failure(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        runner = make_runner(board, work_dir)

        result = runner.evaluate(float_onnx, bundle, tmp_path / "ok")
        assert result.probs.shape == (N_IMAGES, 3)
        assert (work_dir / "runs").is_dir()
        assert _listing(work_dir / "runs") == []

        corrupt = tmp_path / "corrupt.onnx"
        corrupt.write_bytes(b"not onnx")
        with pytest.raises(DeviceError, match="onnxruntime cannot load"):
            runner.evaluate(corrupt, bundle, tmp_path / "bad")
        assert _listing(work_dir / "runs") == []

    def test_a_failed_artifact_upload_leaves_no_run_folder(
        self,
        board: Board,
        work_dir: Path,
        float_onnx: Path,
        bundle: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        real_put = asyncssh.SFTPClient.put

        async def put(self: Any, local: Any, target: Any = None, **kwargs: Any) -> None:
            if "/runs/" in str(target):
                Path(str(target)).write_bytes(b"half")  # a half-written artifact
                raise asyncssh.SFTPFailure("No space left on device")
            await real_put(self, local, target, **kwargs)

        monkeypatch.setattr(asyncssh.SFTPClient, "put", put)

        full = pytest.raises(DeviceError, match="No space left on device")
        with full, make_runner(board, work_dir).stage(float_onnx, bundle):
            pytest.fail("staging reported success")
        assert _listing(work_dir / "runs") == []

    def test_only_stale_half_uploads_are_swept(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        """A young .part may be another controller staging now (it needs no board slot)."""
        bundles = work_dir / "bundles"
        bundles.mkdir(parents=True)
        stale, young = bundles / ".a.npz.dead.part", bundles / ".b.npz.live.part"
        for path in (stale, young):
            path.write_bytes(b"partial")
        old = time.time() - ssh_module.STALE_PARTIAL_S - 60
        os.utime(stale, (old, old))

        make_runner(board, work_dir).evaluate(float_onnx, bundle, tmp_path / "work")

        assert not stale.exists()
        assert young.read_bytes() == b"partial"

    def test_awkward_artifact_name_is_quoted(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        odd = tmp_path / "it's a $(touch pwned) model; ls.onnx"
        shutil.copyfile(float_onnx, odd)

        result = make_runner(board, work_dir).evaluate(odd, bundle, tmp_path / "work")

        assert result.info["model"] == odd.name
        assert not (board.home / "pwned").exists() and not (work_dir / "pwned").exists()
        assert _listing(work_dir / "runs") == []

    def test_timeout_kills_the_remote_evaluator(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        runner = make_runner(board, work_dir, timeout_s=1.5, warmup=10_000_000)  # never ends
        runner.info()  # upload first, so the clock measures the evaluation only
        start = time.monotonic()

        with pytest.raises(DeviceError) as caught:
            runner.evaluate(float_onnx, bundle, tmp_path / "work")

        elapsed = time.monotonic() - start
        message = str(caught.value)
        assert "timed out after 1.5s" in message and "device.timeout_s" in message
        assert 1.5 <= elapsed < 8
        # the SSH server delivers the kill after the session closes: gone within seconds,
        # long before the evaluator's own hard limit (timeout -s KILL) would end it
        deadline = time.monotonic() + 5
        while _processes_mentioning(str(work_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_mentioning(str(work_dir)) == []
        assert _listing(work_dir / "runs") == []
        assert list((tmp_path / "work").rglob("*.json")) == []

    def test_python_missing_on_the_board(
        self, board: Board, work_dir: Path, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        runner = make_runner(board, work_dir, python="/nonexistent/python3")

        with pytest.raises(DeviceError, match=r"exit code 127.*set device\.ssh\.python"):
            runner.evaluate(float_onnx, bundle, tmp_path / "work")
        assert _listing(work_dir / "runs") == []


class TestTrust:
    def test_unknown_host_key_refused(
        self, board: Board, work_dir: Path, tmp_path: Path, connects: list[float]
    ) -> None:
        other = asyncssh.generate_private_key("ssh-ed25519")
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(known_hosts_line(board.host, board.port, other))
        runner = make_runner(board, work_dir, known_hosts=str(known_hosts), retries=3)

        with pytest.raises(DeviceError) as caught:
            runner.info()

        message = str(caught.value)
        assert not isinstance(caught.value, DeviceUnreachableError)
        assert "\n" not in message
        assert f"the host key of 127.0.0.1:{board.port} is not trusted" in message
        assert f"ssh-keyscan -p {board.port} 127.0.0.1 >> {known_hosts}" in message
        assert "device.ssh.check_host_key: false" in message
        assert len(connects) == 1  # not retried
        assert not work_dir.exists()  # nothing was sent

    def test_empty_known_hosts_refused(self, board: Board, work_dir: Path, tmp_path: Path) -> None:
        empty = tmp_path / "known_hosts"
        empty.write_text("")

        with pytest.raises(DeviceError, match="is not trusted"):
            make_runner(board, work_dir, known_hosts=str(empty)).info()

    def test_missing_known_hosts_file(self, board: Board, work_dir: Path, tmp_path: Path) -> None:
        absent = tmp_path / "nope"
        with pytest.raises(DeviceError, match=rf"known_hosts file {absent} does not exist"):
            make_runner(board, work_dir, known_hosts=str(absent)).info()

    def test_check_host_key_false_connects_to_an_unknown_host(
        self, board: Board, work_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        with caplog.at_level(logging.WARNING, logger="tasks.devices.ssh"):
            runner = make_runner(board, work_dir, known_hosts=str(empty), check_host_key=False)

        info = runner.info()

        assert info["evaluator_version"] == evaluator_version()
        assert any("NOT verified" in r.getMessage() for r in caplog.records)

    def test_wrong_client_key_refused(
        self, board: Board, work_dir: Path, tmp_path: Path, connects: list[float]
    ) -> None:
        stranger = tmp_path / "id_stranger"
        stranger.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        stranger.chmod(0o600)
        runner = make_runner(board, work_dir, key_file=str(stranger), retries=3)

        with pytest.raises(DeviceError) as caught:
            runner.info()

        message = str(caught.value)
        assert not isinstance(caught.value, DeviceUnreachableError)
        assert f"authentication failed for {board.user}@127.0.0.1:{board.port}" in message
        assert str(stranger) in message
        assert len(connects) == 1  # not retried

    def test_missing_key_file(self, board: Board, work_dir: Path, tmp_path: Path) -> None:
        with pytest.raises(DeviceError, match=r"key file .*absent.* does not exist"):
            make_runner(board, work_dir, key_file=str(tmp_path / "absent")).info()


class TestReachability:
    def test_connection_refused_is_retried_with_backoff(
        self,
        board: Board,
        work_dir: Path,
        tmp_path: Path,
        connects: list[float],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        delays: list[float] = []
        real_sleep = asyncio.sleep
        this_thread = threading.get_ident()

        async def sleep(delay: float) -> None:
            # asyncio is shared: event loops of other threads (a Prefect server) sleep too
            if threading.get_ident() == this_thread:
                delays.append(delay)
            await real_sleep(delay)

        monkeypatch.setattr(ssh_module.asyncio, "sleep", sleep)
        port = free_port()  # closed: nothing listens there
        runner = make_runner(board, work_dir, port=port, retries=3, backoff_s=0.05)
        start = time.monotonic()

        with pytest.raises(DeviceUnreachableError) as caught:
            runner.info()

        elapsed = time.monotonic() - start
        message = str(caught.value)
        assert len(connects) == 4  # the first try + 3 retries
        assert delays == pytest.approx([0.05, 0.1, 0.2])  # backoff_s * 2**retry
        assert elapsed >= 0.35
        assert all(
            b - a >= d * 0.95 for a, b, d in zip(connects[:-1], connects[1:], delays, strict=True)
        )
        assert f"127.0.0.1:{port}" in message
        assert "after 4 attempt(s)" in message and "device.ssh.retries=3" in message
        assert "ConnectionRefusedError" in message

    def test_silent_server_times_out_and_is_retried(
        self, board: Board, work_dir: Path, connects: list[float]
    ) -> None:
        accepted: list[socket.socket] = []
        with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks SSH
            silent.settimeout(0.1)

            def accept() -> None:
                with contextlib.suppress(OSError):
                    while len(accepted) < 2:
                        with contextlib.suppress(TimeoutError):
                            accepted.append(silent.accept()[0])

            thread = threading.Thread(target=accept)
            thread.start()
            port = silent.getsockname()[1]
            runner = make_runner(
                board, work_dir, port=port, connect_timeout_s=0.3, retries=1, backoff_s=0.01
            )
            start = time.monotonic()
            try:
                with pytest.raises(DeviceUnreachableError) as caught:
                    runner.info()
            finally:
                thread.join(5)
                for conn in accepted:
                    conn.close()

        assert time.monotonic() - start >= 0.6
        assert len(connects) == 2 and len(accepted) == 2
        message = str(caught.value)
        assert f"127.0.0.1:{port} after 2 attempt(s)" in message
        assert "TimeoutError: no SSH handshake within device.ssh.connect_timeout_s=0.3s" in message

    def test_works_from_a_thread_and_from_a_running_loop(
        self, board: Board, work_dir: Path
    ) -> None:
        runner = make_runner(board, work_dir)

        with ThreadPoolExecutor(2) as pool:
            reports = list(pool.map(lambda _: runner.info(), range(2)))

        async def from_async_code() -> dict[str, Any]:
            return runner.info()

        reports.append(asyncio.run(from_async_code()))
        assert [r["evaluator_version"] for r in reports] == [evaluator_version()] * 3

    def test_info(self, board: Board, work_dir: Path) -> None:
        info = make_runner(board, work_dir).info()

        assert info["evaluator_version"] == evaluator_version()
        assert info["runtimes"]["onnxruntime"] == ort.__version__
        assert info["numpy"] == np.__version__
        assert info["host"] == "127.0.0.1"
        assert info["work_dir"] == str(work_dir)
        assert (work_dir / "evaluator" / evaluator_version() / "edgetune_eval.py").is_file()


class TestWorkDir:
    @pytest.mark.parametrize(
        "bad", ["../edgetune", "edgetune/../../etc", "a/..", "/tmp/../root", ""]
    )
    def test_parent_references_rejected(self, board: Board, bad: str) -> None:
        with pytest.raises(ValueError, match=r"device\.ssh\.work_dir"):
            create_runner("ssh", **board.runner_options(work_dir=bad))

    def test_normalised(self) -> None:
        assert check_work_dir("~/edgetune/") == "edgetune"
        assert check_work_dir("./boards//pi") == "boards/pi"
        assert check_work_dir("/srv/edgetune") == "/srv/edgetune"
        layout = RemoteLayout("~/edgetune")
        assert layout.evaluator("1.2.3") == "edgetune/evaluator/1.2.3/edgetune_eval.py"
        assert layout.bundle("ab") == "edgetune/bundles/ab.npz"
        assert layout.run("r1") == "edgetune/runs/r1"

    def test_relative_work_dir_is_in_the_remote_home(self, board: Board) -> None:
        name = f"edgetune-test-{uuid.uuid4().hex[:12]}"
        try:
            info = create_runner("ssh", **board.runner_options(work_dir=name)).info()
            assert info["work_dir"] == name
            assert (
                board.home / name / "evaluator" / evaluator_version() / "edgetune_eval.py"
            ).is_file()
        finally:
            shutil.rmtree(board.home / name, ignore_errors=True)


@pytest.mark.skipif(not ssh_client_available(), reason="no OpenSSH client (ssh) here")
class TestInstallScript:
    def _run(self, board: Board, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(INSTALL_SCRIPT), *args], capture_output=True, text=True, timeout=60
        )

    def _ssh_args(self, board: Board, known_hosts: Path | None = None) -> list[str]:
        return [
            "-p",
            str(board.port),
            "-i",
            str(board.key_file),
            "-o",
            f"UserKnownHostsFile={known_hosts or board.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
        ]

    def test_installs_where_the_runner_looks(
        self, board: Board, work_dir: Path, uploads: list[str]
    ) -> None:
        proc = self._run(
            board,
            *self._ssh_args(board),
            "-d",
            str(work_dir),
            "--python",
            board.python,
            "--no-deps",
            f"{board.user}@{board.host}",
        )

        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["evaluator_version"] == evaluator_version()
        assert report["runtimes"]["onnxruntime"] == ort.__version__
        installed = Path(RemoteLayout(str(work_dir)).evaluator())
        assert installed.read_bytes() == evaluator_path().read_bytes()
        assert _listing(work_dir) == [
            "evaluator",
            f"evaluator/{evaluator_version()}",
            f"evaluator/{evaluator_version()}/edgetune_eval.py",
        ]
        stamp = _stamp(installed)

        make_runner(board, work_dir).info()

        assert uploads == []  # the runner found the installed evaluator
        assert _stamp(installed) == stamp

    def test_bad_arguments(self, board: Board) -> None:
        for args in ([], ["-p"], ["-d", "../x", "u@h"], ["--frobnicate", "u@h"], ["nohost"]):
            proc = self._run(board, *args)
            assert proc.returncode == 2, args
            assert "install-evaluator.sh: error:" in proc.stderr
            assert "usage: install-evaluator.sh" in proc.stderr

    def test_untrusted_host_fails_with_one_line(
        self, board: Board, work_dir: Path, tmp_path: Path
    ) -> None:
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        target = f"{board.user}@{board.host}"

        proc = self._run(
            board, *self._ssh_args(board, empty), "-d", str(work_dir), "--no-deps", target
        )

        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("install-evaluator.sh: error: could not copy the evaluator")
        assert not work_dir.exists()
