"""Progress while work runs: a study's trials (stage, epoch, outcome, elapsed and ETA), read
from a real Optuna storage; the plain lines printed where stderr is no terminal; the live
view at 80 columns; a detector's training epochs; the study's progress artifact in Prefect.

The studies run on fake stages (``tests/fakes/engine.py``): real loop, real SQLite storage,
no training.
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from edgetune.progress import (
    Progress,
    Running,
    Snapshot,
    clock,
    epoch_lines,
    eta_s,
    events,
    live_view,
    read_snapshot,
)
from tasks.hpo.launch import Slot
from tasks.hpo.loop import StudyLoop
from tasks.hpo.study import open_study
from tasks.workloads.base import StudyTarget, TrainOutcome
from tasks.workloads.classifier import ClassifierWorkload

from fakes.engine import FakeStages, FakeTracker, fake_config

LOG = logging.getLogger("test-progress")
LINE = re.compile(r"^\[(\d+:\d\d) elapsed, ETA (\?|\d+:\d\d)\] (.*)$")


def snap(**fields: Any) -> Snapshot:
    base: dict[str, Any] = {
        "study": "s",
        "label": "",
        "total": 8,
        "done": 0,
        "to_ask": 0,
        "counts": {},
        "running": (),
        "finished": {},
        "durations": (),
        "best": "no result yet",
        "parallel": 2,
    }
    return Snapshot(**{**base, **fields})


def running(number: int, age_s: float, stage: str = "train") -> Running:
    return Running(number, stage, 0, 10, age_s)


# ETA arithmetic -----------------------------------------------------------------------------


def test_clock_reads_as_minutes_and_hours() -> None:
    assert [clock(s) for s in (0, 59.6, 75, 3599, 3725)] == [
        "0:00",
        "1:00",
        "1:15",
        "59:59",
        "1:02:05",
    ]


def test_the_eta_is_the_work_left_shared_by_the_parallel_slots() -> None:
    # mean of the finished trials 90 s; 3 still to ask; one running for 30 s (60 s left)
    study = snap(durations=(60.0, 120.0), to_ask=3, running=(running(5, 30.0),))
    assert eta_s([study]) == pytest.approx((3 * 90 + 60) / 2)
    # never shorter than what the longest running trial has left
    assert eta_s([snap(durations=(600.0,), running=(running(1, 10.0),))]) == pytest.approx(590)
    # a time budget: no trial starts after it, those in flight finish (one mean more)
    assert eta_s([study], budget_left_s=50.0) == pytest.approx(50 + 90)
    assert eta_s([study], budget_left_s=-5.0) == pytest.approx(90)
    # unknown before a trial finished; nothing left: done
    assert eta_s([snap(to_ask=3)]) is None
    assert eta_s([snap(done=8)]) == 0.0


def test_a_variant_without_a_finished_trial_takes_the_mean_of_the_others() -> None:
    first = snap(study="a", durations=(100.0, 100.0, 100.0))
    second = snap(study="b", to_ask=4, parallel=2)
    assert eta_s([first, second]) == pytest.approx(4 * 100 / 2)


# Snapshots and events from a real storage -------------------------------------------------


def _study(tmp_path: Path) -> tuple[StudyTarget, optuna.Study]:
    config = fake_config(tmp_path, {"train": {"epochs": 10, "swa_start": 5}}, n_trials=8)
    config.run_path.mkdir(parents=True)
    return config, open_study(config.storage_url, config.study, config.seed)


def _ask(study: optuna.Study, stage: str) -> optuna.Trial:
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1, log=True)})
    trial.set_user_attr("stage", stage)
    return trial


def test_a_snapshot_reads_each_trials_stage_epoch_and_outcome(tmp_path: Path) -> None:
    config, study = _study(tmp_path)
    done, pruned, failed = (_ask(study, "train") for _ in range(3))
    training = _ask(study, "train")
    _ask(study, "device")
    _ask(study, "evaluate")
    for epoch, value in enumerate((0.3, 0.2, 0.1)):
        training.report(value, epoch)
    study.tell(done, 0.04321)
    pruned.set_user_attr("fail_reason", "pruned at epoch 1 with float AUGRC 0.3000")
    study.tell(pruned, state=TrialState.PRUNED)
    failed.set_user_attr("fail_stage", "compile")
    failed.set_user_attr("fail_reason", "RuntimeError: the compiler crashed")
    study.tell(failed, state=TrialState.FAIL)

    now = datetime.now() + timedelta(seconds=61)
    seen = read_snapshot(study, config, now=now)

    assert (seen.total, seen.done, seen.to_ask, seen.parallel) == (8, 3, 2, 2)
    assert [t.text() for t in seen.running] == [
        "trial 3: train epoch 4/10",  # three epochs reported: the fourth trains
        "trial 4: device",
        "trial 5: waiting for the compiler",
    ]
    assert all(60 < t.age_s < 65 for t in seen.running)
    assert re.fullmatch(
        r"COMPLETE, device AUGRC 0\.04321 after 0:0\d · best so far", seen.finished[0]
    )
    assert re.fullmatch(r"PRUNED after 0:0\d: pruned at epoch 1 .*", seen.finished[1])
    assert re.fullmatch(
        r"FAIL in compile after 0:0\d: RuntimeError: the compiler crashed", seen.finished[2]
    )
    assert seen.best == "best device AUGRC 0.04321 (trial 0)"
    assert len(seen.durations) == 3 and seen.status() == (
        "3/8 done · 3 running · 1 pruned · 1 failed"
    )


def test_events_say_what_started_moved_and_finished_since_the_last_look(tmp_path: Path) -> None:
    config, study = _study(tmp_path)
    first, second = _ask(study, "train"), _ask(study, "compile")
    first.report(0.3, 0)
    before = read_snapshot(study, config)
    assert events(None, before) == [
        "trial 0 started: train epoch 2/10",
        "trial 1 started: compile",
    ]
    first.report(0.2, 1)
    study.tell(second, 0.05)
    third = _ask(study, "train")
    after = read_snapshot(study, config)
    lines = events(before, after)
    assert lines[0].startswith("trial 1: COMPLETE, device AUGRC 0.05000 after ")
    assert lines[0].endswith(" · best so far (1/8 done)")
    assert lines[1:] == ["trial 0: train epoch 3/10", "trial 2 started: train epoch 1/10"]
    assert events(after, read_snapshot(study, config)) == []  # nothing new: nothing said
    del third


def test_a_study_started_afresh_is_news_again(tmp_path: Path) -> None:
    config, study = _study(tmp_path)
    study.tell(_ask(study, "train"), 0.05)
    old = read_snapshot(study, config)
    optuna.delete_study(study_name=config.study.name, storage=config.storage_url)
    study = open_study(config.storage_url, config.study, config.seed)
    _ask(study, "train")
    assert events(old, read_snapshot(study, config)) == ["trial 0 started: train epoch 1/10"]


def test_a_study_restarted_under_a_watching_progress_is_news_again(tmp_path: Path) -> None:
    """``--restart`` deletes the study the progress loaded at its start; SQLite gives the
    new one the same id, and the loaded study's cache kept showing the old one: not one
    line for the whole run."""
    from tasks.hpo.recovery import forget_study

    config, study = _study(tmp_path)
    study.tell(_ask(study, "train"), 0.05)
    out = io.StringIO()
    with Progress(config, live=False, fresh=True, interval=60, out=out) as progress:
        progress.tick()  # the old study, loaded and read
        assert forget_study(config)
        study = open_study(config.storage_url, config.study, config.seed)
        _ask(study, "train")
        progress.tick()
    said = [LINE.match(line).group(3) for line in out.getvalue().splitlines()]  # type: ignore[union-attr]
    assert said == ["trial 0 started: train epoch 1/10"]


def test_the_live_view_keeps_each_line_within_80_columns(tmp_path: Path) -> None:
    config, study = _study(tmp_path)
    study.tell(_ask(study, "train"), 0.05)
    _ask(study, "train").report(0.3, 0)
    _ask(study, "device")
    seen = read_snapshot(study, config, label="a-variant-with-a-long-name-that-goes-on-and-on")
    out = Console(width=80, record=True, file=io.StringIO())
    out.print(live_view([seen], "1:05 elapsed, ETA 2:30"))
    lines = out.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    # one line each: the time, the status, the best, the two running trials (none wraps)
    assert len(lines) == 5
    assert lines[0] == "1:05 elapsed, ETA 2:30"
    assert lines[2:] == [
        "  best device AUGRC 0.05000 (trial 0)",
        "  trial 1: train epoch 2/10",
        "  trial 2: device",
    ]
    assert lines[1].startswith("a-variant-with-a-long-name") and lines[1].endswith("…")


# Plain lines while a study runs --------------------------------------------------------------


class Unregistered(ClassifierWorkload):
    """The classifier, without the model registry (not what these tests are about)."""

    def register_best(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class EpochStages(FakeStages):
    """Fake stages whose training reports a float metric each epoch, as a workload does."""

    epoch_s: float = 0.25

    def train(self, slot: Slot) -> TrainOutcome:
        for epoch in range(self.config.train.epochs):
            time.sleep(self.epoch_s)
            slot.trial.report(0.5 / (epoch + 1), epoch)
        return super().train(slot)  # type: ignore[return-value]


def test_without_a_terminal_each_event_is_one_plain_line(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"train": {"epochs": 3, "swa_start": 1}}, n_trials=3, parallel=1)
    config.run_path.mkdir(parents=True)
    study = open_study(config.storage_url, config.study, config.seed)
    stages = EpochStages(config, compile_s=0.3, device_s=0.3)
    loop = StudyLoop(
        config,
        study,
        stages=stages,
        logger=LOG,
        tracker=FakeTracker(),  # type: ignore[arg-type]
        workload=Unregistered(config),
    )
    out = io.StringIO()

    with Progress(config, live=False, interval=0.03, out=out):
        loop.run()

    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no redraws, no colours
    lines = text.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, p in zip(lines, parsed, strict=True) if not p]
    said = [p.group(3) for p in parsed if p]
    for n in range(3):
        mine = [line for line in said if line.startswith((f"trial {n}:", f"trial {n} "))]
        assert mine[0] == f"trial {n} started: train epoch 1/3", mine
        assert f"trial {n}: train epoch 2/3" in mine and f"trial {n}: train epoch 3/3" in mine
        assert mine.index(f"trial {n}: compile") < mine.index(f"trial {n}: device")
        assert re.fullmatch(
            rf"trial {n}: COMPLETE, device AUGRC 0\.\d{{5}} after 0:0\d.* \({n + 1}/3 done\)",
            mine[-1],
        )
    # the ETA is known once a trial has finished, and the clock runs
    etas = [p.group(2) for p in parsed if p]
    assert etas[0] == "?" and etas[-1] == "0:00"
    assert said.index("trial 0 started: train epoch 1/3") < said.index(
        "trial 1 started: train epoch 1/3"
    )


def test_a_study_run_again_starts_with_where_it_stands(tmp_path: Path) -> None:
    config, study = _study(tmp_path)
    study.tell(_ask(study, "train"), 0.05)
    out = io.StringIO()
    with Progress(config, live=False, interval=60, out=out):
        pass
    (line,) = out.getvalue().splitlines()
    assert LINE.match(line)
    assert line.endswith(
        f"] {config.study.name}: 1/8 done · 0 running · 0 pruned · 0 failed · "
        "best device AUGRC 0.05000 (trial 0)"
    )


# A detector's epochs -----------------------------------------------------------------------


def fake_trainer(epoch: int, stop: bool = False) -> SimpleNamespace:
    """What Ultralytics' trainer carries at ``on_fit_epoch_end`` (0-based ``epoch``)."""
    return SimpleNamespace(
        epoch=epoch,
        epochs=10,
        stop=stop,
        metrics={"metrics/mAP50(B)": 0.51234, "metrics/mAP50-95(B)": 0.25, "val/box_loss": 1.5},
        tloss=(1.25, 2.5, 0.75),
        label_loss_items=lambda tloss, prefix: {
            f"{prefix}/{name}_loss": value
            for name, value in zip(("box", "cls", "dfl"), tloss, strict=True)
        },
        lr={"lr/pg0": 0.01},
    )


