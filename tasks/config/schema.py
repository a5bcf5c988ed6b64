"""Typed study configuration: the pydantic models a YAML config validates into.

Every error names the dotted path of the bad key, the value given and what is allowed,
so a typo in a 400-trial study is caught before anything is created. The models check
shape and values only; what needs several models at once (variants) is checked after
validation (``tasks.config.parse``).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tasks.secrets import resolve_secret
from tasks.space import EmptyRange, ExpressionError, limited_corners, parse_expr

#: The names of ``tasks.models.ARCHITECTURES`` (a test keeps them equal): parsing a config
#: must not import torch, which compile and device stages never need.
MODEL_ARCHS = (
    "tinycnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
)

STORAGE_ENV = "EDGETUNE_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"

#: Trial parameters a search space may tune: they override ``train.<name>``.
TUNABLE = (
    "lr",
    "momentum",
    "weight_decay",
    "rho",
    "swa_start",
    "swa_lr",
    "epochs",
    "batch_size",
    "optimizer",
    "sampling",
    "class_weighted_loss",
)

#: SAM's base optimizers (``train.optimizer``, ``train.optimizer_candidates``).
OPTIMIZERS = ("sgd", "adamw")
#: ``train.optimizer`` / ``train.batch_size`` value that leaves the choice to the trial.
AUTO = "auto"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; a study config means the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the key and the fix."""


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _positive_or_auto(value: Any) -> int | str:
    """A whole number above zero, or ``auto`` (strict: no strings of digits, no booleans)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "Input should be a valid integer or 'auto'")
    if value <= 0:
        raise PydanticCustomError("greater_than", "Input should be greater than {gt}", {"gt": 0})
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AugmentConfig(_Strict):
    """Training-time augmentations; horizontal flip stays off unless asked (text, digits)."""

    rotation: float = Field(10.0, ge=0, le=45, description="max rotation in degrees")
    perspective: float = Field(0.0, ge=0, le=1, description="perspective distortion scale")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation")
    hflip: bool = False


def _train_only() -> list[Literal["train", "val"]]:
    return ["train"]


class DataConfig(_Strict):
    root: str = Field(description="image-folder dataset: train/, val/, optional test/")
    image_size: int = Field(32, gt=0, le=4096)
    augment: AugmentConfig = AugmentConfig()
    num_workers: int = Field(0, ge=0, description="loader processes on the per-image path")
    cache: bool = Field(
        True, description="decode the images once per host (EDGETUNE_CACHE_DIR, ~/.cache/edgetune)"
    )
    loader: Literal["auto", "batched", "per_image"] = Field(
        "auto",
        description="batched: whole batches augmented on the training device; per_image: "
        "image by image in num_workers processes; auto: batched when the decoded set fits",
    )
    train_splits: list[Literal["train", "val"]] = Field(
        default_factory=_train_only, description="the splits a model trains on"
    )
    eval_split: Literal["val", "test"] = Field(
        "val", description="the split measured each epoch and on the board"
    )

    @model_validator(mode="after")
    def _held_out(self) -> DataConfig:
        if not self.train_splits or len(set(self.train_splits)) != len(self.train_splits):
            raise ValueError(
                f"train_splits: {self.train_splits} must list train (and val) once each"
            )
        if self.eval_split in self.train_splits:
            raise ValueError(
                f"eval_split: {self.eval_split} is also a training split, so its scores would "
                f"be optimistic; evaluate on test (eval_split: test) or train on train only"
            )
        return self


class ModelConfig(_Strict):
    arch: str = "tinycnn"
    weights: str | None = Field(None, description="local weights file; never a hub download")
    finetune: Literal["full", "head"] = "full"

    @model_validator(mode="after")
    def _known_arch(self) -> ModelConfig:
        if self.arch not in MODEL_ARCHS:
            raise ValueError(
                f"arch: unknown architecture {self.arch!r}; "
                f"choose one of {', '.join(sorted(MODEL_ARCHS))}"
            )
        return self


class TrainConfig(_Strict):
    """FMFP: SAM around SGD (or AdamW), cosine to ``swa_start``, then SWA with SWALR.

    ``batch_size: auto`` and ``optimizer: auto`` are decided by each trial on its training
    host (``tasks.training.auto``).
    """

    epochs: int = Field(200, gt=0)
    batch_size: int | Literal["auto"] = Field(
        16, description="auto: the largest power of two that fits on the GPU"
    )
    lr: float = Field(0.1, gt=0)
    optimizer: Literal["sgd", "adamw", "auto"] = Field(
        "sgd", description="SAM's base optimizer (FMFP: sgd); auto: the best short run"
    )
    optimizer_candidates: list[str] = Field(
        default_factory=lambda: list(OPTIMIZERS),
        description="the optimizers optimizer: auto tries",
    )
    auto_epochs: int = Field(2, gt=0, description="epochs each candidate of optimizer: auto trains")
    auto_batch_min: int = Field(8, gt=0, description="smallest batch size auto probes")
    auto_batch_max: int = Field(512, gt=0, description="largest batch size auto probes")
    cpu_batch_size: int = Field(32, gt=0, description="batch_size: auto on a CPU")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(5e-4, ge=0)
    rho: float = Field(0.05, gt=0, description="SAM neighbourhood size")
    swa_start: int = Field(120, ge=0)
    swa_lr: float = Field(0.05, gt=0)
    eta_min: float = Field(1e-5, ge=0)
    early_stop_patience: int | None = Field(
        None,
        gt=0,
        description="after swa_start: stop when the float validation AUGRC has not improved "
        "for this many epochs (null: train all epochs)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool | Literal["auto", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA (fp16 with a gradient scaler where bf16 is "
        "missing), float32 on a CPU; bf16/fp16 on any device; false: float32",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels-last memory layout (auto: on CUDA)"
    )
    compile: bool = Field(False, description="torch.compile the training passes")
    sampling: Literal["uniform", "weighted"] = Field(
        "uniform",
        description="uniform: each training image once per epoch; weighted: as many draws "
        "with replacement, the classes in the proportions of class_weights (default: equal)",
    )
    class_weights: dict[str, float] | None = Field(
        None,
        description="class folder name -> positive relative weight, for weighted sampling "
        "and the weighted loss (null: equal)",
    )
    class_weighted_loss: bool = Field(
        False,
        description="cross-entropy weighted per class: N/(K·n_c), times class_weights",
    )

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights_as_floats(cls, value: Any) -> Any:
        """YAML writes ``1`` for a weight of one: whole numbers are weights too."""
        if not isinstance(value, dict):
            return value
        return {
            k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in value.items()
        }

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "names no class; give every class folder a positive weight, or null for equal "
                "proportions"
            )
        for name, weight in value.items():
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(
                    f"class {name!r} has weight {weight:g}; weights are relative proportions, "
                    f"give every class a positive finite weight"
                )
        return value

    @field_validator("batch_size", mode="plain", json_schema_input_type=int | Literal["auto"])
    @classmethod
    def _size_or_auto(cls, value: Any) -> int | str:
        return _positive_or_auto(value)

    @field_validator("optimizer_candidates")
    @classmethod
    def _known_optimizers(cls, value: list[str]) -> list[str]:
        choose = f"list some of {', '.join(OPTIMIZERS)}"
        if not value:
            raise ValueError(f"needs at least one optimizer; {choose}")
        for name in value:
            if name not in OPTIMIZERS:
                raise ValueError(
                    f"unknown optimizer {name!r}{_suggest(name, OPTIMIZERS)}; {choose}"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"{value} names an optimizer twice; list each once")
        return value

    @model_validator(mode="after")
    def _auto_batch_range(self) -> TrainConfig:
        for name in ("auto_batch_min", "auto_batch_max"):
            size = getattr(self, name)
            if size & (size - 1):
                lower = 1 << (size.bit_length() - 1)
                raise ValueError(
                    f"{name}: {size} is not a power of two; use {lower} or {2 * lower}"
                )
        if self.auto_batch_min > self.auto_batch_max:
            raise ValueError(
                f"auto_batch_max: {self.auto_batch_max} is below auto_batch_min "
                f"{self.auto_batch_min}; raise auto_batch_max or lower auto_batch_min"
            )
        return self


def class_weights_refusal(
    weights: dict[str, float] | None, classes: typing.Sequence[str]
) -> str | None:
    """Why ``train.class_weights`` does not fit the dataset's class folders ``classes``
    (None: it does, or it is not set): every class needs a weight, and only classes."""
    if weights is None:
        return None
    example = "{" + ", ".join(f"{name}: 1.0" for name in classes) + "}"
    for name in weights:
        if name not in classes:
            return (
                f"train.class_weights: {name!r} is not a class folder of the dataset"
                f"{_suggest(name, classes)}; key the weights by class folder name "
                f"({', '.join(classes)})"
            )
    missing = [name for name in classes if name not in weights]
    if missing:
        return (
            f"train.class_weights: no weight for class {', '.join(map(repr, missing))}; give "
            f"every class a weight, e.g. {example}, or set class_weights: null for equal "
            f"proportions"
        )
    return None


class ExportConfig(_Strict):
    opset: int = Field(17, ge=13, le=21)
    parity_atol: float = Field(1e-3, gt=0)


class OnnxRuntimeOptions(_Strict):
    per_channel: bool = True
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    float_tail: bool = Field(
        False, description="keep the nodes after the last Conv in float (detector decoding)"
    )


class HailoOptions(_Strict):
    hw_arch: Literal["hailo8", "hailo8l", "hailo8r", "hailo10h", "hailo15h", "hailo15l"] = "hailo8"
    optimization_level: int = Field(2, ge=0, le=4)
    compression_level: int = Field(0, ge=0, le=5)
    calibration_batch_size: int = Field(8, gt=0)
    extra_model_script: str = ""


class CompileConfig(_Strict):
    backend: Literal["onnxruntime-int8", "hailo"] = "onnxruntime-int8"
    calibration_samples: int = Field(256, gt=0, description="train images used to calibrate")
    max_accuracy_drop: float | None = Field(
        0.1,
        ge=0,
        le=1,
        description="device accuracy this far below the float model's: the compiled model "
        "collapsed (null: no check)",
    )
    max_augrc_gap: float | None = Field(
        None, ge=0, le=0.5, description="device AUGRC this far above the float one: collapsed"
    )
    on_collapse: Literal["flag", "fail"] = Field(
        "flag", description="a collapsed trial: flag it (kept, marked) or fail it"
    )
    onnxruntime: OnnxRuntimeOptions = OnnxRuntimeOptions()
    hailo: HailoOptions = HailoOptions()

    def backend_options(self) -> dict[str, Any]:
        if self.backend == "hailo":
            return self.hailo.model_dump()
        return self.onnxruntime.model_dump()


def device_limit_name(device: str) -> str:
    """The global concurrency limit (limit 1) that makes one board exclusive."""
    return f"device-{device}"


class SshOptions(_Strict):
    """How the controller reaches a board; the key comes from a file, never from the config."""

    host: str = Field(min_length=1)
    port: int = Field(22, gt=0, lt=65536)
    user: str = Field(min_length=1)
    key_file: str | None = None
    known_hosts: str | None = Field(None, description="default: ~/.ssh/known_hosts")
    check_host_key: bool = True
    work_dir: str = "edgetune"
    python: str = "python3"
    connect_timeout_s: float = Field(15, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(2.0, ge=0)


class DeviceConfig(_Strict):
    name: str = Field("local-cpu", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    runner: Literal["local", "ssh"] = "local"
    ssh: SshOptions | None = None
    timeout_s: float = Field(600, gt=0)
    wait_timeout_s: float = Field(
        3600, gt=0, description="longest wait for the board's slot before the trial fails"
    )
    batch_size: int = Field(1, gt=0)
    warmup: int = Field(5, ge=0)
    max_consecutive_failures: int = Field(
        3, ge=1, description="device-stage failures in a row that pause the study"
    )

    @model_validator(mode="after")
    def _ssh_needs_options(self) -> DeviceConfig:
        if self.runner == "ssh" and self.ssh is None:
            raise ValueError("ssh: runner 'ssh' needs an ssh section with at least host and user")
        return self

    @property
    def concurrency_limit(self) -> str:
        return device_limit_name(self.name)

    def runner_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "timeout_s": self.timeout_s,
            "batch_size": self.batch_size,
            "warmup": self.warmup,
        }
        if self.runner == "ssh" and self.ssh is not None:
            options.update(self.ssh.model_dump())
        return options


class GpuConfig(_Strict):
    """How trainings share the GPUs of the host they run on."""

    slots_per_device: int | Literal["auto"] = Field(
        "auto",
        description="trainings at once on one GPU (small models leave most of a GPU idle); "
        "auto: study.parallel spread evenly over the visible GPUs, one per worker of the gpu "
        "pool (EDGETUNE_GPU_SLOTS_PER_DEVICE on a worker's host overrides it)",
    )

    @field_validator("slots_per_device", mode="plain", json_schema_input_type=int | Literal["auto"])
    @classmethod
    def _count_or_auto(cls, value: Any) -> int | str:
        return _positive_or_auto(value)


class OrchestrationConfig(_Strict):
    """Where the stages run: in this process (``local``) or on work pools (``deployments``)."""

    mode: Literal["local", "deployments"] = "local"
    train_deployment: str = "train-trial/gpu"
    compile_deployment: str = "compile-trial/compile"
    device_deployment: str = "evaluate-trial/edge"
    pipelined: bool = Field(
        True, description="free a GPU slot when training ends (false: hold it until told)"
    )
    poll_interval_s: float = Field(
        2.0,
        gt=0,
        description="how often the parent looks at a stage's flow run (its end wakes it at once)",
    )


Scalar = float | int | str | bool


class SearchParam(_Strict):
    """One searched setting: a float or int range, or a list of choices.

    ``low``/``high`` may be expressions of parameters listed before this one, or of
    training settings (``"3 * epochs / 4"``); ``log`` with ``step`` draws on a log scale
    and rounds to the step (``qloguniform``); ``when`` draws the parameter only when
    earlier parameters take the given values (otherwise the training setting applies).
    """

    type: Literal["float", "int", "categorical"]
    low: float | str | None = None
    high: float | str | None = None
    log: bool = False
    step: float | None = None
    choices: list[Scalar] | None = None
    when: dict[str, list[Scalar]] | None = Field(
        None, description="draw only when earlier parameters take one of these values"
    )

    @field_validator("low", "high", mode="after")
    @classmethod
    def _expression(cls, value: float | str | None) -> float | str | None:
        if not isinstance(value, str):
            return value
        try:
            expr = parse_expr(value)
        except ExpressionError as exc:
            raise ValueError(str(exc)) from None
        if expr.names:
            return value
        try:
            return float(expr({}))  # a constant: the number it spells
        except (ArithmeticError, TypeError, ExpressionError) as exc:
            raise ValueError(f"cannot compute {value!r}: {exc}") from None

    @field_validator("when", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v if isinstance(v, list) else [v] for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("categorical takes 'choices', not 'low'/'high'")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes 'low' and 'high', not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both 'low' and 'high'")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0, but got {self.step}")
        if self.type == "int" and self.step is not None and not float(self.step).is_integer():
            raise ValueError(f"an int range needs a whole step, but got {self.step}")
        low, high = self.low, self.high
        if isinstance(low, str) or isinstance(high, str):
            if self.log and isinstance(low, float) and low <= 0:
                raise ValueError(f"log scale needs low > 0, but got low={low}; raise low")
            return self  # the rest is checked where the expressions have values
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(
                f"low and high must be finite, but got low={low}, high={high}; give finite bounds"
            )
        if low > high:
            raise ValueError(f"low <= high must hold, but got low={low}, high={high}; swap them")
        if self.log and low <= 0:
            raise ValueError(
                f"log scale needs low > 0, but got low={low}; raise low or set log: false"
            )
        if self.type == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"int bounds must be whole numbers, but got {low}..{high}")
        return self

    @property
    def depends_on(self) -> frozenset[str]:
        """The parameters and settings this one's range or condition reads."""
        names = set(self.when or {})
        for end in (self.low, self.high):
            if isinstance(end, str):
                names |= parse_expr(end).names
        return frozenset(names)

    @property
    def dynamic(self) -> bool:
        """Whether a range end is an expression (its values differ from trial to trial)."""
        return isinstance(self.low, str) or isinstance(self.high, str)

    @property
    def upper(self) -> float | None:
        """The largest value this parameter can take (None: an expression decides)."""
        if self.type == "categorical":
            numbers = [c for c in self.choices or [] if isinstance(c, int | float)]
            return max(numbers) if numbers else None
        return self.high if isinstance(self.high, float | int) else None

    @property
    def lower(self) -> float | None:
        if self.type == "categorical":
            numbers = [c for c in self.choices or [] if isinstance(c, int | float)]
            return min(numbers) if numbers else None
        return self.low if isinstance(self.low, float | int) else None


