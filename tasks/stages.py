"""The work of each stage of a trial, as plain functions (the flows wrap them).

Every stage fetches its inputs from MLflow by run id and logs its outputs there, so the
stages can run on different hosts with no shared filesystem:

- ``prepare_inputs``: once per study, the evaluation bundle (validation split) and the
  calibration set (a seeded sample of the train split) → the study's parent run.
- ``train``: FMFP training with per-epoch float AUGRC reported to the trial, the averaged
  checkpoint, ONNX export with a parity check → the trial run.
- ``compile_model``: ONNX + calibration → the compiled artifact and the compiler's log.
- ``evaluate_on_device``: compiled artifact + bundle → per-sample probabilities on the
  board → device metrics computed here, on the controller.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tasks.config import EdgetuneConfig, StudyConfig, dump_config, trial_train_config
from tasks.data import (
    calibration_items,
    inspect_dataset,
    load_bundle,
    make_bundle,
    split_items,
)
from tasks.metrics import classification_metrics
from tasks.tracking import Tracker

BUNDLE = "inputs/val_bundle.npz"
CALIBRATION = "inputs/calibration.npz"
ONNX = "model/model.onnx"
CHECKPOINT = "model/checkpoint.pt"
COMPILED_DIR = "compiled"


class _HasStudy(Protocol):
    @property
    def study(self) -> StudyConfig: ...


@contextmanager
def scratch(config: _HasStudy, label: str) -> Iterator[Path]:
    """A private working folder on this host, removed when the stage ends.

    Stages may run on hosts that do not have the study's run directory: they keep
    nothing locally and pass everything through MLflow.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"edgetune-{config.study.name}-{label}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def stage_outcome_path(stage: str) -> str:
    return f"stages/{stage}.json"


def save_outcome(tracker: Tracker, run_id: str, stage: str, outcome: dict[str, Any]) -> None:
    """Record what a stage returned in its trial's run: a parent on another host reads it."""
    tracker.log_text(run_id, json.dumps(outcome, default=float), stage_outcome_path(stage))


