"""A full disk: the study stops in one line, loses no trial, counts no fault as an outcome.

The engine's tests run everywhere: a FAKE disk (``FullDisk``) makes the study's storage
and tracker fail as SQLite, MLflow and the filesystem do when the disk is full. The last
test fills a real filesystem (a small tmpfs, mounted when this machine allows it) under a
real ``edgetune tune`` process.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from tasks.config import parse_config
from tasks.hpo import optuna_ops
from tasks.hpo.launch import Slot
from tasks.hpo.loop import StudyLoop
from tasks.hpo.recovery import (
    ATTR_HEARTBEAT,
    ATTR_INFRA,
    ATTR_OWNER,
    ATTR_PARENT,
    ATTR_RETRY_OF,
    RESERVE_PREFIX,
    DiskFull,
    outcome_count,
    still_to_ask,
)
from tasks.hpo.study import open_study
from tasks.storage import db_retry, disk_full
from tasks.workloads.classifier import CLASSIFIER

from conftest import tiny_config
from fakes.engine import FakeStages, FakeTracker, fake_config

LOG = logging.getLogger("test-disk-full")
FIX = "free space there, then run the study again to continue (the trials it cut short run again)"


# Recognising a full disk -------------------------------------------------------------------------


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


def _sqlite_full() -> optuna.exceptions.StorageInternalError:
    """What Optuna's RDB storage raises when SQLite cannot write: a commit error whose
    cause is SQLite's."""
    return _chained(  # type: ignore[return-value]
        optuna.exceptions.StorageInternalError("An exception is raised during the commit."),
        sqlite3.OperationalError("database or disk is full"),
    )


def test_a_full_disk_is_found_in_the_chain_of_what_optuna_and_mlflow_raise() -> None:
    written = OSError(errno.ENOSPC, "No space left on device", "/data/run/mlflow.db-journal")
    assert disk_full(written) is written
    committed = _sqlite_full()
    assert str(disk_full(committed)) == "database or disk is full"
    mlflow_error = _chained(
        MlflowException("(sqlite3.OperationalError) database or disk is full"), committed
    )
    assert disk_full(mlflow_error) is mlflow_error
    remote = RuntimeError(
        "StageFailed: train-trial-3 ended FAILED: OSError: [Errno 28] No space left on device"
    )
    assert disk_full(remote) is remote
    assert disk_full(_chained(RuntimeError("wrapped"), written)) is written
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full(RuntimeError("database is locked")) is None


def test_the_storage_does_not_wait_for_a_full_disk_as_for_a_database_restart() -> None:
    calls = []

    def commit() -> None:
        calls.append(time.monotonic())
        raise _sqlite_full()

    started = time.monotonic()
    with pytest.raises(optuna.exceptions.StorageInternalError):
        db_retry(commit, patience_s=5.0)
    assert len(calls) == 1 and time.monotonic() - started < 1.0


# The engine on a fake full disk --------------------------------------------------------------


@dataclass
class FullDisk:
    """FAKE: the run directory's filesystem filling up. After ``fill()`` the writes named in
    ``only`` (every write when empty) fail as on a full disk, until ``free()``; with
    ``reserve_helps`` the study's reserve file (``SpaceReserve``), once deleted, gives its
    room back and writes succeed again, as on a real filesystem."""

    folder: Path
    only: tuple[str, ...] = ()
    reserve_helps: bool = True
    filled: bool = False
    held: list[Path] = field(default_factory=list)

    def fill(self) -> None:
        self.filled = True
        self.held = sorted(self.folder.glob(f"{RESERVE_PREFIX}*")) if self.reserve_helps else []
        assert self.held or not self.reserve_helps, "the study holds no reserve"

    def free(self) -> None:
        self.filled = False

    def refuses(self, write: str) -> bool:
        room = any(not path.exists() for path in self.held)
        return self.filled and not room and (not self.only or write in self.only)


