"""The few Optuna internals edgetune needs, in one place.

Ask/tell across hosts needs two things Optuna keeps private: a trial's storage id (a stage
on another host reports epochs and heartbeats to the trial through it) and the study's
storage (to write a trial's attributes by id while the trial object lives elsewhere, and
to read a trial back fresh). Optuna 5 offers no public call for either, nor for seeding a
sampler's random state again; if a release renames them, only this module changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.samplers._lazy_random_state import LazyRandomState
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


def set_trial_attrs(study: optuna.Study, trial: int, attrs: Mapping[str, Any]) -> None:
    """Set several user attributes of the trial with storage id ``trial`` at once: in one
    transaction on edgetune's RDB storage (``ResilientRDBStorage.set_trial_user_attrs``),
    one by one on others. Raises ``UpdateFinishedTrialError`` once the trial has been told."""
    storage = storage_of(study)
    if isinstance(storage, optuna.storages._CachedStorage):
        storage = storage._backend  # the cache forwards attribute writes as they are
    write_all = getattr(storage, "set_trial_user_attrs", None)
    if write_all is not None:
        write_all(trial, attrs)
        return
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial, key, value)


def set_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """``trial.set_user_attr`` for several attributes, written at once (``set_trial_attrs``);
    the trial's own view (``trial.user_attrs``) shows them as after ``set_user_attr``."""
    set_trial_attrs(trial.study, trial_id(trial), attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)


def fresh_trial(study: optuna.Study, trial: int) -> FrozenTrial:
    """The trial with storage id ``trial`` as stored now."""
    return storage_of(study).get_trial(trial)


def reseed(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed, in place, every random state of ``sampler`` and of the samplers inside it (TPE's
    and NSGA-II's random sampler, the independent sampler of CMA-ES and GP) with ``seed``.

    Optuna seeds a sampler once, at construction, and offers only an unseeded
    ``reseed_rng``. The states are reseeded in place because other objects share them
    (NSGA-II's child generation holds the sampler's own).
    """
    if _reseed(sampler, seed) == 0:
        raise RuntimeError(
            f"{type(sampler).__name__} keeps no random state that can be seeded per trial "
            f"(Optuna {optuna.__version__} moved it); install the Optuna version pyproject.toml "
            f"pins, or find its random state in tasks/hpo/optuna_ops.py: reseed"
        )


def _reseed(sampler: optuna.samplers.BaseSampler, seed: int) -> int:
    count = 0
    for value in vars(sampler).values():
        if isinstance(value, LazyRandomState):
            value.rng.seed(seed)
            count += 1
        elif isinstance(value, optuna.samplers.BaseSampler):
            count += _reseed(value, seed)
    return count
