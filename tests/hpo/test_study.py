"""Optuna plumbing: samplers, pruners (the configured one decides, not Optuna's default)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from tasks.config import SearchParam, StudyConfig
from tasks.hpo.study import (
    epoch_reporter,
    grid_size,
    make_pruner,
    make_sampler,
    open_study,
    study_budget,
    suggest,
)


def _study_with_history(tmp_path: Path, pruner: str) -> tuple[str, StudyConfig, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = StudyConfig(name=f"s-{pruner}", n_trials=10, pruner=pruner)
    study = open_study(url, config, seed=0)
    for _ in range(5):  # five finished trials with good (low) AUGRC at every epoch
        trial = study.ask()
        for epoch in range(EPOCHS):
            trial.report(0.01, epoch)
            assert not trial.should_prune()  # successive halving records its rungs here
        study.tell(trial, 0.01)
    return url, config, study


EPOCHS = 9


@pytest.mark.parametrize(
    ("pruner", "pruned_at"),
    # Hyperband runs successive halving in brackets whose first rung is at 1, 3 or 9 epochs;
    # the trial's bracket is a hash of its number, so only "before the end" is its property.
    [("none", None), ("median", 1), ("asha", 1), ("hyperband", range(1, EPOCHS))],
)
def test_reporter_uses_the_configured_pruner(
    tmp_path: Path, pruner: str, pruned_at: int | range | None
) -> None:
    url, config, study = _study_with_history(tmp_path, pruner)
    trial = study.ask()
    report = epoch_reporter(url, config, trial._trial_id)
    expected = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "asha": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }[pruner]
    assert isinstance(make_pruner(pruner), expected)
    seen = None
    for epoch in range(EPOCHS):  # far worse than every finished trial
        try:
            report(epoch, {"val_augrc": 0.4})
        except optuna.TrialPruned as exc:
            assert str(exc) == f"pruned at epoch {epoch} with float AUGRC 0.4000"
            seen = epoch
            break
    if isinstance(pruned_at, range):
        assert seen in pruned_at
    else:
        assert seen == pruned_at
    reported = study.trials[-1].intermediate_values
    assert reported == {e: 0.4 for e in range(EPOCHS if seen is None else seen + 1)}


SPACE = {
    "lr": SearchParam(type="float", low=1e-3, high=1e-1, log=True),
    "swa_start": SearchParam(type="int", low=5, high=7),
    "momentum": SearchParam(type="float", low=0.8, high=0.9, step=0.05),
    "batch_size": SearchParam(type="categorical", choices=[32, 64]),
}


def _bowl(params: dict[str, Any]) -> float:
    """A cheap objective with its minimum inside the space."""
    return (
        (math.log10(params["lr"]) + 2) ** 2
        + (params["swa_start"] - 6) ** 2
        + (params["momentum"] - 0.85) ** 2
        + (params["batch_size"] == 32)
    )


def _asked(tmp_path: Path, sampler: str, name: str, n: int) -> list[dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = StudyConfig(name=name, sampler=sampler, search_space=SPACE)
    study = open_study(url, config, seed=7)
    asked = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, config.search_space)
        study.tell(trial, _bowl(params))
        asked.append(params)
    return asked


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "nsga2"])
def test_each_sampler_is_seeded_and_stays_inside_the_space(tmp_path: Path, sampler: str) -> None:
    expected = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
    }[sampler]
    assert isinstance(make_sampler(sampler, 0, SPACE), expected)
    first = _asked(tmp_path, sampler, "first", 12)
    again = _asked(tmp_path, sampler, "again", 12)
    assert first == again  # the same seed asks the same trials
    assert len({tuple(sorted(p.items())) for p in first}) > 6  # and it explores
    for params in first:
        assert 1e-3 <= params["lr"] <= 1e-1
        assert params["swa_start"] in (5, 6, 7)
        assert min(abs(params["momentum"] - m) for m in (0.8, 0.85, 0.9)) < 1e-9
        assert params["batch_size"] in (32, 64)


def test_the_grid_sampler_runs_every_point_once_then_stops(tmp_path: Path) -> None:
    config = StudyConfig(
        name="grid",
        sampler="grid",
        n_trials=100,
        search_space=SPACE
        | {
            "lr": SearchParam(type="categorical", choices=[0.1, 0.01, 0.001]),
        },
    )
    assert grid_size(config.search_space) == 3 * 3 * 3 * 2
    assert study_budget(config) == 54
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    study = open_study(url, config, seed=0)
    points = set()
    for _ in range(study_budget(config)):
        trial = study.ask()
        params = suggest(trial, config.search_space)
        study.tell(trial, _bowl(params))  # no study.stop() outside optimize()
        points.add(
            (params["lr"], params["swa_start"], round(params["momentum"], 6), params["batch_size"])
        )
    expected = {
        (lr, s, round(m, 6), b)
        for lr in (0.1, 0.01, 0.001)
        for s in (5, 6, 7)
        for m in (0.8, 0.85, 0.9)
        for b in (32, 64)
    }
    assert points == expected
    assert min(t.value for t in study.trials) == 0.0  # the optimum is on the grid


def test_the_grid_sampler_refuses_a_float_range_without_a_step() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"search_space\.lr: the grid sampler needs a finite"):
        StudyConfig(name="grid", sampler="grid", search_space=SPACE)


def test_a_detector_study_maximises_and_prunes_a_low_float_map(tmp_path: Path) -> None:
    """Direction matters: in a maximised study a low mAP is the bad one, pruned early."""
    from tasks.detection.config import DetectorStudyConfig
    from tasks.hpo.study import best_trial, summary
    from tasks.workloads.detector import DETECTOR

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = DetectorStudyConfig(name="s-ml-hpo", n_trials=10, pruner="median")
    study = open_study(url, config, seed=0, objective=DETECTOR)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for value in (0.5, 0.6, 0.55, 0.52, 0.58):
        trial = study.ask()
        for epoch in range(3):
            trial.report(value, epoch)
        study.tell(trial, value)
    assert best_trial(study).number == 1  # the highest mAP, not the lowest
    worse, better = study.ask(), study.ask()
    report_worse = epoch_reporter(url, config, worse._trial_id, DETECTOR)
    report_better = epoch_reporter(url, config, better._trial_id, DETECTOR)
    report_worse(0, {"metrics/mAP50-95": 0.1, "val_augrc": 0.9})
    with pytest.raises(optuna.TrialPruned, match=r"epoch 1 with float mAP50-95 0\.1000"):
        report_worse(1, {"metrics/mAP50-95": 0.1})
    report_better(0, {"metrics/mAP50-95": 0.7})
    report_better(1, {"metrics/mAP50-95": 0.7})  # better than the median: it goes on
    result = summary(study)
    assert (result["objective"], result["direction"]) == ("device_map50_95", "maximize")
    assert result["best"]["device_map50_95"] == 0.6
    assert {"float_map50_95", "device_map50", "map50_95_gap"} <= set(result["best"])


def test_a_stored_study_keeps_its_objective(tmp_path: Path) -> None:
    from tasks.storage import StudyError
    from tasks.workloads.detector import DETECTOR

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study(url, StudyConfig(name="shared"), seed=0)
    with pytest.raises(StudyError, match="optimises device_augrc, not device_map50_95"):
        open_study(url, StudyConfig(name="shared"), seed=0, objective=DETECTOR)
