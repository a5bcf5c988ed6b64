"""The few Optuna internals edgetune needs, in one place.

Ask/tell across hosts needs two things Optuna keeps private: a trial's storage id (a stage
on another host reports epochs and heartbeats to the trial through it) and the study's
storage (to write a trial's attributes by id while the trial object lives elsewhere, and
to read a trial back fresh). Optuna 5 offers no public call for either; if a release
renames them, only this module changes.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (not its number, which counts within the study)."""
    return int(trial._trial_id)


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def set_trial_attr(study: optuna.Study, trial: int, key: str, value: Any) -> None:
    """Set a user attribute of the trial with storage id ``trial`` (raises
    ``UpdateFinishedTrialError`` once the trial has been told)."""
    storage_of(study).set_trial_user_attr(trial, key, value)


def fresh_trial(study: optuna.Study, trial: int) -> FrozenTrial:
    """The trial with storage id ``trial`` as stored now."""
    return storage_of(study).get_trial(trial)
