"""Optuna plumbing: samplers, pruners, the study and its goals, intermediate reports, results.

The parent flow owns ask/tell; stages on other hosts reach their trial through the
storage URL and the trial id (``Trial(study, trial_id)``), never through a shared object.
"""

from __future__ import annotations

import math
import statistics
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks.config import SearchParam, StudyConfig
from tasks.hpo import optuna_ops
from tasks.space import bounds, condition_holds, snap
from tasks.storage import StudyError, is_journal, open_storage, refuse_study_in_tables
from tasks.tracking import mask_uri
from tasks.workloads.base import Objective
from tasks.workloads.classifier import CLASSIFIER
from tasks.workloads.registry import OBJECTIVES

#: Study user attribute naming the objective (set when the study is created).
ATTR_OBJECTIVE = "objective"

# Trial user-attribute keys written by the stages and read by reports.
ATTR_RUN_ID = "mlflow_run_id"
ATTR_FAIL_REASON = "fail_reason"
ATTR_FAIL_STAGE = "fail_stage"
#: The values a trial trained with, where they differ from its sampled params (a range
#: with log and step is drawn on the log scale, then rounded to the step).
ATTR_APPLIED = "applied_params"
#: Set on a trial whose sample broke a constraint: it ran nothing and counts as no trial.
#: It is told PRUNED with how far it was from each constraint (Optuna's constraint values),
#: the state and values TPE reads; ``state_name`` shows it as REJECTED.
ATTR_REJECTED = "rejected"
#: Set on a trial whose parameters were drawn at random to meet the constraints, after the
#: sampler kept proposing samples that break them (``tasks.hpo.loop.StudyLoop._sample``).
ATTR_DRAWN = "drawn_at_random"
#: What looks wrong with a trial's measured model (``{"collapsed": why}``), by name.
ATTR_FLAGS = "flags"
#: Set on a trial answered from an earlier one with the same parameters (``repeats``).
ATTR_REPEAT_OF = "repeat_of"
#: Study user attribute: the objectives, limits and champion rule (``Goals.record``).
ATTR_GOALS = "goals"
#: Trial user attributes: whether a complete trial met the limits, and which it broke.
ATTR_FEASIBLE = "feasible"
ATTR_INFEASIBLE = "infeasible_reason"


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


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s randomness in a study seeded with ``seed``."""
    return int(np.random.SeedSequence([seed % 2**32, number]).generate_state(1)[0])


class TrialSeeded(optuna.samplers.BaseSampler):
    """A sampler that continues a study's search in every process instead of repeating it.

    Each process of a study (a resume after a crash, a larger ``n_trials``, a second worker)
    builds its sampler from the same seed, so with one random stream per process the second
    would draw the first one's trials again. The storage numbers trials once across all
    processes: a trial whose number this process's own asks did not lead to (trial 0 first,
    then the one after its last) was the next of another process, and its randomness starts
    again from ``trial_seed(study_seed, number)``. One process on a fresh study thus asks
    exactly what the seed asked before (its trials are numbered 0, 1, 2…), and no two
    processes draw from one seed.

    Trials are asked one at a time, from one thread (``tasks.hpo.loop``). The subclasses
    below carry Optuna's names: reports show the algorithm.
    """

    #: The study's seed; None: one random stream per process, as Optuna's own samplers.
    study_seed: int | None = None
    #: The trial this process's stream leads to next.
    _next_trial = 0

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.study_seed is not None and trial.number != self._next_trial:
            optuna_ops.reseed(self, trial_seed(self.study_seed, trial.number))
        self._next_trial = trial.number + 1
        super().before_trial(study, trial)


class RandomSampler(TrialSeeded, optuna.samplers.RandomSampler):
    """Optuna's random sampler, continued across the study's processes."""


class TPESampler(TrialSeeded, optuna.samplers.TPESampler):
    """Optuna's TPE sampler, continued across the study's processes."""


class CmaEsSampler(TrialSeeded, optuna.samplers.CmaEsSampler):
    """Optuna's CMA-ES sampler, continued across the study's processes."""


class GPSampler(TrialSeeded, optuna.samplers.GPSampler):
    """Optuna's GP sampler, continued across the study's processes."""


class NSGAIISampler(TrialSeeded, optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, continued across the study's processes."""


