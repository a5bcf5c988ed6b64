"""How the ask/tell loop writes a trial's attributes: each event of a trial (asked, a stage
entered, a heartbeat, told) in one transaction, the same attributes as one write per key
made, and a restarted PostgreSQL still waited out without checking connections before use.

The loop runs on a real SQLite storage with fake stages (``tests/fakes/engine.py``); the
restart test on a throwaway PostgreSQL cluster (``bench/postgres.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

import tasks.storage
from bench.postgres import throwaway_postgres, unavailable
from tasks.compilers import CompilerError
from tasks.hpo import optuna_ops
from tasks.hpo.launch import Slot
from tasks.hpo.loop import StudyLoop
from tasks.hpo.study import open_study
from tasks.storage import ResilientRDBStorage, open_storage
from tasks.workloads.classifier import CLASSIFIER

from fakes.engine import FakeStages, FakeTracker, fake_config

LOG = logging.getLogger("test-asktell-writes")

TIMES = {"asked_at", "train_started", "train_finished", "train_returned_at"}
EVALUATED = {
    "compile_started", "compile_finished", "device_started", "device_finished",
    "evaluate_returned_at",
}  # fmt: skip
ASKED = {"owner", "heartbeat_at", "stage", "mlflow_run_id"}
TRAINED = {"float_augrc", "train_seconds"}


class Transactions:
    """The committed transactions on a storage's engine that wrote trial user attributes."""

    def __init__(self) -> None:
        self.wrote: set[int] = set()
        self.count = 0

    def executed(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        head = statement.lstrip()[:6].upper()
        if head in ("INSERT", "UPDATE") and "trial_user_attributes" in statement:
            self.wrote.add(id(conn.connection))

    def committed(self, conn: Any) -> None:
        if id(conn.connection) in self.wrote:
            self.wrote.discard(id(conn.connection))
            self.count += 1


@contextmanager
def counting(study: optuna.Study) -> Iterator[Transactions]:
    engine = optuna_ops.storage_of(study)._backend.engine  # type: ignore[attr-defined]
    seen = Transactions()
    event.listen(engine, "after_cursor_execute", seen.executed)
    event.listen(engine, "commit", seen.committed)
    try:
        yield seen
    finally:
        event.remove(engine, "after_cursor_execute", seen.executed)
        event.remove(engine, "commit", seen.committed)


def sqlite_loop(tmp_path: Path, stages_kw: dict[str, Any], **study: Any) -> StudyLoop:
    # one heartbeat at the first turn, none after: the count does not depend on timing
    beats = {"study": {"heartbeat_s": 30, "stale_after_s": 120}}
    config = fake_config(tmp_path, beats, parallel=1, **study)
    url = f"sqlite:///{tmp_path}/optuna.db"
    opened = open_study(url, config.study, config.seed, objective=CLASSIFIER)
    return StudyLoop(
        config,
        opened,
        stages=FakeStages(config, **stages_kw),
        logger=LOG,
        tracker=FakeTracker(),  # type: ignore[arg-type]
    )


def test_a_complete_trial_writes_its_attributes_in_one_transaction_per_event(
    tmp_path: Path,
) -> None:
    """Asked (owner, heartbeat, stage), its MLflow run, two stages entered (compile, then
    device; the queue before the compiler is not written, the compile stage follows at
    once), one heartbeat, told: 6 transactions; one per key made 25."""
    loop = sqlite_loop(tmp_path, {}, n_trials=1)
    with counting(loop.study) as seen:
        loop.run()

    [trial] = loop.study.get_trials()
    assert trial.state == TrialState.COMPLETE
    assert len(trial.user_attrs) == 19
    assert seen.count <= 6


def test_a_trial_reads_the_study_trials_three_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per trial asked, the study's trials are read from the database three times (the
    loop's count of trials left, the sampler's two reads of the ask); the repeat check
    and the budget use the loop's read. Before, five: the budget, the count and the repeat
    check read the trials each."""
    reads: list[int] = []
    real = ResilientRDBStorage._get_trials

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ResilientRDBStorage, "_get_trials", counted)
    totals = []
    for n_trials in (1, 3):
        loop = sqlite_loop(tmp_path / str(n_trials), {}, n_trials=n_trials)
        reads.clear()
        loop.run()
        assert [t.state for t in loop.study.get_trials()] == [TrialState.COMPLETE] * n_trials
        totals.append(len(reads))
    assert (totals[1] - totals[0]) / 2 <= 3


def test_the_trials_carry_the_attributes_one_write_per_key_gave(tmp_path: Path) -> None:
    """Complete, pruned and failed: the same keys and values as before batching."""

    def fail(stage: str, slot: Slot) -> BaseException | None:
        failing = stage == "compile" and slot.number == 2
        return CompilerError("unsupported layer: Foo") if failing else None

    stages = {"prune": lambda slot: "pruned at epoch 0" if slot.number == 1 else None}
    loop = sqlite_loop(tmp_path, {**stages, "fail": fail}, n_trials=3, retries=0)
    loop.run()

    done, pruned, failed = (t.user_attrs for t in loop.study.get_trials())
    measured = {"compiled_size_mb", "device_accuracy", "device_latency_ms"}
    assert set(done) == ASKED | TIMES | TRAINED | EVALUATED | measured | {"compiled_artifact"}
    assert done["compiled_artifact"] == "compiled/model.int8.onnx"
    # the last stage entered: a heartbeat never writes back a stage read before it
    assert done["stage"] == "device"
    assert (done["compiled_size_mb"], done["device_accuracy"]) == (0.5, 0.9)
    assert done["device_latency_ms"] == 0.2 and done["owner"] == loop.me
    assert done["float_augrc"] == pytest.approx(
        0.9 * (0.01 + abs(loop.study.trials[0].params["lr"] - 0.03))
    )
    assert set(pruned) == ASKED | TIMES | {"epochs_run", "epochs_planned", "fail_reason"}
    assert (pruned["epochs_run"], pruned["epochs_planned"]) == (1, 4)
    assert (pruned["fail_reason"], pruned["stage"]) == ("pruned at epoch 0", "train")
    fail_attrs = {"fail_stage", "fail_reason", "evaluate_returned_at"}
    assert set(failed) == ASKED | TIMES | TRAINED | fail_attrs  # no compile times
    assert failed["fail_stage"] == "compile"
    assert failed["fail_reason"] == "CompilerError: unsupported layer: Foo"
    assert all(isinstance(failed[k], float) for k in TIMES | {"heartbeat_at"})


@pytest.mark.parametrize("kind", ["rdb", "memory"])
def test_a_batched_write_sets_every_key_and_refuses_a_told_trial(tmp_path: Path, kind: str) -> None:
    storage = (
        open_storage(f"sqlite:///{tmp_path}/optuna.db")
        if kind == "rdb"
        else optuna.storages.InMemoryStorage()
    )
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    optuna_ops.set_attrs(trial, {"a": 1, "b": [2, 3], "c": {"d": "e"}})
    stored = optuna_ops.fresh_trial(study, optuna_ops.trial_id(trial)).user_attrs
    assert stored == trial.user_attrs == {"a": 1, "b": [2, 3], "c": {"d": "e"}}

    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        optuna_ops.set_trial_attrs(study, optuna_ops.trial_id(trial), {"a": 2, "f": 0})
    assert study.trials[0].user_attrs == {"a": 1, "b": [2, 3], "c": {"d": "e"}}


def test_a_batched_write_waits_while_the_database_is_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(storage=storage)
    trial_id = optuna_ops.trial_id(study.ask())
    real = tasks.storage._upsert
    failures = [OperationalError("SELECT 1", {}, Exception("the server closed the connection"))]

    def flaky(dialect: str) -> Any:
        if failures:
            raise failures.pop()
        return real(dialect)

    monkeypatch.setattr(tasks.storage, "_upsert", flaky)
    assert isinstance(storage, ResilientRDBStorage)
    storage.set_trial_user_attrs(trial_id, {"a": 1, "b": 2})

    assert not failures and storage.get_trial(trial_id).user_attrs == {"a": 1, "b": 2}


@pytest.mark.integration
@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_a_restarted_postgresql_is_waited_out_without_a_check_before_each_call() -> None:
    """The first call after the restart meets a dropped connection; it is retried, the
    pool replaced, and the trial's attributes written."""
    with throwaway_postgres() as cluster:
        storage = open_storage(cluster.create_database("optuna"))
        assert isinstance(storage, ResilientRDBStorage)
        assert not storage.engine.pool._pre_ping  # type: ignore[attr-defined]
        study = optuna.create_study(storage=storage)
        trial = study.ask()
        optuna_ops.set_attrs(trial, {"stage": "train"})
        disconnects: list[bool] = []
        event.listen(
            storage.engine, "handle_error", lambda ctx: disconnects.append(ctx.is_disconnect)
        )

        cluster.restart()
        optuna_ops.set_attrs(trial, {"stage": "compile", "heartbeat_at": 1.0})
        study.tell(trial, 0.5)

        assert disconnects[:1] == [True]
        [told] = study.get_trials()
        assert told.state == TrialState.COMPLETE
        assert told.user_attrs == {"stage": "compile", "heartbeat_at": 1.0}