def check_space(
    space: dict[str, SearchParam], tunable: tuple[str, ...], constraints: list[str]
) -> str | None:
    """Why a space's names, order, conditions or constraints cannot work (None: they can).

    A range end or condition may read parameters listed before it, or training settings;
    a constraint may read any parameter or setting.
    """
    seen: list[str] = []
    for name, spec in space.items():
        if name not in tunable:
            return (
                f"search_space.{name}: not a tunable parameter; "
                f"choose from {', '.join(tunable)}{_suggest(name, tunable)}"
            )
        for where, names in (
            ("when", set(spec.when or {})),
            ("low", parse_expr(spec.low).names if isinstance(spec.low, str) else set()),
            ("high", parse_expr(spec.high).names if isinstance(spec.high, str) else set()),
        ):
            for used in sorted(names):
                if used == name:
                    return f"search_space.{name}.{where}: a parameter cannot depend on itself"
                if used not in tunable:
                    return (
                        f"search_space.{name}.{where}: {used!r} is not a parameter or training "
                        f"setting; use one of {', '.join(tunable)}{_suggest(used, tunable)}"
                    )
                if used in space and used not in seen:
                    return (
                        f"search_space.{name}.{where}: reads {used}, which is drawn after "
                        f"{name}; list {used} before {name}"
                    )
        seen.append(name)
    for index, text in enumerate(constraints):
        try:
            expr = parse_expr(text)
        except ExpressionError as exc:
            return f"constraints[{index}]: {exc}"
        unknown = sorted(expr.names - set(tunable))
        if unknown:
            return (
                f"constraints[{index}]: {unknown[0]!r} is not a parameter or training setting; "
                f"use one of {', '.join(tunable)}{_suggest(unknown[0], tunable)}"
            )
    return None


