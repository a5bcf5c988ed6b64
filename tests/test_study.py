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
