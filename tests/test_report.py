"""The classifier report (``tasks.report``): per-class figures, confusions, the float/board
difference, the deployment threshold and the galleries, on synthetic outputs whose answers
are known, including a very imbalanced set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.metrics import coverage_at_risk, operating_points
from tasks.report import ReportError, ReportInputs, confusion, write_report
from tasks.sheets import CAPTION


def _outputs(labels: np.ndarray, k: int, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities whose argmax is the label for about ``accuracy`` of the images."""
    n = len(labels)
    predicted = np.where(rng.random(n) < accuracy, labels, rng.integers(0, k, n))
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), predicted] += 3.0
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def _inputs(counts: list[int], seed: int = 0) -> ReportInputs:
    """A synthetic split with ``counts`` images per class, float outputs, and board
    outputs that change some of the float predictions."""
    rng = np.random.default_rng(seed)
    k = len(counts)
    labels = np.repeat(np.arange(k), counts)
    floating = _outputs(labels, k, 0.85, rng)
    device = floating.copy()
    changed = rng.choice(len(labels), size=len(labels) // 10, replace=False)
    device[changed] = np.roll(device[changed], 1, axis=1)  # another class wins there
    images = rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
    return ReportInputs(
        labels=labels,
        classes=[f"class{c}" for c in range(k)],
        images=images,
        paths=[f"val/class{y}/{i}.png" for i, y in enumerate(labels)],
        predictions={"float": floating, "device": device},
    )


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _matrix(path: Path) -> np.ndarray:
    rows = _csv(path)
    return np.array([[int(v) for k, v in row.items() if k != "true \\ predicted"] for row in rows])


@pytest.mark.parametrize(
    "counts", [[40, 35, 45, 30], [300, 24, 6]], ids=["digits-like", "imbalanced"]
)
def test_the_report_adds_up(tmp_path: Path, counts: list[int]) -> None:
    inputs = _inputs(counts)
    out = tmp_path / "report"
    summary = write_report(inputs, out, title="t", gallery=8)
    labels, k = inputs.labels, len(counts)
    for name, probs in inputs.predictions.items():
        matrix = _matrix(out / f"confusion_{name}.csv")
        assert matrix.shape == (k, k)
        assert matrix.sum(axis=1).tolist() == counts  # rows: the class supports
        predicted = probs.argmax(axis=1)
        assert matrix.sum(axis=0).tolist() == np.bincount(predicted, minlength=k).tolist()
        assert summary["models"][name]["accuracy"] == pytest.approx(np.trace(matrix) / len(labels))
        table = _csv(out / "per_class.csv")
        assert [int(row["support"]) for row in table] == counts
        for c, row in enumerate(table):
            recall = matrix[c, c] / matrix[c].sum()
            precision = matrix[c, c] / matrix[:, c].sum()
            assert float(row[f"{name}_recall"]) == pytest.approx(recall)
            assert float(row[f"{name}_precision"]) == pytest.approx(precision)
            f1 = 2 * precision * recall / (precision + recall)
            assert float(row[f"{name}_f1"]) == pytest.approx(f1)
        pr = _csv(out / f"pr_{name}.csv")
        assert {row["class"] for row in pr} == set(inputs.classes)
        assert all(0.0 <= float(row["precision"]) <= 1.0 for row in pr)
    difference = _matrix(out / "confusion_difference.csv")
    assert (
        difference == _matrix(out / "confusion_device.csv") - _matrix(out / "confusion_float.csv")
    ).all()
    assert difference.sum() == 0 and (difference.sum(axis=1) == 0).all()
    for name in ("confusion_float", "confusion_device", "confusion_difference", "risk_coverage"):
        assert Image.open(out / f"{name}.png").size[0] > 200
    assert json.loads((out / "summary.json").read_text())["images"] == sum(counts)


def test_the_difference_lists_exactly_the_changed_predictions(tmp_path: Path) -> None:
    inputs = _inputs([50, 50, 50])
    summary = write_report(inputs, tmp_path / "r", title="t")
    floating = inputs.predictions["float"].argmax(axis=1)
    device = inputs.predictions["device"].argmax(axis=1)
    labels = inputs.labels
    expected = np.flatnonzero(floating != device)
    rows = _csv(tmp_path / "r" / "changed.csv")
    assert [int(row["index"]) for row in rows] == expected.tolist()
    assert len(expected) > 5
    for row in rows:
        i = int(row["index"])
        assert row["path"] == inputs.paths[i]  # type: ignore[index]
        assert row["label"] == f"class{labels[i]}"
        assert row["float_predicted"] == f"class{floating[i]}"
        assert row["device_predicted"] == f"class{device[i]}"
        kind = (
            "device_wrong"
            if floating[i] == labels[i]
            else "device_right"
            if device[i] == labels[i]
            else "both_wrong"
        )
        assert row["kind"] == kind
    kinds = summary["changed"]
    assert kinds["total"] == len(expected)
    assert kinds["device_wrong"] == int(((floating == labels) & (device != labels)).sum())
    assert kinds["device_right"] == int(((floating != labels) & (device == labels)).sum())
    # the quantized model's new mistakes are the device's errors the float model had not
    new_errors = _matrix(tmp_path / "r" / "confusion_difference.csv")
    assert np.trace(new_errors) == kinds["device_right"] - kinds["device_wrong"]


def test_the_galleries_show_the_most_confident_failures(tmp_path: Path) -> None:
    inputs = _inputs([30, 30])
    write_report(inputs, tmp_path / "r", title="t", gallery=6)
    probs = inputs.predictions["device"]
    wrong = int((probs.argmax(axis=1) != inputs.labels).sum())
    sheet = Image.open(tmp_path / "r" / "failures_device.png")
    shown = min(6, wrong)
    columns = int(np.ceil(np.sqrt(shown)))
    rows = int(np.ceil(shown / columns))
    assert sheet.size == (columns * 98, rows * (96 + CAPTION + 2))  # 8 px tiles scaled to 96
    # the first tile is the most confident failure, pixel for pixel
    errors = np.flatnonzero(probs.argmax(axis=1) != inputs.labels)
    first = errors[np.argmax(probs[errors].max(axis=1))]
    tile = np.asarray(sheet)[:96:12, :96:12]
    assert (tile == inputs.images[first]).all()
    changed = Image.open(tmp_path / "r" / "changed.png")
    assert changed.size[0] > 0


def test_coverage_at_a_target_risk_is_the_largest_that_meets_it() -> None:
    # confidences 0.9 (right), 0.8 (right), 0.7 (wrong), 0.6 (right), 0.5 (wrong)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    labels = np.array([0, 0, 0, 0, 1])
    thresholds, coverage, _, selective = operating_points(probs, labels)
    assert thresholds.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert coverage.tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert selective.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 4, 2 / 5])
    assert coverage_at_risk(probs, labels, 0.0) == (0.4, 0.8, 0.0)
    assert coverage_at_risk(probs, labels, 0.25) == (0.8, 0.6, 0.25)
    assert coverage_at_risk(probs, labels, 0.5) == (1.0, 0.5, pytest.approx(0.4))
    assert coverage_at_risk(np.array([[0.2, 0.8]]), np.array([0]), 0.1) == (0.0, None, 0.0)