def test_each_detector_epoch_is_one_line_with_losses_map_and_eta() -> None:
    from tasks.detection.ultra import EPOCH_LOG, EpochEnd

    seen: list[tuple[int, dict[str, float]]] = []
    callback = EpochEnd(lambda epoch, row: seen.append((epoch, row)), "s-ml")
    out = io.StringIO()
    with epoch_lines(EPOCH_LOG.name, out):
        callback.started = time.monotonic() - 6.0
        callback(fake_trainer(2))
        callback(fake_trainer(9, stop=True))
        callback(fake_trainer(10))  # Ultralytics' final validation of the best weights
    first, last = out.getvalue().splitlines()
    assert first == (
        "s-ml: epoch 3/10 · loss box 1.2500 cls 2.5000 dfl 0.7500 · "
        "val mAP50 0.5123 mAP50-95 0.2500 · 0:06 elapsed, ETA 0:14"
    )
    assert last.startswith("s-ml: epoch 10/10 · ") and last.endswith(", ETA 0:00")
    assert [epoch for epoch, _ in seen] == [3, 10]
    assert seen[0][1]["metrics/mAP50-95"] == 0.25 and seen[0][1]["train/box_loss"] == 1.25
    # outside ``edgetune detect train`` the line goes nowhere (Ultralytics stays quiet too)
    assert not EPOCH_LOG.handlers and not EPOCH_LOG.isEnabledFor(logging.INFO)


