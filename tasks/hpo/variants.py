"""Several variants of one study compared: one row each from the stored studies, and the
winner among their champions by the study's champion rule (``variants.json``).

How a config's ``variants:`` become studies of their own is ``tasks.config.variants``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from tasks.config import VariantSpec
from tasks.config.variants import expand
from tasks.hpo.reports import records_root
from tasks.hpo.study import (
    best_trial,
    choose_champion,
    goals_for,
    non_dominated,
    open_study,
    summary,
)
from tasks.workloads.registry import objective_for


def compare(config: Any, configs: list[tuple[VariantSpec, Any]] | None = None) -> dict[str, Any]:
    """One row per variant from the stored studies, and the winner by the champion rule.

    The winner is chosen among the variants' champions (each its study's best feasible
    trial) by the config's rule over their Pareto front; a tie goes to the earlier variant.
    """

    objective = objective_for(config)
    goals = goals_for(config.study, objective)
    rows: list[dict[str, Any]] = []
    bests: list[FrozenTrial] = []
    owners: dict[int, dict[str, Any]] = {}
    for spec, variant in configs if configs is not None else expand(config):
        row: dict[str, Any] = {
            "variant": spec.name,
            "study": variant.study.name,
            "search": spec.search,
            "settings": dict(spec.set),
            "n_trials": variant.study.n_trials,
        }
        rows.append(row)
        try:
            study = open_study(
                variant.storage_url, variant.study, variant.seed, create=False, objective=objective
            )
        except KeyError:
            row.update(counts=None, best=None, champion=None)
            continue
        record = summary(study)
        row.update(
            counts=record["counts"],
            best=record["best"],
            champion=record["champion"],
            pruning_saved=record["pruning_saved"],
            records=str(records_root(variant)),
        )
        best = best_trial(study)
        if best is not None:
            owners[id(best)] = row
            bests.append(best)
    front = non_dominated(bests, goals.directions)
    chosen = choose_champion(front, goals, order=[bests.index(t) for t in front])
    winner = owners[id(chosen)] if chosen is not None else None
    for row in rows:
        row["winner"] = row is winner
    counts: dict[str, int] = {}
    for row in rows:
        for state, n in (row.get("counts") or {}).items():
            counts[state] = counts.get(state, 0) + n
    return {
        "study": config.study.name,
        "objective": objective.metric,
        "objective_label": objective.label,
        "float_objective": objective.float_metric,
        "direction": objective.direction,
        "goals": goals.record(),
        "variants": rows,
        "winner": winner["variant"] if winner else None,
        "best": {**winner["best"], "variant": winner["variant"]} if winner else None,
        "counts": counts,
    }


def write_comparison(config: Any, record: dict[str, Any]) -> Path:
    """``<run_dir>/variants.json``: the comparison as the run left it."""
    path = config.run_path / "variants.json"
    staged = path.with_suffix(".json.part")
    staged.write_text(json.dumps(record, indent=2, default=str))
    staged.replace(path)
    return path
