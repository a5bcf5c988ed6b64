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
from pathlib import Path
from typing import Any

from tasks.board import hold_board
from tasks.config import ConfigError, EdgetuneConfig, load_config
from tasks.data import inspect_dataset, load_bundle, make_bundle, split_items
from tasks.metrics import classification_metrics
from tasks.tracking import CHAMPION, PARENT_TAG, Tracker
from tasks.workloads.classifier import CHECKPOINT, COMPILED_DIR, run_on_device

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class EvaluationError(ValueError):
    """A model or split that cannot be evaluated; the message names the fix."""


def parse_model_uri(model: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` as (name, alias, version)."""
    match = _MODEL_URI.match(model)
    if match is None:
        raise EvaluationError(
            f"model {model!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or a study "
            f"config (for its final model or champion)"
        )
    return match["name"], match["alias"], match["version"]


def resolve_version(tracker: Tracker, model: str) -> Any:
    """The model version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names."""
    name, alias, version = parse_model_uri(model)
    try:
        if alias is not None:
            return tracker.client.get_model_version_by_alias(name, alias)
        return tracker.client.get_model_version(name, version)
    except Exception as exc:  # MLflow raises its own exception for an unknown model
        raise EvaluationError(
            f"model {model!r} is not in the registry at the tracking URI ({type(exc).__name__}); "
            f"check the name and alias, or give --tracking-uri"
        ) from None


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


def _float_metrics(
    config: EdgetuneConfig, checkpoint: Path, bundle: dict[str, Any], classes: int
) -> dict[str, float]:
    """The float checkpoint scored on the same bundle the board saw."""
    # torch loads only here: the device measurement needs none.
    import torch

    from tasks.models import create_model
    from tasks.training.fmfp import predict_proba
    from tasks.training.loaders import bundle_tensors

    model = create_model(config.model.arch, classes)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    images, labels = bundle_tensors(bundle)
    probs = predict_proba(model, images, torch.device("cpu"))
    return classification_metrics(
        probs, labels.numpy(), bootstrap=config.study.bootstrap, seed=config.seed
    )


def evaluate_version(
    tracker: Tracker, version: Any, split: str, config: EdgetuneConfig | None = None
) -> dict[str, Any]:
    """Measure ``version`` on ``split`` (float and device); log and return the metrics."""
    run_id = str(version.run_id)
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
        info = inspect_dataset(config.data.root, verify_images=False)
        items = split_items(info, split, config.data.root)
        bundle_path = make_bundle(
            items, info.classes, config.data.image_size, work / f"{split}_bundle.npz"
        )
        compiled = _compiled(tracker, run_id, work)
        with hold_board(config):
            result = run_on_device(config, compiled, bundle_path, work)
        bundle = load_bundle(bundle_path)
        device = classification_metrics(
            result.probs, bundle["labels"], bootstrap=config.study.bootstrap, seed=config.seed
        )
        checkpoint = tracker.download(run_id, CHECKPOINT, work / "model")
        floating = _float_metrics(config, checkpoint, bundle, len(info.classes))
    metrics = {f"{split}_device_{k}": v for k, v in device.items() if k != "n"}
    metrics.update({f"{split}_float_{k}": v for k, v in floating.items() if k != "n"})
    for name in ("augrc", "accuracy"):
        metrics[f"{split}_{name}_gap"] = device[name] - floating[name]
    metrics[f"{split}_images"] = float(len(items))
    metrics["device_latency_ms"] = result.latency_ms["mean"]
    record = {
        "model": version.name,
        "version": str(version.version),
        "run_id": run_id,
        "split": split,
        "device": config.device.name,
        "metrics": metrics,
    }
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k != "device_latency_ms"})
    tracker.log_text(run_id, json.dumps(record, indent=2), f"evaluation/{split}.json")
    for key in (f"{split}_device_augrc", f"{split}_float_augrc", f"{split}_device_accuracy"):
        tracker.client.set_model_version_tag(version.name, version.version, key, metrics[key])
    return record


def champion_of(config: EdgetuneConfig) -> str:
    """The model a study's final report measures: its final model (``@final``, when
    ``study.retrain`` trains one), else its champion."""
    alias = "final" if config.study.retrain != "none" else CHAMPION
    return f"models:/{config.registered_model_name}@{alias}"
