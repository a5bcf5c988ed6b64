"""One detector training, held to the classifier's hardware-in-the-loop standard.

Stages, each recorded in one MLflow run of the detector's experiment:

1. ``prepare``: the data.yaml resolved for Ultralytics, the board's bundle (validation
   images letterboxed to the export size, with their boxes) and the calibration set.
2. ``train``: Ultralytics training with per-epoch metrics, then its final validation of the
   best weights (``val_*``); weights, results.csv and the curves go to MLflow.
3. ``export``: static ONNX without NMS; evaluated on this host by the shipped evaluator
   (``float_*``: same pre- and post-processing as the board).
4. ``compile``: the classifier's compilers (``onnxruntime-int8``, ``hailo``).
5. ``device``: the evaluator's ``detect`` mode on the board, holding the board's slot;
   mAP computed here (``device_*``) with the gap to the float model (``*_gap``).
6. ``select``: the run with the best device mAP50-95 among the detector's finished runs
   is registered under the detector's name with the alias ``champion``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from mlflow.exceptions import MlflowException

from tasks.board import embedded, ensure_device_limit, hold_board
from tasks.compilers import create_compiler
from tasks.config import dump_config
from tasks.detection.config import DetectorConfig
from tasks.detection.dataset import (
    load_detection_bundle,
    make_calibration_set,
    make_detection_bundle,
    read_data_yaml,
    write_resolved_yaml,
)
from tasks.detection.metrics import detection_metrics, gap_to_float
from tasks.detection.ultra import DetectorError, export_onnx, train_detector
from tasks.devices import LocalRunner, create_runner
from tasks.host import pid_alive
from tasks.inputs import log_study_input
from tasks.packaging import package_run
from tasks.tracking import (
    CHAMPION,
    PARENT_TAG,
    Tracker,
    local_artifact_location,
    mask_text,
)

KIND_TAG = "edgetune.kind"
DETECTOR_TAG = "edgetune.detector"
HOST_TAG = "edgetune.host"
PID_TAG = "edgetune.pid"
SELECTION_METRIC = "device_map50_95"
CURVE_SUFFIXES = (".png", ".jpg", ".csv", ".yaml")

_T = TypeVar("_T")
StageRunner = Callable[[str, Callable[[], _T]], _T]


def run_inline(name: str, fn: Callable[[], _T]) -> _T:
    """Run a stage in this thread (the flow wraps each stage as a Prefect task instead)."""
    del name
    return fn()


@dataclass
class DetectorOutcome:
    """What one detector run produced; `champion` is the registered version after it."""

    name: str
    run_id: str
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    champion: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "detector": self.name,
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "metrics": self.metrics,
            "artifacts": self.artifacts,
            "champion": self.champion,
        }


def _flat_params(config: DetectorConfig) -> dict[str, Any]:
    params: dict[str, Any] = {
        "detector": config.name,
        "data.yaml": config.data.yaml,
        "model.arch": config.model.arch,
        "model.weights": config.model.weights or "",
        "compile.backend": config.compile.backend,
        "device.name": config.device.name,
        "device.runner": config.device.runner,
        "seed": config.seed,
    }
    params.update({f"train.{k}": v for k, v in config.train.model_dump().items()})
    params.update({f"eval.{k}": v for k, v in config.eval.model_dump().items()})
    return params


def run_detector(
    config: DetectorConfig, *, stage: StageRunner[Any] = run_inline
) -> DetectorOutcome:
    """Train, export, compile, evaluate on the board, record and select (see the module)."""
    check_detector(config)
    tracker = Tracker(config.tracking_uri)
    run_root = config.run_path
    run_root.mkdir(parents=True, exist_ok=True)
    experiment = tracker.experiment_id(
        config.experiment_name, artifact_location=local_artifact_location(config.tracking_uri)
    )
    end_orphaned_runs(tracker, experiment)
    name = f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    owner = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    run_id = tracker.start_run(
        experiment, name, tags={KIND_TAG: "detector", DETECTOR_TAG: config.name, **owner}
    )
    work = run_root / name
    outcome = DetectorOutcome(name=config.name, run_id=run_id, run_dir=work)
    status = "FAILED"
    try:
        tracker.log_params(run_id, _flat_params(config))
        tracker.log_text(run_id, dump_config(config), "config.yaml")
        inputs = stage("prepare", lambda: prepare_inputs(config, tracker, run_id, work))
        trained = stage("train", lambda: train_stage(config, tracker, run_id, work, inputs["data"]))
        outcome.metrics.update(trained["metrics"])
        onnx = stage("export", lambda: export_stage(config, tracker, run_id, work, trained))
        outcome.metrics.update(onnx["metrics"])
        compiled = stage(
            "compile", lambda: compile_stage(config, tracker, run_id, work, onnx, inputs)
        )
        outcome.metrics.update(compiled["metrics"])
        device = stage(
            "device", lambda: _on_device(config, tracker, run_id, work, compiled, inputs, onnx)
        )
        outcome.metrics.update(device["metrics"])
        outcome.artifacts = {
            "weights": "model/best.pt",
            "onnx": "model/model.onnx",
            "compiled": compiled["artifact"],
        }
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        tracker.set_tags(run_id, {"edgetune.error": mask_text(f"{type(exc).__name__}: {exc}")})
        raise
    finally:
        tracker.end_run(run_id, status)
    outcome.champion = stage("select", lambda: select_champion(config, tracker))
    (work / "outcome.json").write_text(json.dumps(outcome.as_dict(), indent=2, default=float))
    return outcome


def end_orphaned_runs(tracker: Tracker, experiment_id: str) -> list[str]:
    """End KILLED the RUNNING detector runs whose process on this host is gone.

    A worker killed mid-training cannot end its run; the next run on the host does.
    """
    host = socket.gethostname()
    ended = []
    for run in tracker.client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
    ):
        pid = int(run.data.tags.get(PID_TAG, "0") or 0)
        if pid and not pid_alive(pid):
            tracker.set_tags(
                run.info.run_id, {"edgetune.error": f"its process {pid} on {host} died"}
            )
            tracker.end_run(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def check_detector(config: DetectorConfig) -> None:
    """Bad input is refused before any run, folder or database is created."""

    read_data_yaml(Path(config.data.yaml))
    if config.model.weights and not Path(config.model.weights).is_file():
        raise DetectorError(
            f"model.weights {config.model.weights} does not exist; give a local .pt file "
            "(nothing is downloaded) or leave it out to train from the architecture"
        )
    create_compiler(config.compile.backend, **config.compile.backend_options()).check_available()
    create_runner(config.device.runner, **config.device.runner_options()).check_config()


def prepare_inputs(
    config: DetectorConfig, tracker: Tracker, run_id: str, work: Path, *, calibration: bool = False
) -> dict[str, Any]:
    """The resolved data.yaml, the board's bundle and the calibration set, logged to `run_id`
    (the calibration set too when `calibration`: a compile stage on another host needs it)."""
    dataset = read_data_yaml(Path(config.data.yaml))
    data_yaml = write_resolved_yaml(dataset, work / "data.yaml")
    bundle = make_detection_bundle(
        dataset,
        config.train.imgsz,
        work / "inputs" / "val_bundle.npz",
        single_cls=config.train.single_cls,
        single_cls_name=config.train.single_cls_name,
        max_images=config.data.max_eval_images,
    )
    calib = make_calibration_set(
        dataset,
        config.train.imgsz,
        config.compile.calibration_samples,
        config.seed,
        work / "inputs" / "calibration.npz",
    )
    log_study_input(tracker, run_id, bundle, "inputs")
    tracker.log_artifact(run_id, data_yaml, "inputs")
    if calibration:
        log_study_input(tracker, run_id, calib, "inputs")
    tracker.log_params(
        run_id,
        {
            "data.classes": ",".join(dataset.classes),
            "data.train_images": len(dataset.splits["train"]),
            "data.val_images": len(dataset.splits["val"]),
        },
    )
    return {"data": data_yaml, "bundle": bundle, "calibration": calib}


def train_stage(
    config: DetectorConfig,
    tracker: Tracker,
    run_id: str,
    work: Path,
    data_yaml: Path,
    *,
    root: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train into `root`/ultralytics/`work.name` (default: the detector's run dir); log the
    weights, Ultralytics' curves and the final validation; `on_epoch` sees every epoch."""

    def log_epoch(epoch: int, row: dict[str, float]) -> None:
        tracker.log_metrics(run_id, row, step=epoch)
        if on_epoch is not None:
            on_epoch(epoch, row)

    trained = train_detector(
        config, data_yaml, root or config.run_path, work.name, on_epoch=log_epoch
    )
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = model_dir / "best.pt"
    shutil.copyfile(trained.weights, weights)
    tracker.log_artifact(run_id, weights, "model")
    for item in sorted(trained.save_dir.iterdir()):
        if item.is_file() and item.suffix in CURVE_SUFFIXES:
            tracker.log_artifact(run_id, item, "ultralytics")
    metrics = {f"val_{k}": v for k, v in trained.val_metrics.items()}
    metrics.update({"train_seconds": trained.seconds, "epochs_run": float(trained.epochs_run)})
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(run_id, {"edgetune.train_device": trained.device})
    return {"weights": weights, "classes": trained.class_names, "metrics": metrics}


