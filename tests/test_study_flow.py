"""A whole study through the Prefect flows: ask/tell, stages, MLflow, registry, the board lock."""

from __future__ import annotations

import os
import tempfile
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
        # the full resolved settings of the trial, its sampled values in train.*
        params = child.data.params
        assert (params["model.arch"], params["data.image_size"]) == ("tinycnn", "16")
        assert float(params["train.lr"]) == pytest.approx(float(params["lr"]))
        assert params["train.epochs"] == "2" and not any(k.startswith("study.") for k in params)
        history = client.get_metric_history(child.info.run_id, "val_augrc")
        assert [m.step for m in history] == [0, 1]

    best = min(trials, key=lambda t: t.value)
    champion = client.get_model_version_by_alias(config.registered_model_name, "champion")
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    assert champion.tags["trial"] == str(best.number)
    assert result["champion"]["version"] == str(champion.version)
    _champion_is_an_mlflow_model(config, client, champion, digits_root)

    # The saved config re-runs the same study; running it again adds no trial.
    saved = load_config(config.run_path / "config.yaml")
    assert saved == config
    again, _, study = _run(saved.model_dump(mode="json"))
    assert len(study.get_trials()) == 2 and again["counts"]["COMPLETE"] == 2
    # The same champion keeps its version: running again registers nothing new.
    assert again["champion"]["version"] == str(champion.version)
    assert len(client.search_model_versions(f"name = '{config.registered_model_name}'")) == 1


def _champion_is_an_mlflow_model(
    config: Any, client: MlflowClient, champion: Any, digits_root: Path
) -> None:
    """The champion loads as an MLflow model (ONNX flavour and pyfunc) and its predictions
    are the probabilities the board measured, from plain uint8 images."""
    import mlflow
    import numpy as np

    uri = f"models:/{config.registered_model_name}@champion"
    mlflow.set_tracking_uri(config.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
        onnx_model = mlflow.onnx.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
    meta = model.metadata.metadata["edgetune"]
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert meta["image_size"] == [16, 16]
    assert meta["normalisation"]["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert meta["compiled_artifact"] == "compiled/model.int8.onnx"
    assert (meta["study"], meta["objective"]) == ("e2e", "device_augrc")
    inputs = model.metadata.get_input_schema().inputs
    assert [(i.name, str(i.type), i.shape) for i in inputs] == [
        ("images", "uint8", (-1, 16, 16, 3))
    ]
    assert [i.name for i in onnx_model.graph.input] == ["images"]

    # The evaluated split as the board got it, and the board's probabilities.
    with tempfile.TemporaryDirectory() as tmp:
        bundle_path = mlflow.artifacts.download_artifacts(
            run_id=client.get_run(champion.run_id).data.tags["mlflow.parentRunId"],
            artifact_path="inputs/val_bundle.npz",
            dst_path=tmp,
            tracking_uri=config.tracking_uri,
        )
        board_path = mlflow.artifacts.download_artifacts(
            run_id=champion.run_id,
            artifact_path="device/device_probs.npy",
            dst_path=tmp,
            tracking_uri=config.tracking_uri,
        )
        images = np.load(bundle_path)["images"]
        board = np.load(board_path)
        files = {
            p.name
            for p in Path(
                mlflow.artifacts.download_artifacts(
                    f"{client.get_model_version_download_uri(config.registered_model_name, champion.version)}",
                    dst_path=f"{tmp}/model",
                    tracking_uri=config.tracking_uri,
                )
            ).rglob("*")
        }
    assert {"MLmodel", "model.onnx", "model.int8.onnx", "serving_input_example.json"} <= files
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
    probabilities = model.predict(images)["probabilities"]
    assert probabilities.shape == (len(images), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, board, atol=1e-5)
    served = _serve(uri, config.tracking_uri, images[:3])
    np.testing.assert_allclose(served["probabilities"], board[:3], atol=1e-5)


def _serve(uri: str, tracking_uri: str, images: Any) -> dict[str, Any]:
    """``mlflow models serve`` on loopback in this environment (offline), one request."""
    import json
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_bin, "models", "serve", "-m", uri, "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_uri,
            # it starts uvicorn from PATH: the environment's bin folder, as when activated
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(server.stderr.read().decode()[-2000:]) from None
                time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return dict(json.loads(response.read())["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=30)


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
    # Freed, the board is taken at once; the wait allowed is generous only so that a slow
    # server (the suite under load) does not read as a board still taken.
    raw["device"]["wait_timeout_s"] = 60
    with hold_board(parse_config(raw)), get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1  # ours now
