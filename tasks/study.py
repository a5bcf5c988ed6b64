"""Optuna plumbing: storage, sampler, search space, intermediate reports, result rows.

The parent flow owns ask/tell; stages on other hosts reach their trial through the
storage URL and the trial id (``Trial(study, trial_id)``), never through a shared object.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks.config import SearchParam, StudyConfig

OBJECTIVE = "device_augrc"

# Trial user-attribute keys written by the stages and read by reports.
ATTR_RUN_ID = "mlflow_run_id"
ATTR_FAIL_REASON = "fail_reason"
ATTR_FAIL_STAGE = "fail_stage"


class StudyError(RuntimeError):
    """The study storage cannot be used; the message names the URL (masked) and the fix."""


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def open_storage(url: str) -> optuna.storages.BaseStorage:
    from tasks.tracking import mask_uri

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {}
        )
    except Exception as exc:
        raise StudyError(
            f"cannot open Optuna storage {mask_uri(url)}: {str(exc).splitlines()[0]}; check "
            f"study.storage (or --storage) and that the database is running"
        ) from None


def open_study(url: str, config: StudyConfig, seed: int, *, create: bool = True) -> optuna.Study:
    storage = open_storage(url)
    sampler, pruner = make_sampler(config.sampler, seed), make_pruner(config.pruner)
    if create:
        return optuna.create_study(
            storage=storage,
            study_name=config.name,
            direction="minimize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    return optuna.load_study(
        study_name=config.name, storage=storage, sampler=sampler, pruner=pruner
    )


def suggest(trial: optuna.Trial, space: Mapping[str, SearchParam]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if spec.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec.choices or []))
        elif spec.type == "int":
            step = int(spec.step) if spec.step else 1
            params[name] = trial.suggest_int(
                name, int(spec.low or 0), int(spec.high or 0), step=step, log=spec.log
            )
        else:
            params[name] = trial.suggest_float(
                name, float(spec.low or 0), float(spec.high or 0), step=spec.step, log=spec.log
            )
    return params


def epoch_reporter(
    storage_url: str, config: StudyConfig, trial_id: int
) -> Callable[[int, dict[str, float]], None]:
    """Report the float validation AUGRC to the trial each epoch; raise TrialPruned if told.

    The pruning signal is the objective's own metric (AUGRC), measured on the float model,
    and the decision is the configured pruner's (``load_study`` alone would use Optuna's
    default median pruner).
    """
    study = optuna.load_study(
        study_name=config.name, storage=open_storage(storage_url), pruner=make_pruner(config.pruner)
    )
    trial = optuna.Trial(study, trial_id)

    def report(epoch: int, row: dict[str, float]) -> None:
        value = row.get("val_augrc")
        if value is None or not math.isfinite(value):
            return
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with float AUGRC {value:.4f}")

    return report


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "trial": trial.number,
        "state": trial.state.name,
        "params": dict(trial.params),
        "float_augrc": attrs.get("float_augrc"),
        "device_augrc": trial.value if trial.state == TrialState.COMPLETE else None,
        "device_accuracy": attrs.get("device_accuracy"),
        "latency_ms": attrs.get("device_latency_ms"),
        "mlflow_run_id": attrs.get(ATTR_RUN_ID),
        "reason": attrs.get(ATTR_FAIL_REASON),
    }


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return min(done, key=lambda t: (t.value, t.number)) if done else None


def summary(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: 0 for state in TrialState}
    for trial in trials:
        counts[trial.state.name] += 1
    best = best_trial(study)
    return {
        "study": study.study_name,
        "objective": OBJECTIVE,
        "direction": "minimize",
        "counts": counts,
        "best": trial_row(best) if best else None,
        "champion": study.user_attrs.get("champion"),
        "trials": [trial_row(t) for t in trials],
    }
