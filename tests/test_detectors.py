"""Detectors end to end on a synthetic YOLO dataset (tiny images, two epochs, CPU).

Both detectors of the application are trained through the ``detect-train`` flow on the
session's Prefect server: L-ML (two classes) and S-ML (one class, ``single_cls``). Each
run is exported, compiled to INT8 and evaluated by the shipped evaluator's ``detect``
mode (the ``local`` runner stands in for the board). A socket audit hook is active for
the whole training, export, compile, device evaluation, crop and annotation sequence.
Tiny CPU runs reach mAP ≈ 0, so the tests assert artifacts, keys, counts and formats.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from edgetune.cli import app
from edgetune.progress import epoch_lines
from tasks.detection.ultra import EPOCH_LOG

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

ROOT = Path(__file__).resolve().parents[1]
NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request")


class NetworkWatch:
    """Records every attempt to reach a host that is not this machine (audit hook)."""

    def __init__(self) -> None:
        self.active = False
        self.attempts: list[tuple[str, str]] = []
        sys.addaudithook(self._hook)  # hooks cannot be removed: `active` switches it

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event not in NETWORK_EVENTS:
            return
        host = _host_of(event, args)
        if host is not None and not _is_local(host):
            self.attempts.append((event, host))


def _host_of(event: str, args: tuple[Any, ...]) -> str | None:
    if event == "urllib.Request":
        return str(args[0])
    if event == "socket.connect":
        address = args[1]
        return str(address[0]) if isinstance(address, tuple) else None  # unix sockets: local
    return str(args[0]) if args and args[0] is not None else None


def _is_local(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_WATCH = NetworkWatch()


def detector_config(name: str, data_yaml: Path, tmp: Path, **train: Any) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "configs" / "detectors" / f"{name}.yaml").read_text())
    raw["data"] = {"yaml": str(data_yaml)}
    raw["model"] = {"arch": "yolov8n.yaml" if name == "l-ml" else "yolo11n.yaml"}
    tiny = {"imgsz": 64, "epochs": 2, "batch": 8, "cache": False, "workers": 0, "plots": False}
    raw["train"].update({**tiny, "device": "cpu", **train})
    raw["compile"] = {"backend": "onnxruntime-int8", "calibration_samples": 8}
    raw["device"] = {"name": f"test-{name}", "runner": "local", "warmup": 1}
    raw["run_dir"] = str(tmp / "runs" / name)
    raw["tracking"] = {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    return raw


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.detection.synthetic import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", train=16, val=8)


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """L-ML and S-ML trained, then S-ML crops (labelled by L-ML) and L-ML annotations.

    HOME and the working folder point at empty folders meanwhile: nothing may land there.
    """
    from flows.detect import detect_train

    tmp = tmp_path_factory.mktemp("detectors")
    home, cwd = tmp / "home", tmp / "cwd"
    home.mkdir()
    cwd.mkdir()
    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(home))
    patch.chdir(cwd)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    images = shapes.parent / "images" / "val"
    cli = CliRunner()
    epochs = io.StringIO()  # what ``edgetune detect train`` prints of the epochs
    _WATCH.attempts.clear()
    _WATCH.active = True
    try:
        with epoch_lines(EPOCH_LOG.name, epochs):
            outcomes = {
                name: detect_train(detector_config(name, shapes, tmp, plots=name == "l-ml"))
                for name in ("l-ml", "s-ml")
            }
        common = ["--conf", "0.001", "--min-size", "2", "--tracking-uri", uri]
        crops = cli.invoke(
            app, ["detect", "crops", "s-ml", str(images), str(tmp / "crops"), *common]
        )
        labelled = cli.invoke(
            app,
            [
                "detect",
                "crops",
                "s-ml",
                str(images),
                str(tmp / "labelled"),
                "--label-with",
                "l-ml",
                *common,
            ],
        )
        annotate = cli.invoke(
            app,
            [
                "detect",
                "annotate",
                "l-ml",
                str(images),
                str(tmp / "cvat"),
                "--conf",
                "0.001",
                "--tracking-uri",
                uri,
            ],
        )
    finally:
        _WATCH.active = False
        patch.undo()
    yield {
        "outcomes": outcomes,
        "uri": uri,
        "tmp": tmp,
        "home": home,
        "cwd": cwd,
        "images": images,
        "network": list(_WATCH.attempts),
        "crops": crops,
        "labelled": labelled,
        "annotate": annotate,
        "epochs": epochs.getvalue().splitlines(),
    }


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found |= _artifacts(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


def test_the_network_watch_sees_a_lookup_of_another_host() -> None:
    import socket

    _WATCH.attempts.clear()
    _WATCH.active = True
    try:
        with pytest.raises(OSError):
            socket.getaddrinfo("edgetune-no-such-host.invalid", 443)
        socket.getaddrinfo("127.0.0.1", 80)
    finally:
        _WATCH.active = False
    assert _WATCH.attempts == [("socket.getaddrinfo", "edgetune-no-such-host.invalid")]


def test_no_network_and_nothing_outside_the_run_directory(trained: dict[str, Any]) -> None:
    assert trained["network"] == []
    assert list(trained["cwd"].iterdir()) == []
    # Libraries' own caches (matplotlib's font list, onnxruntime's) may be in HOME;
    # nothing of Ultralytics' (settings, fonts, runs, datasets, weights) may.
    in_home = {p.relative_to(trained["home"]).as_posix() for p in trained["home"].rglob("*")}
    assert not [p for p in in_home if "ultralytics" in p.lower()], sorted(in_home)
    assert not [p for p in in_home if p.split("/")[0] in ("runs", "datasets", "weights")]
    settings = trained["tmp"] / "runs" / "l-ml" / ".ultralytics" / "Ultralytics"
    if settings.exists():  # Ultralytics was first imported by this test module
        assert {"settings.json", "Arial.ttf"} <= {p.name for p in settings.iterdir()}


@pytest.mark.parametrize(
    ("name", "classes"), [("l-ml", ["healthy", "broken"]), ("s-ml", ["insulator"])]
)
def test_each_run_holds_weights_onnx_int8_and_board_results(
    trained: dict[str, Any], name: str, classes: list[str]
) -> None:
    outcome = trained["outcomes"][name]
    client = MlflowClient(trained["uri"])
    run = client.get_run(outcome["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["edgetune.detector"] == name
    assert run.data.params["train.imgsz"] == "64"
    files = _artifacts(client, outcome["run_id"])
    expected = {
        "config.yaml",
        "model/best.pt",
        "model/model.onnx",
        "model/model.int8.onnx",
        "compile/compile.log",
        "device/detections.npy",
        "device/device_result.json",
        "inputs/val_bundle.npz",
        "inputs/data.yaml",
        "ultralytics/results.csv",
        "ultralytics/args.yaml",
    }
    assert expected <= files, sorted(files)
    if name == "l-ml":  # plots on: the curves Ultralytics draws are kept with the run
        assert any(f.startswith("ultralytics/") and f.endswith(".png") for f in files)
    metrics = run.data.metrics
    for key in ("map50", "map50_95", "precision", "recall"):
        for prefix in ("val_", "float_", "device_"):
            assert 0.0 <= metrics[prefix + key] <= 1.0
    for cls in classes:
        assert 0.0 <= metrics[f"device_ap50_95/{cls}"] <= 1.0
        assert 0.0 <= metrics[f"float_ap50/{cls}"] <= 1.0
    assert metrics["map50_95_gap"] == pytest.approx(
        metrics["float_map50_95"] - metrics["device_map50_95"]
    )
    assert metrics["device_latency_ms"] > 0 and metrics["device_throughput_fps"] > 0
    assert metrics["compiled_size_mb"] < metrics["onnx_size_mb"]
    history = client.get_metric_history(outcome["run_id"], "metrics/mAP50-95")
    assert sorted(m.step for m in history) == [1, 2]
    assert [m.step for m in client.get_metric_history(outcome["run_id"], "train/box_loss")]


def test_each_training_epoch_is_one_line_with_the_metrics_mlflow_got(
    trained: dict[str, Any],
) -> None:
    client = MlflowClient(trained["uri"])
    for name in ("l-ml", "s-ml"):
        lines = [line for line in trained["epochs"] if line.startswith(f"{name}: ")]
        assert len(lines) == 2, trained["epochs"]
        run_id = trained["outcomes"][name]["run_id"]
        history = {
            key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
            for key in ("metrics/mAP50-95", "train/box_loss")
        }
        for epoch, line in enumerate(lines, start=1):
            found = re.fullmatch(
                rf"{name}: epoch {epoch}/2 · loss box (\S+) cls \S+ dfl \S+ · val mAP50 \S+ "
                r"mAP50-95 (\S+) · \d+:\d\d elapsed, ETA \d+:\d\d",
                line,
            )
            assert found, line
            box_loss, map50_95 = (float(found.group(i)) for i in (1, 2))
            assert box_loss == pytest.approx(history["train/box_loss"][epoch], abs=5e-5)
            assert map50_95 == pytest.approx(history["metrics/mAP50-95"][epoch], abs=5e-5)
        assert lines[-1].endswith("ETA 0:00")


def test_the_board_returns_detections_from_the_int8_artifact(trained: dict[str, Any]) -> None:
    import json

    from tasks.detection.dataset import load_detection_bundle

    outcome = trained["outcomes"]["l-ml"]
    work = Path(outcome["run_dir"])
    info = json.loads((work / "device" / "device_result.json").read_text())
    bundle = load_detection_bundle(work / "inputs" / "val_bundle.npz")
    detections = np.load(work / "device" / "detections.npy")
    assert info["task"] == "detect" and info["model"] == "model.int8.onnx"
    assert info["n"] == len(bundle["images"]) == 8
    assert detections.ndim == 2 and detections.shape[1] == 7
    assert len(detections) == info["n_detections"] > 0
    assert set(np.unique(detections[:, 0])) <= set(range(8))
    assert set(np.unique(detections[:, 6])) <= {0.0, 1.0}
    assert np.all(detections[:, 5] > 0.001)
    per_image = np.bincount(detections[:, 0].astype(int), minlength=8)
    assert per_image.max() <= 300  # eval.max_det
    assert bundle["images"].shape[1:] == (64, 64, 3) and list(bundle["classes"]) == [
        "healthy",
        "broken",
    ]


def test_each_detector_has_a_champion(trained: dict[str, Any]) -> None:
    client = MlflowClient(trained["uri"], registry_uri=trained["uri"])
    for name in ("l-ml", "s-ml"):
        version = client.get_model_version_by_alias(name, "champion")
        assert version.run_id == trained["outcomes"][name]["run_id"]
        assert version.source.endswith("/mlflow_model")
        assert trained["outcomes"][name]["champion"]["version"] == str(version.version)


def test_a_detector_champion_is_an_mlflow_model(trained: dict[str, Any]) -> None:
    """``models:/s-ml@champion`` loads with pyfunc and takes uint8 letterboxed images: its
    output is the compiled model's on the bundle the board got."""
    import mlflow
    import onnxruntime as ort

    from tasks.detection.dataset import load_detection_bundle

    work = Path(trained["outcomes"]["s-ml"]["run_dir"])
    images = load_detection_bundle(work / "inputs" / "val_bundle.npz")["images"]
    mlflow.set_tracking_uri(trained["uri"])
    try:
        model = mlflow.pyfunc.load_model("models:/s-ml@champion")
    finally:
        mlflow.set_tracking_uri(None)
    meta = model.metadata.metadata["edgetune"]
    assert (meta["kind"], meta["class_names"], meta["image_size"]) == (
        "detector",
        ["insulator"],
        [64, 64],
    )
    assert meta["normalisation"] == {
        "mean": [0, 0, 0],
        "std": [255, 255, 255],
        "applied_in_graph": True,
    }
    assert meta["batch"] == 1  # exported for the board: one image per call
    compiled = ort.InferenceSession(str(work / "compiled" / "model.int8.onnx"))
    for image in images:
        (output,) = model.predict(image[None]).values()
        normalised = image[None].transpose(0, 3, 1, 2) / np.float32(255)
        (expected,) = compiled.run(None, {"images": normalised})
        assert output.shape == expected.shape and output.shape[:2] == (1, 5)
        np.testing.assert_allclose(output, expected, atol=1e-4)


