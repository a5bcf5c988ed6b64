"""Exports and views of a study: ``hpo/`` records, end-of-study plots, optuna-dashboard.

- ``hpo/status.json``: the algorithm (sampler, pruner), the search space, the objective and
  its direction, the budget, counts per state, the best trial and one summary per trial.
  Refreshed after every trial outcome and at the end of the study.
- ``hpo/trial_<n>.json``: the full record of trial ``n`` (parameters, distributions, values,
  intermediate values, attributes, stage times), written when the trial gets its outcome.
- ``plots/*.png``: optimization history, parameter importances, the Pareto front of a
  multi-objective study and the risk–coverage curves of the best classifier trials, drawn
  at the end of the study; each with an interactive ``.html`` twin
  (``tasks.hpo.interactive``).

Everything is written under the study's run directory (atomically: a temporary file, then
``os.replace``) and logged to the study's MLflow parent run under the same folder names.
A report that cannot be made is logged as a warning: it never fails the study.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tasks.config import EdgetuneConfig
from tasks.data import load_bundle
from tasks.hpo.interactive import write_html
from tasks.hpo.recovery import outcome_count
from tasks.hpo.study import (
    ATTR_APPLIED,
    ATTR_FAIL_REASON,
    ATTR_FAIL_STAGE,
    ATTR_RUN_ID,
    non_dominated,
    pruning_savings,
    stage_span,
    state_name,
    study_budget,
)
from tasks.hpo.study import best_trial as best_of
from tasks.inputs import fetch_study_input
from tasks.metrics import augrc, risk_coverage_curve
from tasks.report import agg_figure
from tasks.tracking import Tracker, one_line
from tasks.workloads.base import Objective, StudyTarget
from tasks.workloads.classifier import BUNDLE
from tasks.workloads.evaluation import DEVICE_PROBS, report_trial
from tasks.workloads.registry import objective_for

HPO_DIR = "hpo"
PLOTS_DIR = "plots"


def records_root(config: StudyTarget) -> Path:
    """Where a study's ``hpo/`` and ``plots/`` go: its run directory, or for a study derived
    from a search (``<name>-best``, ``<name>-final``) or a variant (``<name>-<variant>``),
    which share the run directory, a folder of its own name in it."""
    if config.study.derived_from or config.study.variant_of:
        return config.run_path / config.study.name
    return config.run_path


STATUS_FILE = "status.json"
#: The champion's report (``tasks.report``), beside ``hpo/`` and ``plots/``.
REPORT_DIR = "report"
#: Complete trials whose risk–coverage curves are drawn.
TOP_K = 3
#: Stage spans kept on each trial by the parent flow: (name, start attribute, end attribute).
#: StudyConfig fields that bound a study besides its trial count (read when present).
BUDGET_FIELDS = ("time_budget", "hpo_time_ratio", "patience")


class _Logger(Protocol):
    def info(self, msg: str, *args: Any) -> None: ...

    def warning(self, msg: str, *args: Any) -> None: ...


class StudyRun(Protocol):
    """What the hooks read from the parent flow's study runner."""

    @property
    def config(self) -> StudyTarget: ...

    @property
    def study(self) -> optuna.Study: ...

    @property
    def tracker(self) -> Tracker: ...

    @property
    def parent_run_id(self) -> str: ...

    @property
    def logger(self) -> _Logger: ...

    @property
    def stopped_by(self) -> str | None: ...


# JSON records ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-safe copy: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _single(study: optuna.Study) -> bool:
    return len(study.directions) == 1


def stage_times(trial: FrozenTrial) -> dict[str, float]:
    """Seconds spent in each stage the trial reached, and from its start to its outcome."""
    times: dict[str, float] = {}
    for stage in ("train", "compile", "device"):
        span = stage_span(trial, stage)
        if span is not None:
            times[f"{stage}_s"] = span
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        times["total_s"] = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return times


