"""After the search: the best parameters trained again, measured, registered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.config import ConfigError, parse_config
from tasks.data import DataError, inspect_dataset

from conftest import tiny_config


def test_data_splits_are_checked(digits_root: Path, tmp_path: Path) -> None:
    raw = tiny_config(digits_root, tmp_path / "r")
    raw["data"].update(train_splits=["train", "val"], eval_split="val")
    with pytest.raises(ConfigError, match=r"data\.eval_split: val is also a training split"):
        parse_config(raw)
    raw["data"].update(train_splits=["train", "train"], eval_split="test")
    with pytest.raises(ConfigError, match=r"data\.train_splits: .* once each"):
        parse_config(raw)


def test_a_search_on_the_test_split_is_refused(digits_root: Path, tmp_path: Path) -> None:
    raw = tiny_config(digits_root, tmp_path / "r", data={"eval_split": "test"})
    with pytest.raises(
        ConfigError, match=r"data\.eval_split: test would choose the hyper"
    ) as caught:
        parse_config(raw)
    assert "\n" not in str(caught.value)
    raw["study"]["derived_from"] = "r"  # the final model of a search: measured on test
    assert parse_config(raw).data.eval_split == "test"


def test_train_and_val_needs_a_test_split(digits_root: Path, tmp_path: Path) -> None:
    from tasks.preflight import preflight

    root = tmp_path / "no-test"
    shutil.copytree(digits_root, root)
    shutil.rmtree(root / "test")
    config = parse_config(tiny_config(root, tmp_path / "r", study={"retrain": "train+val"}))
    with pytest.raises(DataError, match=r"study\.retrain: train\+val measures the final model on"):
        preflight(config)
    # a final model (a study derived from a search) is measured on test
    other = parse_config(
        tiny_config(root, tmp_path / "r2", data={"eval_split": "test"}, study={"derived_from": "s"})
    )
    with pytest.raises(DataError, match=r"data\.eval_split: test/ not found in"):
        preflight(other)


def test_a_detector_retrains_on_train_only() -> None:
    from tasks.detection.config import DetectorStudyConfig

    with pytest.raises(ValueError, match=r"retrain: train\+val needs a test split"):
        DetectorStudyConfig(name="d", retrain="train+val")
    assert DetectorStudyConfig(name="d", retrain="train").retrain == "train"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_the_best_parameters_retrain_on_train_and_val(digits_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from flows.tune import tune
    from tasks.hpo.study import best_trial, open_study

    config = parse_config(
        tiny_config(digits_root, tmp_path / "rt", study={"n_trials": 2, "retrain": "train+val"})
    )
    result = tune(config.model_dump(mode="json"))
    search = open_study(config.storage_url, config.study, config.seed, create=False)
    best = best_trial(search)
    retrained = result["retrained"]
    assert retrained["study"] == "rt-final" and retrained["from_trial"] == best.number
    assert retrained["seed"] == config.seed + 1 and retrained["data"] == "train+val"
    assert retrained["counts"]["COMPLETE"] == 1

    final_cfg = config.model_copy(
        update={"study": config.study.model_copy(update={"name": "rt-final"})}
    )
    final = open_study(final_cfg.storage_url, final_cfg.study, config.seed, create=False)
    (trial,) = final.get_trials()
    assert trial.params == best.params and trial.user_attrs["reused_from"] == best.number
    info = inspect_dataset(digits_root)
    counts = info.counts()
    # trained on train and val, measured on the test split
    assert trial.user_attrs["train_images"] == counts["train"] + counts["val"]
    assert best.user_attrs["train_images"] == counts["train"]
    client = MlflowClient(config.tracking_uri)
    parent = final.user_attrs["mlflow_parent_run_id"]
    bundle = client.download_artifacts(parent, "inputs/val_bundle.npz", str(tmp_path))
    assert len(np.load(bundle)["labels"]) == counts["test"]
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    # measured on test, reported under test names: never under the selection metric's
    assert run.data.metrics["test_device_augrc"] == pytest.approx(trial.values[0])
    assert run.data.metrics["test_float_augrc"] == trial.user_attrs["test_float_augrc"]
    assert run.data.metrics["test_augrc_gap"] == pytest.approx(
        trial.values[0] - run.data.metrics["test_float_augrc"]
    )
    names = set(run.data.metrics)
    assert not {"device_augrc", "float_augrc", "val_augrc", "device_accuracy"} & names
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_augrc")] == [0, 1]
    assert final.user_attrs["objective"] == "test_device_augrc"
    assert retrained["objective"] == "test_device_augrc"
    assert retrained["best"]["test_device_augrc"] == pytest.approx(trial.values[0])
    from edgetune.progress import retrained_line

    line = retrained_line(retrained, "device AUGRC", "device_augrc")
    assert f"test device AUGRC {trial.values[0]:.5f}" in line
    # the final model has its own alias; measured on test, it is not compared with the
    # champion (measured on val), which stays, and the summary says why
    name = config.registered_model_name
    version = client.get_model_version_by_alias(name, "final")
    assert version.run_id == run.info.run_id and version.tags["study"] == "rt-final"
    assert str(retrained["champion"]["version"]) == str(version.version)
    assert retrained["champion"]["alias"] == "final"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    assert "has no test_device_augrc to compare with" in retrained["champion"]["note"]
    # the final report: `edgetune evaluate` measures the champion on test again, and says so
    from typer.testing import CliRunner

    from edgetune.cli import app

    run_dir = str(config.run_path)
    shown = CliRunner().invoke(app, ["evaluate", run_dir, "--split", "test", "--json"])
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.output)
    assert record["version"] == str(version.version) and record["split"] == "test"
    measured = record["metrics"]
    assert measured["test_device_augrc"] == pytest.approx(trial.values[0], abs=1e-12)
    assert measured["test_float_augrc"] == pytest.approx(
        trial.user_attrs["test_float_augrc"], abs=1e-9
    )
    assert measured["test_images"] == counts["test"]
    assert not [k for k in measured if k.startswith(("device_augrc", "float_", "val_"))]
    tagged = client.get_model_version(config.registered_model_name, version.version).tags
    assert float(tagged["test_device_augrc"]) == pytest.approx(measured["test_device_augrc"])
    # a model trained on val is not measured on val
    refused = CliRunner().invoke(app, ["evaluate", run_dir, "--split", "val"])
    assert refused.exit_code == 2
    assert "the model trained on val" in refused.output and "\n" not in refused.output.strip()
    # each study keeps its own records: the search's in hpo/, the final one's beside them
    status = json.loads((config.run_path / "hpo" / "status.json").read_text())
    assert status["study"] == "rt" and len(status["trials"]) == 2
    final_status = json.loads((config.run_path / "rt-final" / "hpo" / "status.json").read_text())
    assert final_status["study"] == "rt-final" and len(final_status["trials"]) == 1
