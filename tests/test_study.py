"""Optuna plumbing: the configured pruner decides, not Optuna's default."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tasks.config import StudyConfig
from tasks.study import epoch_reporter, open_study


def _study_with_history(tmp_path: Path, pruner: str) -> tuple[str, StudyConfig, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = StudyConfig(name=f"s-{pruner}", n_trials=10, pruner=pruner)
    study = open_study(url, config, seed=0)
    for _ in range(5):  # five finished trials with good (low) AUGRC at every epoch
        trial = study.ask()
        for epoch in range(3):
            trial.report(0.01, epoch)
        study.tell(trial, 0.01)
    return url, config, study


@pytest.mark.parametrize(("pruner", "pruned"), [("none", False), ("median", True)])
def test_reporter_uses_the_configured_pruner(tmp_path: Path, pruner: str, pruned: bool) -> None:
    url, config, study = _study_with_history(tmp_path, pruner)
    trial = study.ask()
    report = epoch_reporter(url, config, trial._trial_id)
    report(0, {"val_augrc": 0.4})  # far worse than every finished trial
    if pruned:
        with pytest.raises(optuna.TrialPruned, match=r"pruned at epoch 1 with float AUGRC 0\.4000"):
            report(1, {"val_augrc": 0.4})
    else:
        report(1, {"val_augrc": 0.4})
    assert study.trials[-1].intermediate_values == ({0: 0.4, 1: 0.4})


def test_a_detector_study_maximises_and_prunes_a_low_float_map(tmp_path: Path) -> None:
    """Direction matters: in a maximised study a low mAP is the bad one, pruned early."""
    from tasks.detection.config import DetectorStudyConfig
    from tasks.study import DETECTOR, best_trial, summary

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
    from tasks.study import DETECTOR, StudyError

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study(url, StudyConfig(name="shared"), seed=0)
    with pytest.raises(StudyError, match="optimises device_augrc, not device_map50_95"):
        open_study(url, StudyConfig(name="shared"), seed=0, objective=DETECTOR)
