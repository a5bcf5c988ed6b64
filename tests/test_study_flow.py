"""A whole study through the Prefect flows: ask/tell, stages, MLflow, registry, the board lock."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient

from tasks.config import load_config, parse_config
from tasks.hpo.study import open_study

from conftest import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def _run(raw: dict[str, Any]) -> tuple[dict[str, Any], Any, optuna.Study]:
    from flows.tune import tune

    config = parse_config(raw)
    result = tune(config.model_dump(mode="json"))
    return result, config, open_study(config.storage_url, config.study, config.seed, create=False)


def test_study_end_to_end(digits_root: Path, tmp_path: Path) -> None:
    result, config, study = _run(tiny_config(digits_root, tmp_path / "e2e"))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert result["counts"]["COMPLETE"] == 2
    for trial in trials:
        assert 0.0 <= trial.value <= 0.5
        assert 0.0 <= trial.user_attrs["float_augrc"] <= 0.5
        assert (
            trial.user_attrs["device_augrc_ci_low"]
            <= trial.value
            <= trial.user_attrs["device_augrc_ci_high"]
        )
        assert trial.user_attrs["train_finished"] <= trial.user_attrs["compile_started"]
        assert trial.user_attrs["compile_finished"] <= trial.user_attrs["device_started"]
        # The float→device gaps of every trial (device − float)
        attrs = trial.user_attrs
        assert attrs["augrc_gap"] == pytest.approx(trial.value - attrs["float_augrc"])
        assert attrs["accuracy_gap"] == pytest.approx(
            attrs["device_accuracy"] - attrs["float_accuracy"]
        )
        # The objective of pruning is the objective's own metric: one report per epoch.
        assert sorted(trial.intermediate_values) == [0, 1]

    client = MlflowClient(config.tracking_uri)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["edgetune.kind"] == "study"
    assert parent.data.metrics["best_device_augrc"] == pytest.approx(min(t.value for t in trials))
    assert {a.path for a in client.list_artifacts(parent_id, "inputs")} == {
        "inputs/calibration.npz",
        "inputs/val_bundle.npz",
    }
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert {
            "float_augrc",
            "device_augrc",
            "device_accuracy",
            "device_latency_ms",
            "val_augrc",
            "augrc_gap",
            "accuracy_gap",
        } <= set(child.data.metrics)
        paths = {
            a.path
            for folder in ("model", "compiled", "compile", "device")
            for a in client.list_artifacts(child.info.run_id, folder)
        }
        assert {
            "model/model.onnx",
            "model/checkpoint.pt",
            "compiled/model.int8.onnx",
            "compile/compile.log",
            "device/device_probs.npy",
            "device/device_result.json",
        } <= paths
        history = client.get_metric_history(child.info.run_id, "val_augrc")
        assert [m.step for m in history] == [0, 1]

    best = min(trials, key=lambda t: t.value)
    champion = client.get_model_version_by_alias(config.registered_model_name, "champion")
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    assert champion.tags["trial"] == str(best.number)
    assert result["champion"]["version"] == str(champion.version)

    # The saved config re-runs the same study; running it again adds no trial.
    saved = load_config(config.run_path / "config.yaml")
    assert saved == config
    again, _, study = _run(saved.model_dump(mode="json"))
    assert len(study.get_trials()) == 2 and again["counts"]["COMPLETE"] == 2
    # The same champion keeps its version: running again registers nothing new.
    assert again["champion"]["version"] == str(champion.version)
    assert len(client.search_model_versions(f"name = '{config.registered_model_name}'")) == 1


def test_a_board_left_taken_fails_clearly_and_release_frees_it(
    digits_root: Path, tmp_path: Path
) -> None:
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from typer.testing import CliRunner

    from edgetune.cli import app
    from tasks.board import BoardBusyError, ensure_device_limit, hold_board

    raw = tiny_config(digits_root, tmp_path / "stuck")
    raw["device"]["wait_timeout_s"] = 2
    config = parse_config(raw)
    name = config.device.concurrency_limit
    ensure_device_limit(name)
    with get_client(sync_client=True) as client:  # a run killed on the board kept its slot
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))
    started = time.monotonic()
    with (
        pytest.raises(BoardBusyError, match=r"stayed busy for 2 s .*edgetune device release"),
        hold_board(config),
    ):
        pass
    assert time.monotonic() - started >= 2
    path = tmp_path / "stuck.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["device", "release", str(path)])
    assert result.exit_code == 0, result.output
    assert f"released 1 slot(s) of {name}" in result.output
    with hold_board(config), get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1  # ours now