def test_a_strictly_better_run_takes_the_champion_alias_and_a_tie_does_not(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    from tasks.detection.config import parse_detector_config
    from tasks.detection.pipeline import DETECTOR_TAG, KIND_TAG, select_champion
    from tasks.tracking import Tracker

    raw = detector_config("s-ml", Path("unused.yaml"), trained["tmp"])
    raw["tracking"].update(experiment="selection", registered_model="selection")
    config = parse_detector_config(raw)
    tracker = Tracker(trained["uri"])
    experiment = tracker.experiment_id(config.experiment_name)
    work = Path(trained["outcomes"]["s-ml"]["run_dir"])

    def finished_run(score: float, status: str = "FINISHED") -> str:
        run_id = tracker.start_run(
            experiment, "s-ml-made", tags={KIND_TAG: "detector", DETECTOR_TAG: "s-ml"}
        )
        tracker.log_metrics(run_id, {"device_map50_95": score})
        # a trained detector's files: a registered version is a real MLflow model
        for folder, path in [("model", "model/model.onnx"), ("model", "compiled/model.int8.onnx")]:
            tracker.log_artifact(run_id, work / path, folder)
        tracker.log_artifact(run_id, work / "inputs" / "val_bundle.npz", "inputs")
        tracker.end_run(run_id, status)
        return run_id

    first = finished_run(0.25)
    assert select_champion(config, tracker)["run_id"] == first
    finished_run(0.25)  # a tie keeps the current champion
    finished_run(0.9, status="FAILED")  # a failed run never counts
    chosen = select_champion(config, tracker)
    assert (chosen["run_id"], chosen["version"], chosen["device_map50_95"]) == (first, "1", 0.25)
    better = finished_run(0.5)
    chosen = select_champion(config, tracker)
    assert (chosen["run_id"], chosen["version"]) == (better, "2")
    assert tracker.alias_version("selection").run_id == better


def test_crops_form_an_image_folder_dataset(trained: dict[str, Any]) -> None:
    from tasks.detection.predict import OnnxDetector, resolve_model

    result = trained["crops"]
    assert result.exit_code == 0, result.output
    out = trained["tmp"] / "crops"
    rows = list(csv.DictReader((out / "crops.csv").open()))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert sorted(r["crop"] for r in rows) == files
    # as many crops as S-ML boxes at this threshold that are at least 2 px on each side
    detector = OnnxDetector(
        resolve_model("s-ml", trained["uri"], trained["tmp"] / "check"), conf=0.001
    )
    from tasks.detection.annotate import crop_box

    expected = 0
    for found in detector.run(trained["images"]):
        for box in found.boxes:
            x1, y1, x2, y2 = crop_box(box, found.width, found.height, 0.1)
            expected += min(x2 - x1, y2 - y1) >= 2
    assert len(rows) == expected > 0
    assert {Path(f).parts[0] for f in files} == {"insulator"}
    assert f"{expected} crops from 8 images" in result.output


def test_crops_labelled_by_l_ml_are_split_by_source_image(trained: dict[str, Any]) -> None:
    result = trained["labelled"]
    assert result.exit_code == 0, result.output
    out = trained["tmp"] / "labelled"
    rows = list(csv.DictReader((out / "crops.csv").open()))
    assert rows
    split_of: dict[str, set[str]] = {}
    for row in rows:
        parts = Path(row["crop"]).parts
        if row["label"]:
            assert parts[0] in ("train", "val") and parts[1] == row["label"]
            assert row["label"] in ("healthy", "broken")
            split_of.setdefault(row["source"], set()).add(parts[0])
        else:
            assert parts[0] == "unmatched"
    assert all(len(splits) == 1 for splits in split_of.values())


def test_annotation_writes_yolo_labels_and_cvat_xml(trained: dict[str, Any]) -> None:
    result = trained["annotate"]
    assert result.exit_code == 0, result.output
    out = trained["tmp"] / "cvat"
    labels = sorted((out / "labels").glob("*.txt"))
    assert [p.stem for p in labels] == [p.stem for p in sorted(trained["images"].glob("*.png"))]
    lines = [line.split() for p in labels for line in p.read_text().splitlines()]
    assert lines and all(len(parts) == 5 for parts in lines)
    assert {parts[0] for parts in lines} <= {"0", "1"}
    assert all(0.0 <= float(v) <= 1.0 for parts in lines for v in parts[1:])
    root = ET.parse(out / "annotations.xml").getroot()
    assert root.findtext("version") == "1.1"
    assert [n.text for n in root.iter("name") if n.text in ("healthy", "broken")] == [
        "healthy",
        "broken",
    ]
    images = root.findall("image")
    assert len(images) == len(labels) == 8
    assert sum(len(img.findall("box")) for img in images) == len(lines)
    assert (out / "classes.txt").read_text().split() == ["healthy", "broken"]


def _label_boxes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (K,) and normalised xyxy boxes (K, 4) of one YOLO label file."""
    text = path.read_text().split()
    values = np.array(text, dtype=np.float64).reshape(-1, 5)
    cx, cy, w, h = values[:, 1:].T
    return values[:, 0].astype(int), np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def _worst_overlaps(labels: Path) -> tuple[float, float]:
    """The largest IoU between two boxes of one image: of the same class, of two classes."""
    from tasks.detection.metrics import box_iou

    same = across = 0.0
    for path in labels.glob("*.txt"):
        classes, boxes = _label_boxes(path)
        overlap = np.triu(box_iou(boxes, boxes), k=1)
        differ = classes[:, None] != classes[None, :]
        same = max(same, float(np.where(differ, 0.0, overlap).max(initial=0.0)))
        across = max(across, float(np.where(differ, overlap, 0.0).max(initial=0.0)))
    return same, across


def test_annotation_keeps_one_box_per_object_whatever_its_class(trained: dict[str, Any]) -> None:
    """Class-agnostic NMS is the default: no two boxes of an image overlap by more than
    --iou (0.7), not even two boxes of different classes (class-aware NMS keeps those)."""
    labels = trained["tmp"] / "cvat" / "labels"
    assert sum(len(_label_boxes(p)[0]) for p in labels.glob("*.txt")) > 0
    same, across = _worst_overlaps(labels)
    assert same <= 0.7 + 1e-3 and across <= 0.7 + 1e-3, (same, across)  # labels: 6 decimals


def test_crops_that_no_box_passes_are_one_error_with_the_fix_and_no_folder(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    from tasks.detection.predict import OnnxDetector, resolve_model

    uri, images = trained["uri"], trained["images"]
    detector = OnnxDetector(resolve_model("s-ml", uri, tmp_path / "model"), conf=0.0)
    top = max(float(found.scores.max()) for found in detector.run(images))
    out = tmp_path / "crops"

    def crops(conf: str, min_size: str) -> Any:
        options = ["--conf", conf, "--min-size", min_size, "--tracking-uri", uri]
        return CliRunner().invoke(app, ["detect", "crops", "s-ml", str(images), str(out), *options])

    result = crops("0.999999", "1")
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        "error: no crop passes the thresholds on 8 images: no box of models:/s-ml@champion "
        f"scores above --conf 0.999999 (the highest score is {top:.4g}); lower --conf below "
    ), line
    assert line.endswith("or train it longer (more train.epochs)"), line
    hint = re.search(r"\(e\.g\. --conf ([0-9.e-]+)\)", line)
    assert hint and float(hint.group(1)) < top, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no crops/, no .partial
    # boxes above --conf, all smaller than --min-size: that threshold is named instead
    result = crops(hint.group(1), "100000")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    side = re.search(r"lower --min-size to (\d+) or pass larger images$", line)
    assert side and line.startswith("error: no crop passes the thresholds on 8 images: "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # the values the errors name give crops
    result = crops(hint.group(1), side.group(1))
    assert result.exit_code == 0, result.output
    assert int(result.stdout.split()[0]) > 0 and (out / "crops.csv").is_file()


def test_labelled_crops_warn_when_the_classifier_study_would_refuse_them(
    trained: dict[str, Any],
) -> None:
    from tasks.data import DataError, inspect_dataset

    result = trained["labelled"]
    assert result.exit_code == 0, result.output
    out = trained["tmp"] / "labelled"
    rows = list(csv.DictReader((out / "crops.csv").open()))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    try:
        inspect_dataset(out)
    except DataError:
        (warning,) = warnings
        assert warning.startswith(
            f"warning: {out} is not a dataset the classifier study accepts yet (train/ and "
            "val/ with the same 2 or more class folders): "
        ), warning
        train, val = (
            {row["label"] for row in rows if row["crop"].startswith(f"{split}/")}
            for split in ("train", "val")
        )
        if len(train) < 2:
            labelled = sum(1 for row in rows if row["label"])
            assert f"models:/l-ml@champion labelled {labelled} of {len(rows)} crops" in warning
        if len(train) == 1:
            assert f"train/ has crops of one class only ({min(train)})" in warning
        if train - val:
            assert "raise --val-fraction (now 0.2)" in warning
    else:
        assert warnings == []


def test_the_quantizer_keeps_the_box_decoding_in_float(trained: dict[str, Any]) -> None:
    from tasks.compilers.onnxruntime_int8 import tail_nodes

    onnx_path = Path(trained["outcomes"]["s-ml"]["run_dir"]) / "model" / "model.onnx"
    tail = tail_nodes(onnx_path)
    assert tail and all("Conv" not in name.rsplit("/", 1)[-1] for name in tail)
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    output_producer = next(n.name for n in graph.node if graph.output[0].name in n.output)
    assert output_producer in tail
    assert any(n.op_type == "Sigmoid" and n.name in tail for n in graph.node)
    log = (Path(trained["outcomes"]["s-ml"]["run_dir"]) / "compiled" / "compile.log").read_text()
    kept = re.search(r"kept in float \(after the last Conv\): (\d+) nodes (.*)", log)
    assert kept and int(kept.group(1)) > 0 and output_producer in kept.group(2)


@pytest.fixture(scope="module")
def tuned(trained: dict[str, Any], shapes: Path) -> dict[str, Any]:
    """An S-ML study through the tune flow, in the tracking store of the trainings above."""
    import optuna

    from flows.tune import tune

    tmp = trained["tmp"]
    raw = detector_config("s-ml", shapes, tmp)
    raw["study"] = {
        "name": "s-ml-hpo",
        "n_trials": 3,
        "sampler": "random",
        "search_space": {
            "lr0": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "mosaic": {"type": "float", "low": 0.0, "high": 1.0},
            "epochs": {"type": "categorical", "choices": [1, 2]},
        },
    }
    cwd = tmp / "tune-cwd"
    cwd.mkdir()
    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(trained["home"]))
    patch.chdir(cwd)
    _WATCH.attempts.clear()
    _WATCH.active = True
    try:
        result = tune(raw)
    finally:
        _WATCH.active = False
        patch.undo()
    storage = f"sqlite:///{tmp / 'runs' / 's-ml' / 'optuna.db'}"
    study = optuna.load_study(study_name="s-ml-hpo", storage=storage)
    return {"result": result, "study": study, "network": list(_WATCH.attempts), "cwd": cwd}


def test_tune_searches_a_detector_with_device_map_as_the_objective(
    trained: dict[str, Any], tuned: dict[str, Any]
) -> None:
    import optuna

    result, study = tuned["result"], tuned["study"]
    assert tuned["network"] == []
    assert list(tuned["cwd"].iterdir()) == []
    assert (result["objective"], result["direction"]) == ("device_map50_95", "maximize")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert result["counts"]["COMPLETE"] == 3
    client = MlflowClient(trained["uri"])
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["edgetune.detector"] == "s-ml"
        assert trial.value == run.data.metrics["device_map50_95"]
        assert trial.user_attrs["float_map50_95"] == run.data.metrics["float_map50_95"]
        assert trial.user_attrs["map50_95_gap"] == run.data.metrics["map50_95_gap"]
        assert {
            "model/best.pt",
            "model/model.onnx",
            "model/model.int8.onnx",
            "device/detections.npy",
        } <= _artifacts(client, run.info.run_id)
        # The trial's settings reached Ultralytics: its own record of the arguments.
        args = yaml.safe_load(
            Path(client.download_artifacts(run.info.run_id, "ultralytics/args.yaml")).read_text()
        )
        assert (args["lr0"], args["mosaic"], args["epochs"]) == (
            trial.params["lr0"],
            trial.params["mosaic"],
            trial.params["epochs"],
        )
        assert run.data.metrics["epochs_run"] == trial.params["epochs"]
    best = max(trials, key=lambda t: (t.value, -t.number))
    assert result["best"]["trial"] == best.number


def test_the_detector_champion_is_the_best_of_its_trainings_and_trials(
    trained: dict[str, Any], tuned: dict[str, Any]
) -> None:
    client = MlflowClient(trained["uri"])
    experiment = client.get_experiment_by_name("detector-s-ml")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED' and tags.`edgetune.detector` = 's-ml'",
    )
    trial_runs = {r.info.run_id for r in runs if "edgetune.trial" in r.data.tags}
    assert len(trial_runs) == 3 and len(runs) > 3  # the detect-train run is among them
    top = max(r.data.metrics["device_map50_95"] for r in runs)
    champion = client.get_model_version_by_alias("s-ml", "champion")
    assert client.get_run(champion.run_id).data.metrics["device_map50_95"] == top
    recorded = tuned["study"].user_attrs["champion"]
    assert recorded["version"] == str(champion.version)
    won = champion.run_id in trial_runs
    assert (recorded["trial"] is not None) == won


def test_tune_refuses_a_detector_config_it_cannot_run_in_one_line(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "detectors" / "s-ml.yaml").read_text())
    config = tmp_path / "s-ml.yaml"
    cases = [
        ({"study": None}, "a detector config needs a study section to be tuned"),
        ({"study": {**raw["study"], "parallel": 2}}, "study.parallel: 2 trainings at once"),
        (
            {
                "study": {
                    **raw["study"],
                    "search_space": {"imgsz": {"type": "int", "low": 320, "high": 640}},
                }
            },
            "study.search_space.imgsz: not a tunable parameter",
        ),
        (
            {
                "study": {
                    **raw["study"],
                    "search_space": {"mosaic": {"type": "float", "low": 0, "high": 2}},
                }
            },
            "study.search_space.mosaic: a trial could draw 2.0, which train.mosaic refuses",
        ),
    ]
    for change, message in cases:
        config.write_text(yaml.safe_dump({**raw, **change}))
        result = CliRunner().invoke(app, ["tune", str(config)])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-ml.yaml"]


def test_detect_train_refuses_bad_configs_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "detectors" / "s-ml.yaml").read_text())
    raw["train"]["imgsz"] = 100
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["detect", "train", str(config)])
    assert result.exit_code == 2
    assert "train.imgsz: 100 is not a multiple of 32" in result.output
    assert "use 96" in result.output
    raw["train"]["imgsz"] = 64
    raw["train"]["epoch"] = 3
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["detect", "train", str(config)])
    assert result.exit_code == 2
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in result.output


def test_detect_train_refuses_a_missing_dataset_before_creating_anything(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "detectors" / "s-ml.yaml").read_text())
    raw["data"] = {"yaml": "missing/data.yaml"}
    raw["run_dir"] = "runs/s-ml"
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    config = tmp_path / "s-ml.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["detect", "train", str(config)])
    assert result.exit_code == 2
    assert f"data.yaml {tmp_path / 'missing' / 'data.yaml'} does not exist" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-ml.yaml"]


def test_a_run_left_running_by_a_dead_process_is_ended_killed(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    import socket
    import subprocess

    from tasks.detection.pipeline import HOST_TAG, PID_TAG, end_orphaned_runs
    from tasks.tracking import Tracker

    tracker = Tracker(trained["uri"])
    experiment = tracker.experiment_id("orphans")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    orphan = tracker.start_run(experiment, "orphan", tags={HOST_TAG: host, PID_TAG: str(dead.pid)})
    alive = tracker.start_run(experiment, "alive", tags={HOST_TAG: host, PID_TAG: str(os.getpid())})
    assert end_orphaned_runs(tracker, experiment) == [orphan]
    assert tracker.client.get_run(orphan).info.status == "KILLED"
    assert tracker.client.get_run(alive).info.status == "RUNNING"
    tracker.end_run(alive)


def test_a_corrupt_image_stays_a_pillow_error_once_ultralytics_is_imported(
    tmp_path: Path,
) -> None:
    """Ultralytics' Image.open would try to install a HEIF plugin (offline: ImportError)."""
    from PIL import Image, UnidentifiedImageError

    from tasks.detection.ultra import ultralytics

    ultralytics(tmp_path / "run")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnidentifiedImageError):
        Image.open(bad)
