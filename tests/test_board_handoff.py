"""The board never idles while work waits: staging before the slot, and a quick handoff.

A classifier evaluation stages its artifact on the board (a real SSH server on 127.0.0.1,
tests/board.py) while another evaluation holds the board's slot, and takes the slot only to
run; a staging that fails never takes the slot and leaves nothing on the board. A waiter for
the board takes it within a few hundredths of a second of its release, with the file lock
(embedded) and with a Prefect server.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncssh
import pytest

import tasks.board
import tasks.workloads.classifier as classifier
from tasks.board import ON_BOARD, hold_board
from tasks.config import parse_config
from tasks.devices import DeviceError
from tests.conftest import tiny_config

from board import Board, start_board
from fakes import export_onnx, tiny_classifier, write_bundle

pytestmark = pytest.mark.integration

N_IMAGES = 9
#: Far above the new handoff (one poll of 0.01 s), far below the old
#: one (a 0.2 s poll; Prefect's Retry-After of seconds).
HANDOFF_BOUND_S = 0.1


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    with start_board(tmp_path_factory.mktemp("handoff-board")) as running:
        yield running


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("handoff-inputs")
    artifact = export_onnx(tiny_classifier(), folder / f"model-{uuid.uuid4().hex[:8]}.onnx")
    return artifact, write_bundle(folder / "bundle.npz", n=N_IMAGES, seed=5)


def _config(tmp_path: Path, board: Board | None = None, **device: Any) -> Any:
    section: dict[str, Any] = {"name": f"handoff-{uuid.uuid4().hex[:10]}", **device}
    if board is not None:
        options = board.runner_options(work_dir=str(tmp_path / "remote"))
        section.update(runner="ssh", ssh=options)
    return parse_config(tiny_config(tmp_path, tmp_path / "run", device=section))


@pytest.fixture
def embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.board, "embedded", lambda: True)


@pytest.fixture
def workload_on(
    monkeypatch: pytest.MonkeyPatch, inputs: tuple[Path, Path], tmp_path: Path
) -> Callable[[Any], Any]:
    """The classifier's evaluate with MLflow left out: the inputs are already here and the
    board's result is returned as is (fakes of the tracker's download and scoring only)."""

    @contextmanager
    def local_inputs(*args: Any) -> Iterator[tuple[Path, Path, Path]]:
        yield inputs[0], inputs[1], tmp_path / "work"

    monkeypatch.setattr(classifier, "evaluation_inputs", local_inputs)
    monkeypatch.setattr(classifier, "score_device_result", lambda *args: args[3])
    return lambda config: classifier.ClassifierWorkload(config)


def _wait_for(condition: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    return condition()


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.usefixtures("embedded")
def test_the_artifact_is_on_the_board_before_the_slot_is_taken(
    board: Board, tmp_path: Path, inputs: tuple[Path, Path], workload_on: Callable[[Any], Any]
) -> None:
    config = _config(tmp_path, board, warmup=0)
    runs = tmp_path / "remote" / "runs"
    events: list[tuple[str, list[str]]] = []
    results: list[Any] = []

    def evaluate() -> None:
        ON_BOARD.set(lambda: events.append(("slot taken", _listing(runs))))
        results.append(workload_on(config).evaluate(None, "trial", "study", "compiled/m.onnx"))

    with hold_board(config):  # another evaluation is running on the board
        waiter = threading.Thread(target=evaluate)
        waiter.start()
        # The artifact is put straight to its name in the run's own folder (nothing reads it
        # before the run), so it can be seen here half written: wait for the whole of it.
        whole = [inputs[0].read_bytes()]
        staged = _wait_for(
            lambda: [p.read_bytes() for p in runs.glob(f"*/{inputs[0].name}")] == whole, 30
        )
        assert staged, _listing(runs)
        assert events == []  # staged while the board was busy, still waiting for it
    waiter.join(60)

    assert len(events) == 1 and events[0][0] == "slot taken"
    assert any(name.endswith(inputs[0].name) for name in events[0][1])  # there when taken
    assert results[0].probs.shape == (N_IMAGES, 3)
    assert _listing(runs) == []  # the run folder is removed after the run


@pytest.mark.usefixtures("embedded")
def test_a_failed_staging_never_takes_the_slot_and_leaves_nothing(
    board: Board,
    tmp_path: Path,
    inputs: tuple[Path, Path],
    workload_on: Callable[[Any], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(tmp_path, board, warmup=0)
    remote = tmp_path / "remote"
    real_put = asyncssh.SFTPClient.put

    async def put(self: Any, local: Any, target: Any = None, **kwargs: Any) -> None:
        if "/runs/" in str(target):  # the artifact: half written, then the link fails
            Path(str(target)).write_bytes(b"half an artifact")
            raise asyncssh.SFTPFailure("disk full")
        await real_put(self, local, target, **kwargs)

    monkeypatch.setattr(asyncssh.SFTPClient, "put", put)
    taken: list[bool] = []
    ON_BOARD.set(lambda: taken.append(True))

    with pytest.raises(DeviceError, match="disk full"):
        workload_on(config).evaluate(None, "trial", "study", "compiled/m.onnx")

    assert taken == []
    assert _listing(remote / "runs") == []
    assert [p.name for p in remote.rglob("*.part")] == []
    with hold_board(config.model_copy(deep=True)):  # nothing kept the board
        pass


@pytest.mark.usefixtures("embedded")
def test_an_embedded_waiter_takes_the_board_right_after_its_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    polls = _waiter_sleeps(monkeypatch)
    gaps = sorted(_handoff(config) for _ in range(5))

    assert polls and max(polls) <= 0.02  # a waiter tries the lock every 0.01 s
    assert gaps[2] < HANDOFF_BOUND_S, gaps  # the median: a loaded machine may stall one


def _waiter_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds every sleep of tasks.board asks for in the thread named "waiter"."""
    sleeps: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if threading.current_thread().name == "waiter":
            sleeps.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(tasks.board.time, "sleep", sleep)
    return sleeps


def _handoff(config: Any, join_s: float = 10) -> float:
    """Seconds from one holder's release of the board to a waiter holding it."""
    acquired: list[float] = []

    def waiter() -> None:
        with hold_board(config):
            acquired.append(time.monotonic())

    with hold_board(config):
        thread = threading.Thread(target=waiter, name="waiter")
        thread.start()
        time.sleep(0.3)  # the waiter is polling by now
    released = time.monotonic()
    thread.join(join_s)
    return acquired[0] - released


@pytest.mark.slow
def test_with_a_prefect_server_a_waiter_takes_the_board_right_after_its_release(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.board import embedded, ensure_device_limit

    assert not embedded()
    config = _config(tmp_path)
    ensure_device_limit(config.device.concurrency_limit)

    sleeps = _waiter_sleeps(monkeypatch)
    gaps = sorted(_handoff(config, join_s=120) for _ in range(5))

    # the waiter's own poll between denied tries, never the server's Retry-After
    assert sleeps and set(sleeps) == {tasks.board.PREFECT_POLL_S}, sleeps
    # within one poll (0.25 s) and a request; Prefect's own wait is the server's Retry-After,
    # about the slot's average occupancy (2 s for a new limit) x (1 + denied tries), on every
    # handoff. The median, because the test server now and then stalls a request for ~2 s.
    assert gaps[2] < 0.5, gaps
