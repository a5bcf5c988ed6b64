"""A stage's use of the study storage on the work pools: the heartbeat and the training's
pruning reporter open it beside the stage's work (a journal replays the whole study on
opening), not before it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.study import StudyDirection

import tasks.hpo.study as study_module
from tasks.config import parse_config
from tasks.hpo import trial_stages
from tasks.hpo.launch import ATTR_STAGE_BEAT
from tasks.hpo.study import epoch_reporter
from tasks.storage import StudyError

from conftest import tiny_config


def _trial(name: str = "beats") -> tuple[optuna.storages.BaseStorage, int]:
    storage = optuna.storages.InMemoryStorage()
    study = storage.create_new_study([StudyDirection.MINIMIZE], name)
    return storage, storage.create_new_trial(study)


def _wait_for_beat(storage: optuna.storages.BaseStorage, trial_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        beat = storage.get_trial(trial_id).user_attrs.get(ATTR_STAGE_BEAT)
        if beat is not None:
            return dict(beat)
        time.sleep(0.02)
    raise AssertionError("no beat within 10 s")


def _opens_after(
    event: threading.Event, storage: optuna.storages.BaseStorage
) -> Callable[[str], optuna.storages.BaseStorage]:
    """An opener (``open_for_beats``, ``open_storage``) that opens once ``event`` is set
    (by the stage's work), and fails if it waited 10 s for it (it was called before the
    work began)."""

    def opens(url: str) -> optuna.storages.BaseStorage:
        if not event.wait(10):
            raise RuntimeError("the storage was opened before the stage's work began")
        return storage

    return opens


def test_the_stage_works_while_the_beat_opens_the_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The defect: the storage was opened before the stage's work (0.23-0.34 s an
    evaluation on the edge pool, more as the journal grows), while the board waited."""
    storage, trial_id = _trial()
    working = threading.Event()
    monkeypatch.setattr(trial_stages, "open_for_beats", _opens_after(working, storage))
    with trial_stages.stage_heartbeat("journal+postgresql://db/x", trial_id, 0.05) as gone:
        started = time.time()
        working.set()
        beat = _wait_for_beat(storage, trial_id)
    assert beat["at"] >= started and not gone.is_set()


def test_a_storage_that_never_opens_fails_the_stage_after_its_work_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, trial_id = _trial()
    attempts: list[float] = []
    reason = "cannot open Optuna storage postgresql://db/x: refused; check study.storage"

    def refuses(url: str) -> optuna.storages.BaseStorage:
        attempts.append(time.monotonic())
        raise StudyError(reason)

    monkeypatch.setattr(trial_stages, "open_for_beats", refuses)
    worked = False
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(StudyError, match="cannot open Optuna storage postgresql://db/x"),
        trial_stages.stage_heartbeat("postgresql://db/x", trial_id, 0.05),
    ):
        deadline = time.monotonic() + 10
        while len(attempts) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        worked = True
    assert worked and len(attempts) >= 3  # tried again each beat
    warnings = [r.getMessage() for r in caplog.records if "cannot open Optuna" in r.getMessage()]
    assert warnings == [f"{reason} (the stage goes on; it beats once it opens)"]  # once


def test_a_storage_that_opens_late_beats_and_fails_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage, trial_id = _trial()
    refusals = [StudyError("cannot open Optuna storage: restarting")] * 2

    def opens_on_the_third_try(url: str) -> optuna.storages.BaseStorage:
        if refusals:
            raise refusals.pop()
        return storage

    monkeypatch.setattr(trial_stages, "open_for_beats", opens_on_the_third_try)
    with trial_stages.stage_heartbeat("postgresql://db/x", trial_id, 0.05):
        beat = _wait_for_beat(storage, trial_id)
    assert beat["flow_run"] == "" and refusals == []


def test_a_trial_finished_elsewhere_tells_the_stage_to_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage, trial_id = _trial()
    storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    monkeypatch.setattr(trial_stages, "open_for_beats", lambda url: storage)
    with trial_stages.stage_heartbeat("postgresql://db/x", trial_id, 0.05) as gone:
        assert gone.wait(10)


def test_the_pruning_reporter_loads_the_study_beside_the_trials_set_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The defect: a training opened the storage and loaded the study (Optuna's trial
    reads the study's trials for its sampler) before its first batch, while its GPU
    waited."""
    config = parse_config(tiny_config(tmp_path, tmp_path / "run")).study
    storage, trial_id = _trial(config.name)
    released = threading.Event()
    monkeypatch.setattr(study_module, "open_storage", _opens_after(released, storage))
    report = epoch_reporter("postgresql://db/x", config, trial_id)
    released.set()  # the training goes on: its first epoch ends
    report(0, {"val_augrc": 0.25})
    report(1, {"val_augrc": float("nan")})  # not reported
    assert storage.get_trial(trial_id).intermediate_values == {0: 0.25}


def test_a_study_that_does_not_load_fails_the_first_report_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = parse_config(tiny_config(tmp_path, tmp_path / "run")).study

    def refuses(url: str) -> optuna.storages.BaseStorage:
        raise StudyError("cannot open Optuna storage postgresql://db/x: refused")

    monkeypatch.setattr(study_module, "open_storage", refuses)
    report = epoch_reporter("postgresql://db/x", config, 0)
    with pytest.raises(StudyError, match="cannot open Optuna storage postgresql://db/x"):
        report(0, {"val_augrc": 0.25})
