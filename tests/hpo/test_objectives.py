"""Several objectives: device AUGRC with latency and size, limits, the Pareto front, the
champion rule."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

import optuna
import pytest
from pydantic import ValidationError

from tasks.config import StudyConfig
from tasks.hpo.study import (
    best_trial,
    choose_champion,
    feasible_front,
    goals_for,
    open_study,
    study_goals,
    suggest,
    summary,
)
from tasks.storage import StudyError

from conftest import tiny_config

THREE = ["device_augrc", "device_latency_ms", "compiled_size_mb"]
SPACE = {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}


def _config(**study: Any) -> StudyConfig:
    return StudyConfig.model_validate({"name": "mo", "search_space": SPACE, **study})


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"objectives": ["device_latency_ms"]}, r"the first objective must be device_augrc"),
        (
            {"objectives": ["device_augrc", "latency"]},
            r"'latency' cannot be optimised alongside device_augrc; use device_latency_ms "
            r"and/or compiled_size_mb",
        ),
        ({"objectives": ["device_augrc", "device_latency_ms"], "pruner": "median"}, r"pruner: "),
        ({"objectives": THREE, "sampler": "cmaes"}, r"sampler: cmaes optimises one objective"),
        ({"objectives": THREE, "champion": "weighted"}, r"champion_weights: champion: weighted"),
        (
            {"objectives": THREE, "champion": "weighted", "champion_weights": {"size": 1}},
            r"'size' is not one of the study's objectives",
        ),
        ({"max_latency_ms": 0}, r"max_latency_ms"),
    ],
)
def test_objectives_are_checked(study: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _config(**study)


def _tell(study: optuna.Study, goals: Any, augrc: float, latency: float, size: float) -> None:
    """What the parent flow does with a complete trial's measurements."""
    trial = study.ask()
    suggest(trial, {})
    measured = {"device_augrc": augrc, "device_latency_ms": latency, "compiled_size_mb": size}
    for key in ("device_latency_ms", "compiled_size_mb"):
        trial.set_user_attr(key, measured[key])
    goals.constrain(trial, measured)
    study.tell(trial, [measured[m] for m in goals.metrics] if goals.multi else augrc)


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def test_the_front_is_non_dominated_and_feasible(tmp_path: Path) -> None:
    config = _config(objectives=THREE, max_latency_ms=8.0, max_size_mb=3.0, sampler="nsga2")
    study = open_study(f"sqlite:///{tmp_path / 'o.db'}", config, seed=0)
    goals = goals_for(config)
    rng = random.Random(4)
    for _ in range(40):
        _tell(study, goals, rng.uniform(0.01, 0.2), rng.uniform(1, 12), rng.uniform(0.5, 4))
    trials = study.get_trials()
    ok = [t for t in trials if t.user_attrs["feasible"]]
    assert 0 < len(ok) < len(trials)  # some trials broke a limit
    for trial in trials:  # Optuna's feasibility values (<= 0: met), read by the samplers
        expected = {
            "device_latency_ms": trial.user_attrs["device_latency_ms"] - 8.0,
            "compiled_size_mb": trial.user_attrs["compiled_size_mb"] - 3.0,
        }
        assert trial.constraints == pytest.approx(expected)
        assert trial.user_attrs["feasible"] == all(v <= 0 for v in expected.values())
    front = feasible_front(study)
    numbers = {t.number for t in front}
    # brute force: exactly the feasible trials that no feasible trial dominates
    assert numbers == {
        t.number for t in ok if not any(_dominates(o.values, t.values) for o in ok if o is not t)
    }
    assert all(t.user_attrs["feasible"] for t in front)
    assert all(t.values[1] <= 8.0 and t.values[2] <= 3.0 for t in front)

    result = summary(study)
    assert result["pareto_front"] == sorted(numbers)
    assert result["infeasible"] == len(trials) - len(ok)
    assert result["goals"]["metrics"] == THREE
    # the default rule: the front's best AUGRC, which is the best feasible AUGRC
    best = best_trial(study)
    assert best is not None and best.number in numbers
    assert best.values[0] == min(t.values[0] for t in ok)
    assert result["best"]["trial"] == best.number


