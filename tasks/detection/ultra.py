"""Ultralytics, offline and contained: training, validation and ONNX export of a detector.

Ultralytics reaches for the network and the user's folders in several places; each is
closed before it is first imported, and again before every use:

- ``YOLO_OFFLINE=1`` (no connectivity probe at import), ``YOLO_AUTOINSTALL=0`` (no pip);
- ``YOLO_CONFIG_DIR`` inside edgetune's run directory (settings.json, fonts), with the
  settings' datasets, weights and runs folders pointed there too, hub sync and every
  third-party logger (MLflow included: edgetune logs by run id itself) turned off;
- the plotting font: Ultralytics downloads ``Arial.ttf`` unless a file of that name is in
  its config folder; matplotlib's DejaVu Sans is copied there under that name;
- Ultralytics replaces ``PIL.Image.open`` process-wide with one that, on an image it cannot
  identify, installs a HEIF plugin from PyPI (or fails with ModuleNotFoundError offline):
  Pillow's own is put back, so a corrupt image stays a plain error in every module;
- the GPU AMP check downloads a model: it is replaced by a check that only refuses the
  GPUs known to break AMP;
- named weights (``yolov8n.pt``) download: only architecture YAMLs and local ``.pt``
  files are accepted, and training always gets absolute ``project``/``data`` paths.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.detection.config import DetectorConfig
from tasks.training.gpus import pinned_gpu

CONFIG_DIR = ".ultralytics"
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")
#: GPUs on which mixed precision gives NaN losses or zero mAP (GTX 16xx, some T-series).
AMP_UNSAFE_GPU = re.compile(
    r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
    re.IGNORECASE,
)
THIRD_PARTY_LOGGERS = ("clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "wandb")

_log = logging.getLogger(__name__)
#: One line per training epoch, at INFO (dropped unless a handler is attached to it).
EPOCH_LOG = logging.getLogger(f"{__name__}.epochs")


class DetectorError(RuntimeError):
    """Training, validation or export of a detector failed; the message says why."""


def ultralytics(run_dir: Path) -> Any:
    """Import Ultralytics with its network and folders confined (see the module docstring).

    The config folder is fixed when Ultralytics is first imported in a process; the
    datasets, weights and runs folders follow `run_dir` on every call.
    """
    run_dir = Path(run_dir).resolve()
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if "ultralytics" not in sys.modules:
        os.environ["YOLO_CONFIG_DIR"] = str(run_dir / CONFIG_DIR)
    threads = os.environ.get("OMP_NUM_THREADS")
    # Ultralytics (and torch) load only where a detector trains.
    import ultralytics
    from ultralytics.engine import trainer as trainer_module
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    # The config folder is the first run dir of this process; a study's scratch folder
    # may be gone by the next call, and the settings are saved there on every update.
    Path(USER_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
    if threads is None:  # Ultralytics sets 1 at import; training would crawl on a CPU
        os.environ.pop("OMP_NUM_THREADS", None)
    SETTINGS.update(
        {
            "sync": False,
            "datasets_dir": str(run_dir / "datasets"),
            "weights_dir": str(run_dir / "weights"),
            "runs_dir": str(run_dir / "ultralytics-runs"),
            **{name: False for name in THIRD_PARTY_LOGGERS if name in SETTINGS},
            **({"tensorboard": False} if "tensorboard" in SETTINGS else {}),
        }
    )
    _install_fonts(Path(USER_CONFIG_DIR))
    trainer_module.check_amp = offline_check_amp
    _restore_pillow()
    return ultralytics


def _restore_pillow() -> None:
    # Ultralytics (and torch) load only where a detector trains.
    from PIL import Image
    from ultralytics.utils import patches

    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def _install_fonts(folder: Path) -> None:
    """Put a local font where Ultralytics looks before it downloads one."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [name for name in FONTS if not (folder / name).is_file()]
    if not missing:
        return
    # Ultralytics (and torch) load only where a detector trains.
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in missing:
        shutil.copyfile(source, folder / name)