class AskTellGridSampler(TrialSeeded, optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()``, which only works in ``optimize``;
    the ask/tell loop stops asking when the grid is covered (``study_budget``)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(
    name: str, seed: int, space: Mapping[str, SearchParam] | None = None
) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded (the same seed asks the same first trials), whose
    randomness continues across the study's processes (``TrialSeeded``).

    tpe, gp and nsga2 also read each complete trial's constraint values (``Goals.constrain``)
    and steer away from trials that broke the study's limits; tpe alone also learns from
    the samples the study's constraints rejected (``learns_from_rejections``).
    """
    sampler = _configured(name, seed, space)
    sampler.study_seed = seed
    return sampler


def _configured(name: str, seed: int, space: Mapping[str, SearchParam] | None) -> TrialSeeded:
    if name == "random":
        return RandomSampler(seed=seed)
    if name == "cmaes":
        # CMA-ES models the numeric parameters jointly; categorical ones are drawn at random.
        return CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return GPSampler(seed=seed)
    if name == "nsga2":
        return NSGAIISampler(seed=seed)
    if name == "grid":
        grid = {key: grid_values(spec) for key, spec in (space or {}).items()}
        return AskTellGridSampler(grid, seed=seed)
    return TPESampler(seed=seed)


def learns_from_rejections(sampler: optuna.samplers.BaseSampler) -> bool:
    """Whether the sampler learns from a rejected sample, told PRUNED with its constraint
    values: TPE splits COMPLETE and PRUNED trials and ranks every trial with a positive
    constraint value with the worst (``optuna/samplers/_tpe/sampler.py: _split_trials``).
    GP and NSGA-II read complete trials only, and a rejected sample has no value to tell;
    CMA-ES warns that it ignores constraint values; random and grid read nothing.
    """
    return isinstance(sampler, optuna.samplers.TPESampler)


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


def full_training_s(trials: list[FrozenTrial]) -> float | None:
    """The median training time of the trials that trained to the end (None: none yet)."""
    return _median(
        [
            s
            for t in trials
            if t.state == TrialState.COMPLETE and (s := stage_span(t, "train")) is not None
        ]
    )


def trials_since_best(trials: list[FrozenTrial], maximize: bool) -> tuple[int, int | None]:
    """Finished trials (complete or pruned) since the best one finished, and its number;
    samples the constraints rejected ran nothing and are not counted."""
    finished = sorted(
        (
            t
            for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not rejected(t)
        ),
        key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number),
    )
    sign = -1.0 if maximize else 1.0
    best: FrozenTrial | None = None
    since = 0
    for trial in finished:
        if trial.state == TrialState.COMPLETE and (
            best is None or sign * primary_value(trial) < sign * primary_value(best)
        ):
            best, since = trial, 0
        elif best is not None:
            since += 1
    return since, None if best is None else best.number


def budget_stop(
    config: StudyConfig,
    trials: list[FrozenTrial],
    started: float,
    now: float,
    maximize: bool = False,
) -> str | None:
    """Why the study asks no more trials (None: it goes on); trials in flight still finish.

    ``time_budget`` and ``hpo_time_ratio`` count from ``started`` (this run of the study);
    ``hpo_time_ratio`` R allows R times one full training (the median training time of
    the trials that trained to the end, known once the first one has); ``patience`` K
    stops after K finished trials without a new best.
    """
    elapsed = now - started
    budget = config.time_budget_s
    if budget is not None and elapsed >= budget:
        return f"time budget {config.time_budget} reached after {elapsed:.0f} s"
    if config.hpo_time_ratio is not None:
        full = full_training_s(trials)
        if full is not None and elapsed >= config.hpo_time_ratio * full:
            return (
                f"HPO time ratio {config.hpo_time_ratio:g} reached: {elapsed:.0f} s is "
                f"{elapsed / full:.1f} x one full training ({full:.1f} s)"
            )
    if config.patience is not None:
        since, best = trials_since_best(trials, maximize)
        if best is not None and since >= config.patience:
            return f"no improvement in the {since} trials finished since the best (trial {best})"
    return None


def open_study(
    url: str,
    config: StudyConfig,
    seed: int,
    *,
    create: bool = True,
    objective: Objective = CLASSIFIER,
    storage: optuna.storages.BaseStorage | None = None,
) -> optuna.Study:
    """The study ``config.name`` in the storage at ``url`` (or in ``storage``, an opened
    one), created unless ``create`` is false; refused if it optimises something else."""
    storage = storage if storage is not None else open_storage(url)
    if is_journal(url):
        refuse_study_in_tables(url, storage, config.name)
    goals = goals_for(config, objective)
    sampler = make_sampler(config.sampler, seed, config.search_space)
    pruner = make_pruner(config.pruner)
    if not create:
        return optuna.load_study(
            study_name=config.name, storage=storage, sampler=sampler, pruner=pruner
        )
    study = optuna.create_study(
        storage=storage,
        study_name=config.name,
        directions=[optuna.study.StudyDirection[d.upper()] for d in goals.directions],
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    stored = study.user_attrs.get(ATTR_OBJECTIVE)
    if stored is None:
        study.set_user_attr(ATTR_OBJECTIVE, objective.metric)
    elif stored != objective.metric:
        raise StudyError(
            f"study {config.name!r} in {mask_uri(url)} optimises {stored}, not "
            f"{objective.metric}; choose another study.name"
        )
    known = ATTR_GOALS in study.user_attrs or study.get_trials(deepcopy=False)
    had = study_goals(study).metrics if known else goals.metrics
    if had != goals.metrics:
        raise StudyError(
            f"study {config.name!r} in {mask_uri(url)} has the objectives {list(had)}, not "
            f"{list(goals.metrics)}; keep study.objectives or choose another study.name"
        )
    study.set_user_attr(ATTR_GOALS, goals.record())  # limits and rule may change on resume
    with warnings.catch_warnings():  # experimental in Optuna 5, read by the dashboard
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(goals.metrics))
    return study


def objective_of(study: optuna.Study) -> Objective:
    """The objective a stored study was created with (studies before this attribute: AUGRC)."""
    return OBJECTIVES.get(str(study.user_attrs.get(ATTR_OBJECTIVE)), CLASSIFIER)


def suggest(
    trial: optuna.Trial, space: Mapping[str, SearchParam], base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Draw the trial's parameters in space order; returns the values to train with.

    A range end written as an expression is computed from the values drawn before it (or
    from ``base``, the training settings); a parameter whose ``when`` does not hold is not
    drawn (its training setting applies). Raises ``tasks.space.EmptyRange`` when a range
    leaves nothing to draw for this trial.
    """
    values: dict[str, Any] = dict(base or {})
    params: dict[str, Any] = {}
    snapped = False
    for name, spec in space.items():
        if not condition_holds(spec, values):
            continue
        value: Any
        if spec.type == "categorical":
            value = trial.suggest_categorical(name, list(spec.choices or []))
        else:
            low, high = bounds(name, spec, values)
            quantized_log = spec.log and spec.step is not None
            if spec.type == "int":
                step = 1 if quantized_log or not spec.step else int(spec.step)
                value = trial.suggest_int(name, int(low), int(high), step=step, log=spec.log)
            else:
                step_arg = None if quantized_log else spec.step
                value = trial.suggest_float(name, low, high, step=step_arg, log=spec.log)
            if quantized_log:
                rounded = snap(float(value), low, high, float(spec.step or 1))
                value = int(rounded) if spec.type == "int" else rounded
                snapped = True
        params[name] = value
        values[name] = value
    if snapped:
        trial.set_user_attr(ATTR_APPLIED, params)
    return params


def epoch_reporter(
    storage_url: str,
    config: StudyConfig,
    trial_id: int,
    objective: Objective = CLASSIFIER,
    warmup: int = 0,
) -> Callable[[int, dict[str, float]], None]:
    """Report the float validation metric to the trial each epoch; raise TrialPruned if told.

    The pruning signal is the objective's own metric (AUGRC, or mAP50-95 for a detector),
    measured on the float model, and the decision is the configured pruner's
    (``load_study`` alone would use Optuna's default median pruner). Epochs before
    ``warmup`` are reported but never judged: an FMFP trial is not judged before its SWA
    starts, when its validation AUGRC does not predict the final one.

    The study is loaded in a thread of its own, beside the trial's set-up and first epoch
    (opening a journal replays the whole study); the first report waits for it and raises
    what loading raised.
    """
    loaded: Future[optuna.Trial | None] = Future()  # None: a study Optuna does not prune

    def load() -> None:
        try:
            storage = open_storage(storage_url)
            pruner = make_pruner(config.pruner)
            study = optuna.load_study(study_name=config.name, storage=storage, pruner=pruner)
            several = len(study.directions) > 1  # Optuna prunes single-objective studies only
            loaded.set_result(None if several else optuna.Trial(study, trial_id))
        except BaseException as exc:
            loaded.set_exception(exc)

    threading.Thread(target=load, name="study-load", daemon=True).start()
    name = objective.label.replace("device ", "float ")

    def report(epoch: int, row: dict[str, float]) -> None:
        value = row.get(objective.epoch_metric)
        trial = loaded.result()
        if trial is None or value is None or not math.isfinite(value):
            return
        trial.report(value, epoch)
        if epoch >= warmup and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with {name} {value:.4f}")

    return report


def trial_row(trial: FrozenTrial, objective: Objective = CLASSIFIER) -> dict[str, Any]:
    """One line of the results table; the metric keys are the objective's own names."""
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "trial": trial.number,
        "state": state_name(trial),
        "params": dict(attrs.get(ATTR_APPLIED) or trial.params),
        objective.float_metric: attrs.get(objective.float_metric),
        objective.metric: primary_value(trial) if trial.state == TrialState.COMPLETE else None,
    }
    row["compiled_size_mb"] = attrs.get("compiled_size_mb")
    if attrs.get(ATTR_FEASIBLE) is False:
        row["infeasible"] = attrs.get(ATTR_INFEASIBLE)
    if attrs.get(ATTR_FLAGS):
        row["flags"] = dict(attrs[ATTR_FLAGS])
    if attrs.get(ATTR_REPEAT_OF) is not None:
        row["repeat_of"] = attrs[ATTR_REPEAT_OF]
    for key, _, _ in objective.columns:
        row[key] = attrs.get(key)
    row["latency_ms"] = row.pop("device_latency_ms", None)
    row.update(
        epochs_run=attrs.get("epochs_run"),
        epochs_planned=attrs.get("epochs_planned"),
        mlflow_run_id=attrs.get(ATTR_RUN_ID),
        reason=attrs.get(ATTR_FAIL_REASON),
    )
    return row