def test_float_only_has_no_board_files(tmp_path: Path) -> None:
    full = _inputs([20, 20])
    inputs = ReportInputs(
        full.labels, full.classes, full.images, None, {"float": full.predictions["float"]}
    )
    summary = write_report(inputs, tmp_path / "r", title="t")
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert "changed.csv" not in names and "confusion_device.csv" not in names
    assert {"confusion_float.csv", "per_class.csv", "failures_float.png"} <= names
    assert "changed" not in summary and set(summary["models"]) == {"float"}
    assert set(_csv(tmp_path / "r" / "per_class.csv")[0]) == {
        "class",
        "support",
        "float_precision",
        "float_recall",
        "float_f1",
        "float_average_precision",
        "float_augrc",
    }


def test_a_report_replaces_its_folder_whole_or_leaves_it(tmp_path: Path) -> None:
    inputs = _inputs([20, 20])
    out = tmp_path / "r"
    write_report(inputs, out, title="first")
    write_report(inputs, out, title="second")
    assert json.loads((out / "summary.json").read_text())["title"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary folder left
    wrong = ReportInputs(
        inputs.labels,
        inputs.classes,
        inputs.images,
        None,
        {"float": inputs.predictions["float"][:5]},
    )
    with pytest.raises(ReportError, match=r"not \(40, 2\)"):
        write_report(wrong, out, title="bad")
    assert json.loads((out / "summary.json").read_text())["title"] == "second"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ReportError, match="not an earlier report; choose another folder"):
        write_report(inputs, other, title="t")
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