def offline_check_amp(model: Any) -> bool:
    """AMP on CUDA unless the GPU is known to break it; never downloads a model."""
    # Ultralytics (and torch) load only where a detector trains.
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    name = torch.cuda.get_device_name(device)
    if AMP_UNSAFE_GPU.search(name):
        _log.warning("AMP disabled: %s is known to give NaN losses with mixed precision", name)
        return False
    return True


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    # Ultralytics (and torch) load only where a detector trains.
    import torch

    return str(pinned_gpu()) if torch.cuda.is_available() else "cpu"  # this training's slot


def create_model(config: DetectorConfig, run_dir: Path) -> Any:
    """The architecture from its YAML, with local weights loaded when given."""
    yolo = ultralytics(run_dir).YOLO
    arch, weights = config.model.arch, config.model.weights
    if weights and not Path(weights).is_file():
        raise DetectorError(
            f"model.weights {weights} does not exist; give a local .pt file (nothing is "
            "downloaded) or leave it out to train from the architecture"
        )
    try:
        model = yolo(arch, task="detect")
        if weights:
            model.load(weights)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise DetectorError(
            f"model.arch {arch!r} cannot be built ({one_line(exc)}); name an Ultralytics "
            "architecture YAML such as yolov8l.yaml or yolo11n.yaml, or the path of one"
        ) from None
    return model


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def clean_metric_name(name: str) -> str:
    """Ultralytics' `metrics/mAP50-95(B)` → `metrics/mAP50-95` (a valid MLflow key)."""
    name = re.sub(r"\(B\)$", "", name)
    return re.sub(r"[^A-Za-z0-9_\-./ :]", "_", name)


