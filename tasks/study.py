"""Optuna plumbing: storage, sampler, search space, intermediate reports, result rows.

The parent flow owns ask/tell; stages on other hosts reach their trial through the
storage URL and the trial id (``Trial(study, trial_id)``), never through a shared object.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks.config import SearchParam, StudyConfig


@dataclass(frozen=True)
class Objective:
    """What a study optimises: the board's metric, its direction, and its float twin.

    ``epoch_metric`` is the float validation metric reported each epoch, on which the
    pruner decides before a trial reaches the compiler or the board.
    """

    metric: str
    direction: Literal["minimize", "maximize"]
    label: str
    float_metric: str
    epoch_metric: str
    #: Device metrics shown in the results table: (key, column title, format).
    columns: tuple[tuple[str, str, str], ...]
    #: Further device metrics kept on each trial as user attributes.
    kept: tuple[str, ...] = ()

    @property
    def trial_attrs(self) -> tuple[str, ...]:
        return (*(key for key, _, _ in self.columns), *self.kept)

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


CLASSIFIER = Objective(
    metric="device_augrc",
    direction="minimize",
    label="device AUGRC",
    float_metric="float_augrc",
    epoch_metric="val_augrc",
    columns=(("device_accuracy", "device acc", ".3f"), ("device_latency_ms", "latency ms", ".3f")),
    kept=("device_augrc_ci_low", "device_augrc_ci_high", "device_e_augrc"),
)
DETECTOR = Objective(
    metric="device_map50_95",
    direction="maximize",
    label="device mAP50-95",
    float_metric="float_map50_95",
    epoch_metric="metrics/mAP50-95",
    columns=(
        ("device_map50", "device mAP50", ".4f"),
        ("map50_95_gap", "gap to float", ".4f"),
        ("device_latency_ms", "latency ms", ".3f"),
    ),
    kept=("device_precision", "device_recall"),
)
OBJECTIVES = {o.metric: o for o in (CLASSIFIER, DETECTOR)}
#: Kept for callers that name the classifier's objective.
OBJECTIVE = CLASSIFIER.metric
#: Study user attribute naming the objective (set when the study is created).
ATTR_OBJECTIVE = "objective"

# Trial user-attribute keys written by the stages and read by reports.
ATTR_RUN_ID = "mlflow_run_id"
ATTR_FAIL_REASON = "fail_reason"
ATTR_FAIL_STAGE = "fail_stage"

_T = TypeVar("_T")


def _transient(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, optuna.exceptions.StorageInternalError):
        return True
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def db_retry(fn: Callable[..., _T], *args: Any, patience_s: float = 120.0, **kwargs: Any) -> _T:
    """Call ``fn``; while the study database is unreachable, retry with backoff.

    A restarted PostgreSQL drops every pooled connection: the first call after it fails
    (``pool_pre_ping`` then replaces the connection), and calls during the restart fail
    until the server accepts connections again. Gives up after ``patience_s``.
    """
    deadline = time.monotonic() + patience_s
    delay = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _transient(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


#: RDBStorage calls that wait out a database restart (see ``ResilientRDBStorage``).
_RETRIED = (
    *sorted(optuna.storages.BaseStorage.__abstractmethods__),
    "_get_trials",
    "get_n_trials",
    "get_best_trial",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
)


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose calls wait (bounded) while the database restarts.

    Opening it still fails at once on a wrong URL: only a database that was reachable and
    went away is waited for.
    """


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(optuna.storages.RDBStorage, name)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return db_retry(method, self, *args, **kwargs)

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call


for _name in _RETRIED:
    setattr(ResilientRDBStorage, _name, _retrying(_name))


class StudyError(RuntimeError):
    """The study storage cannot be used; the message names the URL (masked) and the fix."""


def grid_values(spec: SearchParam) -> list[Any]:
    """Every value a parameter can take (categorical, int, or float with a step)."""
    if spec.type == "categorical":
        return list(spec.choices or [])
    low, high = float(spec.low or 0), float(spec.high or 0)
    step = float(spec.step or 1)
    count = math.floor((high - low) / step + 1e-9) + 1
    values = [low + i * step for i in range(count)]
    if spec.type == "int":
        return [round(v) for v in values]
    return [round(v, 12) for v in values]


