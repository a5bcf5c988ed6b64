"""Search-space files: ranges, log scale with step, conditions, expressions, constraints."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from tasks.config import ConfigError, load_config, parse_config
from tasks.hpo.study import ATTR_APPLIED, open_study, suggest
from tasks.space import ExpressionError, parse_expr, violated

from conftest import tiny_config

SPACE_FILE = {
    "params": {
        "epochs": {"type": "int", "low": 8, "high": 16, "step": 4},
        "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
        "optimizer": {"type": "categorical", "choices": ["sgd", "adamw"]},
        "momentum": {"type": "float", "low": 0.8, "high": 0.95, "when": {"optimizer": "sgd"}},
        "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "step": 1e-5},
        "swa_start": {"type": "int", "low": "epochs / 2", "high": "3 * epochs / 4"},
        "swa_lr": {"type": "float", "low": 0.001, "high": 0.1, "step": 0.001},
    },
    "constraints": ["swa_lr <= lr"],
}


def _write(folder: Path, name: str, data: Any) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _config_with_space(
    tmp_path: Path, space: Any, digits: Path | None = None, **study: Any
) -> Path:
    """A config in ``tmp_path/cfg`` naming the space file ``spaces/x.yaml`` next to it."""
    _write(tmp_path / "cfg" / "spaces", "x.yaml", space)
    raw = tiny_config(digits or tmp_path / "data", tmp_path / "run")
    raw["study"]["search_space"] = "spaces/x.yaml"
    raw["study"].update(study)
    return _write(tmp_path / "cfg", "study.yaml", raw)


# The file -------------------------------------------------------------------------------------
def test_a_space_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    config = load_config(_config_with_space(tmp_path, SPACE_FILE, constraints=["lr < 0.09"]))
    space = config.study.search_space
    assert list(space) == list(SPACE_FILE["params"])
    assert space["swa_start"].low == "epochs / 2" and space["swa_start"].dynamic
    assert space["momentum"].when == {"optimizer": ["sgd"]}
    assert space["weight_decay"].log and space["weight_decay"].step == 1e-5
    # the file's constraints first, then the config's own
    assert config.study.constraints == ["swa_lr <= lr", "lr < 0.09"]
    assert config.study.search_space_file == str((tmp_path / "cfg/spaces/x.yaml").resolve())
    # the resolved config holds the space itself: it re-runs without the file
    again = parse_config(config.model_dump(mode="json"))
    assert again.study.search_space == space


def test_the_shipped_space_file_loads() -> None:
    root = Path(__file__).resolve().parents[2]
    config = load_config(
        root / "configs/hi4lines-classifier.yaml",
        [f"study.search_space={root / 'configs/search_spaces/fmfp.yaml'}", "data.root=."],
    )
    assert config.study.search_space_file is not None
    assert config.study.search_space_file.endswith("configs/search_spaces/fmfp.yaml")
    assert config.study.search_space["swa_start"].dynamic


def _refusal(tmp_path: Path, space: Any, **study: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(_config_with_space(tmp_path, space, **study))
    message = str(caught.value)
    assert "\n" not in message
    return message


def _with(**params: Any) -> dict[str, Any]:
    return {"params": {**SPACE_FILE["params"], **params}, "constraints": []}


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        (
            _with(lr={"type": "float", "low": 0.001, "hihg": 0.1}),
            r"x\.yaml: params\.lr\.hihg: unknown key \(did you mean 'high'\?\)",
        ),
        (
            _with(swa_start={"type": "int", "low": "epoch / 2", "high": 9}),
            r"x\.yaml: params\.swa_start\.low: 'epoch' is not a parameter or training setting; "
            r"use one of .*\(did you mean 'epochs'\?\)",
        ),
        (
            {
                "params": {
                    "swa_start": {"type": "int", "low": "epochs / 2", "high": 9},
                    "epochs": {"type": "int", "low": 8, "high": 16},
                }
            },
            r"x\.yaml: params\.swa_start\.low: reads epochs, which is drawn after swa_start; "
            r"list epochs before swa_start",
        ),
        (
            _with(swa_start={"type": "int", "low": "epochs / (2", "high": 9}),
            r"x\.yaml: params\.swa_start\.low: cannot read 'epochs / \(2'",
        ),
        (
            _with(lr={"type": "float", "low": "__import__('os').getpid()", "high": 0.1}),
            r"params\.lr\.low: .*only the functions min, max, abs, round may be called",
        ),
        (
            {"params": SPACE_FILE["params"], "constraints": ["swa_lr <= learning_rate"]},
            r"x\.yaml: constraints\[0\]: 'learning_rate' is not a parameter",
        ),
        (
            _with(momentum={"type": "float", "low": 0.8, "high": 0.9, "when": {"optim": "sgd"}}),
            r"params\.momentum\.when: 'optim' is not a parameter .*did you mean 'optimizer'",
        ),
        (
            {"param": SPACE_FILE["params"]},
            r"x\.yaml: params: required key is missing; param: unknown key",
        ),
    ],
    ids=["key", "name", "order", "syntax", "call", "constraint", "when", "top"],
)
def test_a_bad_space_file_is_refused_at_its_key(tmp_path: Path, space: Any, expected: str) -> None:
    message = _refusal(tmp_path, space)
    assert re.search(expected, message), message


def test_ranges_that_can_be_empty_or_break_a_rule_are_refused(tmp_path: Path) -> None:
    empty = _with(swa_start={"type": "int", "low": "epochs / 2", "high": "epochs / 4"})
    message = _refusal(tmp_path, empty)
    assert "params.swa_start: the range ['epochs / 2', 'epochs / 4'] is empty (4 > 2)" in message
    assert "for epochs=8" in message
    # swa_start may reach the last epoch: the joint check sees it at a corner
    late = _with(swa_start={"type": "int", "low": "epochs / 2", "high": "epochs"})
    assert "SWA must start before the last epoch, but swa_start can be 8 with epochs=8" in (
        _refusal(tmp_path, late)
    )
    missing = tmp_path / "other"
    raw = tiny_config(tmp_path / "data", tmp_path / "run")
    raw["study"]["search_space"] = "nowhere.yaml"
    path = _write(missing, "c.yaml", raw)
    with pytest.raises(ConfigError, match=r"study\.search_space: file .*nowhere\.yaml' not found"):
        load_config(path)
    fixed = {k: SPACE_FILE["params"][k] for k in ("epochs", "swa_start")}
    grid = _refusal(tmp_path, {"params": fixed}, sampler="grid")
    assert "params.swa_start: the grid sampler needs fixed ranges" in grid


def test_a_value_the_settings_refuse_names_the_file(tmp_path: Path, digits_root: Path) -> None:
    from tasks.preflight import check_search_space

    space = _with(batch_size={"type": "int", "low": "epochs - 8", "high": 64})
    config = load_config(_config_with_space(tmp_path, space, digits_root))
    with pytest.raises(ConfigError) as caught:
        check_search_space(config)
    assert str(caught.value).startswith(f"{config.study.search_space_file}: params.batch_size: ")
    assert "a trial could draw 0 (with epochs=8" in str(caught.value)


# Expressions ----------------------------------------------------------------------------------
def test_expressions_evaluate_without_eval() -> None:
    assert parse_expr("3 * epochs / 4")({"epochs": 200}) == 150
    assert parse_expr("max(1, epochs // 3) + 2 ** 2")({"epochs": 10}) == 7
    assert parse_expr("optimizer in ['sgd'] and not lr > 0.1")({"optimizer": "sgd", "lr": 0.05})
    assert parse_expr("epochs / 2").names == {"epochs"}
    for bad in ("lr.__class__", "[x for x in y]", "lambda: 1", "open('f')", "a if b else c"):
        with pytest.raises(ExpressionError):
            parse_expr(bad)
    assert violated(["swa_lr <= lr"], {"swa_lr": 0.2, "lr": 0.1}) == (
        "constraint 'swa_lr <= lr' is violated (lr=0.1, swa_lr=0.2)"
    )
    assert violated(["swa_lr <= lr"], {"swa_lr": 0.05, "lr": 0.1}) is None


# Sampling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp"])
def test_samples_follow_the_ranges_conditions_and_steps(tmp_path: Path, sampler: str) -> None:
    config = load_config(_config_with_space(tmp_path, SPACE_FILE, sampler=sampler))
    study = open_study(f"sqlite:///{tmp_path / 'o.db'}", config.study, seed=3)
    base = config.train.model_dump()
    seen_optimizers = set()
    for _ in range(24):
        trial = study.ask()
        params = suggest(trial, config.study.search_space, base)
        epochs = params["epochs"]
        assert epochs in (8, 12, 16)
        assert math.ceil(epochs / 2) <= params["swa_start"] <= math.floor(3 * epochs / 4)
        assert ("momentum" in params) == (params["optimizer"] == "sgd")
        seen_optimizers.add(params["optimizer"])
        # log scale with a step: the value trained with is a multiple of the step
        wd = params["weight_decay"]
        assert 1e-5 <= wd <= 1e-3 and abs(wd / 1e-5 - round(wd / 1e-5)) < 1e-6
        assert trial.user_attrs[ATTR_APPLIED] == params  # it differs from the drawn value
        assert abs(params["swa_lr"] / 0.001 - round(params["swa_lr"] / 0.001)) < 1e-6
        study.tell(trial, params["lr"] + params["swa_start"] / 100)
    assert seen_optimizers == {"sgd", "adamw"}


# A study --------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_study_rejects_samples_that_break_a_constraint(tmp_path: Path, digits_root: Path) -> None:
    """Rejected samples run nothing and do not count: the study still gets its trials."""
    from mlflow import MlflowClient

    from flows.tune import tune

    space = {
        "params": {
            "optimizer": {"type": "categorical", "choices": ["sgd", "adamw"]},
            "momentum": {"type": "float", "low": 0.8, "high": 0.95, "when": {"optimizer": "sgd"}},
            "epochs": {"type": "int", "low": 2, "high": 4},
            "swa_start": {"type": "int", "low": "epochs / 2", "high": "epochs - 1"},
            "lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
        },
        # the first draw of seed 0 (lr 0.035) breaks it
        "constraints": ["lr >= 0.036"],
    }
    path = _config_with_space(tmp_path, space, digits_root, n_trials=3, parallel=1)
    config = load_config(path)
    result = tune(config.model_dump(mode="json"))
    assert result["counts"]["COMPLETE"] == 3
    study = open_study(config.storage_url, config.study, config.seed, create=False)
    rejected = [t for t in study.trials if t.user_attrs.get("rejected")]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert rejected and result["counts"]["REJECTED"] == len(rejected)
    assert result["counts"]["FAIL"] == 0
    for trial in rejected:
        assert trial.state == optuna.trial.TrialState.PRUNED  # for TPE, with its shortfall
        assert trial.constraints["lr >= 0.036"] > 0
        assert trial.user_attrs["fail_reason"].startswith("constraint 'lr >= 0.036' is violated")
        assert trial.params["lr"] < 0.036 and "mlflow_run_id" not in trial.user_attrs
    client = MlflowClient(config.tracking_uri)
    for trial in done:
        assert trial.params["lr"] >= 0.036
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        logged = run.data.params
        assert logged["optimizer"] == trial.params["optimizer"]
        assert ("momentum" in logged) == (trial.params["optimizer"] == "sgd")
        epochs = trial.params["epochs"]
        # the training ran the drawn length, with SWA inside it
        assert len(client.get_metric_history(run.info.run_id, "val_augrc")) == epochs
        assert math.ceil(epochs / 2) <= trial.params["swa_start"] <= epochs - 1
    assert len(client.search_runs([run.info.experiment_id], "tags.edgetune.trial != ''")) == 3