def clock(seconds: float) -> str:
    """``75`` → ``1:15``; ``3725`` → ``1:02:05``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def epoch_line(name: str, epoch: int, epochs: int, row: dict[str, float], elapsed_s: float) -> str:
    """One training epoch in a line: its training losses, the validation mAP, the time
    since training began and the time left at the mean pace of the epochs so far."""
    losses = " ".join(
        f"{key.removeprefix('train/').removesuffix('_loss')} {value:.4f}"
        for key, value in row.items()
        if key.startswith("train/") and key.endswith("_loss")
    )
    maps = " ".join(
        f"{key.removeprefix('metrics/')} {row[key]:.4f}"
        for key in ("metrics/mAP50", "metrics/mAP50-95")
        if key in row
    )
    eta = elapsed_s / max(epoch, 1) * max(epochs - epoch, 0)
    return (
        f"{name}: epoch {epoch}/{epochs} · loss {losses or '-'} · val {maps or '-'} · "
        f"{clock(elapsed_s)} elapsed, ETA {clock(eta)}"
    )


class EpochEnd:
    """Ultralytics' ``on_fit_epoch_end`` callback: each epoch's metrics to ``on_epoch`` (1-based
    epochs) and one line to ``EPOCH_LOG`` (silent unless a handler prints it: ``edgetune
    detect train`` does, on stderr, while Ultralytics' own output stays off)."""

    def __init__(self, on_epoch: Callable[[int, dict[str, float]], None] | None, name: str) -> None:
        self.on_epoch = on_epoch
        self.name = name
        self.started = time.monotonic()
        self.stopped = False

    def start(self, trainer: Any) -> None:
        """``on_train_start``: the clock starts once the data and the model are set up."""
        self.started = time.monotonic()

    def __call__(self, trainer: Any) -> None:
        # After the epoch that stops training, Ultralytics validates the best weights and
        # calls this again as epoch N + 1; those metrics are the run's val_* instead.
        if self.stopped:
            return
        self.stopped = bool(trainer.stop)
        row = {clean_metric_name(k): float(v) for k, v in (trainer.metrics or {}).items()}
        losses = trainer.label_loss_items(trainer.tloss, prefix="train")
        row.update({clean_metric_name(k): float(v) for k, v in losses.items()})
        row.update({clean_metric_name(k): float(v) for k, v in (trainer.lr or {}).items()})
        row = {k: v for k, v in row.items() if math.isfinite(v)}
        epoch = int(trainer.epoch) + 1
        elapsed = time.monotonic() - self.started
        EPOCH_LOG.info(epoch_line(self.name, epoch, int(trainer.epochs), row, elapsed))
        if self.on_epoch is not None:
            self.on_epoch(epoch, row)


@dataclass(frozen=True)
class TrainedDetector:
    weights: Path  # best.pt
    save_dir: Path  # Ultralytics' run folder: results.csv, curves, weights
    class_names: tuple[str, ...]
    val_metrics: dict[str, float]  # map50, map50_95, precision, recall, ap50_95/<class>
    epochs_run: int
    seconds: float
    device: str


def train_detector(
    config: DetectorConfig,
    data_yaml: Path,
    run_dir: Path,
    name: str,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedDetector:
    """Train with Ultralytics into `run_dir/ultralytics/<name>`; per-epoch metrics go to
    `on_epoch(epoch, metrics)` (1-based epochs)."""
    model = create_model(config, run_dir)
    device = resolve_device(config.train.device)
    settings = config.train.model_dump(exclude={"extra", "device", "single_cls_name"})
    settings["amp"] = settings["amp"] and device != "cpu"

    epoch_end = EpochEnd(on_epoch, config.name)

    def name_single_class(trainer: Any) -> None:
        """Ultralytics calls the one class `item`; the config names it."""
        names = {0: config.train.single_cls_name}
        trainer.data["names"] = names
        for net in (trainer.model, getattr(trainer.ema, "ema", None)):
            net = getattr(net, "module", net)
            if net is not None:
                net.names = names

    model.add_callback("on_train_start", epoch_end.start)
    model.add_callback("on_fit_epoch_end", epoch_end)
    if config.train.single_cls:
        model.add_callback("on_train_start", name_single_class)
    started = time.perf_counter()
    try:
        results = model.train(
            data=str(data_yaml),
            device=device,
            project=str((run_dir / "ultralytics").resolve()),
            name=name,
            exist_ok=True,
            seed=int(config.seed),
            deterministic=True,
            verbose=False,
            val=True,
            **settings,
            **config.train.extra,
        )
    except (SyntaxError, KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        raise DetectorError(f"Ultralytics refused the training settings: {one_line(exc)}") from exc
    seconds = time.perf_counter() - started
    trainer = model.trainer
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    if not best.is_file():
        raise DetectorError(f"training ended without weights in {trainer.save_dir}")
    names = tuple(str(model.names[k]) for k in sorted(model.names))
    return TrainedDetector(
        weights=best,
        save_dir=Path(trainer.save_dir),
        class_names=names,
        val_metrics=_box_metrics(results, names),
        epochs_run=int(trainer.epoch) + 1,
        seconds=seconds,
        device=device,
    )


def _box_metrics(results: Any, names: tuple[str, ...]) -> dict[str, float]:
    """Ultralytics' final validation (best weights) as flat, MLflow-safe keys."""
    box = getattr(results, "box", None)
    if box is None:
        return {}
    metrics = {
        "map50": float(box.map50),
        "map50_95": float(box.map),
        "precision": float(box.mp),
        "recall": float(box.mr),
    }
    for i, cls in enumerate(getattr(results, "ap_class_index", [])):
        metrics[f"ap50_95/{clean_metric_name(names[int(cls)])}"] = float(box.ap[i])
    return metrics


def export_onnx(
    weights: Path, imgsz: int, opset: int, simplify: bool, out: Path, run_dir: Path
) -> Path:
    """Static-shape (1, 3, imgsz, imgsz) ONNX without NMS: the board runs NMS itself."""
    yolo = ultralytics(run_dir).YOLO
    model = yolo(str(weights), task="detect")
    try:
        exported = model.export(
            format="onnx",
            imgsz=imgsz,
            opset=opset,
            simplify=simplify,
            dynamic=False,
            batch=1,
            half=False,
            nms=False,
            device="cpu",
            verbose=False,
        )
    except Exception as exc:
        raise DetectorError(f"ONNX export of {weights} failed: {one_line(exc)}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(exported), out)
    return out
