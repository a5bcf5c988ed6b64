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
import types
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
    """The seconds every sleep of tasks.board's own code asks for in the thread named
    "waiter" (not the API client's: it sleeps before retrying a 503 of the test server)."""
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        if threading.current_thread().name == "waiter":
            sleeps.append(seconds)
        time.sleep(seconds)

    own_time = types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic)
    monkeypatch.setattr(tasks.board, "time", own_time)
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


def _active_slots(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return int(client.read_global_concurrency_limit_by_name(name).active_slots)


@pytest.mark.slow
def test_a_prepared_stage_takes_the_board_with_the_client_it_opened_ahead(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evaluation's ``PREPARE`` (run while its run is made RUNNING) opens and connects
    the API client; taking the slot then opens none, and the slot is held for the block only."""
    from flows.stages import PREPARE
    from tasks.board import ensure_device_limit

    config = _config(tmp_path)
    name = config.device.concurrency_limit
    ensure_device_limit(name)
    opened: list[str] = []
    real_get_client = tasks.board.get_client

    def counting_get_client(**kwargs: Any) -> Any:
        opened.append(threading.current_thread().name)
        return real_get_client(**kwargs)

    monkeypatch.setattr(tasks.board, "get_client", counting_get_client)
    PREPARE["evaluate_trial"](config=config, trial_number=3, run_id="r", parent_run_id="p")
    assert opened == [threading.current_thread().name]
    with hold_board(config):
        held = _active_slots(name)
    assert (opened, held, _active_slots(name)) == ([threading.current_thread().name], 1, 0)

    with hold_board(config):  # unprepared: a client of its own
        held = _active_slots(name)
    assert (len(opened), held, _active_slots(name)) == (2, 1, 0)


@pytest.mark.slow
def test_a_held_lease_is_renewed_and_one_that_is_lost_fails_the_evaluation(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease on the board's slot is renewed while the block runs; when the server no
    longer has it (here released by another client, as when it expired), the block's end
    raises ``BoardLeaseLost``: another run may have used the board meanwhile."""
    from prefect.client.orchestration import SyncPrefectClient, get_client

    from tasks.board import BoardLeaseLost, ensure_device_limit

    config = _config(tmp_path)
    name = config.device.concurrency_limit
    ensure_device_limit(name)
    monkeypatch.setattr(tasks.board, "RENEW_EVERY_S", 0.2)
    renewals: list[int] = []
    real_renew = SyncPrefectClient.renew_concurrency_lease

    def renew(self: SyncPrefectClient, lease_id: Any, lease_duration: float) -> Any:
        try:
            response = real_renew(self, lease_id, lease_duration)
        except Exception as exc:
            renewals.append(getattr(getattr(exc, "response", None), "status_code", -1))
            raise
        renewals.append(response.status_code)
        return response

    monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", renew)
    leases: list[Any] = []
    real_try = tasks.board._try_lease
    monkeypatch.setattr(
        tasks.board, "_try_lease", lambda *a: leases.append(real_try(*a)) or leases[-1]
    )

    with hold_board(config):
        time.sleep(1.0)
    assert len(renewals) >= 3 and set(renewals) == {204}, renewals
    assert _active_slots(name) == 0

    renewals.clear()
    lost = rf"limit {name}\) was lost .*HTTP 410: Lease not found"
    with pytest.raises(BoardLeaseLost, match=lost), hold_board(config):
        _wait_for(lambda: renewals, 5)
        with get_client(sync_client=True) as other:  # as if it had expired
            other.release_concurrency_slots_with_lease(leases[-1])
        _wait_for(lambda: 410 in renewals, 5)
    assert renewals[-1] == 410 and _active_slots(name) == 0, renewals


@pytest.mark.slow
def test_a_board_whose_limit_is_missing_says_how_to_create_it(
    prefect_server: None, tmp_path: Path
) -> None:
    from tasks.board import BoardLimitMissing

    config = _config(tmp_path)
    name = config.device.concurrency_limit
    missing = rf"{name!r} does not exist .* prefect gcl create {name} --limit 1"
    with pytest.raises(BoardLimitMissing, match=missing), hold_board(config):
        pytest.fail("held a board that has no limit")
