"""A registered classifier measured on a split after the search: the final report.

``edgetune evaluate MODEL --split test`` takes a registered version (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, or a study config for its final model or champion), runs its
compiled artifact on the study's board over the split, scores the float checkpoint on the
same images, and reports both under the split's own names (``test_device_augrc``,
``test_float_augrc``, ``test_augrc_gap``): never under the validation metric that
selected the model. The metrics go to the version's run and, as tags, to the version
itself.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.board import hold_board
from tasks.config import ConfigError, EdgetuneConfig, load_config
from tasks.data import inspect_dataset, load_bundle, make_bundle, split_items
from tasks.inputs import fetch_study_input
from tasks.metrics import classification_metrics
from tasks.report import TARGET_RISK, ReportInputs, write_report
from tasks.tracking import CHAMPION, PARENT_TAG, Tracker, one_line
from tasks.workloads.classifier import BUNDLE, CHECKPOINT, COMPILED_DIR, run_on_device

_MODEL_URI = re.compile(
    r"^(?:models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))"
    r"|runs:/(?P<run>[0-9a-zA-Z]+)/?)$"
)
#: Where a report goes when no folder is given and no study folder is known.
REPORTS = Path("reports")


class EvaluationError(ValueError):
    """A model or split that cannot be evaluated; the message names the fix."""


@dataclass(frozen=True)
class Target:
    """The trial run a measured model comes from, and its registered version if any."""

    run_id: str
    name: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}-v{self.version}" if self.name else f"run-{self.run_id[:8]}"


def parse_model_uri(model: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` as (name, alias, version);
    ``runs:/RUN_ID`` as (RUN_ID, None, None) with the ``runs:/`` kept in front."""
    match = _MODEL_URI.match(model)
    if match is None:
        raise EvaluationError(
            f"model {model!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, "
            f"a checkpoint file (.pt, with --config) or a study config (for its final model "
            f"or champion)"
        )
    if match["run"]:
        return f"runs:/{match['run']}", None, None
    return match["name"], match["alias"], match["version"]


def resolve_target(tracker: Tracker, model: str) -> Target:
    """The run (and version) ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
    ``runs:/RUN_ID`` names."""
    name, alias, version = parse_model_uri(model)
    try:
        if name.startswith("runs:/"):
            run_id = name.removeprefix("runs:/")
            return Target(str(tracker.client.get_run(run_id).info.run_id))
        if alias is not None:
            found = tracker.client.get_model_version_by_alias(name, alias)
        else:
            found = tracker.client.get_model_version(name, version)
    except Exception as exc:  # MLflow raises its own exception for an unknown model
        where = "tracking store" if name.startswith("runs:/") else "registry"
        raise EvaluationError(
            f"model {model!r} is not in the {where} at the tracking URI ({type(exc).__name__}); "
            f"check the name, alias or run id, or give --tracking-uri"
        ) from None
    return Target(str(found.run_id), str(found.name), str(found.version))


def study_config(tracker: Tracker, run_id: str, work: Path) -> EdgetuneConfig:
    """The config of the study that trained run ``run_id`` (saved in its parent run)."""
    parent = tracker.client.get_run(run_id).data.tags.get(PARENT_TAG)
    if parent is None:
        raise EvaluationError(f"run {run_id} has no study run; give the study's config (--config)")
    try:
        return load_config(tracker.download(parent, "config.yaml", work / "study"))
    except ConfigError as exc:
        raise EvaluationError(
            f"the model's study config does not load as a classifier study ({exc}); evaluate "
            f"measures classifiers (detectors: edgetune detect train)"
        ) from None


def _compiled(tracker: Tracker, run_id: str, work: Path) -> Path:
    files = [a.path for a in tracker.client.list_artifacts(run_id, COMPILED_DIR) if not a.is_dir]
    if not files:
        raise EvaluationError(f"run {run_id} has no compiled artifact under {COMPILED_DIR}/")
    return tracker.download(run_id, sorted(files)[0], work / "compiled")


def float_probs(config: EdgetuneConfig, checkpoint: Path, bundle: dict[str, Any]) -> np.ndarray:
    """The float checkpoint's probabilities on the same bundle the board saw."""
    # torch loads only here: the device measurement needs none.
    import torch

    from tasks.models import create_model
    from tasks.training.fmfp import predict_proba
    from tasks.training.loaders import bundle_tensors

    model = create_model(config.model.arch, len(bundle["classes"]))
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # a file that is not this architecture's weights
        raise EvaluationError(
            f"{checkpoint.name} does not load into model.arch {config.model.arch} with "
            f"{len(bundle['classes'])} classes ({one_line(exc)[:160]}); give the config the "
            f"model was trained with (--config)"
        ) from None
    images, _ = bundle_tensors(bundle)
    return np.asarray(predict_proba(model, images, torch.device("cpu")))


