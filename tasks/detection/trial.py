"""The stages of one detector trial in a study (``edgetune tune`` on a detector config).

The same stages as ``detect train`` (``tasks.detection.pipeline``), cut where the study's
pipeline cuts them, and passing everything through MLflow like the classifier's stages,
so each can run on its own pool and host:

- ``prepare``: once per study, the board's bundle and the calibration set → the parent run.
- ``train``: Ultralytics training with the trial's settings (float mAP50-95 reported each
  epoch for the pruner), ONNX export, the float model through the board's evaluator on
  this host (``float_*``) → the trial run.
- ``compile``: the trial's ONNX + the study's calibration set → the compiled artifact.
- ``evaluate``: the compiled artifact on the board (holding its slot) → ``device_*`` and
  the gap to the float model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.detection.config import DetectorStudy, trial_train_settings
from tasks.detection.dataset import read_data_yaml, write_resolved_yaml
from tasks.detection.pipeline import (
    DETECTOR_TAG,
    KIND_TAG,
    board_stage,
    compile_stage,
    export_stage,
    float_reference,
    prepare_inputs,
    train_stage,
)
from tasks.stages import scratch
from tasks.tracking import Tracker

BUNDLE = "inputs/val_bundle.npz"
CALIBRATION = "inputs/calibration.npz"
ONNX = "model/model.onnx"


def trial_tags(config: DetectorStudy) -> dict[str, str]:
    """Trial runs are runs of the detector: its champion is chosen among them too."""
    return {KIND_TAG: "detector", DETECTOR_TAG: config.name}


def prepare(config: DetectorStudy, tracker: Tracker, parent_run_id: str) -> dict[str, Any]:
    with scratch(config, "inputs") as work:
        prepare_inputs(config, tracker, parent_run_id, work, calibration=True)
    dataset = read_data_yaml(Path(config.data.yaml))
    return {
        "classes": dataset.classes,
        "counts": {split: len(files) for split, files in dataset.splits.items()},
    }


def train(
    config: DetectorStudy,
    params: dict[str, Any],
    tracker: Tracker,
    run_id: str,
    parent_run_id: str,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train, export and measure the float model of one trial; return its float metrics."""
    started = time.time()
    trial = config.model_copy(update={"train": trial_train_settings(config.train, params)})
    with scratch(config, "train") as work:
        # A study in one process keeps Ultralytics' folders in its run dir, like detect
        # train; a stage on a work pool keeps nothing on its host.
        root = config.run_path if config.orchestration.mode == "local" else work
        data_yaml = write_resolved_yaml(read_data_yaml(Path(config.data.yaml)), work / "data.yaml")
        run_name = f"{config.study.name}-{tracker.client.get_run(run_id).info.run_name}"
        trained = train_stage(
            trial, tracker, run_id, work / run_name, data_yaml, root=root, on_epoch=on_epoch
        )
        onnx = export_stage(trial, tracker, run_id, work / run_name, trained, root=root)
        bundle = tracker.download(parent_run_id, BUNDLE, work / "in")
        reference = float_reference(trial, onnx["path"], bundle, work)
    float_metrics = {f"float_{k}": v for k, v in reference.items()}
    tracker.log_metrics(run_id, float_metrics)
    metrics = {**trained["metrics"], **onnx["metrics"], **float_metrics}
    return {"metrics": metrics, "started_at": started, "finished_at": time.time()}


def compile_model(
    config: DetectorStudy, tracker: Tracker, run_id: str, parent_run_id: str
) -> dict[str, Any]:
    started = time.time()
    with scratch(config, "compile") as work:
        onnx = tracker.download(run_id, ONNX, work / "in")
        calibration = tracker.download(parent_run_id, CALIBRATION, work / "in")
        compiled = compile_stage(
            config, tracker, run_id, work, {"path": onnx}, {"calibration": calibration}
        )
    return {
        "artifact": compiled["artifact"],
        "metrics": compiled["metrics"],
        "started_at": started,
        "finished_at": time.time(),
    }


def evaluate(
    config: DetectorStudy, tracker: Tracker, run_id: str, parent_run_id: str, artifact: str
) -> dict[str, Any]:
    started = time.time()
    logged = tracker.client.get_run(run_id).data.metrics
    reference = {k.removeprefix("float_"): v for k, v in logged.items() if k.startswith("float_")}
    with scratch(config, "device") as work:
        compiled = tracker.download(run_id, artifact, work / "in")
        bundle = tracker.download(parent_run_id, BUNDLE, work / "in")
        metrics = board_stage(config, tracker, run_id, compiled, bundle, work, reference)
    return {"metrics": metrics, "started_at": started, "finished_at": time.time()}