def trial_summary(trial: FrozenTrial, objective: Objective) -> dict[str, Any]:
    """One trial in ``status.json``: outcome, parameters, metrics, reason and stage times."""
    attrs = trial.user_attrs
    done = trial.state == TrialState.COMPLETE and trial.values is not None
    values = list(trial.values) if done and trial.values is not None else None
    summary: dict[str, Any] = {
        "number": trial.number,
        "state": state_name(trial),
        "params": dict(trial.user_attrs.get(ATTR_APPLIED) or trial.params),
        "value": values[0] if values is not None and len(values) == 1 else None,
        "float_value": attrs.get(objective.float_metric),
        "device_metrics": {k: attrs[k] for k in objective.trial_attrs if k in attrs},
        "fail_stage": attrs.get(ATTR_FAIL_STAGE),
        "reason": attrs.get(ATTR_FAIL_REASON),
        "times": stage_times(trial),
        "mlflow_run_id": attrs.get(ATTR_RUN_ID),
    }
    if values is not None and len(values) > 1:
        summary["values"] = values
    # Retries, and how far a pruned trial trained (``params`` are the values trained with;
    # a sample the constraints rejected has the state REJECTED).
    for key in ("retry_of", "attempt", "epochs_run", "epochs_planned"):
        if key in attrs:
            summary[key] = attrs[key]
    return summary


def trial_record(trial: FrozenTrial, objective: Objective) -> dict[str, Any]:
    """The full record of one trial (``hpo/trial_<n>.json``)."""

    return _plain(
        {
            **trial_summary(trial, objective),
            "objective": objective.metric,
            "direction": objective.direction,
            "values": list(trial.values) if trial.values is not None else None,
            "datetime_start": trial.datetime_start,
            "datetime_complete": trial.datetime_complete,
            "distributions": {
                name: json.loads(distribution_to_json(dist))
                for name, dist in trial.distributions.items()
            },
            "intermediate_values": {
                str(step): value for step, value in sorted(trial.intermediate_values.items())
            },
            "user_attrs": dict(trial.user_attrs),
            "system_attrs": dict(trial.system_attrs),
        }
    )