def space_refusal(
    space: dict[str, SearchParam],
    settings_with: typing.Callable[[dict[str, Any]], object],
    base: dict[str, Any] | None = None,
) -> str | None:
    """Why some value a trial could draw is refused by the training settings (None: none is).

    ``settings_with(params)`` builds a trial's settings (and raises if it cannot); ``base``
    holds the settings that ranges written as expressions may read. The parser checks each
    range on its own; this checks each end of each range and each choice against the
    settings' rules (``batch_size`` may not be 0), then every corner of the space together
    (ranges whose ends read other parameters), so that no trial can draw such values.
    """
    for name, spec in space.items():
        if spec.dynamic:
            continue
        if spec.type == "categorical":
            values = list(spec.choices or [])
        else:
            values = [v for v in (spec.low, spec.high) if v is not None]
        for value in values:
            refusal = _refused(settings_with, {name: value}, spec)
            if refusal:
                return refusal
    try:
        for corner in limited_corners(space, base or {}):
            refusal = _refused(settings_with, corner, None)
            if refusal:
                return refusal
    except EmptyRange as exc:
        return f"study.search_space.{exc}; widen the range or change what it reads"
    return None


def _refused(
    settings_with: typing.Callable[[dict[str, Any]], object],
    params: dict[str, Any],
    spec: SearchParam | None,
) -> str | None:
    """Why ``settings_with(params)`` refuses these values, naming the parameter at fault."""

    def shown(name: str) -> Any:
        value = params[name]
        kind = spec.type if spec is not None else None
        if kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    try:
        settings_with(params)
    except ValidationError as exc:
        error = exc.errors()[0]
        reason = str(error["msg"]).removeprefix("Value error, ")
        field = str(error["loc"][0]) if error["loc"] else ""
        name = field if field in params else next(iter(params))
        others = [f"{k}={shown(k)!r}" for k in params if k != name]
        alongside = f" (with {', '.join(others)})" if others else ""
        return (
            f"study.search_space.{name}: a trial could draw {shown(name)!r}{alongside}, which "
            f"train.{field or name} refuses ({reason}); keep the range inside what "
            f"train.{field or name} accepts"
        )
    except (TypeError, ValueError):
        name = next(iter(params))
        return (
            f"study.search_space.{name}: choice {shown(name)!r} is not a number; "
            f"train.{name} takes numbers"
        )
    return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)")