def test_champion_rules_pick_from_the_front(tmp_path: Path) -> None:
    config = _config(objectives=THREE)
    study = open_study(f"sqlite:///{tmp_path / 'o.db'}", config, seed=0)
    goals = goals_for(config)
    points = [
        (0.05, 10.0, 2.0),  # best AUGRC
        (0.08, 4.0, 2.0),  # balanced
        (0.20, 1.0, 2.5),  # fastest
        (0.09, 11.0, 2.2),  # dominated by the first
    ]
    for point in points:
        _tell(study, goals, *point)
    front = feasible_front(study)
    assert [t.number for t in front] == [0, 1, 2]
    assert choose_champion(front, goals).number == 0
    # scaled over the front: 0 (0, 1, 0), 1 (0.2, 1/3, 0), 2 (1, 0, 1): 1 is nearest to 0
    utopia = goals_for(config.model_copy(update={"champion": "utopia"}))
    assert choose_champion(front, utopia).number == 1
    fastest = goals_for(
        config.model_copy(
            update={"champion": "weighted", "champion_weights": {"device_latency_ms": 1.0}}
        )
    )
    assert choose_champion(front, fastest).number == 2
    distances = {
        t.number: math.dist(
            [0, 0, 0],
            [
                (t.values[i] - min(p[i] for p in points[:3]))
                / (max(p[i] for p in points[:3]) - min(p[i] for p in points[:3]))
                for i in range(3)
            ],
        )
        for t in front
    }
    assert min(distances, key=lambda n: distances[n]) == 1


def test_one_objective_with_a_limit_skips_infeasible_trials(tmp_path: Path) -> None:
    config = _config(max_latency_ms=5.0)
    study = open_study(f"sqlite:///{tmp_path / 'o.db'}", config, seed=0)
    goals = goals_for(config)
    for augrc, latency in [(0.01, 9.0), (0.03, 4.0), (0.02, 6.0), (0.04, 1.0)]:
        _tell(study, goals, augrc, latency, 1.0)
    assert best_trial(study).number == 1  # 0 and 2 are better but too slow
    assert study.trials[0].user_attrs["infeasible_reason"] == "device_latency_ms 9 ms > 5 ms"
    assert summary(study)["pareto_front"] is None  # one objective: no front to show
    # nothing feasible: no champion
    strict = _config(name="strict", max_latency_ms=0.5)
    other = open_study(f"sqlite:///{tmp_path / 'o.db'}", strict, seed=0)
    _tell(other, goals_for(strict), 0.01, 1.0, 1.0)
    assert best_trial(other) is None


def test_a_stored_study_keeps_its_objectives(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = open_study(url, _config(objectives=THREE[:2]), seed=0)
    assert study_goals(study).metrics == tuple(THREE[:2])
    assert study.metric_names == THREE[:2]
    with pytest.raises(StudyError, match=r"has the objectives \['device_augrc', 'device_lat"):
        open_study(url, _config(objectives=THREE), seed=0)
    # the limits and the champion rule may change when the study continues
    again = open_study(url, _config(objectives=THREE[:2], max_size_mb=2.0), seed=0)
    assert study_goals(again).max_size_mb == 2.0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_study_with_three_objectives(digits_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from flows.tune import tune
    from tasks.config import parse_config

    raw = tiny_config(
        digits_root,
        tmp_path / "mo",
        study={
            "n_trials": 3,
            "sampler": "nsga2",
            "objectives": THREE,
            "max_latency_ms": 10_000.0,  # every trial meets it
            "champion": "utopia",
        },
    )
    config = parse_config(raw)
    result = tune(config.model_dump(mode="json"))
    study = open_study(config.storage_url, config.study, config.seed, create=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for trial in trials:
        attrs = trial.user_attrs
        assert trial.values[1:] == [attrs["device_latency_ms"], attrs["compiled_size_mb"]]
        assert attrs["device_augrc_ci_low"] <= trial.values[0] <= attrs["device_augrc_ci_high"]
        assert attrs["feasible"] is True and attrs["compiled_size_mb"] > 0
    client = MlflowClient(config.tracking_uri)
    for trial in trials:  # the values told are the ones MLflow recorded
        metrics = client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
        assert trial.values[0] == pytest.approx(metrics["device_augrc"])
        assert trial.values[2] == pytest.approx(metrics["compiled_size_mb"])
    front = {t.number for t in feasible_front(study)}
    assert set(result["pareto_front"]) == front and front
    for a, b in itertools.permutations(trials, 2):
        if a.number in front:
            assert not _dominates(b.values, a.values)
    champion = result["champion"]
    assert champion["trial"] == result["best"]["trial"] and champion["trial"] in front
    version = client.get_model_version_by_alias(champion["model"], "champion")
    assert version.tags["trial"] == str(champion["trial"])