def study_status(
    config: StudyTarget, study: optuna.Study, state: str, stopped_by: str | None = None
) -> dict[str, Any]:
    """The whole study at a glance (``hpo/status.json``); ``state``: RUNNING, FINISHED…"""
    objective = objective_for(config)
    cfg = config.study
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: 0 for s in TrialState} | {"REJECTED": 0}
    for trial in trials:
        counts[state_name(trial)] += 1
    single = _single(study)
    best = best_of(study) if single else None
    budget: dict[str, Any] = {"n_trials": cfg.n_trials, "trials": study_budget(cfg)}
    budget.update({name: getattr(cfg, name) for name in BUDGET_FIELDS})
    status: dict[str, Any] = {
        "study": study.study_name,
        "state": state,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "algorithm": {
            "sampler": cfg.sampler,
            "sampler_class": type(study.sampler).__name__,
            "pruner": cfg.pruner,
            "pruner_class": type(study.pruner).__name__,
            "seed": config.seed,
        },
        "search_space": {
            name: spec.model_dump(mode="json", exclude_none=True)
            for name, spec in cfg.search_space.items()
        },
        "constraints": list(cfg.constraints),
        "search_space_file": cfg.search_space_file,
        "objective": {
            "metric": objective.metric,
            "label": objective.label,
            "direction": objective.direction,
            "float_metric": objective.float_metric,
            "epoch_metric": objective.epoch_metric,
        },
        "directions": [d.name.lower() for d in study.directions],
        "budget": budget,
        "counts": counts,
        "best": trial_summary(best, objective) if best is not None else None,
        "champion": study.user_attrs.get("champion"),
        "stopped_by": stopped_by,
        "pruning_saved": pruning_savings(list(trials)),
        "trials": [trial_summary(t, objective) for t in trials],
    }
    if not single:
        status["pareto_front"] = pareto_front(study)
    return _plain(status)


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto it once written (readers never see
    half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named here, not by mkstemp, so the file gets the usual permissions (umask), not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> Path:
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n")
    return path


def trial_path(folder: Path, number: int) -> Path:
    return folder / f"trial_{number}.json"


def write_records(
    config: StudyTarget,
    study: optuna.Study,
    state: str,
    numbers: Sequence[int] | None = None,
    stopped_by: str | None = None,
) -> list[Path]:
    """Write ``status.json`` and the records of trials ``numbers``.

    With ``numbers`` None, every trial's record is written and a record of a trial the
    study no longer has (a study started afresh with ``--restart``) is removed.
    """
    folder = records_root(config) / HPO_DIR
    objective = objective_for(config)
    trials = study.get_trials(deepcopy=False)
    wanted = {t.number for t in trials} if numbers is None else set(numbers)
    paths = [
        write_json(trial_path(folder, t.number), trial_record(t, objective))
        for t in trials
        if t.number in wanted
    ]
    if numbers is None:
        kept = {p.name for p in paths}
        for stale in folder.glob("trial_*.json"):
            if stale.name not in kept:
                stale.unlink(missing_ok=True)
    status = study_status(config, study, state, stopped_by)
    paths.append(write_json(folder / STATUS_FILE, status))
    return paths


def _publish(run: StudyRun, paths: Sequence[Path], artifact_dir: str) -> None:
    if not run.parent_run_id:
        return
    for path in paths:
        run.tracker.log_artifact(run.parent_run_id, path, artifact_dir)


def study_progress(config: StudyTarget, study: optuna.Study) -> tuple[float, str]:
    """How far the study is, for a progress bar in the orchestrator's UI: the share of its
    trials with an outcome (0 to 100), and a line with the counts and the best so far."""
    trials = study.get_trials(deepcopy=False)
    total, done = study_budget(config.study), outcome_count(trials)
    counts = {s: sum(1 for t in trials if state_name(t) == s) for s in ("COMPLETE", "PRUNED")}
    failed = sum(1 for t in trials if t.state == TrialState.FAIL)
    best = best_of(study) if _single(study) else None
    label = objective_for(config).label
    text = (
        f"study {study.study_name}: {done}/{total} trials with an outcome "
        f"({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {failed} failed); "
        + (f"best {label} {best.values[0]:.5f} (trial {best.number})" if best else "no result yet")
    )
    return (min(100.0, 100.0 * done / total) if total else 100.0), text


# Hooks of the parent flow ---------------------------------------------------------------


def on_trial_outcome(run: StudyRun, trial: optuna.Trial | FrozenTrial) -> None:
    """After a trial is told: its ``trial_<n>.json`` and a fresh ``status.json``."""
    try:
        written = write_records(run.config, run.study, "RUNNING", [trial.number], run.stopped_by)
        _publish(run, written, HPO_DIR)
    except Exception as exc:
        run.logger.warning("hpo records of trial %d not saved: %s", trial.number, one_line(exc))


def on_study_end(run: StudyRun, state: str) -> None:
    """At the end of the study: every trial's record, ``status.json`` and the plots."""
    try:
        _publish(run, write_records(run.config, run.study, state, None, run.stopped_by), HPO_DIR)
    except Exception as exc:
        run.logger.warning("hpo records not saved: %s", one_line(exc))
    try:
        _publish(run, make_plots(run), PLOTS_DIR)
    except Exception as exc:
        run.logger.warning("plots not logged: %s", one_line(exc))
    champion_report(run)


def champion_report(run: StudyRun) -> Path | None:
    """The report of the trial this study made champion (``tasks.report``), into
    ``<records>/report/`` and the trial's run; None when there is none to make (a detector
    study, no new champion). A report that fails is logged; the study's result stands."""
    crowned = run.study.user_attrs.get("champion") or {}
    config = run.config
    if crowned.get("trial") is None or not isinstance(config, EdgetuneConfig):
        return None  # no new champion, or a detector study
    trial = run.study.trials[int(crowned["trial"])]
    out = records_root(config) / REPORT_DIR
    started = time.monotonic()
    try:
        summary = report_trial(
            config, run.tracker, trial.user_attrs[ATTR_RUN_ID], run.parent_run_id, out
        )
    except Exception as exc:
        run.logger.warning("champion report not written: %s", one_line(exc))
        return None
    changed = summary.get("changed", {}).get("total", 0)
    run.logger.info(
        "champion report (trial %d, %d images, %d predictions changed on the board) in %s (%.1f s)",
        trial.number,
        summary["images"],
        changed,
        out,
        time.monotonic() - started,
    )
    return out


# Plots ----------------------------------------------------------------------------------


def _save(figure: Any, path: Path) -> Path:
    """The PNG at ``path`` and its interactive twin beside it (``.html``)."""
    with _atomic(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    write_html(figure, path.with_suffix(".html"))
    return path


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.values is not None
    ]


def plot_history(
    study: optuna.Study, objective: Objective, path: Path
) -> list[tuple[int, float, float]] | None:
    """Each complete trial's value by trial number and the best so far.

    Returns ``(number, value, best so far)`` per complete trial; None (nothing drawn) when
    no trial completed or the study has several objectives.
    """
    done = sorted(_complete(study), key=lambda t: t.number)
    if not done or not _single(study):
        return None
    better = max if study.direction == StudyDirection.MAXIMIZE else min
    rows: list[tuple[int, float, float]] = []
    best = float("nan")
    for trial in done:
        value = float(trial.values[0])
        best = value if not rows else better(best, value)
        rows.append((trial.number, value, best))
    figure, axes = agg_figure()
    numbers = [r[0] for r in rows]
    axes.scatter(numbers, [r[1] for r in rows], s=22, color="tab:blue", label="trial", zorder=3)
    axes.step(numbers, [r[2] for r in rows], where="post", color="tab:red", label="best so far")
    others = len(study.trials) - len(done)
    axes.set_title(
        f"{study.study_name}: {len(done)} complete"
        + (f", {others} pruned, failed or running" if others else ""),
        fontsize=10,
    )
    axes.set_xlabel("trial")
    axes.set_ylabel(f"{objective.label} ({objective.direction})")
    axes.grid(alpha=0.3)
    axes.legend()
    _save(figure, path)
    return rows


def varying_params(study: optuna.Study) -> list[str]:
    """Parameters that every complete trial has and that take more than one value."""
    done = _complete(study)
    if not done:
        return []
    names = set(done[0].params).intersection(*(t.params for t in done[1:]))
    return sorted(n for n in names if len({repr(t.params[n]) for t in done}) > 1)


def _union(distributions: Sequence[BaseDistribution]) -> BaseDistribution:
    """One distribution that holds every trial's value of a parameter."""
    first = distributions[0]
    if isinstance(first, CategoricalDistribution):
        choices: list[Any] = []
        for d in distributions:
            choices += [c for c in d.choices if c not in choices]  # type: ignore[attr-defined]
        return CategoricalDistribution(choices)
    low = min(d.low for d in distributions)  # type: ignore[attr-defined]
    high = max(d.high for d in distributions)  # type: ignore[attr-defined]
    if isinstance(first, IntDistribution):
        return IntDistribution(low, high, log=first.log)
    assert isinstance(first, FloatDistribution), first
    return FloatDistribution(low, high, log=first.log)


def uniform_space(study: optuna.Study, params: Sequence[str]) -> optuna.Study:
    """The complete trials over ``params`` with one distribution per parameter (the union of
    the trials' own), in an in-memory study: a parameter whose range depends on another
    (``swa_start`` below ``epochs``) or that some trials lack (a conditional space) would
    otherwise stop fANOVA, which needs one fixed space."""
    done = _complete(study)
    space = {name: _union([t.distributions[name] for t in done]) for name in params}
    copy = optuna.create_study(directions=study.directions)
    for trial in done:
        copy.add_trial(
            optuna.trial.create_trial(
                params={name: trial.params[name] for name in params},
                distributions=space,
                values=trial.values,
            )
        )
    return copy


def plot_importances(study: optuna.Study, path: Path, seed: int = 0) -> dict[str, float] | None:
    """fANOVA importance of each varying parameter for the objective (the first one of a
    multi-objective study).

    Returns the importances, or None (nothing drawn) with fewer than 2 complete trials or
    no parameter that varies.
    """
    params = varying_params(study)
    if len(_complete(study)) < 2 or not params:
        return None
    # fANOVA (scikit-learn, about a second to import) loads only where importances are drawn.
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    target = None if _single(study) else (lambda t: t.values[0])
    importances = get_param_importances(
        uniform_space(study, params),
        evaluator=FanovaImportanceEvaluator(seed=seed),
        params=params,
        target=target,
    )
    if not all(math.isfinite(v) for v in importances.values()):
        raise ValueError(f"importances are not finite: {importances}")
    names = sorted(importances, key=lambda n: importances[n])
    figure, axes = agg_figure(height=1.2 + 0.45 * len(names))
    axes.barh(range(len(names)), [importances[n] for n in names], color="tab:blue")
    axes.set_yticks(range(len(names)), names)
    for y, name in enumerate(names):
        axes.text(importances[name], y, f" {importances[name]:.2f}", va="center")
    axes.set_xlim(0, max(1.0, *importances.values()) * 1.12)
    axes.set_xlabel("importance (fANOVA)")
    axes.set_title(f"{study.study_name}: parameter importances", fontsize=10)
    _save(figure, path)
    return {name: float(value) for name, value in importances.items()}


def pareto_front(study: optuna.Study) -> list[int]:
    """Numbers of the complete trials that no other complete trial dominates."""
    directions = tuple(d.name.lower() for d in study.directions)
    return [t.number for t in non_dominated(_complete(study), directions)]


def plot_pareto_front(
    study: optuna.Study, path: Path, names: Sequence[str] | None = None
) -> list[int] | None:
    """The complete trials on the first two objectives, the non-dominated ones highlighted.

    Returns the numbers of the front's trials (all objectives considered); None (nothing
    drawn) for a single-objective study.
    """
    if _single(study):
        return None
    done = _complete(study)
    front = pareto_front(study)
    on_front = set(front)
    labels = list(names or study.metric_names or [f"objective {i}" for i in range(2)])
    directions = [d.name.lower() for d in study.directions]
    figure, axes = agg_figure(width=6.0, height=5.0)
    rest = [t for t in done if t.number not in on_front]
    best = sorted((t for t in done if t.number in on_front), key=lambda t: t.values[0])
    axes.scatter(
        [t.values[0] for t in rest], [t.values[1] for t in rest], s=20, color="0.6", label="trial"
    )
    axes.plot(
        [t.values[0] for t in best],
        [t.values[1] for t in best],
        "o-",
        color="tab:red",
        label="Pareto front",
    )
    for trial in best:
        axes.annotate(str(trial.number), (trial.values[0], trial.values[1]), fontsize=8)
    axes.set_xlabel(f"{labels[0]} ({directions[0]})")
    axes.set_ylabel(f"{labels[1]} ({directions[1]})")
    axes.set_title(f"{study.study_name}: {len(front)} of {len(done)} on the front", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    _save(figure, path)
    return front


def top_trials(study: optuna.Study, k: int = TOP_K) -> list[FrozenTrial]:
    """The ``k`` best complete trials on the study's metric (ties: earlier first)."""
    sign = -1.0 if study.directions[0] == StudyDirection.MAXIMIZE else 1.0
    return sorted(_complete(study), key=lambda t: (sign * float(t.values[0]), t.number))[:k]


def plot_risk_coverage(
    study: optuna.Study,
    tracker: Tracker,
    parent_run_id: str,
    path: Path,
    k: int = TOP_K,
    logger: _Logger | None = None,
) -> dict[int, float] | None:
    """Generalized and selective risk against coverage for the ``k`` best classifier trials,
    from each trial's device probabilities and the study's validation labels.

    Returns each drawn trial's AUGRC recomputed from its curve; None (nothing drawn) when
    no trial's outputs could be read.
    """
    best = top_trials(study, k)
    if not best:
        return None
    drawn: dict[int, float] = {}
    figure, (generalized, selective) = agg_figure(width=5.5, columns=2)
    with tempfile.TemporaryDirectory(prefix="edgetune-plots-") as tmp:
        labels = load_bundle(fetch_study_input(tracker, parent_run_id, BUNDLE, Path(tmp)))["labels"]
        for trial in best:
            try:
                run_id = trial.user_attrs[ATTR_RUN_ID]
                probs = np.load(
                    tracker.download(run_id, DEVICE_PROBS, Path(tmp) / str(trial.number))
                )
                coverage, g_risk, s_risk = risk_coverage_curve(probs, labels)
                area = augrc(probs, labels)
            except Exception as exc:
                if logger is not None:
                    logger.warning(
                        "risk-coverage: trial %d left out: %s", trial.number, one_line(exc)
                    )
                continue
            drawn[trial.number] = area
            label = f"trial {trial.number} (AUGRC {area:.5f})"
            generalized.plot(coverage, g_risk, label=label)
            selective.plot(coverage, s_risk, label=f"trial {trial.number}")
    if not drawn:
        return None
    generalized.set_title("generalized risk (area: AUGRC)")
    generalized.set_ylabel("accepted and wrong / N")
    selective.set_title("selective risk")
    selective.set_ylabel("wrong / accepted")
    for axes in (generalized, selective):
        axes.set_xlabel("coverage")
        axes.set_xlim(0.0, 1.0)
        axes.grid(alpha=0.3)
    generalized.legend()
    figure.suptitle(
        f"{study.study_name}: device risk–coverage, best {len(drawn)} trials", fontsize=11
    )
    _save(figure, path)
    return drawn


def make_plots(run: StudyRun) -> list[Path]:
    """Draw every plot that applies to the study; a plot that fails is logged and skipped."""
    study, logger, seed = run.study, run.logger, run.config.seed
    objective = objective_for(run.config)
    folder = records_root(run.config) / PLOTS_DIR
    plots: list[tuple[str, str, Callable[[Path], object], str]] = [
        (
            "optimization history",
            "optimization_history.png",
            lambda path: plot_history(study, objective, path),
            "no complete trial, or several objectives",
        ),
        (
            "parameter importances",
            "param_importances.png",
            lambda path: plot_importances(study, path, seed),
            "it needs 2 complete trials and a parameter that varies",
        ),
        (
            "Pareto front",
            "pareto_front.png",
            lambda path: plot_pareto_front(study, path),
            "the study has one objective",
        ),
    ]
    if objective.confidences:
        plots.append(
            (
                "risk-coverage curves",
                "risk_coverage.png",
                lambda path: plot_risk_coverage(
                    study, run.tracker, run.parent_run_id, path, logger=logger
                ),
                "no complete trial's device outputs could be read",
            )
        )
    else:
        logger.info("plot risk-coverage curves skipped: the board returns no confidences")
    made: list[Path] = []
    started = time.monotonic()
    for title, name, draw, why in plots:
        path = folder / name
        try:
            drawn = draw(path)
        except Exception as exc:
            logger.warning("plot %s failed, skipped: %s", title, one_line(exc))
            continue
        if drawn is None:
            logger.info("plot %s skipped: %s", title, why)
        else:
            made.extend(p for p in (path, path.with_suffix(".html")) if p.is_file())
    logger.info("%d plot file(s) in %s (%.1f s)", len(made), folder, time.monotonic() - started)
    return made


# optuna-dashboard -----------------------------------------------------------------------


def dashboard_server(storage: optuna.storages.BaseStorage, host: str, port: int) -> Any:
    """A threaded WSGI server of optuna-dashboard on ``storage`` (call ``serve_forever``).

    The dashboard's page and scripts ship inside the optuna-dashboard package: nothing is
    downloaded. Raises OSError when the address cannot be bound.
    """

    # matplotlib, fANOVA and optuna-dashboard load only where a plot or the dashboard is made.
    from optuna_dashboard import wsgi

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # one line per request: off
            return None

    return make_server(host, port, wsgi(storage), server_class=Server, handler_class=QuietHandler)
