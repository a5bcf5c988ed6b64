"""Two processes starting a fresh run directory at once both create and use its stores.

Two real processes (spawned, as two ``edgetune tune`` are) open the Optuna storage and the
MLflow tracking store of one fresh directory behind a barrier, round after round: the
first to arrive creates each database while the other waits, and neither sees a store
half created (MLflow's migrations failed with an alembic ``CommandError`` before).
"""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import optuna
import pytest

from tasks.config import StudyConfig
from tasks.hpo.study import open_study
from tasks.tracking import Tracker, creation_lock, one_line

ROUNDS = 3
TIMEOUT_S = 240


def _start(dirs: list[Path], barrier: Any, results: Any) -> None:
    """One process: in each directory, wait for the other, then open both stores."""
    for run_dir in dirs:
        barrier.wait(timeout=TIMEOUT_S)
        outcome: dict[str, str] = {"dir": run_dir.name}
        try:
            study = open_study(f"sqlite:///{run_dir / 'optuna.db'}", StudyConfig(name="s"), 0)
            outcome["study"] = study.study_name
        except Exception as exc:
            outcome["study"] = f"{type(exc).__name__}: {one_line(exc)}"
            outcome["trace"] = traceback.format_exc()
        try:
            tracker = Tracker(f"sqlite:///{run_dir / 'mlflow.db'}")
            outcome["experiment"] = tracker.experiment_id("start")
        except Exception as exc:
            outcome["experiment"] = f"{type(exc).__name__}: {one_line(exc)}"
            outcome["trace"] = outcome.get("trace", "") + traceback.format_exc()
        results.put(outcome)


@pytest.mark.slow
def test_two_processes_starting_one_fresh_directory_both_work(tmp_path: Path) -> None:
    dirs = [tmp_path / f"run{i}" for i in range(ROUNDS)]
    for run_dir in dirs:
        run_dir.mkdir()
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    workers = [spawn.Process(target=_start, args=(dirs, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=TIMEOUT_S) for _ in range(2 * ROUNDS)]
    for worker in workers:
        worker.join(timeout=TIMEOUT_S)
    assert [w.exitcode for w in workers] == [0, 0]

    broken = [o for o in outcomes if o["study"] != "s" or not o["experiment"].isdigit()]
    assert not broken, broken[0].get("trace") or broken
    for run_dir in dirs:
        same = [o for o in outcomes if o["dir"] == run_dir.name]
        assert len(same) == 2
        assert same[0]["experiment"] == same[1]["experiment"]  # one experiment, not two
        summaries = optuna.get_all_study_summaries(f"sqlite:///{run_dir / 'optuna.db'}")
        assert [s.study_name for s in summaries] == ["s"]  # one study, not two


def test_a_database_being_created_is_waited_for_then_refused_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with (
        creation_lock(url),  # held by another opener
        pytest.raises(TimeoutError) as refused,
        creation_lock(url, patience_s=1.0),
    ):
        pass
    assert str(refused.value) == (
        f"{tmp_path / 'optuna.db.lock'} stayed locked for 1 s by another process opening "
        f"optuna.db; wait for that process, or stop it (its lock goes with it)"
    )
    with creation_lock(url, patience_s=1.0):  # freed with its holder
        assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db.lock"]