# The study's progress in Prefect -------------------------------------------------------------


@pytest.mark.integration
def test_a_progress_artifact_follows_the_study_in_the_flow_run(
    prefect_server: None, tmp_path: Path
) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.runtime import flow_run

    from flows.tune import ProgressHooks

    config = fake_config(tmp_path, n_trials=4, parallel=1)
    config.run_path.mkdir(parents=True)
    key = f"{config.study.name.lower().replace('_', '-')}-progress"
    read: list[tuple[float, str]] = []

    def artifact() -> Any:
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
        return max(found, key=lambda a: a.created)

    class Watched(ProgressHooks):
        """Reads the artifact back through the API after each outcome."""

        def on_trial_outcome(self, run: Any, trial: Any) -> None:
            super().on_trial_outcome(run, trial)
            self.flush()  # the update goes out from a thread of its own
            shown = artifact()
            read.append((shown.data, shown.description))

    @flow(name="progress-artifact-test")
    def run_study() -> tuple[dict[str, Any], str]:
        study = open_study(config.storage_url, config.study, config.seed)
        loop = StudyLoop(
            config,
            study,
            stages=FakeStages(config),
            logger=LOG,
            tracker=FakeTracker(),  # type: ignore[arg-type]
            hooks=Watched(),
            workload=Unregistered(config),
        )
        return loop.run(), str(flow_run.id)

    result, run_id = run_study()

    assert [value for value, _ in read] == [25.0, 50.0, 75.0, 100.0]
    assert read[0][1].startswith(
        f"study {config.study.name}: 1/4 trials with an outcome (1 complete"
    )
    final = artifact()
    assert (final.type, final.data, str(final.flow_run_id)) == ("progress", 100.0, run_id)
    best = result["best"]
    assert final.description == (
        f"study {config.study.name}: 4/4 trials with an outcome (4 complete, 0 pruned, "
        f"0 failed); best device AUGRC {best['device_augrc']:.5f} (trial {best['trial']}); finished"
    )


def test_watching_a_study_never_creates_its_database(tmp_path: Path) -> None:
    """The progress thread polls while the study creates its storage: if both created the
    tables and Optuna's version row, one of them failed (UNIQUE constraint on
    alembic_version). The observer creates nothing and tries again at the next poll."""
    import sqlite3

    from edgetune.progress import observer_storage

    path = tmp_path / "optuna.db"
    url = f"sqlite:///{path}"
    with pytest.raises(FileNotFoundError):
        observer_storage(url)
    assert not path.exists()
    sqlite3.connect(path).close()  # the study has just opened its file
    with pytest.raises(optuna.exceptions.StorageInternalError):  # no tables yet
        optuna.load_study(study_name="s", storage=observer_storage(url))
    with sqlite3.connect(path) as db:
        assert db.execute("select name from sqlite_master").fetchall() == []
    optuna.create_study(study_name="s", storage=url)  # the study creates it
    assert optuna.load_study(study_name="s", storage=observer_storage(url)).study_name == "s"
