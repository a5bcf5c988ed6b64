"""A champion that is more than a lucky seed: the top trials trained again with other seeds.

With ``study.confirm_seeds: n``, the ``confirm_top_k`` best trials of a finished search are
each trained ``n`` more times, with other seeds, compiled and measured on the board again,
as the studies ``<name>-seed1`` … ``<name>-seed<n>`` (one trial per top trial, each study
its own seed replicate, so the trial seeds differ while parameters and data do not). The
champion is the best mean over the ``n + 1`` measurements of each, reported with its
spread, and the record says whether the winner is separated from the runner-up by more
than the noise: a difference of means larger than twice its standard error.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks.hpo.recovery import derived_config
from tasks.hpo.study import feasible, open_study, primary_value
from tasks.workloads.base import StudyTarget
from tasks.workloads.registry import objective_for

if TYPE_CHECKING:
    from tasks.hpo.loop import StudyLoop

#: Set on a confirmation trial: the search trial whose parameters it trains again.
ATTR_REPLICA_OF = "replica_of"


def top_trials(study: optuna.Study, k: int, maximize: bool) -> list[FrozenTrial]:
    """The ``k`` best complete, feasible trials, best first (ties: the earlier)."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if feasible(t) and t.values is not None
    ]
    sign = -1.0 if maximize else 1.0
    return sorted(done, key=lambda t: (sign * primary_value(t), t.number))[:k]


def replica_studies(cfg: StudyTarget, top: list[FrozenTrial]) -> list[tuple[StudyTarget, Any]]:
    """One derived study per extra seed, with the top trials' parameters enqueued once."""
    out = []
    for replicate in range(1, cfg.study.confirm_seeds + 1):
        rcfg = derived_config(
            cfg, f"{cfg.study.name}-seed{replicate}", len(top), replicate=replicate
        )
        study = open_study(rcfg.storage_url, rcfg.study, rcfg.seed, objective=objective_for(rcfg))
        if not study.get_trials(deepcopy=False):  # a resumed check does not enqueue again
            for trial in top:
                study.enqueue_trial(dict(trial.params), user_attrs={ATTR_REPLICA_OF: trial.number})
        out.append((rcfg, study))
    return out


def _spread(values: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"values": values, "mean": mean, "std": std, "runs": len(values)}


def compare(top: list[FrozenTrial], replicas: list[optuna.Study], maximize: bool) -> dict[str, Any]:
    """Each top trial's measurements (its own and its replicas'), the best mean, and whether
    it stands out from the runner-up by more than the noise."""
    rows = []
    for trial in top:
        values = [primary_value(trial)]
        for study in replicas:
            values += [
                primary_value(t)
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get(ATTR_REPLICA_OF) == trial.number
            ]
        rows.append({"trial": trial.number, "params": dict(trial.params), **_spread(values)})
    sign = -1.0 if maximize else 1.0
    rows.sort(key=lambda r: (sign * r["mean"], r["trial"]))
    record: dict[str, Any] = {"rows": rows, "winner": rows[0]["trial"] if rows else None}
    if len(rows) > 1:
        first, second = rows[0], rows[1]
        noise = 2.0 * math.sqrt(
            first["std"] ** 2 / first["runs"] + second["std"] ** 2 / second["runs"]
        )
        difference = abs(first["mean"] - second["mean"])
        record.update(
            runner_up=second["trial"],
            difference=difference,
            noise=noise,
            separated=difference > noise,
        )
    return record


def confirm(
    cfg: StudyTarget,
    study: optuna.Study,
    make_loop: Any,
    run: Any,
) -> dict[str, Any] | None:
    """Train the top trials again with other seeds; the comparison record (None: nothing to
    confirm). ``make_loop(cfg, study)`` builds a study loop, ``run(loops)`` runs them."""
    maximize = objective_for(cfg).maximize
    top = top_trials(study, cfg.study.confirm_top_k, maximize)
    if not top:
        return None
    replicas = replica_studies(cfg, top)
    loops: list[StudyLoop] = [make_loop(rcfg, rstudy) for rcfg, rstudy in replicas]
    run(loops)
    record = compare(top, [rstudy for _, rstudy in replicas], maximize)
    record.update(
        seeds=cfg.study.confirm_seeds,
        top_k=len(top),
        objective=objective_for(cfg).metric,
        studies=[rcfg.study.name for rcfg, _ in replicas],
    )
    return record
