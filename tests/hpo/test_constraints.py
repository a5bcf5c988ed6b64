"""Constraints that steer: rejected samples teach the sampler, and never stop a study whose
feasible region is not empty.

The loop runs with fake stages (``tests/fakes/engine.py``), one trial at a time (the
blocking design, one GPU slot), so that every ask sees every earlier sample told and the
seeded study asks the same samples on every run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from tasks.config import TUNABLE, read_space_file
from tasks.hpo import loop as loop_module
from tasks.hpo.loop import SampleRejected, StudyLoop
from tasks.hpo.recovery import outcome_count
from tasks.hpo.study import (
    ATTR_DRAWN,
    ATTR_REJECTED,
    pruning_savings,
    state_name,
    trials_since_best,
)
from tasks.space import draw, feasible_draw, shortfalls

from fakes.engine import FakeStages, FakeTracker, fake_config, memory_study

LOG = logging.getLogger("test-constraints")

#: Two floats over (about) [0, 1] x [0, 1]; the constraint leaves about a tenth of it.
SPACE = {
    "momentum": {"type": "float", "low": 0.0, "high": 0.99},
    "rho": {"type": "float", "low": 0.01, "high": 1.0},
}
SMALL = "momentum + rho <= 0.45"
FMFP = Path(__file__).parents[2] / "configs" / "search_spaces" / "fmfp.yaml"


def _value(params: dict[str, Any]) -> float:
    """A device AUGRC lowest at momentum 0.1, rho 0.2: inside the feasible corner."""
    return 0.01 + abs(float(params["momentum"]) - 0.1) + abs(float(params["rho"]) - 0.2)


def make_loop(tmp_path: Path, **study: Any) -> tuple[StudyLoop, FakeStages]:
    config = fake_config(
        tmp_path,
        {"orchestration": {"pipelined": False}},  # one trial at a time: deterministic asks
        **{"search_space": SPACE, "sampler": "tpe", "parallel": 1, **study},
    )
    stages = FakeStages(config, value=_value)
    loop = StudyLoop(
        config,
        memory_study(config),
        stages=stages,
        logger=LOG,
        tracker=FakeTracker(),  # type: ignore[arg-type]
    )
    return loop, stages


def rejected(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get(ATTR_REJECTED))


def test_tpe_learns_from_rejected_samples_and_asks_more_feasible_ones(tmp_path: Path) -> None:
    loop, stages = make_loop(tmp_path, n_trials=25, constraints=[SMALL])

    result = loop.run()

    assert result["counts"]["COMPLETE"] == 25 and len(stages.of("train")) == 25
    feasible = [not rejected(t) for t in loop.study.get_trials()]  # asks, in order
    early, late = feasible[:20], feasible[-20:]
    # About a tenth of the space is feasible: drawn at random, ~2 of 20 asks would be.
    assert sum(early) <= 8 and sum(late) >= sum(early) + 5, (sum(early), sum(late))
    # Every rejected sample told TPE how far it was from the constraint.
    for trial in loop.study.get_trials():
        if rejected(trial):
            assert trial.state == TrialState.PRUNED
            assert trial.constraints[SMALL] > 0
            assert trial.params["momentum"] + trial.params["rho"] > 0.45


def test_a_rejected_sample_is_told_to_the_sampler_but_counts_only_as_rejected(
    tmp_path: Path,
) -> None:
    loop, stages = make_loop(tmp_path, n_trials=6, constraints=[SMALL])

    result = loop.run()

    rejects = [t for t in loop.study.get_trials() if rejected(t)]
    assert rejects, "the test needs rejected samples"
    # told PRUNED with its constraint values: the state and the values TPE reads
    assert all(t.state == TrialState.PRUNED and t.constraints[SMALL] > 0 for t in rejects)
    counts = result["counts"]
    assert counts["REJECTED"] == len(rejects)
    assert counts["COMPLETE"] == 6 and counts["PRUNED"] == 0 and counts["FAIL"] == 0
    rows = {row["trial"]: row for row in result["trials"]}
    assert {rows[t.number]["state"] for t in rejects} == {"REJECTED"}
    assert all("momentum + rho <= 0.45" in rows[t.number]["reason"] for t in rejects)
    assert outcome_count(loop.study.get_trials()) == 6  # n_trials counts no rejected sample
    assert len(stages.of("train")) == 6  # a rejected sample runs nothing


def _made(number: int, state: TrialState, value: float | None, **attrs: Any) -> FrozenTrial:
    trial = optuna.trial.create_trial(
        state=state,
        value=value,
        params={"lr": 0.01},
        distributions={"lr": FloatDistribution(1e-3, 1e-1, log=True)},
        user_attrs=attrs,
    )
    trial.number = number
    return trial


def test_budgets_patience_and_pruning_savings_ignore_rejected_samples() -> None:
    best = _made(0, TrialState.COMPLETE, 0.1, train_started=0.0, train_finished=4.0)
    samples = [_made(n, TrialState.PRUNED, None, **{ATTR_REJECTED: True}) for n in (1, 2, 3)]
    pruned = _made(4, TrialState.PRUNED, None, epochs_run=1, epochs_planned=4)
    pruned.user_attrs.update(train_started=0.0, train_finished=1.0)
    trials = [best, *samples, pruned]

    assert [state_name(t) for t in trials] == ["COMPLETE", *["REJECTED"] * 3, "PRUNED"]
    assert trials_since_best(trials, maximize=False) == (1, 0)  # the pruned trial only
    assert outcome_count(trials) == 2
    saved = pruning_savings(trials)
    assert saved is not None and saved["trials"] == 1 and saved["epochs"] == 3


def test_a_sampler_stuck_in_the_infeasible_region_falls_back_to_random_draws(
    tmp_path: Path,
) -> None:
    """A sampler that only proposes momentum 0.9 breaks the constraint every time: after
    MAX_REJECTED in a row, parameters drawn at random that meet it are asked."""
    loop, stages = make_loop(tmp_path, n_trials=3, constraints=[SMALL])
    with warnings.catch_warnings():  # experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        stuck = optuna.samplers.PartialFixedSampler({"momentum": 0.9}, loop.study.sampler)
    loop.study.sampler = stuck

    result = loop.run()

    assert result["counts"]["COMPLETE"] == 3 and len(stages.of("train")) == 3
    assert result["counts"]["REJECTED"] == 3 * loop_module.MAX_REJECTED
    done = loop.study.get_trials(states=(TrialState.COMPLETE,))
    assert all(t.user_attrs.get(ATTR_DRAWN) for t in done)
    assert all(t.params["momentum"] + t.params["rho"] <= 0.45 for t in done)


def test_an_empty_feasible_region_stops_the_study_in_one_line(tmp_path: Path) -> None:
    loop, stages = make_loop(tmp_path, n_trials=2, constraints=["momentum + rho > 2"])

    with pytest.raises(SampleRejected) as caught:
        loop.run()

    message = str(caught.value)
    assert "\n" not in message
    assert f"{loop_module.MAX_DRAWS} drawn at random" in message
    assert "the feasible region looks empty" in message
    assert "loosen study.constraints" in message
    assert stages.of("train") == []


def test_a_violation_grows_with_the_distance_from_the_constraint() -> None:
    near = shortfalls([SMALL, "rho > 0"], {"momentum": 0.3, "rho": 0.2})
    far = shortfalls([SMALL, "rho > 0"], {"momentum": 0.9, "rho": 0.9})
    assert near[SMALL] > 0 and far[SMALL] > near[SMALL] and far[SMALL] <= 1
    assert near["rho > 0"] == 0 == far["rho > 0"]  # met: no shortfall
    assert shortfalls([SMALL], {"momentum": 0.1, "rho": 0.1}) == {SMALL: 0.0}
    ties = shortfalls(
        ["rho < momentum", "rho == 1", "rho in [1, 2]"], {"momentum": 0.5, "rho": 0.5}
    )
    assert ties["rho < momentum"] > 0 and ties["rho == 1"] > 0 and ties["rho in [1, 2]"] == 1.0
    choice = shortfalls(["optimizer == 'sgd' or lr <= 0.01"], {"optimizer": "adamw", "lr": 0.02})
    assert 0 < next(iter(choice.values())) < 1  # the nearer alternative: lr


def test_random_draws_follow_the_space_its_conditions_and_expressions() -> None:
    space = read_space_file(FMFP, TUNABLE)
    base = {"epochs": 200, "momentum": 0.9}
    rng = np.random.default_rng(7)
    draws = [draw(space.params, base, rng) for _ in range(300)]
    for params in draws:
        assert params["epochs"] in (150, 175, 200, 225, 250)
        assert params["epochs"] / 2 <= params["swa_start"] <= 3 * params["epochs"] / 4
        assert 1e-3 <= params["lr"] <= 1e-1 and 1e-3 <= params["swa_lr"] <= 1e-1
        assert ("momentum" in params) == (params["optimizer"] == "sgd")
        assert round(params["weight_decay"] / 1e-5, 6).is_integer()
    # log scale: about half the lr draws below the geometric middle of the range
    assert 0.35 < np.mean([p["lr"] < 1e-2 for p in draws]) < 0.65
    assert draw(space.params, base, np.random.default_rng(7)) == draws[0]  # seeded
    params, why = feasible_draw(space.params, space.constraints, base, rng, tries=100)
    assert why is None and params is not None and params["swa_lr"] <= params["lr"]
    none, why = feasible_draw(space.params, ["lr > 1"], base, rng, tries=10)
    assert none is None and why is not None and "'lr > 1' is violated" in why