class FullDiskStorage(optuna.storages.InMemoryStorage):
    """FAKE: Optuna's storage on the ``FullDisk``: its writes fail as SQLite's do when full."""

    WRITES = (
        "create_new_trial",
        "set_trial_param",
        "set_trial_state_values",
        "set_trial_intermediate_value",
        "set_trial_user_attr",
        "set_trial_system_attr",
        "set_study_user_attr",
        "set_study_system_attr",
    )

    def __init__(self, disk: FullDisk) -> None:
        super().__init__()
        self.disk = disk

    def __getattribute__(self, name: str) -> Any:
        method = super().__getattribute__(name)
        if name not in FullDiskStorage.WRITES:
            return method
        disk = super().__getattribute__("disk")

        def write(*args: Any, **kwargs: Any) -> Any:
            if disk.refuses(name):
                raise _sqlite_full()
            return method(*args, **kwargs)

        return write


class FullDiskTracker(FakeTracker):
    """FAKE: MLflow on the ``FullDisk``: its database and artifact writes fail."""

    def __init__(self, disk: FullDisk) -> None:
        super().__init__()
        self.disk = disk

    def _check(self, write: str) -> None:
        if not self.disk.refuses(write):
            return
        if write == "log_text":
            path = self.disk.folder / "mlartifacts" / "error.txt"
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        raise _chained(
            MlflowException("(sqlite3.OperationalError) database or disk is full"),
            sqlite3.OperationalError("database or disk is full"),
        )

    def start_run(self, *args: Any, **kwargs: Any) -> str:
        self._check("start_run")
        return super().start_run(*args, **kwargs)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._check("set_tags")
        super().set_tags(run_id, tags)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._check("end_run")
        super().end_run(run_id, status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._check("log_params")
        super().log_params(run_id, params)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        self._check("log_metrics")
        super().log_metrics(run_id, metrics, step)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._check("log_text")
        super().log_text(run_id, text, path)


def _filling(disk: FullDisk, trial: int) -> Any:
    """A stage failure: trial ``trial``'s training fills the disk and fails writing its
    model, as MLflow's artifact store does."""

    def fail(stage: str, slot: Slot) -> BaseException | None:
        if stage != "train" or slot.number != trial:
            return None
        disk.fill()
        model = disk.folder / "mlartifacts" / f"trial-{trial}" / "model.onnx"
        return OSError(errno.ENOSPC, "No space left on device", str(model))

    return fail


def _study_on(disk: FullDisk, tmp_path: Path, **study: Any) -> tuple[Any, optuna.Study]:
    config = fake_config(tmp_path, n_trials=3, parallel=1, **study)
    storage = FullDiskStorage(disk)
    return config, open_study("", config.study, 0, objective=CLASSIFIER, storage=storage)


def _run_again(config: Any, study: optuna.Study, tracker: FakeTracker) -> dict[str, Any]:
    """The disk has room again: the study runs again to its end."""
    stages = FakeStages(config)
    return StudyLoop(config, study, stages=stages, logger=LOG, tracker=tracker).run()  # type: ignore[arg-type]


def test_a_full_disk_stops_the_study_in_one_line_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    disk = FullDisk(tmp_path / "run")
    config, study = _study_on(disk, tmp_path, retries=0)
    tracker = FullDiskTracker(disk)
    stages = FakeStages(config, fail=_filling(disk, 1))
    loop = StudyLoop(config, study, stages=stages, logger=LOG, tracker=tracker)  # type: ignore[arg-type]

    with pytest.raises(DiskFull) as stopped:
        loop.run()

    message = str(stopped.value)
    assert message.startswith(f"disk full: no space left on the filesystem of {disk.folder}")
    assert " (mounted on /" in message and message.endswith(f"; {FIX}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    failed, retry = trials[1], trials[2]
    assert failed.user_attrs[ATTR_INFRA] == failed.user_attrs["fail_reason"]
    assert failed.user_attrs["fail_reason"] == f"study stopped: {message}"
    # enqueued again with retries: 0, and not charged: a full disk is not the trial's fault
    assert retry.user_attrs == {ATTR_RETRY_OF: 1, "attempt": 0}
    assert retry.params == {} and retry.system_attrs["fixed_params"] == failed.params
    assert outcome_count(trials) == 1 and still_to_ask(trials, 3) == 2  # the retry, then one
    parent = tracker.named(f"study-{config.study.name}")
    assert parent.status == "KILLED"
    assert parent.tags["edgetune.end_reason"] == f"study stopped: {message}"
    assert (tracker.named("trial-1").status, tracker.named("trial-1").tags["edgetune.state"]) == (
        "KILLED",
        "FAIL",
    )
    assert list(disk.folder.glob(f"{RESERVE_PREFIX}*")) == []  # freed for the bookkeeping

    disk.free()
    result = _run_again(config, study, tracker)

    trials = study.get_trials()
    assert result["counts"]["COMPLETE"] == 3 and outcome_count(trials) == 3
    assert trials[2].state == TrialState.COMPLETE and trials[2].params == failed.params
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    assert [r.name for r in tracker.runs.values() if r.status == "RUNNING"] == []


def test_a_fail_whose_retry_could_not_be_enqueued_is_no_outcome_and_the_next_start_retries_it(
    tmp_path: Path,
) -> None:
    """Room to update a trial but none for a new one: the FAIL is told, its retry is not."""
    disk = FullDisk(tmp_path / "run", only=("create_new_trial",), reserve_helps=False)
    config, study = _study_on(disk, tmp_path, retries=0)
    tracker = FullDiskTracker(disk)
    stages = FakeStages(config, fail=_filling(disk, 1))
    loop = StudyLoop(config, study, stages=stages, logger=LOG, tracker=tracker)  # type: ignore[arg-type]

    with pytest.raises(DiskFull):
        loop.run()

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs[ATTR_INFRA].startswith("study stopped: disk full: ")
    assert outcome_count(trials) == 1 and still_to_ask(trials, 3) == 2  # not an outcome
    assert tracker.named(f"study-{config.study.name}").status == "KILLED"

    disk.free()
    result = _run_again(config, study, tracker)

    trials = study.get_trials()
    assert result["counts"]["COMPLETE"] == 3 and outcome_count(trials) == 3
    [retry] = [t for t in trials if t.user_attrs.get(ATTR_RETRY_OF) == 1]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[1].params
    assert retry.user_attrs["attempt"] == 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_disk_too_full_to_record_the_stop_leaves_it_to_the_next_start(tmp_path: Path) -> None:
    """No room at all (the reserve is on another filesystem, say): nothing can be written,
    the error is still one line, and the next start reconciles what was left RUNNING."""
    disk = FullDisk(tmp_path / "run", reserve_helps=False)
    config, study = _study_on(disk, tmp_path, retries=1)
    tracker = FullDiskTracker(disk)
    stages = FakeStages(config, fail=_filling(disk, 1))
    loop = StudyLoop(config, study, stages=stages, logger=LOG, tracker=tracker)  # type: ignore[arg-type]

    with pytest.raises(DiskFull, match=r"^disk full: no space left on the filesystem of "):
        loop.run()

    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert tracker.named(f"study-{config.study.name}").status == "RUNNING"
    # the study process that held them is gone (it exited)
    disk.free()
    gone = {"host": socket.gethostname(), "pid": _dead_pid(), "token": "gone"}
    study.set_user_attr(ATTR_PARENT, {"owner": gone, ATTR_HEARTBEAT: time.time()})
    optuna_ops.set_trial_attr(study, optuna_ops.trial_id(study.trials[1]), ATTR_OWNER, gone)
    result = _run_again(config, study, tracker)

    trials = study.get_trials()
    assert result["counts"]["COMPLETE"] == 3 and outcome_count(trials) == 3
    assert trials[1].user_attrs["fail_reason"].startswith(f"stale: its study process {gone['pid']}")
    [retry] = [t for t in trials if t.user_attrs.get(ATTR_RETRY_OF) == 1]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[1].params
    first, _ = [r for r in tracker.runs.values() if r.name == f"study-{config.study.name}"]
    assert first.status == "KILLED"  # by the next start
    assert first.tags["edgetune.end_reason"].startswith("stale: its study process ")
    assert [r.name for r in tracker.runs.values() if r.status == "RUNNING"] == []


def test_the_command_hides_what_mlflow_and_prefect_log_of_a_full_disk() -> None:
    """MLflow logs a database error with its traceback on a handler of its own; Prefect logs
    a failed flow run's. The command's one ``error:`` line says it instead."""
    from edgetune.cli import _untraced

    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    mlflow_db = logging.getLogger("mlflow.store.db.utils")
    mlflow_db.addHandler(console)
    flow_runs = logging.getLogger("prefect.flow_runs")
    root = logging.getLogger()
    root.addHandler(console)

    def log(logger: logging.Logger, error: BaseException) -> None:
        try:
            raise error
        except BaseException:
            logger.error("database error", exc_info=True)

    try:
        with _untraced(False, DiskFull):  # as the tune command does
            log(
                mlflow_db,
                _chained(
                    MlflowException("(sqlite3.OperationalError) database or disk is full"),
                    _sqlite_full(),
                ),
            )
            log(flow_runs, OSError(errno.ENOSPC, "No space left on device", "/data/run/x"))
            log(flow_runs, DiskFull("disk full: no space left on the filesystem of /data/run"))
        assert stream.getvalue() == ""
        with _untraced(verbose=False):
            log(mlflow_db, MlflowException("database is locked"))  # not a full disk: shown
        assert "database is locked" in stream.getvalue()
        assert not mlflow_db.filters
    finally:
        mlflow_db.removeHandler(console)
        root.removeHandler(console)


# A real full filesystem ------------------------------------------------------------------------


def _mount_tmpfs(folder: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` on ``folder``, or skip the test saying why it cannot."""
    if os.geteuid() != 0:
        pytest.skip(
            "mounting a small tmpfs needs root (CAP_SYS_ADMIN); the engine on a full disk is "
            "tested with a fake disk above"
        )
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command here to mount a small tmpfs")
    if done.returncode != 0:
        pytest.skip(
            f"mounting a tmpfs is not permitted here (no CAP_SYS_ADMIN?): {done.stderr.strip()}"
        )


@pytest.fixture(scope="session")
def tmpfs_allowed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Whether this machine lets the tests mount a tmpfs (tried once, before the Prefect
    server of the session is started for nothing)."""
    folder = tmp_path_factory.mktemp("tmpfs-check")
    _mount_tmpfs(folder, "1m")
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_disk(tmpfs_allowed: None, tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: room for a 3-trial study, filled by the test while it runs."""
    folder = tmp_path / "disk"
    folder.mkdir()
    _mount_tmpfs(folder, "64m")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _running_with_epochs(database: Path) -> set[int]:
    """Numbers of RUNNING trials that reported an epoch, read without writing anything."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as db:
            rows = db.execute(
                "SELECT DISTINCT t.number FROM trials t JOIN trial_intermediate_values v "
                "ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'"
            ).fetchall()
    except sqlite3.Error:
        return set()  # not created yet, or busy
    return {number for (number,) in rows}


def _fill_when_training(disk: Path, run_dir: Path, seen: list[int], done: threading.Event) -> None:
    """Fill the filesystem to its last byte once a trial after trial 0 is mid-training, and
    put its number in ``seen`` (read once trial 0 has its record: never while the study
    creates its database). Which one it is depends on the machine's pace: pipelined, trial
    1 may end its training before trial 0's record is written, and then it is trial 2."""
    deadline = time.monotonic() + 300
    before = run_dir / "hpo" / "trial_0.json"
    while True:
        training = _running_with_epochs(run_dir / "optuna.db") - {0} if before.exists() else set()
        if training:
            seen.append(min(training))
            break
        if done.is_set() or time.monotonic() > deadline:
            return
        time.sleep(0.1)
    handle = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    chunk = bytes(1 << 16)
    try:
        while True:
            os.write(handle, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(handle)


def _edgetune(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    command = [str(Path(sys.executable).parent / "edgetune"), "tune", str(config), *extra]
    return subprocess.run(
        command, env=env, cwd=config.parent, capture_output=True, text=True, timeout=600
    )


def _mlflow_runs(tracking_uri: str) -> list[Any]:
    client = MlflowClient(tracking_uri)
    return [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    ]


def _told(trials: list[optuna.trial.FrozenTrial]) -> str:
    return repr([(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials])


def _cut_short_and_enqueued_again(trials: list[optuna.trial.FrozenTrial]) -> dict[int, int]:
    """The trials a full disk stopped, each with the number of its retry.

    Pipelined, the next trial trains while the one before is compiled and evaluated, so the
    disk may fill with one trial in flight or two: each is told FAIL as a fault outside it
    (no outcome, not charged) and enqueued again once. What ended before is COMPLETE.
    """
    failed = [t for t in trials if t.state == TrialState.FAIL]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert failed and len(waiting) == len(failed), _told(trials)
    assert all(t.state == TrialState.COMPLETE for t in trials[: failed[0].number]), _told(trials)
    assert trials[-len(failed) - len(waiting) :] == failed + waiting, _told(trials)
    for trial in failed:
        assert trial.user_attrs[ATTR_INFRA].startswith("study stopped: disk full: ")
    retries = {t.user_attrs[ATTR_RETRY_OF]: t for t in waiting}
    assert sorted(retries) == [t.number for t in failed], _told(trials)
    for number, retry in retries.items():
        assert retry.user_attrs == {ATTR_RETRY_OF: number, "attempt": 0}
        assert retry.system_attrs["fixed_params"] == trials[number].params  # asked as it
    return {number: retry.number for number, retry in retries.items()}


@pytest.mark.integration
@pytest.mark.slow
def test_a_study_on_a_filesystem_that_fills_up_stops_in_one_line_and_resumes_to_its_end(
    tmpfs_allowed: None, prefect_server: None, small_disk: Path, digits_root: Path, tmp_path: Path
) -> None:
    run_dir = small_disk / "full"
    raw = tiny_config(digits_root, run_dir)
    raw["study"].update(n_trials=3, parallel=1, retries=0, heartbeat_s=1, stale_after_s=30)
    # epochs enough that a trial is still training when the filler sees its first epoch
    raw["train"].update(epochs=8, swa_start=4)
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    done = threading.Event()
    seen: list[int] = []
    filler = threading.Thread(target=_fill_when_training, args=(small_disk, run_dir, seen, done))
    filler.start()
    try:
        first = _edgetune(path)
    finally:
        done.set()
        filler.join()

    assert first.returncode == 1, first.stderr[-3000:]
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, first.stderr[-3000:]
    assert errors[0].startswith(f"error: disk full: no space left on the filesystem of {run_dir}")
    assert f"(mounted on {small_disk}, " in errors[0] and errors[0].endswith(f"; {FIX}")
    (small_disk / "filler").unlink()  # free space

    trials = open_study(config.storage_url, config.study, 0, create=False).get_trials()
    cut = _cut_short_and_enqueued_again(trials)
    assert seen[0] in cut, _told(trials)  # the trial the disk filled under
    runs = _mlflow_runs(config.tracking_uri)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    [parent] = [r for r in runs if r.data.tags.get("edgetune.kind") == "study"]
    assert parent.info.status == "KILLED"
    assert parent.data.tags["edgetune.end_reason"].startswith("study stopped: disk full: ")

    second = _edgetune(path, "--json")

    assert second.returncode == 0, second.stderr[-3000:]
    trials = open_study(config.storage_url, config.study, 0, create=False).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3 and outcome_count(trials) == 3
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    for number, retry in cut.items():
        assert trials[retry].state == TrialState.COMPLETE, _told(trials)
        assert trials[retry].params == trials[number].params
    assert [
        r.info.run_name for r in _mlflow_runs(config.tracking_uri) if r.info.status == "RUNNING"
    ] == []
    assert list(run_dir.glob(f"{RESERVE_PREFIX}*")) == []
