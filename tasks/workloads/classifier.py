"""The classifier workload: an FMFP image classifier, measured by its AUGRC on the board.

Every stage fetches its inputs from MLflow by run id and logs its outputs there, so the
stages can run on different hosts with no shared filesystem:

- ``prepare_inputs``: once per study, the evaluation bundle (validation split) and the
  calibration set (a seeded sample of the train split) → the study's parent run.
- ``train``: FMFP training with per-epoch float AUGRC reported to the trial, the averaged
  checkpoint, ONNX export with a parity check → the trial run.
- ``compile_model``: ONNX + calibration → the compiled artifact, the compiler's log and
  the trial's MLflow model (``mlflow_model/``: the compiled model served from uint8
  images, see ``tasks.packaging``), which a registered version points at.
- ``evaluate_on_device``: compiled artifact + bundle → per-sample probabilities on the
  board → device metrics computed here, on the controller.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks import preflight as checks
from tasks.board import hold_board
from tasks.compilers import COMPILERS, create_compiler
from tasks.config import EdgetuneConfig, TrainConfig, dump_config, trial_train_config
from tasks.config.variants import variant_name
from tasks.data import (
    DatasetInfo,
    calibration_items,
    inspect_dataset,
    load_bundle,
    make_bundle,
    normalise,
    split_items,
)
from tasks.devices import create_runner
from tasks.devices.base import Staged
from tasks.inputs import fetch_study_input, log_study_input, staging_key
from tasks.metrics import classification_metrics
from tasks.packaging import MODEL_DIR, save_served_model, served_arrays
from tasks.seeding import trial_seed
from tasks.tracking import CHAMPION, Tracker, local_artifact_location
from tasks.workloads.base import (
    BUNDLE,
    DRY_RUN_IMAGES,
    Checked,
    CompileOutcome,
    DeviceOutcome,
    DryRun,
    DryRunSteps,
    EpochHook,
    Objective,
    Registration,
    StudyTarget,
    TrainOutcome,
    Workload,
    evaluation_inputs,
    holding_board,
    scratch,
    study_free,
)

if TYPE_CHECKING:  # torch, imported only where a training runs
    from tasks.training.auto import AutoChoices
    from tasks.training.loaders import Balance

CALIBRATION = "inputs/calibration.npz"
ONNX = "model/model.onnx"
CHECKPOINT = "model/checkpoint.pt"
COMPILED_DIR = "compiled"


def split_prefix(config: EdgetuneConfig) -> str:
    """``test_`` when the study measures on the test split (a final model): its metrics
    then never carry the names of the validation metrics that selected it."""
    return "" if config.data.eval_split == "val" else f"{config.data.eval_split}_"


def _per_epoch(config: EdgetuneConfig, row: dict[str, float]) -> dict[str, float]:
    """The trainer's ``val_*`` keys renamed after the split actually measured."""
    split = config.data.eval_split
    return {
        (f"{split}_{k.removeprefix('val_')}" if k.startswith("val_") else k): v
        for k, v in row.items()
    }


def prepare_inputs(config: EdgetuneConfig, tracker: Tracker, parent_run_id: str) -> Checked:
    info = inspect_dataset(config.data.root)
    with scratch(config, "inputs") as work:
        evaluated = split_items(info, config.data.eval_split, config.data.root)
        bundle = make_bundle(
            evaluated, info.classes, config.data.image_size, work / "val_bundle.npz"
        )
        calib = calibration_set(config, info, work / "calibration.npz")
        log_study_input(tracker, parent_run_id, bundle, "inputs")
        log_study_input(tracker, parent_run_id, calib, "inputs")
        config_file = work / "config.yaml"
        config_file.write_text(dump_config(config))
        tracker.log_artifact(parent_run_id, config_file)
    return Checked(info.classes, info.counts())