def load_outcome(tracker: Tracker, run_id: str, stage: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.download(run_id, stage_outcome_path(stage), Path(tmp))
        return dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class StudyInputs:
    classes: tuple[str, ...]
    counts: dict[str, int]


def prepare_inputs(config: EdgetuneConfig, tracker: Tracker, parent_run_id: str) -> StudyInputs:
    info = inspect_dataset(config.data.root)
    with scratch(config, "inputs") as work:
        evaluated = split_items(info, config.data.eval_split, config.data.root)
        bundle = make_bundle(
            evaluated, info.classes, config.data.image_size, work / "val_bundle.npz"
        )
        calib = make_bundle(
            calibration_items(info.files["train"], config.compile.calibration_samples, config.seed),
            info.classes,
            config.data.image_size,
            work / "calibration.npz",
        )
        tracker.log_artifact(parent_run_id, bundle, "inputs")
        tracker.log_artifact(parent_run_id, calib, "inputs")
        config_file = work / "config.yaml"
        config_file.write_text(dump_config(config))
        tracker.log_artifact(parent_run_id, config_file)
    return StudyInputs(classes=info.classes, counts=info.counts())


# Training ---------------------------------------------------------------------------------


def train(
    config: EdgetuneConfig,
    params: dict[str, Any],
    tracker: Tracker,
    run_id: str,
    parent_run_id: str,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train one trial, export it, log checkpoint and ONNX; return the float metrics."""
    import torch

    from tasks.export import export_checked
    from tasks.models import create_model
    from tasks.training.auto import resolve_auto
    from tasks.training.fmfp import seed_everything, train_fmfp
    from tasks.training.loaders import bundle_tensors, train_loader

    started = time.time()
    settings = trial_train_config(config, params)
    info = inspect_dataset(config.data.root, verify_images=False)
    with scratch(config, "train") as work:
        bundle = load_bundle(tracker.download(parent_run_id, BUNDLE, work))
        val_x, val_y = bundle_tensors(bundle)
        items = [item for split in config.data.train_splits for item in info.files[split]]

        def make_model() -> Any:
            seed_everything(config.seed)  # the initial weights are part of the trial
            return create_model(
                config.model.arch,
                len(info.classes),
                weights=config.model.weights,
                finetune=config.model.finetune,
            )

        # optimizer: auto is decided on train and val, never on test.
        select_x, select_y = val_x, val_y
        if settings.optimizer == "auto" and config.data.eval_split != "val":
            select = make_bundle(
                info.files["val"], info.classes, config.data.image_size, work / "select.npz"
            )
            select_x, select_y = bundle_tensors(load_bundle(select))
        choices = resolve_auto(
            settings,
            make_model=make_model,
            train_items=info.files["train"],
            val_images=select_x,
            val_labels=select_y,
            image_size=config.data.image_size,
            augment=config.data.augment,
            num_classes=len(info.classes),
            seed=config.seed,
            num_workers=config.data.num_workers,
        )
        if choices.chosen:
            tracker.log_params(run_id, choices.params())
            tracker.log_metrics(run_id, choices.metrics())
        settings = choices.settings
        assert isinstance(settings.batch_size, int)
        loader = train_loader(
            items,
            config.data.image_size,
            config.data.augment,
            settings.batch_size,
            seed=config.seed,
            num_workers=config.data.num_workers,
        )
        model = make_model()

        def log_epoch(epoch: int, row: dict[str, float]) -> None:
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            if on_epoch is not None:
                on_epoch(epoch, row)

        result = train_fmfp(
            model, loader, val_x, val_y, settings, seed=config.seed, on_epoch=log_epoch
        )
        checkpoint = work / "checkpoint.pt"
        torch.save(result.model.state_dict(), checkpoint)
        exported = export_checked(
            result.model,
            work / "model.onnx",
            config.data.image_size,
            val_x[:32].numpy(),
            opset=config.export.opset,
            atol=config.export.parity_atol,
        )
        tracker.log_artifact(run_id, checkpoint, "model")
        tracker.log_artifact(run_id, exported.path, "model")
    metrics = {f"float_{k}": v for k, v in result.metrics.items()}
    metrics["onnx_max_abs_diff"] = exported.max_abs_diff
    metrics["train_seconds"] = result.seconds
    metrics["train_images"] = float(len(items))
    tracker.log_metrics(run_id, metrics)
    metrics.update({k: v for k, v in choices.metrics().items() if np.isfinite(v)})
    outcome: dict[str, Any] = {
        "metrics": metrics,
        "device": result.device,
        "started_at": started,
        "finished_at": time.time(),
    }
    if choices.chosen:
        outcome["auto"] = choices.record()
    return outcome


# Compilation ------------------------------------------------------------------------------


def compile_model(
    config: EdgetuneConfig, tracker: Tracker, run_id: str, parent_run_id: str
) -> dict[str, Any]:
    """Compile the trial's ONNX with the configured backend; log the artifact and the log."""
    from tasks.compilers import create_compiler

    started = time.time()
    compiler = create_compiler(config.compile.backend, **config.compile.backend_options())
    with scratch(config, "compile") as work:
        onnx_path = tracker.download(run_id, ONNX, work / "in")
        calibration = tracker.download(parent_run_id, CALIBRATION, work / "in")
        out = work / "out"
        out.mkdir()
        try:
            artifact = compiler.compile(onnx_path, calibration, out)
        except Exception:  # the log says why: keep it with the failed trial
            log = out / "compile.log"
            if log.is_file():
                tracker.log_artifact(run_id, log, "compile")
            raise
        tracker.log_artifact(run_id, artifact.path, COMPILED_DIR)
        if artifact.log_path is not None and artifact.log_path.is_file():
            tracker.log_artifact(run_id, artifact.log_path, "compile")
    metrics = {"compile_seconds": artifact.seconds, "compiled_size_mb": artifact.size_bytes / 1e6}
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(
        run_id, {"edgetune.compiler": compiler.name, "edgetune.runtime": artifact.runtime}
    )
    return {
        "artifact": f"{COMPILED_DIR}/{artifact.path.name}",
        "runtime": artifact.runtime,
        "metrics": metrics,
        "started_at": started,
        "finished_at": time.time(),
    }


# Device evaluation ------------------------------------------------------------------------


@contextmanager
def device_inputs(
    config: EdgetuneConfig, tracker: Tracker, run_id: str, parent_run_id: str, artifact: str
) -> Iterator[tuple[Path, Path, Path]]:
    """Fetch the compiled artifact and the bundle before the board is taken."""
    with scratch(config, "device") as work:
        compiled = tracker.download(run_id, artifact, work / "in")
        bundle = tracker.download(parent_run_id, BUNDLE, work / "in")
        yield compiled, bundle, work


def run_on_device(config: EdgetuneConfig, compiled: Path, bundle: Path, work: Path) -> Any:
    """Run the shipped evaluator on the board (hold the device's slot around this call)."""
    from tasks.devices import create_runner

    runner = create_runner(config.device.runner, **config.device.runner_options())
    return runner.evaluate(compiled, bundle, work / "result")


def score_device_result(
    config: EdgetuneConfig,
    tracker: Tracker,
    run_id: str,
    result: Any,
    labels: np.ndarray,
) -> dict[str, Any]:
    """Compute the device metrics on the controller and log them with the raw outputs."""
    metrics = classification_metrics(
        result.probs, labels, bootstrap=config.study.bootstrap, seed=config.seed
    )
    device_metrics = {f"device_{k}": v for k, v in metrics.items() if k != "n"}
    device_metrics["device_latency_ms"] = result.latency_ms["mean"]
    device_metrics["device_latency_p95_ms"] = result.latency_ms["p95"]
    device_metrics["device_throughput_fps"] = result.throughput_fps
    tracker.log_metrics(run_id, device_metrics)
    with tempfile.TemporaryDirectory() as tmp:
        probs = Path(tmp) / "device_probs.npy"
        np.save(probs, result.probs.astype(np.float32))
        tracker.log_artifact(run_id, probs, "device")
        summary = Path(tmp) / "device_result.json"
        summary.write_text(json.dumps(result.info, indent=2, default=str))
        tracker.log_artifact(run_id, summary, "device")
    return {
        "metrics": device_metrics,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
    }
