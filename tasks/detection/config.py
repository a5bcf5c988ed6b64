"""Typed detector configuration (``configs/detectors/*.yaml``).

A detector run trains one Ultralytics YOLO model, exports it to ONNX, compiles it with the
classifier's compilers and measures it on the same board. The compile, device and
tracking sections are the classifier's own, so one board serves both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import Field, field_validator, model_validator

from tasks.config import (
    CompileConfig,
    ConfigError,
    DeviceConfig,
    GpuConfig,
    OnnxRuntimeOptions,
    OrchestrationConfig,
    SearchParam,
    StudyConfig,
    TrackingConfig,
    VariantSpec,
    _Strict,
    overridden,
    read_yaml,
    space_refusal,
    storage_url,
    tracking_uri,
    validate_study,
    yaml_load,
)


class DetectorData(_Strict):
    yaml: str = Field(description="YOLO data.yaml; its `path` is relative to the file's folder")
    max_eval_images: int | None = Field(
        None, gt=0, description="validation images sent to the board (default: all)"
    )


class DetectorModel(_Strict):
    arch: str = Field(
        "yolo11n.yaml",
        description="architecture YAML shipped with Ultralytics (yolov8l.yaml) or a file",
    )
    weights: str | None = Field(None, description="local .pt file; never a hub download")

    @field_validator("arch")
    @classmethod
    def _yaml_only(cls, value: str) -> str:
        if not value.endswith((".yaml", ".yml")):
            raise ValueError(
                f"{value!r} is not an architecture YAML; name one (yolov8l.yaml, yolo11n.yaml) "
                "and put a local .pt file in model.weights to start from trained weights"
            )
        return value

    @field_validator("weights")
    @classmethod
    def _pt_file(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".pt"):
            raise ValueError(f"{value!r} is not a .pt weights file; give a local .pt path")
        return value


class DetectorTrain(_Strict):
    """Ultralytics training settings (the names are Ultralytics' own)."""

    imgsz: int = Field(1280, ge=32, le=8192)
    epochs: int = Field(300, gt=0)
    patience: int = Field(20, ge=0)
    batch: int = Field(16, gt=0)
    cache: bool | Literal["ram", "disk"] = True
    device: str = Field("auto", description="auto, cpu, or CUDA ids such as 0 or 0,1")
    workers: int = Field(8, ge=0)
    optimizer: Literal["auto", "SGD", "Adam", "AdamW", "NAdam", "RAdam", "RMSProp"] = "auto"
    lr0: float = Field(0.01, gt=0)
    lrf: float = Field(0.01, gt=0, le=1)
    momentum: float = Field(0.937, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: float = Field(3.0, ge=0)
    box: float = Field(7.5, gt=0)
    cls: float = Field(0.5, gt=0)
    mosaic: float = Field(1.0, ge=0, le=1)
    close_mosaic: int = Field(10, ge=0)
    mixup: float = Field(0.0, ge=0, le=1)
    fliplr: float = Field(0.5, ge=0, le=1)
    degrees: float = Field(0.0, ge=0, le=180)
    scale: float = Field(0.5, ge=0, le=1)
    translate: float = Field(0.1, ge=0, le=1)
    hsv_h: float = Field(0.015, ge=0, le=1)
    hsv_s: float = Field(0.7, ge=0, le=1)
    hsv_v: float = Field(0.4, ge=0, le=1)
    single_cls: bool = Field(False, description="train every class as one")
    single_cls_name: str = Field("object", min_length=1, description="that one class's name")
    amp: bool = True
    plots: bool = Field(True, description="Ultralytics' curves and sample plots")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="other Ultralytics train arguments, passed as given"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not re.fullmatch(r"\d+(,\d+)*", value):
            raise ValueError(f"{value!r}: use auto, cpu, or CUDA device ids such as 0 or 0,1")
        return value


class DetectorExport(_Strict):
    opset: int = Field(17, ge=13, le=21)
    simplify: bool = Field(False, description="needs onnxslim installed")


class DetectorEval(_Strict):
    """Post-processing on the board and on the controller (boxes after NMS)."""

    conf: float = Field(0.001, ge=0, lt=1)
    iou: float = Field(0.7, gt=0, le=1)
    max_det: int = Field(300, gt=0)


class DetectorOnnxRuntimeOptions(OnnxRuntimeOptions):
    float_tail: bool = Field(
        True, description="box decoding stays float: INT8 would round every score to 0"
    )


class DetectorCompile(CompileConfig):
    onnxruntime: DetectorOnnxRuntimeOptions = DetectorOnnxRuntimeOptions()
    calibration_samples: int = Field(64, gt=0, description="train images used to calibrate")


#: Ultralytics training settings a detector study may search (``train.<name>``); imgsz is
#: not among them: the board's evaluation bundle is made once per study at train.imgsz.
DETECTOR_TUNABLE = (
    "lr0",
    "lrf",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "box",
    "cls",
    "mosaic",
    "close_mosaic",
    "mixup",
    "fliplr",
    "degrees",
    "scale",
    "translate",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "epochs",
    "patience",
    "batch",
    "optimizer",
)
_INT_SETTINGS = ("epochs", "patience", "batch", "close_mosaic")


def _detector_space() -> dict[str, SearchParam]:
    """Optimiser and augmentation strengths: the settings that move a detector's mAP most."""
    return {
        "lr0": SearchParam(type="float", low=1e-4, high=1e-1, log=True),
        "lrf": SearchParam(type="float", low=0.01, high=1.0, log=True),
        "momentum": SearchParam(type="float", low=0.6, high=0.98),
        "weight_decay": SearchParam(type="float", low=1e-5, high=1e-3, log=True),
        "warmup_epochs": SearchParam(type="float", low=0.0, high=5.0),
        "mosaic": SearchParam(type="float", low=0.0, high=1.0),
        "scale": SearchParam(type="float", low=0.0, high=0.9),
    }


class DetectorStudyConfig(StudyConfig):
    """A study over a detector's Ultralytics settings; the objective is device mAP50-95."""

    tunable: ClassVar[tuple[str, ...]] = DETECTOR_TUNABLE
    metric: ClassVar[str] = "device_map50_95"

    n_trials: int = Field(30, gt=0)
    search_space: dict[str, SearchParam] = Field(default_factory=_detector_space)

    @model_validator(mode="after")
    def _retrain_on_train(self) -> DetectorStudyConfig:
        if self.retrain == "train+val":
            raise ValueError(
                "retrain: train+val needs a test split, and a detector's data.yaml names train "
                "and val only; use retrain: train"
            )
        if self.confirm_seeds:
            raise ValueError(
                "confirm_seeds: a detector trial's seed comes from Ultralytics' own seed, "
                "which its replicas would share; set confirm_seeds: 0"
            )
        return self


def trial_train_settings(train: DetectorTrain, params: dict[str, Any]) -> DetectorTrain:
    """The training settings of one trial: the config's, overridden by the sampled params."""
    unknown = sorted(set(params) - set(DETECTOR_TUNABLE))
    if unknown:
        raise ConfigError(f"trial params {unknown} are not tunable; use {DETECTOR_TUNABLE}")
    merged = {**train.model_dump(), **params}
    for name in _INT_SETTINGS:
        merged[name] = int(merged[name])
    return DetectorTrain.model_validate(merged)


class DetectorConfig(_Strict):
    """One detector: data, model, Ultralytics training, export, compiler, board, tracking.

    The optional ``study`` section is read by ``edgetune tune``, which searches the
    training settings with device mAP50-95 as the objective; ``detect train`` ignores it.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="l-ml, s-ml, …")
    seed: int = 0
    run_dir: str | None = Field(None, description="default: runs/detectors/<name>")
    data: DetectorData
    model: DetectorModel = DetectorModel()
    train: DetectorTrain = DetectorTrain()
    export: DetectorExport = DetectorExport()
    eval: DetectorEval = DetectorEval()
    compile: DetectorCompile = DetectorCompile()
    device: DeviceConfig = DeviceConfig()
    tracking: TrackingConfig = TrackingConfig()
    study: DetectorStudyConfig | None = None
    orchestration: OrchestrationConfig = OrchestrationConfig()
    gpu: GpuConfig = GpuConfig()
    variants: list[VariantSpec] = Field(
        default_factory=list,
        description="several variants (architectures, settings) in one tune run",
    )

    @model_validator(mode="after")
    def _space_inside_settings(self) -> DetectorConfig:
        """Every end of every range (every choice) is a value ``train.<name>`` accepts."""
        if self.study is None:
            return self
        refusal = space_refusal(
            self.study.search_space,
            lambda params: trial_train_settings(self.train, params),
            self.train.model_dump(),
        )
        if refusal:
            raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _stride_multiple(self) -> DetectorConfig:
        if self.train.imgsz % 32:
            raise ValueError(
                f"train.imgsz: {self.train.imgsz} is not a multiple of 32 (the detectors' "
                f"largest stride); use {max(32, round(self.train.imgsz / 32) * 32)}"
            )
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or Path("runs") / "detectors" / self.name)

    @property
    def tracking_uri(self) -> str:
        """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file shared by detectors."""
        return tracking_uri(self.tracking, self.run_path.parent)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"detector-{self.name}"

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or self.name


class DetectorStudy(DetectorConfig):
    """A detector config whose study section is present (what ``edgetune tune`` runs)."""

    study: DetectorStudyConfig  # required here

    @property
    def storage_url(self) -> str:
        """study.storage, else $EDGETUNE_STORAGE, else optuna.db in the detector's run dir."""
        return storage_url(self.study, self.run_path)

    @model_validator(mode="after")
    def _one_training_per_process(self) -> DetectorStudy:
        if self.orchestration.mode == "local" and self.study.parallel > 1:
            raise ValueError(
                f"study.parallel: {self.study.parallel} trainings at once in one process; "
                f"Ultralytics keeps process-wide state, so set study.parallel: 1 (compilation "
                f"and the board still overlap the next training) or run the stages on work "
                f"pools (orchestration.mode: deployments)"
            )
        return self


#: Path-valued keys, relative to the config file's folder when written in the file.
DETECTOR_PATH_KEYS = (
    ("data", "yaml"),
    ("model", "weights"),
    ("run_dir",),
    ("study", "search_space"),
)


def parse_detector_config(raw: dict[str, Any], *, source: str = "config") -> DetectorConfig:
    return _resolve(validate_study(DetectorConfig, raw, source, DETECTOR_TUNABLE))


def parse_detector_study(raw: dict[str, Any], *, source: str = "config") -> DetectorStudy:
    """A detector config for ``edgetune tune``: its study section is required."""
    if not isinstance(raw.get("study"), dict):
        raise ConfigError(
            f"{source}: a detector config needs a study section to be tuned (study: {{name: "
            f"..., search_space: ...}}); see configs/detectors/s-ml.yaml"
        )
    return _resolve(validate_study(DetectorStudy, raw, source, DETECTOR_TUNABLE))


_C = TypeVar("_C", bound="DetectorConfig")


def _resolve(config: _C) -> _C:
    data = config.data.model_copy(update={"yaml": str(Path(config.data.yaml).resolve())})
    model = config.model
    if model.weights:
        model = model.model_copy(update={"weights": str(Path(model.weights).resolve())})
    return config.model_copy(
        update={"data": data, "model": model, "run_dir": str(config.run_path.resolve())}
    )


def is_detector_config(raw: dict[str, Any]) -> bool:
    """A detector config names a YOLO data.yaml; a classifier config names a data.root."""
    data = raw.get("data")
    return isinstance(data, dict) and "yaml" in data


#: Ultralytics' own flat names (``yolo train data=… epochs=1``) as overrides of these keys;
#: ``model=`` names ``model.weights`` (a .pt file) or ``model.arch`` (see ``_alias``).
ULTRALYTICS_KEYS = {
    "data": "data.yaml",
    "epochs": "train.epochs",
    "imgsz": "train.imgsz",
    "batch": "train.batch",
}


def _alias(key: str, text: str) -> str:
    """The detector config's key for an override ``key=text`` (the key itself if not an
    alias; ``data=`` and ``model=`` with a mapping stay the sections)."""
    if key not in (*ULTRALYTICS_KEYS, "model"):
        return key
    try:
        if isinstance(yaml_load(text), dict):
            return key
    except yaml.YAMLError:
        pass  # apply_overrides names the bad value
    if key == "model":
        return "model.weights" if text.strip().endswith(".pt") else "model.arch"
    return ULTRALYTICS_KEYS[key]


def ultralytics_aliases(overrides: list[str]) -> list[str]:
    """The overrides with Ultralytics' flat keys (``data=``, ``epochs=``, ``imgsz=``,
    ``batch=``, ``model=``) written as this config's keys."""
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        out.append(f"{_alias(key, text)}={text}" if sep else item)
    return out


def override_detector(
    raw: dict[str, Any], path: str | Path, overrides: list[str]
) -> dict[str, Any]:
    """A detector config file's raw mapping with the overrides (Ultralytics' flat keys too)
    over it; paths as in ``overridden``."""
    return overridden(raw, path, ultralytics_aliases(overrides), DETECTOR_PATH_KEYS)


def read_detector_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of a detector config file, its paths anchored, overrides applied."""
    raw = read_yaml(path)
    if not is_detector_config(raw):
        raise ConfigError(
            f"{path}: not a detector config (it has no data.yaml key); "
            "start from configs/detectors/s-ml.yaml"
        )
    return override_detector(raw, path, overrides or [])


def load_detector_config(path: str | Path, overrides: list[str] | None = None) -> DetectorConfig:
    """Read, override and validate a detector config (paths relative to its folder)."""
    return parse_detector_config(read_detector_config(path, overrides), source=str(path))


__all__ = [
    "DetectorConfig",
    "DetectorStudy",
    "is_detector_config",
    "load_detector_config",
    "override_detector",
    "parse_detector_config",
    "parse_detector_study",
    "trial_train_settings",
    "ultralytics_aliases",
]