def export_stage(
    config: DetectorConfig,
    tracker: Tracker,
    run_id: str,
    work: Path,
    trained: dict[str, Any],
    *,
    root: Path | None = None,
) -> dict[str, Any]:

    onnx = export_onnx(
        trained["weights"],
        config.train.imgsz,
        config.export.opset,
        config.export.simplify,
        work / "model" / "model.onnx",
        root or config.run_path,
    )
    tracker.log_artifact(run_id, onnx, "model")
    metrics = {"onnx_size_mb": onnx.stat().st_size / 1e6}
    tracker.log_metrics(run_id, metrics)
    return {"path": onnx, "metrics": metrics}


def compile_stage(
    config: DetectorConfig,
    tracker: Tracker,
    run_id: str,
    work: Path,
    onnx: dict[str, Any],
    inputs: dict[str, Any],
) -> dict[str, Any]:
    compiler = create_compiler(config.compile.backend, **config.compile.backend_options())
    out = work / "compiled"
    try:
        artifact = compiler.compile(onnx["path"], inputs["calibration"], out)
    finally:
        if (out / "compile.log").is_file():
            tracker.log_artifact(run_id, out / "compile.log", "compile")
    tracker.log_artifact(run_id, artifact.path, "model")
    metrics = {"compile_seconds": artifact.seconds, "compiled_size_mb": artifact.size_bytes / 1e6}
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(
        run_id, {"edgetune.compiler": compiler.name, "edgetune.runtime": artifact.runtime}
    )
    return {"path": artifact.path, "artifact": f"model/{artifact.path.name}", "metrics": metrics}