def calibration_set(config: EdgetuneConfig, info: DatasetInfo, out: Path) -> Path:
    """The study's calibration set: ``compile.calibration_samples`` train images, seeded."""
    return make_bundle(
        calibration_items(info.files["train"], config.compile.calibration_samples, config.seed),
        info.classes,
        config.data.image_size,
        out,
    )


# Training ---------------------------------------------------------------------------------


def train(
    config: EdgetuneConfig,
    params: dict[str, Any],
    tracker: Tracker,
    run_id: str,
    parent_run_id: str,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainOutcome:
    """Train one trial, export it, log checkpoint and ONNX; return the float metrics."""
    # torch is imported where it is used: the compile and device stages never need it.
    from tasks.models import create_model
    from tasks.training.fmfp import resolve_device, train_fmfp
    from tasks.training.loaders import Balance, bundle_tensors, train_batches
    from tasks.training.rng import build_model

    started = time.time()
    seed = trial_seed(config.seed, params, replicate=config.study.replicate)
    tracker.log_params(run_id, {"trial_seed": seed})
    settings = trial_train_config(config, params)
    info = inspect_dataset(config.data.root, verify_images=False)
    balance = Balance.of(settings, info.classes)  # train.sampling, class weights and loss
    with scratch(config, "train") as work:
        bundle = load_bundle(fetch_study_input(tracker, parent_run_id, BUNDLE, work))
        val_x, val_y = val = bundle_tensors(bundle)
        items = info.items(config.data.train_splits)

        def make_model() -> Any:
            return build_model(
                seed,
                lambda: create_model(
                    config.model.arch,
                    len(info.classes),
                    weights=config.model.weights,
                    finetune=config.model.finetune,
                ),
            )

        choices = _auto_choices(config, settings, info, make_model, val, work, seed, balance)
        if choices.chosen:
            tracker.log_params(run_id, choices.params())
            tracker.log_metrics(run_id, choices.metrics())
        settings = choices.settings
        assert isinstance(settings.batch_size, int)
        loader = train_batches(
            config.data,
            items,
            settings.batch_size,
            seed=seed,
            device=resolve_device(settings.device),
            balance=balance,
        )

        def log_epoch(epoch: int, row: dict[str, float]) -> None:
            row = _per_epoch(config, row)
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            if on_epoch is not None:
                on_epoch(epoch, row)

        weights = balance.loss_weights([label for _, label in items])  # None: unweighted
        result = train_fmfp(
            make_model(), loader, val_x, val_y, settings, on_epoch=log_epoch, loss_weights=weights
        )
        exported = _save_model(config, tracker, run_id, result.model, val_x[:32].numpy(), work)
    metrics = {f"{split_prefix(config)}float_{k}": v for k, v in result.metrics.items()}
    metrics["onnx_max_abs_diff"] = exported.max_abs_diff
    metrics["train_seconds"] = result.seconds
    metrics["train_images"] = float(len(items))
    metrics["epochs_run"] = float(len(result.history))
    if result.stopped_early_at is not None:  # early stopping (train.early_stop_patience)
        metrics["stopped_early_at"] = float(result.stopped_early_at)
    tracker.log_metrics(run_id, metrics)
    metrics.update({k: v for k, v in choices.metrics().items() if np.isfinite(v)})
    return TrainOutcome(
        metrics=metrics,
        started_at=started,
        finished_at=time.time(),
        device=result.device,
        auto=choices.record() if choices.chosen else None,
    )


def _auto_choices(
    config: EdgetuneConfig,
    settings: TrainConfig,
    info: DatasetInfo,
    make_model: Callable[[], Any],
    val: tuple[Any, Any],
    work: Path,
    seed: int,
    balance: Balance,
) -> AutoChoices:
    """Settings left to ``auto`` (optimizer, batch size), decided on train and val (never
    on test: with ``train+val`` the choice is made on val before the final training), the
    short runs drawn and weighted as the trial (``balance``)."""
    # torch loads only where a trial trains: compile and device stages never need it.
    from tasks.training.auto import resolve_auto
    from tasks.training.loaders import bundle_tensors

    select_x, select_y = val
    if settings.optimizer == "auto" and config.data.eval_split != "val":
        select = make_bundle(
            info.files["val"], info.classes, config.data.image_size, work / "select.npz"
        )
        select_x, select_y = bundle_tensors(load_bundle(select))
    return resolve_auto(
        settings,
        make_model=make_model,
        train_items=info.files["train"],
        val_images=select_x,
        val_labels=select_y,
        data=config.data,
        num_classes=len(info.classes),
        seed=seed,
        balance=balance,
    )


def _save_model(
    config: EdgetuneConfig, tracker: Tracker, run_id: str, model: Any, sample: Any, work: Path
) -> Any:
    """The trained weights and their ONNX export (checked against ``sample``) → the run."""
    # torch loads only where a trial trains: compile and device stages never need it.
    import torch

    checkpoint = work / "checkpoint.pt"
    torch.save(model.state_dict(), checkpoint)
    exported = export_model(config, model, sample, work / "model.onnx")
    tracker.log_artifact(run_id, checkpoint, "model")
    tracker.log_artifact(run_id, exported.path, "model")
    return exported


def export_model(config: EdgetuneConfig, model: Any, sample: Any, out: Path) -> Any:
    """``model`` to ONNX at ``data.image_size`` (``export.*``), checked against ``sample``."""
    # torch loads only where a model is built: compile and device stages never need it.
    from tasks.export import export_checked

    return export_checked(
        model,
        out,
        config.data.image_size,
        sample,
        opset=config.export.opset,
        atol=config.export.parity_atol,
    )


# Compilation ------------------------------------------------------------------------------


def compile_model(
    config: EdgetuneConfig, tracker: Tracker, run_id: str, parent_run_id: str
) -> CompileOutcome:
    """Compile the trial's ONNX with the configured backend; log the artifact and the log."""
    started = time.time()
    compiler = create_compiler(config.compile.backend, **config.compile.backend_options())
    with scratch(config, "compile") as work:
        onnx_path = tracker.download(run_id, ONNX, work / "in")
        calibration = fetch_study_input(tracker, parent_run_id, CALIBRATION, work / "in")
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
        served = package_classifier(config, onnx_path, artifact.path, calibration, work)
        tracker.client.log_artifacts(run_id, str(served), MODEL_DIR)
    metrics = {"compile_seconds": artifact.seconds, "compiled_size_mb": artifact.size_bytes / 1e6}
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(
        run_id, {"edgetune.compiler": compiler.name, "edgetune.runtime": artifact.runtime}
    )
    return CompileOutcome(
        artifact=f"{COMPILED_DIR}/{artifact.path.name}",
        metrics=metrics,
        started_at=started,
        finished_at=time.time(),
        runtime=artifact.runtime,
    )


# Device evaluation ------------------------------------------------------------------------


@contextmanager
def staged_on_device(
    config: EdgetuneConfig, compiled: Path, bundle: Path, key: str | None = None
) -> Iterator[Staged]:
    """The artifact, the bundle and the evaluator on the board before its slot is taken,
    so they travel while another evaluation runs there (or were sent ahead under ``key``);
    removed from the board after."""
    runner = create_runner(config.device.runner, **config.device.runner_options())
    with runner.stage(compiled, bundle, key) as staged:
        yield staged


def run_on_device(
    config: EdgetuneConfig, compiled: Path, bundle: Path, work: Path, staged: Staged | None = None
) -> Any:
    """Run the shipped evaluator on the board (hold the device's slot around this call);
    on `staged` inputs (`staged_on_device`) when given, else staged here first."""
    if staged is not None:
        return staged.evaluate(work / "result")
    runner = create_runner(config.device.runner, **config.device.runner_options())
    return runner.evaluate(compiled, bundle, work / "result")


def score_device_result(
    config: EdgetuneConfig,
    tracker: Tracker,
    run_id: str,
    result: Any,
    labels: np.ndarray,
) -> DeviceOutcome:
    """Compute the device metrics on the controller and log them with the raw outputs;
    the gaps to the trial's float metrics flag a compiled model that collapsed."""
    p = split_prefix(config)
    metrics = classification_metrics(
        result.probs, labels, bootstrap=config.study.bootstrap, seed=config.seed
    )
    device_metrics = {f"{p}device_{k}": v for k, v in metrics.items() if k != "n"}
    float_metrics = tracker.run_metrics(run_id)
    for name in ("augrc", "accuracy"):
        if f"{p}float_{name}" in float_metrics:
            gap = device_metrics[f"{p}device_{name}"] - float_metrics[f"{p}float_{name}"]
            device_metrics[f"{p}{name}_gap"] = gap
    device_metrics["device_latency_ms"] = result.latency_ms["mean"]
    device_metrics["device_latency_p95_ms"] = result.latency_ms["p95"]
    device_metrics["device_throughput_fps"] = result.throughput_fps
    tracker.log_metrics(run_id, device_metrics)
    flags = collapse_flags(config, device_metrics)
    with tempfile.TemporaryDirectory() as tmp:
        probs = Path(tmp) / "device_probs.npy"
        np.save(probs, result.probs.astype(np.float32))
        tracker.log_artifact(run_id, probs, "device")
        summary = Path(tmp) / "device_result.json"
        summary.write_text(json.dumps(result.info, indent=2, default=str))
        tracker.log_artifact(run_id, summary, "device")
    return DeviceOutcome(
        metrics=device_metrics,
        started_at=result.started_at,
        finished_at=result.finished_at,
        flags=flags,
        fails=bool(flags) and config.compile.on_collapse == "fail",
    )


def collapse_flags(config: EdgetuneConfig, device_metrics: dict[str, float]) -> dict[str, str]:
    """``{"collapsed": why}`` when the compiled model lost more than the config allows."""
    p, limits = split_prefix(config), config.compile
    found = []
    drop = -device_metrics.get(f"{p}accuracy_gap", 0.0)
    if limits.max_accuracy_drop is not None and drop > limits.max_accuracy_drop:
        found.append(
            f"device accuracy {drop:.3f} below the float model's "
            f"(compile.max_accuracy_drop {limits.max_accuracy_drop:g})"
        )
    rise = device_metrics.get(f"{p}augrc_gap", 0.0)
    if limits.max_augrc_gap is not None and rise > limits.max_augrc_gap:
        found.append(
            f"device AUGRC {rise:.4f} above the float model's "
            f"(compile.max_augrc_gap {limits.max_augrc_gap:g})"
        )
    return {"collapsed": "; ".join(found)} if found else {}


# The dry run ------------------------------------------------------------------------------


def dry_run(config: EdgetuneConfig) -> DryRun:
    """An untrained ``model.arch`` through the study's own export, compiler (on the study's
    calibration set) and board, once, before any training; see ``Workload.dry_run``."""
    # torch loads only where a model is built: compile and device stages never need it.
    from tasks.models import create_model
    from tasks.training.rng import build_model

    info = inspect_dataset(config.data.root, verify_images=False)
    evaluated = split_items(info, config.data.eval_split, config.data.root)[:DRY_RUN_IMAGES]
    steps = DryRunSteps(config, f"data.image_size={config.data.image_size}")
    with scratch(config, "dry-run") as work:
        calibration = calibration_set(config, info, work / "calibration.npz")
        bundle = make_bundle(evaluated, info.classes, config.data.image_size, work / "bundle.npz")
        images = load_bundle(bundle)
        with steps.step("export"):
            model = build_model(
                config.seed, lambda: create_model(config.model.arch, len(info.classes))
            )
            sample = normalise(images["images"], images["mean"], images["std"])
            exported = export_model(config, model, sample, work / "model.onnx")
        with steps.step("compile"):
            compiler = create_compiler(config.compile.backend, **config.compile.backend_options())
            artifact = compiler.compile(exported.path, calibration, work / "compiled")
        with (
            steps.step("device"),
            staged_on_device(config, artifact.path, bundle) as staged,
            holding_board(config),
        ):
            result = run_on_device(config, artifact.path, bundle, work, staged)
    return steps.done(artifact, result.latency_ms["mean"], len(evaluated))


# The workload ------------------------------------------------------------------------------


def _objective(split: str) -> Objective:
    """The classifier's objective measured on ``split``; off val, every name says where."""
    p = "" if split == "val" else f"{split}_"
    return Objective(
        metric=f"{p}device_augrc",
        direction="minimize",
        label=f"{p.replace('_', ' ')}device AUGRC",
        float_metric=f"{p}float_augrc",
        epoch_metric=f"{split}_augrc",
        columns=(
            (f"{p}device_accuracy", f"{p.replace('_', ' ')}device acc", ".3f"),
            ("device_latency_ms", "latency ms", ".3f"),
            (f"{p}augrc_gap", "AUGRC gap", "+.4f"),
            (f"{p}accuracy_gap", "acc gap", "+.3f"),
        ),
        kept=(f"{p}device_augrc_ci_low", f"{p}device_augrc_ci_high", f"{p}device_e_augrc"),
        confidences=True,
    )


CLASSIFIER = _objective("val")
#: A final model measured on the test split (``study.retrain: train+val``).
CLASSIFIER_ON_TEST = _objective("test")


def package_classifier(
    config: EdgetuneConfig, onnx_path: Path, compiled: Path, calibration: Path, work: Path
) -> Path:
    """The trial's MLflow model (``mlflow_model/``): its compiled artifact in a serving graph
    that takes uint8 images and returns class probabilities (see ``tasks.packaging``); its
    input example is a calibration image."""
    return save_served_model(
        onnx_path,
        compiled,
        served_arrays(calibration),
        work / "mlflow_model",
        classifier=True,
        metadata={
            "study": config.study.name,
            "compiler": config.compile.backend,
            "device": config.device.name,
            "objective": ClassifierWorkload.objective_on(config).metric,
        },
    )


class ClassifierWorkload(Workload[EdgetuneConfig]):
    """FMFP (SAM + SWA) image classifier; objective: validation AUGRC on the board."""

    name = "classifier"
    objective = CLASSIFIER
    other_objectives = (CLASSIFIER_ON_TEST,)
    config_type = EdgetuneConfig

    @classmethod
    def objective_on(cls, config: StudyTarget) -> Objective:
        if isinstance(config, EdgetuneConfig) and config.data.eval_split == "test":
            return CLASSIFIER_ON_TEST
        return CLASSIFIER

    def preflight(self) -> Checked:
        info = checks.preflight(self.config)
        return Checked(info.classes, info.counts())

    def preflight_variant(self, num_classes: int) -> None:
        checks.check_search_space(self.config)
        checks.check_weights(self.config, num_classes)
        COMPILERS[self.config.compile.backend].check_available()

    def prepare(self, tracker: Tracker, parent_run_id: str) -> Checked:
        return prepare_inputs(self.config, tracker, parent_run_id)

    def train(
        self,
        params: dict[str, Any],
        tracker: Tracker,
        run_id: str,
        parent_run_id: str,
        *,
        on_epoch: EpochHook | None = None,
    ) -> TrainOutcome:
        return train(self.config, params, tracker, run_id, parent_run_id, on_epoch=on_epoch)

    def compile(self, tracker: Tracker, run_id: str, parent_run_id: str) -> CompileOutcome:
        return compile_model(self.config, tracker, run_id, parent_run_id)

    def dry_run(self) -> DryRun:
        return dry_run(self.config)

    def evaluate(
        self, tracker: Tracker, run_id: str, parent_run_id: str, artifact: str
    ) -> DeviceOutcome:
        """The compiled trial on the board, holding the board's slot only while it runs there:
        its inputs are staged on the board first, while another evaluation may run."""
        config = self.config
        key = staging_key(run_id, artifact)
        with evaluation_inputs(config, tracker, run_id, parent_run_id, artifact) as inputs:
            compiled, bundle, work = inputs
            labels = load_bundle(bundle)["labels"]
            with staged_on_device(config, compiled, bundle, key) as staged, hold_board(config):
                result = run_on_device(config, compiled, bundle, work, staged)
        return score_device_result(config, tracker, run_id, result, labels)

    def planned_epochs(self, params: dict[str, Any]) -> int:
        return trial_train_config(self.config, params).epochs

    def trial_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            **study_free(self.config.model_dump(mode="json")),
            "train": trial_train_config(self.config, params).model_dump(mode="json"),
        }

    def pruning_warmup(self, params: dict[str, Any]) -> int:
        """By default the trial's ``swa_start``: no FMFP trial is judged before its SWA
        starts (before it, validation AUGRC predicts the final one poorly)."""
        warmup = self.config.study.pruner_warmup
        return trial_train_config(self.config, params).swa_start if warmup is None else warmup

    def artifact_location(self) -> str | None:
        """Beside a SQLite tracking file; a tracking server's artifact proxy otherwise
        (whether the URI comes from tracking.uri or $MLFLOW_TRACKING_URI)."""
        return local_artifact_location(self.config.tracking_uri)

    def register_best(
        self, tracker: Tracker, run_id: str, trial: int, value: float, alias: str
    ) -> Registration | None:
        """The trial's compiled artifact becomes a version of the registered model."""
        cfg = self.config
        variant = variant_name(cfg)
        tags = {
            "study": cfg.study.name,
            "trial": trial,
            self.study_objective.metric: value,
            "compiler": cfg.compile.backend,
            "device": cfg.device.name,
            **({"variant": variant} if variant else {}),
        }
        name = cfg.registered_model_name
        version = tracker.register(
            name,
            run_id,
            MODEL_DIR,
            alias=None if alias == CHAMPION else alias,
            tags=tags,
            description=(
                f"Best trial of study {cfg.study.name} by {self.study_objective.label} "
                f"({cfg.device.name})."
            ),
        )
        if variant:  # the variants' comparison decides (``crown``)
            return Registration(name, version, alias, run_id)
        objective = self.study_objective
        promotion = tracker.promote(
            name, version, objective.metric, value, maximize=objective.maximize
        )
        # the alias this version holds: champion, its own (retrained, final), or none (a
        # search whose best does not beat an earlier champion)
        own = "" if alias == CHAMPION else alias
        held = CHAMPION if promotion.version == version else own
        return Registration(name, version, held, run_id, extra={"note": promotion.note})

    def crown(self, tracker: Tracker, winner: dict[str, Any] | None) -> Registration | None:
        """The winning variant's version takes ``champion`` (each variant registered its own)."""
        registered = (winner or {}).get("champion")
        if not winner or not registered:
            return None
        model, version = str(registered["model"]), str(registered["version"])
        objective = self.study_objective
        value = float(winner["best"][objective.metric])
        promotion = tracker.promote(
            model, version, objective.metric, value, maximize=objective.maximize
        )
        if promotion.version != version:  # an earlier champion is better: it keeps the alias
            current = tracker.alias_version(model)
            return Registration(
                model,
                promotion.version,
                CHAMPION,
                str(current.run_id),
                extra={"note": promotion.note},
            )
        run_id = str(winner["best"]["mlflow_run_id"])
        return Registration(model, version, CHAMPION, run_id, extra={"note": promotion.note})