@dataclass(frozen=True)
class Measured:
    """One split's bundle, the images' files and each model's probabilities on it."""

    split: str
    bundle: dict[str, Any]
    paths: list[str] | None
    predictions: dict[str, np.ndarray]
    latency_ms: float | None = None


def split_bundle(config: EdgetuneConfig, split: str, work: Path) -> tuple[Path, list[str]]:
    """The split's evaluation bundle (as the board reads it) and its images' paths,
    relative to the dataset."""
    info = inspect_dataset(config.data.root, verify_images=False)
    items = split_items(info, split, config.data.root)
    path = make_bundle(items, info.classes, config.data.image_size, work / f"{split}_bundle.npz")
    return path, _relative(config, items)


def measure(
    config: EdgetuneConfig,
    split: str,
    checkpoint: Path,
    compiled: Path | None,
    work: Path,
) -> Measured:
    """The float checkpoint and, when ``compiled`` is given, the board on ``split``."""
    bundle_path, paths = split_bundle(config, split, work)
    bundle = load_bundle(bundle_path)
    predictions, latency = {}, None
    predictions["float"] = float_probs(config, checkpoint, bundle)
    if compiled is not None:
        with hold_board(config):
            result = run_on_device(config, compiled, bundle_path, work)
        predictions["device"] = np.asarray(result.probs)
        latency = float(result.latency_ms["mean"])
    return Measured(split, bundle, paths, predictions, latency)


def split_metrics(config: EdgetuneConfig, measured: Measured) -> dict[str, float]:
    """``<split>_float_*``, ``<split>_device_*`` and their gaps, as the final report names
    them (never the validation metric that selected the model)."""
    split, labels = measured.split, measured.bundle["labels"]
    scored = {
        name: classification_metrics(
            probs, labels, bootstrap=config.study.bootstrap, seed=config.seed
        )
        for name, probs in measured.predictions.items()
    }
    metrics = {
        f"{split}_{name}_{k}": v
        for name, found in scored.items()
        for k, v in found.items()
        if k != "n"
    }
    if "device" in scored:
        for name in ("augrc", "accuracy"):
            metrics[f"{split}_{name}_gap"] = scored["device"][name] - scored["float"][name]
    metrics[f"{split}_images"] = float(len(labels))
    if measured.latency_ms is not None:
        metrics["device_latency_ms"] = measured.latency_ms
    return metrics


def report_of(
    measured: Measured, out: Path, title: str, target_risk: float = TARGET_RISK
) -> dict[str, Any]:
    """The report (``tasks.report``) of a measured split, written into ``out``."""
    bundle = measured.bundle
    inputs = ReportInputs(
        labels=bundle["labels"],
        classes=[str(c) for c in bundle["classes"]],
        images=bundle["images"],
        paths=measured.paths,
        predictions=measured.predictions,
    )
    return write_report(inputs, out, title=title, target_risk=target_risk)


def evaluate_version(
    tracker: Tracker,
    target: Target,
    split: str,
    config: EdgetuneConfig | None = None,
    *,
    on_device: bool = True,
    out: Path | None = None,
    target_risk: float = TARGET_RISK,
) -> dict[str, Any]:
    """Measure ``target`` on ``split`` (float, and on the board unless ``on_device`` is
    false); write its report into ``out`` and the run's ``evaluation/<split>/``; log the
    metrics to the run (and, for a registered version, as its tags); return the record."""
    run_id = target.run_id
    with tempfile.TemporaryDirectory(prefix=f"edgetune-evaluate-{run_id[:8]}-") as tmp:
        work = Path(tmp)
        # The splits it trained on are the model's own study's, whichever config is given.
        own = study_config(tracker, run_id, work)
        trained_on = own.data.train_splits
        config = config or own
        if split in trained_on:
            raise EvaluationError(
                f"--split {split}: the model trained on {split} (data.train_splits "
                f"{trained_on}), so its scores there would be optimistic; evaluate on a "
                f"split it did not train on"
            )
        compiled = _compiled(tracker, run_id, work) if on_device else None
        checkpoint = tracker.download(run_id, CHECKPOINT, work / "model")
        measured = measure(config, split, checkpoint, compiled, work)
        out = out or default_report_dir(None, target, split)
        summary = report_of(measured, out, f"{target.label} on {split}", target_risk)
        tracker.log_artifacts(run_id, out, f"evaluation/{split}")
    metrics = split_metrics(config, measured)
    record = {
        "model": target.name,
        "version": target.version,
        "run_id": run_id,
        "split": split,
        "device": config.device.name if on_device else None,
        **_reported(metrics, out, summary),
    }
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k != "device_latency_ms"})
    tracker.log_text(run_id, json.dumps(record, indent=2), f"evaluation/{split}.json")
    if target.name is not None:
        for key in (f"{split}_device_augrc", f"{split}_float_augrc", f"{split}_device_accuracy"):
            if key in metrics:
                tracker.client.set_model_version_tag(target.name, target.version, key, metrics[key])
    return record


