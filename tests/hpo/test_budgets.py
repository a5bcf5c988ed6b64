"""Budgets and stopping (time, HPO time ratio, patience) and the time pruning saved."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from tasks.config import StudyConfig
from tasks.hpo.study import budget_stop, full_training_s, pruning_savings, trials_since_best

from conftest import tiny_config

T0 = datetime(2026, 1, 1)


def _made(
    number: int, state: TrialState, value: float | None, attrs: dict[str, Any]
) -> FrozenTrial:
    trial = optuna.trial.create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"lr": 0.01},
        distributions={"lr": FloatDistribution(1e-3, 1e-1, log=True)},
        user_attrs=attrs,
    )
    trial.number = number
    trial.datetime_complete = T0 + timedelta(minutes=number)
    return trial


def _trained(number: int, value: float, seconds: float) -> FrozenTrial:
    return _made(
        number,
        TrialState.COMPLETE,
        value,
        {"train_started": 100.0, "train_finished": 100.0 + seconds},
    )


def test_the_time_budget_counts_from_the_start_of_this_run() -> None:
    config = StudyConfig(name="s", time_budget="1h30m")
    assert config.time_budget_s == 5400
    assert budget_stop(config, [], started=0, now=5399) is None
    assert budget_stop(config, [], started=0, now=5400) == (
        "time budget 1h30m reached after 5400 s"
    )


def test_the_hpo_time_ratio_waits_for_one_full_training() -> None:
    config = StudyConfig(name="s", hpo_time_ratio=3)
    pruned = _made(0, TrialState.PRUNED, None, {"train_started": 0.0, "train_finished": 5.0})
    assert full_training_s([pruned]) is None  # a pruned training is not a full one
    assert budget_stop(config, [pruned], started=0, now=10_000) is None
    trials = [pruned, _trained(1, 0.2, 100), _trained(2, 0.1, 140), _trained(3, 0.3, 120)]
    assert full_training_s(trials) == 120  # the median
    assert budget_stop(config, trials, started=0, now=359) is None
    assert budget_stop(config, trials, started=0, now=360) == (
        "HPO time ratio 3 reached: 360 s is 3.0 x one full training (120.0 s)"
    )


@pytest.mark.parametrize("maximize", [False, True])
def test_patience_counts_finished_trials_since_the_best(maximize: bool) -> None:
    sign = -1 if maximize else 1
    values = [0.3, 0.2, 0.25, None, 0.21, 0.2]  # None: pruned; the last one only ties
    trials = [
        _made(
            i,
            TrialState.PRUNED if v is None else TrialState.COMPLETE,
            None if v is None else sign * v,
            {},
        )
        for i, v in enumerate(values)
    ]
    trials.append(_made(6, TrialState.FAIL, None, {}))  # a failure says nothing about it
    assert trials_since_best(trials, maximize) == (4, 1)
    config = StudyConfig(name="s", patience=4)
    assert budget_stop(config, trials, 0, 0, maximize) == (
        "no improvement in the 4 trials finished since the best (trial 1)"
    )
    assert budget_stop(StudyConfig(name="s", patience=5), trials, 0, 0, maximize) is None
    assert trials_since_best(trials[:1], maximize) == (0, 0)
    assert trials_since_best([], maximize) == (0, None)


def test_pruning_savings_add_up_what_pruned_trials_did_not_spend() -> None:
    stages = {"compile_started": 0.0, "compile_finished": 4.0, "device_started": 10.0}
    done = [
        _made(0, TrialState.COMPLETE, 0.1, {**stages, "device_finished": 13.0}),
        _made(
            1,
            TrialState.COMPLETE,
            0.2,
            {**stages, "compile_finished": 6.0, "device_finished": 15.0},
        ),
    ]
    # 2 of 8 epochs in 10 s (5 s/epoch: 30 s saved) and 1 of 4 in 2 s (6 s saved)
    pruned = [
        _made(
            2,
            TrialState.PRUNED,
            None,
            {"train_started": 0.0, "train_finished": 10.0, "epochs_run": 2, "epochs_planned": 8},
        ),
        _made(
            3,
            TrialState.PRUNED,
            None,
            {"train_started": 5.0, "train_finished": 7.0, "epochs_run": 1, "epochs_planned": 4},
        ),
    ]
    assert pruning_savings(done) is None
    saved = pruning_savings(done + pruned)
    assert saved == {
        "trials": 2,
        "epochs": 9,
        "train_s": pytest.approx(36.0),
        "compile_s": pytest.approx(2 * 5.0),  # the median compilation, once per pruned trial
        "board_s": pytest.approx(2 * 4.0),
    }
    assert pruning_savings(pruned)["compile_s"] is None  # nothing completed yet


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_pruned_trial_skips_the_board_and_patience_ends_the_study(
    digits_root: Path, tmp_path: Path
) -> None:
    """ASHA prunes a barely trained trial after its first rung: it is never compiled nor
    run on the board; patience 1 then stops the study well before n_trials."""
    from mlflow import MlflowClient

    from edgetune.progress import pruning_line
    from flows.tune import tune
    from tasks.config import parse_config
    from tasks.hpo.study import open_study

    raw = tiny_config(
        digits_root,
        tmp_path / "budget",
        # the pruner judges from swa_start (its default warm-up): here from epoch 1
        train={"epochs": 4, "swa_start": 1, "batch_size": 128, "lr": 0.05, "swa_lr": 0.02},
        study={
            "n_trials": 6,
            "parallel": 1,
            "pruner": "asha",
            "patience": 1,
            "search_space": {"lr": {"type": "float", "low": 1e-6, "high": 0.1, "log": True}},
        },
        # blocking: trial 1 is asked once trial 0 has its result, so patience sees it
        orchestration={"pipelined": False},
    )
    config = parse_config(raw)
    study = open_study(config.storage_url, config.study, config.seed)
    study.enqueue_trial({"lr": 0.05})  # learns
    study.enqueue_trial({"lr": 1e-6})  # barely moves: worse at the first rung
    result = tune(config.model_dump(mode="json"))

    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    assert (
        result["stopped_by"] == "no improvement in the 1 trials finished since the best (trial 0)"
    )
    done, pruned = trials
    assert pruned.user_attrs["epochs_run"] == 2 and pruned.user_attrs["epochs_planned"] == 4
    assert "compile_started" not in pruned.user_attrs
    assert "device_started" not in pruned.user_attrs
    client = MlflowClient(config.tracking_uri)
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.data.tags["edgetune.state"] == "PRUNED"
    assert not [
        a for a in client.list_artifacts(run.info.run_id) if a.path in ("compiled", "device")
    ]
    assert "device_augrc" not in run.data.metrics

    saved = result["pruning_saved"]
    span = pruned.user_attrs["train_finished"] - pruned.user_attrs["train_started"]
    assert saved["trials"] == 1 and saved["epochs"] == 2
    assert saved["train_s"] == pytest.approx(span)  # 2 epochs left at its own pace
    attrs = done.user_attrs
    assert saved["compile_s"] == pytest.approx(attrs["compile_finished"] - attrs["compile_started"])
    assert saved["board_s"] == pytest.approx(attrs["device_finished"] - attrs["device_started"])
    assert pruning_line(saved).startswith(
        "pruning stopped 1 trial early, saving ~2 training epochs"
    )
