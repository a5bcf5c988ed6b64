"""The detector workload: a YOLO detector in a study (``edgetune tune`` on a detector config).

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
from pathlib import Path
from typing import Any

from tasks import preflight as checks
from tasks.compilers import create_compiler
from tasks.config import ConfigError
from tasks.detection.config import DetectorStudy, trial_train_settings
from tasks.detection.dataset import (
    make_calibration_set,
    make_detection_bundle,
    read_data_yaml,
    write_resolved_yaml,
)
from tasks.detection.pipeline import (
    DETECTOR_TAG,
    KIND_TAG,
    board_stage,
    check_detector,
    compile_stage,
    export_stage,
    float_reference,
    prepare_inputs,
    select_champion,
    train_stage,
)
from tasks.detection.ultra import DetectorError, export_onnx, ultralytics
from tasks.devices import DeviceConfigError, create_runner
from tasks.devices.base import detection_bundle_expectations
from tasks.inputs import fetch_study_input, staging_key
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
    TrainOutcome,
    Workload,
    evaluation_inputs,
    holding_board,
    scratch,
    study_free,
)

CALIBRATION = "inputs/calibration.npz"
ONNX = "model/model.onnx"


def untrained_weights(config: DetectorStudy, classes: int, work: Path) -> Path:
    """A checkpoint of ``model.arch`` with ``classes`` classes and initial weights: what a
    trial exports, less its training (the weights file changes values, not the graph)."""
    yolo = ultralytics(work).YOLO
    # Ultralytics (and torch) load only where a detector is built.
    from ultralytics.nn.tasks import DetectionModel

    try:
        model = yolo(config.model.arch, task="detect")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise DetectorError(f"model.arch {config.model.arch!r} cannot be built: {exc}") from None
    model.model = DetectionModel(model.model.yaml, nc=classes, verbose=False)
    path = work / "untrained.pt"
    model.save(path)
    return path


# The workload ------------------------------------------------------------------------------

DETECTOR = Objective(
    metric="device_map50_95",
    direction="maximize",
    label="device mAP50-95",
    float_metric="float_map50_95",
    epoch_metric="metrics/mAP50-95",
    columns=(
        ("device_map50", "device mAP50", ".4f"),
        ("map50_95_gap", "gap to float", ".4f"),
        ("device_latency_ms", "latency ms", ".3f"),
    ),
    kept=("device_precision", "device_recall"),
)


class DetectorWorkload(Workload[DetectorStudy]):
    """Ultralytics YOLO detector; objective: validation mAP50-95 on the board (maximised).

    Its champion is the best of all the detector's runs, ``detect train`` runs and study
    trials alike: a study's best trial takes the alias only if it beats the champion.
    """

    name = "detector"
    objective = DETECTOR
    config_type = DetectorStudy

    def preflight(self) -> Checked:
        config = self.config
        self.preflight_variant(0)
        checks.check_shared_services(config)
        checks.check_storage(config.storage_url)
        checks.check_tracking(config.tracking_uri)
        return self._dataset()

    def _dataset(self) -> Checked:
        dataset = read_data_yaml(Path(self.config.data.yaml))
        return Checked(dataset.classes, {k: len(v) for k, v in dataset.splits.items()})

    def preflight_variant(self, num_classes: int) -> None:
        try:
            check_detector(self.config)
        except (DetectorError, DeviceConfigError) as exc:
            raise ConfigError(str(exc)) from None

    def prepare(self, tracker: Tracker, parent_run_id: str) -> Checked:
        with scratch(self.config, "inputs") as work:
            prepare_inputs(self.config, tracker, parent_run_id, work, calibration=True)
        return self._dataset()

    def train(
        self,
        params: dict[str, Any],
        tracker: Tracker,
        run_id: str,
        parent_run_id: str,
        *,
        on_epoch: EpochHook | None = None,
    ) -> TrainOutcome:
        """Train, export and measure the float model of one trial; return its float metrics."""
        config = self.config
        started = time.time()
        trial = config.model_copy(update={"train": trial_train_settings(config.train, params)})
        with scratch(config, "train") as work:
            # A study in one process keeps Ultralytics' folders in its run dir, like detect
            # train; a stage on a work pool keeps nothing on its host.
            root = config.run_path if config.orchestration.mode == "local" else work
            data_yaml = write_resolved_yaml(
                read_data_yaml(Path(config.data.yaml)), work / "data.yaml"
            )
            run_name = f"{config.study.name}-{tracker.client.get_run(run_id).info.run_name}"
            trained = train_stage(
                trial, tracker, run_id, work / run_name, data_yaml, root=root, on_epoch=on_epoch
            )
            onnx = export_stage(trial, tracker, run_id, work / run_name, trained, root=root)
            bundle = fetch_study_input(tracker, parent_run_id, BUNDLE, work / "in")
            reference = float_reference(trial, onnx["path"], bundle, work)
        float_metrics = {f"float_{k}": v for k, v in reference.items()}
        tracker.log_metrics(run_id, float_metrics)
        metrics = {**trained["metrics"], **onnx["metrics"], **float_metrics}
        return TrainOutcome(metrics=metrics, started_at=started, finished_at=time.time())

    def compile(self, tracker: Tracker, run_id: str, parent_run_id: str) -> CompileOutcome:
        config = self.config
        started = time.time()
        with scratch(config, "compile") as work:
            onnx = tracker.download(run_id, ONNX, work / "in")
            calibration = fetch_study_input(tracker, parent_run_id, CALIBRATION, work / "in")
            compiled = compile_stage(
                config, tracker, run_id, work, {"path": onnx}, {"calibration": calibration}
            )
        return CompileOutcome(
            artifact=compiled["artifact"],
            metrics=compiled["metrics"],
            started_at=started,
            finished_at=time.time(),
        )

    def evaluate(
        self, tracker: Tracker, run_id: str, parent_run_id: str, artifact: str
    ) -> DeviceOutcome:
        config = self.config
        started = time.time()
        logged = tracker.client.get_run(run_id).data.metrics
        reference = {
            k.removeprefix("float_"): v for k, v in logged.items() if k.startswith("float_")
        }
        key = staging_key(run_id, artifact)
        with evaluation_inputs(config, tracker, run_id, parent_run_id, artifact) as inputs:
            compiled, bundle, work = inputs
            metrics = board_stage(config, tracker, run_id, compiled, bundle, work, reference, key)
        return DeviceOutcome(metrics=metrics, started_at=started, finished_at=time.time())

    def dry_run(self) -> DryRun:
        """An untrained ``model.arch`` with the dataset's classes through the study's own
        export, compiler (on the study's calibration set) and board, once."""
        config, imgsz = self.config, self.config.train.imgsz
        dataset = read_data_yaml(Path(config.data.yaml))
        steps = DryRunSteps(config, f"train.imgsz={imgsz}")
        with scratch(config, "dry-run") as work:
            bundle = make_detection_bundle(
                dataset,
                imgsz,
                work / "bundle.npz",
                single_cls=config.train.single_cls,
                single_cls_name=config.train.single_cls_name,
                max_images=DRY_RUN_IMAGES,
            )
            calibration = make_calibration_set(
                dataset, imgsz, config.compile.calibration_samples, config.seed, work / "cal.npz"
            )
            images, classes = detection_bundle_expectations(bundle)
            with steps.step("export"):
                weights = untrained_weights(config, classes, work)
                export = config.export
                onnx = export_onnx(
                    weights, imgsz, export.opset, export.simplify, work / "model.onnx", work
                )
            with steps.step("compile"):
                compiler = create_compiler(
                    config.compile.backend, **config.compile.backend_options()
                )
                artifact = compiler.compile(onnx, calibration, work / "compiled")
            with steps.step("device"):
                runner = create_runner(config.device.runner, **config.device.runner_options())
                with runner.stage(artifact.path, bundle) as staged, holding_board(config):
                    result = staged.detect(work / "device", **config.eval.model_dump())
        return steps.done(artifact, result.latency_ms["mean"], images)

    def dry_run_settings(self) -> dict[str, Any]:
        """Also the export size and the class set, which are train settings of a detector."""
        train = self.config.train
        return {
            **super().dry_run_settings(),
            "eval": self.config.eval.model_dump(mode="json"),
            "train": [train.imgsz, train.single_cls, train.single_cls_name],
        }

    def planned_epochs(self, params: dict[str, Any]) -> int:
        return trial_train_settings(self.config.train, params).epochs

    def trial_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            **study_free(self.config.model_dump(mode="json")),
            "train": trial_train_settings(self.config.train, params).model_dump(mode="json"),
        }

    def run_tags(self) -> dict[str, str]:
        """Trial runs are runs of the detector: its champion is chosen among them too."""
        return {KIND_TAG: "detector", DETECTOR_TAG: self.config.name}

    def artifact_location(self) -> str | None:
        return local_artifact_location(self.config.tracking_uri)

    def register_best(
        self, tracker: Tracker, run_id: str, trial: int, value: float, alias: str
    ) -> Registration | None:
        """The best of all the detector's runs keeps (or takes) ``champion``; ``alias`` is
        not used: a detector's variants are runs of the same detector."""
        return self.crown(tracker, None)

    def crown(self, tracker: Tracker, winner: dict[str, Any] | None) -> Registration | None:
        chosen = select_champion(self.config, tracker)
        if chosen is None:
            return None
        return Registration(
            str(chosen["model"]),
            str(chosen["version"]),
            CHAMPION,
            str(chosen["run_id"]),
            extra={k: v for k, v in chosen.items() if k not in ("model", "version", "alias")},
        )
