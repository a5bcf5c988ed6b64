"""A parameter set the study already finished is answered from that trial, not retrained."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from edgetune.progress import results_table
from tasks.hpo.loop import StudyLoop
from tasks.hpo.repeats import answer, earlier_result
from tasks.hpo.study import Goals

from fakes.engine import FakeStages, FakeTracker, fake_config, memory_study

SPACE = {"lr": {"type": "categorical", "choices": [0.01, 0.03]}}


def _run(tmp_path: Path, repeats: str) -> tuple[StudyLoop, FakeStages, dict]:
    config = fake_config(
        tmp_path, n_trials=6, parallel=1, sampler="random", search_space=SPACE, repeats=repeats
    )
    stages = FakeStages(config)
    loop = StudyLoop(
        config,
        memory_study(config),
        stages=stages,
        logger=logging.getLogger("test-repeats"),
        tracker=FakeTracker(),  # type: ignore[arg-type]
    )
    return loop, stages, loop.run()


def test_a_repeated_point_is_answered_without_training(tmp_path: Path) -> None:
    loop, stages, result = _run(tmp_path, "reuse")

    trials = loop.study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    firsts = {}
    for trial in trials:
        firsts.setdefault(trial.params["lr"], trial)
    assert len(firsts) == 2  # two points, six asks: four repeats
    # only the first trial of each point trained, compiled and went to the board
    assert sorted(w.trial for w in stages.of("train")) == sorted(t.number for t in firsts.values())
    assert len(stages.of("device")) == 2
    for trial in trials:
        first = firsts[trial.params["lr"]]
        if trial.number == first.number:
            assert "repeat_of" not in trial.user_attrs
            continue
        assert trial.user_attrs["repeat_of"] == first.number
        assert trial.value == first.value
        assert trial.user_attrs["mlflow_run_id"] == first.user_attrs["mlflow_run_id"]
        assert "train_started" not in trial.user_attrs  # its times are not the earlier one's
    states = results_table(result).columns[-1]._cells
    assert sum("(repeat of trial" in s for s in states) == 4
    assert result["counts"]["COMPLETE"] == 6


def test_repeats_train_again_when_asked(tmp_path: Path) -> None:
    loop, stages, _ = _run(tmp_path, "train")
    assert len(stages.of("train")) == 6
    assert not any("repeat_of" in t.user_attrs for t in loop.study.get_trials())


def test_a_pruned_point_is_pruned_again_at_the_same_epochs() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lr = FloatDistribution(0.001, 0.1)
    pruned = study.ask({"lr": lr})
    for step, value in enumerate([0.4, 0.3]):
        pruned.report(value, step)
    study.tell(pruned, state=TrialState.PRUNED)
    study.enqueue_trial({"lr": pruned.params["lr"]})
    again = study.ask({"lr": lr})
    earlier = earlier_result(study.get_trials(), again)
    assert earlier is not None and earlier.number == pruned.number
    goals = Goals(metrics=("device_augrc",), directions=("minimize",))
    assert answer(study, again, earlier, goals) == TrialState.PRUNED
    told = study.trials[again.number]
    assert told.state == TrialState.PRUNED and told.intermediate_values == {0: 0.4, 1: 0.3}
    assert told.user_attrs["repeat_of"] == pruned.number
    assert earlier_result(study.get_trials(), study.ask({"lr": lr})) is None  # a new point