_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``6h``, ``90m``, ``1h30m``, ``45s``, ``2d`` (a bare number: seconds)."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        spaced = str(text).strip().lower()
        parts = _DURATION.findall(spaced)
        joined = "".join(f"{n}{u}" for n, u in parts)
        if re.fullmatch(r"\d+(?:\.\d+)?", spaced):
            seconds = float(spaced)
        elif parts and joined == spaced.replace(" ", ""):
            seconds = sum(float(n) * _SECONDS[u] for n, u in parts)
        else:
            raise ValueError(f"{text!r} is not a duration; write e.g. 6h, 90m, 1h30m, 45s or 2d")
    if not seconds > 0:
        raise ValueError(f"a time budget must be positive, but got {text!r}")
    return seconds


#: Objectives a study may add to its metric, all minimised: name -> what it measures.
SECONDARY = {
    "device_latency_ms": "mean latency on the board (ms)",
    "compiled_size_mb": "size of the compiled model (MB)",
}


def _original_space() -> dict[str, SearchParam]:
    """The HI4Lines study's space (REFERENCE.md): used when a config names none."""
    return {
        "lr": SearchParam(type="float", low=1e-3, high=1e-1, log=True),
        "swa_start": SearchParam(type="int", low=65, high=150),
        "weight_decay": SearchParam(type="float", low=1e-5, high=1e-3, log=True),
        "momentum": SearchParam(type="float", low=0.85, high=0.99),
        "swa_lr": SearchParam(type="float", low=1e-3, high=1e-1, log=True),
    }