def test_confusion_counts_by_true_then_predicted() -> None:
    matrix = confusion(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 2]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


# A study's champion and ``edgetune evaluate``, end to end -------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_study_reports_its_champion_and_evaluate_reports_any_model(
    digits_root: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from edgetune.cli import app
    from flows.tune import tune
    from tasks.config import parse_config
    from tasks.data import inspect_dataset
    from tests.conftest import tiny_config

    config = parse_config(tiny_config(digits_root, tmp_path / "rep", study={"n_trials": 2}))
    result = tune(config.model_dump(mode="json"))
    counts = inspect_dataset(digits_root).counts()
    champion = result["champion"]
    client = MlflowClient(config.tracking_uri)
    version = client.get_model_version(champion["model"], champion["version"])
    # the champion's report: from the study's own outputs, on the split it was chosen on
    report = config.run_path / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["images"] == counts["val"] and set(summary["models"]) == {"float", "device"}
    run = client.get_run(version.run_id)
    assert summary["models"]["device"]["augrc"] == pytest.approx(run.data.metrics["device_augrc"])
    assert summary["models"]["float"]["augrc"] == pytest.approx(
        run.data.metrics["float_augrc"], abs=1e-6
    )
    assert sum(int(r["support"]) for r in _csv(report / "per_class.csv")) == counts["val"]
    logged = {a.path for a in client.list_artifacts(version.run_id, "report/val")}
    assert {"report/val/per_class.csv", "report/val/changed.csv"} <= logged
    for row in _csv(report / "changed.csv"):
        assert (digits_root / row["path"]).is_file() and row["path"].startswith("val/")

    cli = CliRunner()
    # a registered model on test, on the board: its report in the study's evaluation/
    shown = cli.invoke(app, ["evaluate", str(config.run_path), "--json"])
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.output)
    folder = Path(record["report"])
    assert folder == config.run_path / "evaluation" / f"{version.name}-v{version.version}-test"
    table = _csv(folder / "per_class.csv")
    assert sum(int(r["support"]) for r in table) == counts["test"]
    device = _matrix(folder / "confusion_device.csv")
    assert np.trace(device) / counts["test"] == pytest.approx(
        record["metrics"]["test_device_accuracy"]
    )
    logged = {a.path for a in client.list_artifacts(version.run_id, "evaluation/test")}
    assert "evaluation/test/summary.json" in logged
    # a run, in float only, into a folder of one's choosing
    plain = cli.invoke(
        app,
        [
            "evaluate",
            f"runs:/{version.run_id}",
            "--float-only",
            "-o",
            str(tmp_path / "f"),
            "--config",
            str(_saved(config, tmp_path)),
        ],
    )
    assert plain.exit_code == 0, plain.output
    assert "float only" in plain.output and "report: " in plain.output
    assert not (tmp_path / "f" / "confusion_device.csv").exists()
    assert (
        _matrix(tmp_path / "f" / "confusion_float.csv").tolist()
        == _matrix(folder / "confusion_float.csv").tolist()
    )
    # a checkpoint file with its config, in float only
    checkpoint = client.download_artifacts(version.run_id, "model/checkpoint.pt", str(tmp_path))
    from_file = cli.invoke(
        app,
        [
            "evaluate",
            checkpoint,
            "--float-only",
            "--config",
            str(_saved(config, tmp_path)),
            "-o",
            str(tmp_path / "file"),
            "--json",
        ],
    )
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(from_file.output)["metrics"]["test_float_augrc"] == pytest.approx(
        record["metrics"]["test_float_augrc"]
    )
    on_board = cli.invoke(app, ["evaluate", checkpoint, "--config", str(_saved(config, tmp_path))])
    assert on_board.exit_code == 2 and "measured in float only; add --float-only" in on_board.output


def _saved(config: object, tmp_path: Path) -> Path:
    from tasks.config import dump_config

    path = tmp_path / "study.yaml"
    if not path.exists():
        path.write_text(dump_config(config))  # type: ignore[arg-type]
    return path