def rejected(trial: FrozenTrial) -> bool:
    """Whether the trial is a sample the study's constraints rejected (it ran nothing)."""
    return bool(trial.user_attrs.get(ATTR_REJECTED))


def state_name(trial: FrozenTrial) -> str:
    """The trial's state; a sample rejected by the constraints is REJECTED, not PRUNED (the
    state it is told, for the sampler) nor FAIL (the state studies before it were told)."""
    if rejected(trial):
        return "REJECTED"
    return trial.state.name


@dataclass(frozen=True)
class Goals:
    """What a study optimises as a whole: its objectives, the limits that make a trial
    infeasible, and the rule that picks the champion from the feasible Pareto front."""

    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    champion: str = "primary"
    weights: tuple[tuple[str, float], ...] = ()

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    @property
    def limited(self) -> bool:
        return self.max_latency_ms is not None or self.max_size_mb is not None

    def record(self) -> dict[str, Any]:
        return {
            "metrics": list(self.metrics),
            "directions": list(self.directions),
            "max_latency_ms": self.max_latency_ms,
            "max_size_mb": self.max_size_mb,
            "champion": self.champion,
            "weights": dict(self.weights),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Goals:
        return cls(
            metrics=tuple(record["metrics"]),
            directions=tuple(record["directions"]),
            max_latency_ms=record.get("max_latency_ms"),
            max_size_mb=record.get("max_size_mb"),
            champion=str(record.get("champion", "primary")),
            weights=tuple(sorted((record.get("weights") or {}).items())),
        )

    def violations(self, metrics: Mapping[str, Any]) -> list[str]:
        """The limits these device metrics break (empty: the trial is feasible)."""
        broken = []
        for key, limit, unit in (
            ("device_latency_ms", self.max_latency_ms, "ms"),
            ("compiled_size_mb", self.max_size_mb, "MB"),
        ):
            value = metrics.get(key)
            if limit is not None and (value is None or float(value) > limit):
                shown = "unknown" if value is None else f"{float(value):.4g} {unit}"
                broken.append(f"{key} {shown} > {limit:g} {unit}")
        return broken

    def constrain(
        self,
        trial: optuna.Trial,
        metrics: Mapping[str, Any],
        attrs: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Record on the trial how far it is inside each limit (Optuna's constraint values,
        <= 0: met; the samplers read them) and whether it is feasible; returns the limits
        it broke. Call before the trial is told. ``attrs``, other user attributes of the
        trial, are written with its feasibility in one transaction."""
        broken = self.violations(metrics)
        written = dict(attrs or {})
        if self.limited:
            for key, limit in (
                ("device_latency_ms", self.max_latency_ms),
                ("compiled_size_mb", self.max_size_mb),
            ):
                if limit is not None:
                    value = metrics.get(key)
                    trial.set_constraint(key, 1.0 if value is None else float(value) - limit)
            written[ATTR_FEASIBLE] = not broken
            if broken:
                written[ATTR_INFEASIBLE] = "; ".join(broken)
        optuna_ops.set_attrs(trial, written)
        return broken


def goals_for(config: StudyConfig, objective: Objective = CLASSIFIER) -> Goals:
    """The study's goals; the first is the objective's metric under the name it is measured
    by (``test_device_augrc`` for a final model measured on test)."""
    first, *others = config.objective_names
    names = (objective.metric, *others)
    weights = {
        (objective.metric if k == first else k): w for k, w in config.champion_weights.items()
    }
    return Goals(
        metrics=names,
        directions=(objective.direction, *("minimize" for _ in others)),
        max_latency_ms=config.max_latency_ms,
        max_size_mb=config.max_size_mb,
        champion=config.champion,
        weights=tuple(sorted(weights.items())),
    )


def study_goals(study: optuna.Study) -> Goals:
    """The goals a stored study was created with (before they were stored: its objective)."""
    record = study.user_attrs.get(ATTR_GOALS)
    if isinstance(record, dict):
        return Goals.from_record(record)
    objective = objective_of(study)
    return Goals(metrics=(objective.metric,), directions=(objective.direction,))


def primary_value(trial: FrozenTrial) -> float:
    return float((trial.values or [0.0])[0])


def feasible(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get(ATTR_FEASIBLE, True))


def _dominates(a: list[float], b: list[float]) -> bool:
    """``a`` is no worse than ``b`` everywhere and better somewhere (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def non_dominated(trials: list[FrozenTrial], directions: tuple[str, ...]) -> list[FrozenTrial]:
    """The trials no other of them dominates, in trial order."""
    signs = [-1.0 if d == "maximize" else 1.0 for d in directions]
    keys = [[s * float(v) for s, v in zip(signs, t.values, strict=True)] for t in trials]
    return [
        trial
        for i, trial in enumerate(trials)
        if not any(_dominates(keys[j], keys[i]) for j in range(len(trials)) if j != i)
    ]


def feasible_front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of the complete trials that meet the study's limits."""
    goals = study_goals(study)
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if feasible(t) and t.values is not None and len(t.values) == len(goals.metrics)
    ]
    return non_dominated(done, goals.directions)


def choose_champion(
    front: list[FrozenTrial], goals: Goals, order: list[int] | None = None
) -> FrozenTrial | None:
    """The champion among the feasible front, by ``goals.champion``; ties: the earlier trial
    (or the lower ``order``, for trials of several studies).

    primary: the best value of the study's metric; utopia: the nearest to the ideal point
    (each objective scaled to [0, 1] over the front, 0 its best); weighted: the lowest
    weighted sum of those scaled objectives.
    """
    if not front:
        return None
    signs = [-1.0 if d == "maximize" else 1.0 for d in goals.directions]
    keys = [[s * float(v) for s, v in zip(signs, t.values, strict=True)] for t in front]
    if goals.champion == "primary" or len(front) == 1:
        scores = [k[0] for k in keys]
    else:
        lows = [min(k[i] for k in keys) for i in range(len(signs))]
        spans = [max(k[i] for k in keys) - lows[i] or 1.0 for i in range(len(signs))]
        scaled = [[(k[i] - lows[i]) / spans[i] for i in range(len(signs))] for k in keys]
        if goals.champion == "utopia":
            scores = [math.sqrt(sum(x * x for x in row)) for row in scaled]
        else:
            weights = dict(goals.weights)
            scores = [
                sum(weights.get(m, 0.0) * x for m, x in zip(goals.metrics, row, strict=True))
                for row in scaled
            ]
    ranks = order if order is not None else [t.number for t in front]
    index = min(range(len(front)), key=lambda i: (scores[i], ranks[i]))
    return front[index]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's champion: among the complete trials that meet its limits, the one its
    rule picks from the Pareto front (one objective: the best value; a tie goes to the
    earlier trial). None when no complete trial is feasible."""
    return choose_champion(feasible_front(study), study_goals(study))


def stage_span(trial: FrozenTrial, stage: str) -> float | None:
    """Seconds between ``<stage>_started`` and ``<stage>_finished`` (None: not both known)."""
    attrs = trial.user_attrs
    start, end = attrs.get(f"{stage}_started"), attrs.get(f"{stage}_finished")
    return None if start is None or end is None else float(end) - float(start)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def pruning_savings(trials: list[FrozenTrial]) -> dict[str, Any] | None:
    """The training, compile and board time that pruned trials did not spend (estimates).

    Training: each pruned trial's own seconds per epoch times the epochs it did not run.
    Compile and board: one median compilation and one median board evaluation of the
    complete trials per pruned trial (None until a trial has completed).
    """
    pruned = [
        t
        for t in trials
        if t.state == TrialState.PRUNED
        and not rejected(t)
        and t.user_attrs.get("epochs_run")
        and "epochs_planned" in t.user_attrs
        and stage_span(t, "train") is not None
    ]
    if not pruned:
        return None
    epochs_saved = 0
    train_s = 0.0
    for trial in pruned:
        run, planned = int(trial.user_attrs["epochs_run"]), int(trial.user_attrs["epochs_planned"])
        epochs_saved += max(planned - run, 0)
        train_s += max(planned - run, 0) * float(stage_span(trial, "train") or 0.0) / run
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    compile_s = _median([s for t in done if (s := stage_span(t, "compile")) is not None])
    board_s = _median([s for t in done if (s := stage_span(t, "device")) is not None])
    return {
        "trials": len(pruned),
        "epochs": epochs_saved,
        "train_s": train_s,
        "compile_s": None if compile_s is None else compile_s * len(pruned),
        "board_s": None if board_s is None else board_s * len(pruned),
    }


def summary(study: optuna.Study) -> dict[str, Any]:
    objective = objective_of(study)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: 0 for state in TrialState} | {"REJECTED": 0}
    for trial in trials:
        counts[state_name(trial)] += 1
    goals = study_goals(study)
    front = feasible_front(study)
    best = choose_champion(front, goals)
    return {
        "study": study.study_name,
        "objective": objective.metric,
        "objective_label": objective.label,
        "float_objective": objective.float_metric,
        "direction": objective.direction,
        "goals": goals.record(),
        "pareto_front": [t.number for t in front] if goals.multi else None,
        "infeasible": sum(1 for t in trials if t.user_attrs.get(ATTR_FEASIBLE) is False),
        "counts": counts,
        "best": trial_row(best, objective) if best else None,
        "champion": study.user_attrs.get("champion"),
        "pruning_saved": pruning_savings(trials),
        "trials": [trial_row(t, objective) for t in trials],
    }