def score_detections(
    detections: np.ndarray, bundle: dict[str, np.ndarray], prefix: str
) -> dict[str, float]:
    """mAP50, mAP50-95, precision, recall and per-class AP of boxes against the bundle."""
    classes = [str(c) for c in bundle["classes"]]
    metrics = detection_metrics(
        detections, bundle["boxes"], num_classes=len(classes), n_images=len(bundle["images"])
    ).as_dict(classes)
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


def float_reference(
    config: DetectorConfig, onnx: Path, bundle_path: Path, work: Path
) -> dict[str, float]:
    """The float ONNX through the board's evaluator on this host: the reference for the gap."""

    host = LocalRunner(timeout_s=config.device.timeout_s, warmup=0)
    result = host.detect(onnx, bundle_path, work / "float", **config.eval.model_dump())
    return score_detections(result.detections, load_detection_bundle(bundle_path), "")


def board_stage(
    config: DetectorConfig,
    tracker: Tracker,
    run_id: str,
    compiled: Path,
    bundle_path: Path,
    work: Path,
    float_metrics: dict[str, float],
    key: str | None = None,
) -> dict[str, float]:
    """The compiled detector on the board (staged first, or sent ahead under ``key``, then
    holding its slot for the run);
    mAP scored here, with the gap to `float_metrics`; the metrics and the board's raw
    detections are logged."""

    runner = create_runner(config.device.runner, **config.device.runner_options())
    if not embedded():
        ensure_device_limit(config.device.concurrency_limit)
    device_dir = work / "device"
    with runner.stage(compiled, bundle_path, key) as staged, hold_board(config):
        result = staged.detect(device_dir, **config.eval.model_dump())
    device_metrics = score_detections(result.detections, load_detection_bundle(bundle_path), "")
    metrics = {f"device_{k}": v for k, v in device_metrics.items()}
    metrics.update(gap_to_float(device_metrics, float_metrics))
    metrics["device_latency_ms"] = result.latency_ms["mean"]
    metrics["device_latency_p95_ms"] = result.latency_ms["p95"]
    metrics["device_postprocess_ms"] = result.postprocess_ms
    metrics["device_throughput_fps"] = result.throughput_fps
    tracker.log_metrics(run_id, metrics)
    np.save(device_dir / "detections.npy", result.detections)
    (device_dir / "device_result.json").write_text(json.dumps(result.info, indent=2))
    tracker.log_artifact(run_id, device_dir / "detections.npy", "device")
    tracker.log_artifact(run_id, device_dir / "device_result.json", "device")
    return metrics