class StudyConfig(_Strict):
    #: The ``train.<name>`` settings a search space may name.
    tunable: ClassVar[tuple[str, ...]] = TUNABLE
    #: The study's own metric: the first objective.
    metric: ClassVar[str] = "device_augrc"

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    n_trials: int = Field(400, gt=0)
    parallel: int = Field(1, gt=0, description="trials training at once (GPU slots)")
    max_pending: int | None = Field(
        None,
        gt=0,
        description="trained models queued for compile or the board, not yet in either "
        "(default: parallel)",
    )
    sampler: Literal["tpe", "random", "cmaes", "gp", "nsga2", "grid"] = "tpe"
    pruner: Literal["none", "median", "asha", "hyperband"] = Field(
        "none", description="decides on the float metric each epoch, before compile and board"
    )
    pruner_warmup: int | None = Field(
        None,
        ge=0,
        description="epochs the pruner never judges (default: a classifier trial's "
        "swa_start, so none is judged before SWA starts; a detector's 0)",
    )
    storage: str | None = Field(None, description="Optuna RDB URL; default: a file in run_dir")
    search_space: dict[str, SearchParam] = Field(default_factory=_original_space)
    constraints: list[str] = Field(
        default_factory=list,
        description="conditions every trial's parameters must meet, e.g. 'swa_lr <= lr'",
    )
    search_space_file: str | None = Field(
        None, description="the file search_space was read from (set when it names a file)"
    )
    time_budget: str | float | None = Field(
        None, description="stop asking new trials after this long, e.g. 6h, 90m, 1h30m"
    )
    hpo_time_ratio: float | None = Field(
        None, gt=0, description="stop asking after R times the length of one full training"
    )
    patience: int | None = Field(
        None, gt=0, description="stop after this many finished trials without a new best"
    )
    objectives: list[str] | None = Field(
        None,
        description="the study's metric, then device_latency_ms and/or compiled_size_mb: "
        "a Pareto front (default: the metric alone)",
    )
    max_latency_ms: float | None = Field(
        None, gt=0, description="a trial slower on the board is infeasible"
    )
    max_size_mb: float | None = Field(
        None, gt=0, description="a trial whose compiled model is larger is infeasible"
    )
    champion: Literal["primary", "utopia", "weighted"] = Field(
        "primary",
        description="which feasible Pareto-optimal trial is the champion: the best on the "
        "study's metric, the nearest to the ideal point, or the best weighted sum",
    )
    champion_weights: dict[str, float] = Field(
        default_factory=dict, description="objective -> weight, for champion: weighted"
    )
    derived_from: str | None = Field(
        None, description="the search this one-trial study retrains (set by edgetune)"
    )
    variant_of: str | None = Field(
        None, description="the study run whose variant this study is (set by edgetune)"
    )
    retrain: Literal["none", "train", "train+val"] = Field(
        "none",
        description="after the search, train the best parameters again (seed + 1) on train, "
        "or on train and val measured on test, then compile, evaluate and register",
    )
    repeats: Literal["reuse", "train"] = Field(
        "reuse",
        description="a parameter set the study already finished: answer it from that trial "
        "(reuse) or train it again (train)",
    )
    confirm_seeds: int = Field(
        0,
        ge=0,
        description="before crowning, train each of the confirm_top_k best trials again with "
        "this many other seeds; the champion is the best mean (0: off)",
    )
    confirm_top_k: int = Field(3, gt=0, description="the trials confirm_seeds trains again")
    replicate: int = Field(
        0, ge=0, description="the seed replicate of a confirmation study (set by edgetune)"
    )
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the AUGRC interval")
    retries: int = Field(1, ge=0, description="times a failed trial's parameters are run again")
    dry_run: bool = Field(
        True,
        description="before the first training, export an untrained model, compile it with "
        "the study's settings and run it once on the board; a failure stops the study",
    )
    heartbeat_s: float = Field(10.0, gt=0, description="how often a running trial is marked alive")
    stale_after_s: float = Field(
        120.0, gt=0, description="a RUNNING trial without a heartbeat this long is failed"
    )

    @field_validator("storage")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        return _refuse_password(value, STORAGE_ENV, "--storage")

    @field_validator("time_budget")
    @classmethod
    def _duration(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def time_budget_s(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    @model_validator(mode="after")
    def _heartbeat_window(self) -> StudyConfig:
        if self.stale_after_s < 3 * self.heartbeat_s:
            raise ValueError(
                f"stale_after_s: must be at least 3 x heartbeat_s ({3 * self.heartbeat_s:g}), "
                f"got {self.stale_after_s:g}; raise stale_after_s or lower heartbeat_s"
            )
        return self

    @model_validator(mode="after")
    def _grid_is_finite(self) -> StudyConfig:
        if self.sampler != "grid":
            return self
        for name, spec in self.search_space.items():
            if spec.type == "float" and spec.step is None:
                raise ValueError(
                    f"search_space.{name}: the grid sampler needs a finite set of values, but "
                    f"this float range has no step; give it a step, make it categorical, or "
                    f"choose another sampler"
                )
            if spec.dynamic or spec.when:
                raise ValueError(
                    f"search_space.{name}: the grid sampler needs fixed ranges, but this one "
                    f"{'has a condition' if spec.when else 'has an expression for an end'}; "
                    f"write fixed values or choose another sampler"
                )
        if self.constraints:
            raise ValueError(
                "constraints: the grid sampler runs every point of a fixed grid; remove the "
                "constraints (leave such points out of the grid) or choose another sampler"
            )
        return self

    @property
    def objective_names(self) -> list[str]:
        return list(self.objectives or [self.metric])

    @model_validator(mode="after")
    def _objectives(self) -> StudyConfig:
        names = self.objective_names
        if names[0] != self.metric:
            raise ValueError(
                f"objectives: the first objective must be {self.metric} (the study's metric), "
                f"got {names[0]!r}; list {self.metric} first, then {' and/or '.join(SECONDARY)}"
            )
        for name in names[1:]:
            if name not in SECONDARY:
                raise ValueError(
                    f"objectives: {name!r} cannot be optimised alongside {self.metric}; use "
                    f"{' and/or '.join(SECONDARY)}{_suggest(name, SECONDARY)}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: {names} names an objective twice; list each once")
        if len(names) > 1 and self.pruner != "none":
            raise ValueError(
                f"pruner: {self.pruner!r} decides on one metric, and this study has "
                f"{len(names)} objectives; set pruner: none, or keep one objective"
            )
        if len(names) > 1 and self.confirm_seeds:
            raise ValueError(
                f"confirm_seeds: the seed check ranks trials by the mean of one metric, and "
                f"this study has {len(names)} objectives; set confirm_seeds: 0 or keep one "
                f"objective"
            )
        if len(names) > 1 and self.sampler == "cmaes":
            raise ValueError(
                "sampler: cmaes optimises one objective; choose nsga2, tpe, gp or random for "
                "several objectives"
            )
        if self.champion == "weighted":
            if not self.champion_weights:
                raise ValueError(
                    "champion_weights: champion: weighted needs a weight per objective, e.g. "
                    f"{{{names[0]}: 1.0, device_latency_ms: 0.5}}"
                )
            unknown = sorted(set(self.champion_weights) - set(names))
            if unknown:
                raise ValueError(
                    f"champion_weights: {unknown[0]!r} is not one of the study's objectives "
                    f"({', '.join(names)}); weigh only those"
                )
            if any(w < 0 for w in self.champion_weights.values()) or not any(
                self.champion_weights.values()
            ):
                raise ValueError(
                    "champion_weights: weights must be >= 0 and not all 0; give the objectives "
                    "that matter a positive weight"
                )
        return self

    @model_validator(mode="after")
    def _known_params(self) -> StudyConfig:
        refusal = check_space(self.search_space, self.tunable, self.constraints)
        if refusal:
            raise ValueError(refusal)
        return self


#: Registry aliases edgetune or MLflow keep for themselves (``v<N>`` too).
RESERVED_ALIASES = ("champion", "latest")


class VariantSpec(_Strict):
    """One variant of a study run: settings over the config's, searched or trained once.

    ``set`` takes dotted keys like the command line's overrides (``model.arch``,
    ``train.lr``, ``study.search_space``). A variant is its own study ``<study>-<name>``;
    the variants share the run directory, the storage, the experiment and the registered
    model, and the best of them becomes the champion.
    """

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="the variant's name: its study is <study.name>-<name>, its alias <name>",
    )
    set: dict[str, Any] = Field(
        default_factory=dict, description="dotted key -> value over the config's settings"
    )
    search: bool = Field(
        True, description="search the study's space; false: train once with these settings"
    )

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() in RESERVED_ALIASES or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(
                f"{value!r} is a name the model registry keeps for itself (champion, latest, "
                f"v<N>); name the variant after what it changes, e.g. mobilenet"
            )
        return value


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite in run_dir")
    experiment: str | None = None
    registered_model: str | None = None

    @field_validator("uri")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        return _refuse_password(value, TRACKING_ENV, "--tracking-uri")


def _refuse_password(value: str | None, env: str, flag: str) -> str | None:
    """A URL in a config must not carry a password: configs are saved, logged and passed on."""
    if value is None:
        return value
    try:
        password = urlsplit(value).password
    except ValueError:
        password = None
    if password:
        raise ValueError(
            f"holds a password, and configs are saved, logged and passed to every stage; "
            f"leave it out and set ${env} (or {flag}) on each host, or save the URL in a "
            f"Prefect Secret block and write prefect-secret://NAME"
        )
    return value


def tracking_uri(tracking: TrackingConfig, default_dir: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else `default_dir`/mlflow.db (SQLite)."""
    if tracking.uri:
        return _resolved(tracking.uri, "tracking.uri")
    if os.environ.get(TRACKING_ENV):
        return _resolved(os.environ[TRACKING_ENV], f"${TRACKING_ENV}")
    return f"sqlite:///{(default_dir / 'mlflow.db').resolve()}"


def storage_url(study: StudyConfig, run_path: Path) -> str:
    """study.storage, else $EDGETUNE_STORAGE, else a SQLite file in the run directory.

    Read where it is used, so a password can stay in the environment of each host.
    """
    if study.storage:
        return _resolved(study.storage, "study.storage")
    if os.environ.get(STORAGE_ENV):
        return _resolved(os.environ[STORAGE_ENV], f"${STORAGE_ENV}")
    return f"sqlite:///{(run_path / 'optuna.db').resolve()}"


@functools.lru_cache(maxsize=16)
def _resolved(value: str, key: str) -> str:
    """The URL itself, or the one in the Prefect Secret block it names (once per process)."""
    return resolve_secret(value, key=key) or value


class EdgetuneConfig(_Strict):
    """One study: data, model, FMFP training, export, compiler, device, search and tracking."""

    seed: int = 0
    run_dir: str | None = Field(None, description="default: runs/<study.name>")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    compile: CompileConfig = CompileConfig()
    device: DeviceConfig = DeviceConfig()
    study: StudyConfig
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    gpu: GpuConfig = GpuConfig()
    variants: list[VariantSpec] = Field(
        default_factory=list,
        description="several variants (architectures, settings) in one study run",
    )

    @model_validator(mode="after")
    def _no_selection_on_test(self) -> EdgetuneConfig:
        """A search measures its objective on val; only a final model (a study derived from
        a search, as ``study.retrain: train+val`` makes) is measured on test."""
        if self.data.eval_split == "test" and self.study.derived_from is None:
            raise ValueError(
                "data.eval_split: test would choose the hyperparameters on the test split, "
                "which is kept for the final report; keep eval_split: val (study.retrain: "
                "train+val measures the final model on test)"
            )
        return self

    @model_validator(mode="after")
    def _swa_inside_epochs(self) -> EdgetuneConfig:
        """In every trial, SWA starts before the last epoch (checked at the space's corners)."""
        base = self.train.model_dump()
        try:
            for corner in limited_corners(self.study.search_space, base):
                swa = corner.get("swa_start", self.train.swa_start)
                epochs = corner.get("epochs", self.train.epochs)
                numbers = isinstance(swa, int | float) and isinstance(epochs, int | float)
                if numbers and swa >= epochs:
                    raise ValueError(
                        f"train.swa_start: SWA must start before the last epoch, but "
                        f"swa_start can be {swa:g} with epochs={epochs:g}; lower swa_start "
                        f"(or its search range) below epochs"
                    )
        except EmptyRange as exc:
            raise ValueError(
                f"study.search_space.{exc}; widen the range or change what it reads"
            ) from None
        return self

    # Derived locations -------------------------------------------------------------------
    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.study.name)

    @property
    def storage_url(self) -> str:
        return storage_url(self.study, self.run_path)

    @property
    def tracking_uri(self) -> str:
        """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the run directory."""
        return tracking_uri(self.tracking, self.run_path)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.study.name

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or f"{self.study.name}-classifier"