def grid_size(space: Mapping[str, SearchParam]) -> int:
    return math.prod(len(grid_values(spec)) for spec in space.values())


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()``, which only works in ``optimize``;
    the ask/tell loop stops asking when the grid is covered (``study_budget``)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(
    name: str, seed: int, space: Mapping[str, SearchParam] | None = None
) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded (the same seed asks the same first trials)."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        # CMA-ES models the numeric parameters jointly; categorical ones are drawn at random.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "grid":
        grid = {key: grid_values(spec) for key, spec in (space or {}).items()}
        return AskTellGridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The configured pruner; each decides on the float metric reported every epoch."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def study_budget(config: StudyConfig) -> int:
    """Trials to run: study.n_trials, or the grid's size when the grid is smaller."""
    if config.sampler == "grid":
        return min(config.n_trials, grid_size(config.search_space))
    return config.n_trials


def open_storage(url: str) -> optuna.storages.BaseStorage:
    from tasks.tracking import mask_uri

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return ResilientRDBStorage(
            url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {}
        )
    except Exception as exc:
        raise StudyError(
            f"cannot open Optuna storage {mask_uri(url)}: {str(exc).splitlines()[0]}; check "
            f"study.storage (or --storage) and that the database is running"
        ) from None


def open_study(
    url: str,
    config: StudyConfig,
    seed: int,
    *,
    create: bool = True,
    objective: Objective = CLASSIFIER,
) -> optuna.Study:
    storage = open_storage(url)
    sampler = make_sampler(config.sampler, seed, config.search_space)
    pruner = make_pruner(config.pruner)
    if not create:
        return optuna.load_study(
            study_name=config.name, storage=storage, sampler=sampler, pruner=pruner
        )
    study = optuna.create_study(
        storage=storage,
        study_name=config.name,
        direction=objective.direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    stored = study.user_attrs.get(ATTR_OBJECTIVE)
    if stored is None:
        study.set_user_attr(ATTR_OBJECTIVE, objective.metric)
    elif stored != objective.metric:
        raise StudyError(
            f"study {config.name!r} in {_masked(url)} optimises {stored}, not "
            f"{objective.metric}; choose another study.name"
        )
    return study


def _masked(url: str) -> str:
    from tasks.tracking import mask_uri

    return mask_uri(url)


def objective_of(study: optuna.Study) -> Objective:
    """The objective a stored study was created with (studies before this attribute: AUGRC)."""
    return OBJECTIVES.get(str(study.user_attrs.get(ATTR_OBJECTIVE)), CLASSIFIER)


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
    storage_url: str, config: StudyConfig, trial_id: int, objective: Objective = CLASSIFIER
) -> Callable[[int, dict[str, float]], None]:
    """Report the float validation metric to the trial each epoch; raise TrialPruned if told.

    The pruning signal is the objective's own metric (AUGRC, or mAP50-95 for a detector),
    measured on the float model, and the decision is the configured pruner's
    (``load_study`` alone would use Optuna's default median pruner).
    """
    study = optuna.load_study(
        study_name=config.name, storage=open_storage(storage_url), pruner=make_pruner(config.pruner)
    )
    trial = optuna.Trial(study, trial_id)

    name = objective.label.replace("device ", "float ")

    def report(epoch: int, row: dict[str, float]) -> None:
        value = row.get(objective.epoch_metric)
        if value is None or not math.isfinite(value):
            return
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with {name} {value:.4f}")

    return report


def trial_row(trial: FrozenTrial, objective: Objective = CLASSIFIER) -> dict[str, Any]:
    """One line of the results table; the metric keys are the objective's own names."""
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "trial": trial.number,
        "state": trial.state.name,
        "params": dict(trial.params),
        objective.float_metric: attrs.get(objective.float_metric),
        objective.metric: trial.value if trial.state == TrialState.COMPLETE else None,
    }
    for key, _, _ in objective.columns:
        row[key] = attrs.get(key)
    row["latency_ms"] = row.pop("device_latency_ms", None)
    row.update(mlflow_run_id=attrs.get(ATTR_RUN_ID), reason=attrs.get(ATTR_FAIL_REASON))
    return row


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial in the study's direction; a tie goes to the earlier trial."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return min(done, key=lambda t: (sign * float(t.value or 0.0), t.number))


def summary(study: optuna.Study) -> dict[str, Any]:
    objective = objective_of(study)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: 0 for state in TrialState}
    for trial in trials:
        counts[trial.state.name] += 1
    best = best_trial(study)
    return {
        "study": study.study_name,
        "objective": objective.metric,
        "objective_label": objective.label,
        "float_objective": objective.float_metric,
        "direction": objective.direction,
        "counts": counts,
        "best": trial_row(best, objective) if best else None,
        "champion": study.user_attrs.get("champion"),
        "trials": [trial_row(t, objective) for t in trials],
    }