def _on_device(
    config: DetectorConfig,
    tracker: Tracker,
    run_id: str,
    work: Path,
    compiled: dict[str, Any],
    inputs: dict[str, Any],
    onnx: dict[str, Any],
) -> dict[str, Any]:
    reference = float_reference(config, onnx["path"], inputs["bundle"], work)
    metrics = {f"float_{k}": v for k, v in reference.items()}
    tracker.log_metrics(run_id, metrics)
    metrics.update(
        board_stage(config, tracker, run_id, compiled["path"], inputs["bundle"], work, reference)
    )
    return {"metrics": metrics}


def package_detector(tracker: Tracker, run_id: str, metadata: dict[str, Any]) -> str:
    """The run's MLflow model (``mlflow_model/``): its compiled detector in a serving graph
    that takes uint8 letterboxed images (see ``tasks.packaging``). The evaluated bundle is
    the run's own (``detect train``) or its study's (a trial)."""
    files = [item.path for item in tracker.client.list_artifacts(run_id, "model")]
    compiled = [p for p in files if p not in ("model/best.pt", "model/model.onnx")]
    if len(compiled) != 1 or "model/model.onnx" not in files:
        raise DetectorError(
            f"run {run_id} has no single compiled model beside model/model.onnx ({files}); "
            f"it cannot be registered"
        )
    bundle_run = run_id
    if "inputs/val_bundle.npz" not in {
        a.path for a in tracker.client.list_artifacts(run_id, "inputs")
    }:
        bundle_run = tracker.client.get_run(run_id).data.tags[PARENT_TAG]
    return package_run(
        tracker,
        run_id,
        onnx_artifact="model/model.onnx",
        compiled_artifact=compiled[0],
        bundle=(bundle_run, "inputs/val_bundle.npz"),
        classifier=False,
        metadata=metadata,
    )


def select_champion(config: DetectorConfig, tracker: Tracker) -> dict[str, Any] | None:
    """Register the finished run with the best device mAP50-95 as `<name>@champion`.

    The current champion keeps its alias unless another run is strictly better, so runs
    that tie (tiny runs at mAP 0) do not move it.
    """
    experiment = tracker.client.get_experiment_by_name(config.experiment_name)
    runs = tracker.client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"attributes.status = 'FINISHED' and tags.`{DETECTOR_TAG}` = '{config.name}' "
            f"and metrics.{SELECTION_METRIC} >= 0"
        ),
        order_by=[f"metrics.{SELECTION_METRIC} DESC", "attributes.start_time ASC"],
        max_results=1,
    )
    if not runs:
        return None
    best = runs[0]
    name = config.registered_model_name
    score = float(best.data.metrics[SELECTION_METRIC])

    try:
        current = tracker.alias_version(name)
        current_score = float(tracker.client.get_run(current.run_id).data.metrics[SELECTION_METRIC])
    except (MlflowException, KeyError):
        current, current_score = None, -1.0
    if current is not None and score <= current_score:
        best_id, version = current.run_id, str(current.version)
        score = current_score
    else:
        best_id = best.info.run_id
        tags = {SELECTION_METRIC: f"{score:.6f}", DETECTOR_TAG: config.name}
        version = tracker.register(
            name,
            best_id,
            package_detector(
                tracker,
                best_id,
                {**tags, "compiler": config.compile.backend, "device": config.device.name},
            ),
            alias=CHAMPION,
            tags=tags,
            description=(
                f"{config.name}: best device mAP50-95 ({score:.4f}) among its runs, "
                f"compiled with {config.compile.backend} for {config.device.name}"
            ),
        )
    return {
        "model": name,
        "version": version,
        "alias": CHAMPION,
        "run_id": best_id,
        SELECTION_METRIC: score,
    }
