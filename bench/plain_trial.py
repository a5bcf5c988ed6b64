"""A plain script that does what one trial of ``edgetune tune`` does, and nothing else.

The baseline of ``bench.startup --plain``: the study config's training (its own settings,
no search), the ONNX export with its parity check, the compiler on the calibration set and
the evaluation on the board, with the project's own functions, but no Prefect, no Optuna,
no MLflow and no records. ``edgetune tune`` of one trial costs this plus its engine.

    python -m bench.plain_trial one.yaml
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks.compilers import create_compiler
from tasks.config import EdgetuneConfig, load_config, trial_train_config
from tasks.data import calibration_items, inspect_dataset, load_bundle, make_bundle, split_items
from tasks.devices import create_runner
from tasks.metrics import classification_metrics


def _inputs(config: EdgetuneConfig, work: Path) -> tuple[Any, Path, Path]:
    """The dataset, its evaluation bundle and the calibration set (as a study prepares them)."""
    info = inspect_dataset(config.data.root)
    evaluated = split_items(info, config.data.eval_split, config.data.root)
    size = config.data.image_size
    bundle = make_bundle(evaluated, info.classes, size, work / "val_bundle.npz")
    picked = calibration_items(info.files["train"], config.compile.calibration_samples, config.seed)
    calibration = make_bundle(picked, info.classes, size, work / "calibration.npz")
    return info, bundle, calibration


def _train_and_export(config: EdgetuneConfig, info: Any, bundle: Path, work: Path) -> Path:
    """Train with the config's settings and export to ONNX (checked against the float model)."""
    # torch loads here, as in a trial's training stage.
    from tasks.export import export_checked
    from tasks.models import create_model
    from tasks.training.fmfp import resolve_device, train_fmfp
    from tasks.training.loaders import bundle_tensors, train_batches
    from tasks.training.rng import build_model

    settings = trial_train_config(config, {})
    assert isinstance(settings.batch_size, int), "the plain script takes a fixed batch size"
    val_x, val_y = bundle_tensors(load_bundle(bundle))
    items = info.items(config.data.train_splits)
    loader = train_batches(
        config.data,
        items,
        settings.batch_size,
        seed=config.seed,
        device=resolve_device(settings.device),
    )
    model = build_model(config.seed, lambda: create_model(config.model.arch, len(info.classes)))
    result = train_fmfp(model, loader, val_x, val_y, settings)
    exported = export_checked(
        result.model,
        work / "model.onnx",
        config.data.image_size,
        val_x[:32].numpy(),
        opset=config.export.opset,
        atol=config.export.parity_atol,
    )
    return Path(exported.path)


def run(config_path: Path) -> dict[str, float]:
    """One training, export, compilation and board evaluation; its device metrics."""
    config = load_config(config_path)
    with tempfile.TemporaryDirectory(prefix="edgetune-plain-trial-") as tmp:
        work = Path(tmp)
        info, bundle, calibration = _inputs(config, work)
        onnx_path = _train_and_export(config, info, bundle, work)
        compiler = create_compiler(config.compile.backend, **config.compile.backend_options())
        (work / "compiled").mkdir()
        artifact = compiler.compile(onnx_path, calibration, work / "compiled")
        runner = create_runner(config.device.runner, **config.device.runner_options())
        result = runner.evaluate(artifact.path, bundle, work / "result")
        labels = load_bundle(bundle)["labels"]
        metrics = classification_metrics(
            result.probs, labels, bootstrap=config.study.bootstrap, seed=config.seed
        )
    return {key: float(value) for key, value in metrics.items()}


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    metrics = run(Path((argv or sys.argv[1:])[0]))
    print(json.dumps({**metrics, "seconds": time.monotonic() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