def default_report_dir(config: EdgetuneConfig | None, target: Target, split: str) -> Path:
    """``<run dir>/evaluation/<model>-v<version>-<split>`` for a study found on this host,
    else ``reports/<model>-v<version>-<split>`` here."""
    base = config.run_path / "evaluation" if config is not None else REPORTS
    return base / f"{target.label}-{split}"


def evaluate_checkpoint(
    config: EdgetuneConfig,
    checkpoint: Path,
    split: str,
    out: Path,
    target_risk: float = TARGET_RISK,
) -> dict[str, Any]:
    """A checkpoint file measured in float on ``split`` with ``config``'s data and
    architecture (no tracking: a file has no run); its report written into ``out``."""
    if not checkpoint.is_file():
        raise EvaluationError(f"checkpoint {checkpoint} does not exist; give a .pt file")
    if split in config.data.train_splits:
        raise EvaluationError(
            f"--split {split}: the config trains on {split} (data.train_splits), so the "
            f"scores there would be optimistic; evaluate on a split it did not train on"
        )
    with tempfile.TemporaryDirectory(prefix="edgetune-evaluate-file-") as tmp:
        measured = measure(config, split, checkpoint, None, Path(tmp))
        summary = report_of(measured, out, f"{checkpoint.name} on {split}", target_risk)
    record = {"model": str(checkpoint), "version": None, "run_id": None, "split": split}
    return {**record, "device": None, **_reported(split_metrics(config, measured), out, summary)}


def _reported(metrics: dict[str, float], out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A record's figures: the metrics, the report's folder, the predictions the board
    changed, and each model's deployment threshold at the report's target risk."""
    return {
        "metrics": metrics,
        "report": str(out),
        "changed": summary.get("changed"),
        "thresholds": {
            name: model["threshold_at_target_risk"] for name, model in summary["models"].items()
        },
    }


#: What a classifier trial logs of its run on the board: the outputs, image by image.
DEVICE_PROBS = "device/device_probs.npy"


def report_trial(
    config: EdgetuneConfig,
    tracker: Tracker,
    run_id: str,
    parent_run_id: str,
    out: Path,
    target_risk: float = TARGET_RISK,
) -> dict[str, Any]:
    """A study's trial (its champion, at the study's end) reported on the split the study
    measured, from what the study already has: the board's outputs the trial logged, its
    float checkpoint on the study's bundle. Nothing runs on the board again. The report
    goes into ``out`` and the trial's run (``report/<split>/``)."""
    split = config.data.eval_split
    with tempfile.TemporaryDirectory(prefix=f"edgetune-report-{run_id[:8]}-") as tmp:
        work = Path(tmp)
        bundle = load_bundle(fetch_study_input(tracker, parent_run_id, BUNDLE, work / "inputs"))
        device = np.load(tracker.download(run_id, DEVICE_PROBS, work / "device"))
        checkpoint = tracker.download(run_id, CHECKPOINT, work / "model")
        predictions = {"float": float_probs(config, checkpoint, bundle), "device": device}
        measured = Measured(
            split, bundle, _paths(config, split, len(bundle["labels"])), predictions
        )
        summary = report_of(measured, out, f"{config.study.name} champion on {split}", target_risk)
        tracker.log_artifacts(run_id, out, f"report/{split}")
    return summary


def _paths(config: EdgetuneConfig, split: str, count: int) -> list[str] | None:
    """The split's image files (relative to the dataset), when this host has the dataset
    as the study read it."""
    try:
        info = inspect_dataset(config.data.root, verify_images=False)
        items = split_items(info, split, config.data.root)
    except Exception:  # another host's dataset: the report names images by index
        return None
    return _relative(config, items) if len(items) == count else None


def _relative(config: EdgetuneConfig, items: list[tuple[Path, int]]) -> list[str]:
    root = Path(config.data.root)
    return [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p, _ in items]


def champion_of(config: EdgetuneConfig) -> str:
    """The model a study's final report measures: its final model (``@final``, when
    ``study.retrain`` trains one), else its champion."""
    alias = "final" if config.study.retrain != "none" else CHAMPION
    return f"models:/{config.registered_model_name}@{alias}"
