"""Run a detector over a folder of images: crops for the classifier, labels for CVAT.

The model is the ONNX export of a detector (a file, or a registered detector such as
``s-ml`` / ``s-ml@champion`` / ``s-ml/3`` fetched from MLflow). Pre- and post-processing
are the board's own (letterbox, decoding and NMS of the shipped evaluator), so what is
cropped here is what the board would find.
"""

from __future__ import annotations

import ast
import csv
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from PIL import Image

from tasks.detection.annotate import (
    ImageDetections,
    crop_box,
    write_cvat_xml,
    write_yolo_labels,
)
from tasks.detection.dataset import letterbox, list_images, read_rgb
from tasks.detection.metrics import box_iou
from tasks.devices import edgetune_eval
from tasks.tracking import CHAMPION, Tracker, mask_uri

MODEL_FILE = "model/model.onnx"


class PredictError(ValueError):
    """Bad input for prediction (model, folders, thresholds); the message names the fix."""


@dataclass(frozen=True)
class Found:
    """One image's boxes in its own pixels."""

    path: Path
    name: str  # relative to the images folder
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) xyxy
    scores: np.ndarray  # (K,)
    classes: np.ndarray  # (K,) int

    def as_detections(self) -> ImageDetections:
        return ImageDetections(
            name=self.name,
            width=self.width,
            height=self.height,
            boxes=self.boxes,
            classes=self.classes,
            scores=self.scores,
        )


class OnnxDetector:
    """A detector ONNX on onnxruntime (CPU), with the board's decoding and NMS."""

    def __init__(self, path: Path, conf: float = 0.25, iou: float = 0.7, max_det: int = 300):
        # ONNX Runtime loads only where a detector runs.
        import onnxruntime as ort

        if not 0 <= conf < 1 or not 0 < iou <= 1 or max_det < 1:
            raise PredictError(
                f"conf={conf}, iou={iou}, max_det={max_det}: conf must be in [0, 1), iou in "
                "(0, 1], max_det >= 1"
            )
        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise PredictError(f"onnxruntime cannot load {path}: {exc}") from None
        inputs = self.session.get_inputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or not isinstance(shape[2], int):
            raise PredictError(
                f"{path} has inputs {[(i.name, i.shape) for i in inputs]}; expected one fixed "
                "(1, 3, S, S) image input: export the detector with `edgetune detect train`"
            )
        self.input_name, self.size = inputs[0].name, int(shape[2])
        self.names = _class_names(self.session)
        self.conf, self.iou, self.max_det = conf, iou, max_det

    def predict(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes (K, 4) in the image's pixels, scores (K,), classes (K,))."""
        canvas, placement = letterbox(rgb, self.size)
        x = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        raw = self.session.run(None, {self.input_name: x})[0]
        rows = edgetune_eval.decode_yolo(np.squeeze(raw, axis=0), len(self.names))
        kept = edgetune_eval.select(rows, self.conf, self.iou, self.max_det)
        height, width = rgb.shape[:2]
        boxes = placement.to_original(kept[:, :4], width, height)
        return boxes, kept[:, 4], kept[:, 5].astype(np.int64)

    def run(self, images_dir: Path) -> Iterator[Found]:
        for path in _images(images_dir):
            rgb = read_rgb(path)
            boxes, scores, classes = self.predict(rgb)
            yield Found(
                path=path,
                name=str(path.relative_to(images_dir)),
                width=rgb.shape[1],
                height=rgb.shape[0],
                boxes=boxes,
                scores=scores,
                classes=classes,
            )


def _class_names(session: Any) -> list[str]:
    """Class names from the export's metadata (Ultralytics writes a dict literal)."""
    meta = session.get_modelmeta().custom_metadata_map
    try:
        names = ast.literal_eval(meta.get("names", ""))
    except (ValueError, SyntaxError):
        names = None
    if not isinstance(names, dict) or not names:
        raise PredictError(
            "the ONNX file has no class names in its metadata; export it with "
            "`edgetune detect train` (Ultralytics' exporter writes them)"
        )
    return [str(names[k]) for k in sorted(names)]


def _images(folder: Path) -> list[Path]:
    if not Path(folder).is_dir():
        raise PredictError(f"images folder {folder} does not exist; pass a folder of images")
    images = list_images(Path(folder))
    if not images:
        raise PredictError(f"{folder} holds no images ({', '.join(('.jpg', '.png', '...'))})")
    return images


def resolve_model(ref: str, tracking_uri: str, dst: Path) -> Path:
    """A detector ONNX file, or a registered detector (`name`, `name@alias`, `name/version`)."""
    path = Path(ref)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise PredictError(f"model {ref} does not exist; pass an .onnx file or a name")
        return path

    tracker = Tracker(tracking_uri)
    name, _, alias = ref.partition("@")
    name, _, version = name.partition("/")
    try:
        if version:
            entry = tracker.client.get_model_version(name, version)
        else:
            entry = tracker.alias_version(name, alias or CHAMPION)
    except MlflowException as exc:
        raise PredictError(
            f"no registered detector {ref!r} in MLflow at {mask_uri(tracking_uri)} "
            f"({str(exc)[:120]}); train one with `edgetune detect train`, or pass an .onnx file"
        ) from None
    try:
        return tracker.download(entry.run_id, MODEL_FILE, dst)
    except MlflowException:
        raise PredictError(
            f"registered detector {ref!r} (version {entry.version}, run {entry.run_id}) has no "
            f"{MODEL_FILE}; register a run made by `edgetune detect train`, or pass an .onnx file"
        ) from None


def _staging(out: Path) -> Path:
    """A fresh folder beside `out`, renamed onto it when complete (nothing half-written)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PredictError(f"output folder {out} exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty, checked by _staging
    os.replace(staging, out)


@dataclass(frozen=True)
class CropSettings:
    margin: float = 0.1  # share of the box's width/height added on each side
    min_size: int = 16  # crops smaller than this (either side, pixels) are skipped
    val_fraction: float = 0.2  # share of source images whose crops go to val/ (labelled)
    label_iou: float = 0.5  # a crop takes the labeller's class when their boxes overlap this much
    seed: int = 0

    def check(self) -> None:
        if self.margin < 0 or self.min_size < 1 or not 0 <= self.val_fraction < 1:
            raise PredictError(
                f"margin={self.margin}, min_size={self.min_size}, "
                f"val_fraction={self.val_fraction}: margin must be >= 0, min size >= 1, "
                "val fraction in [0, 1)"
            )
        if not 0 < self.label_iou <= 1:
            raise PredictError(f"label_iou={self.label_iou} must be in (0, 1]")


def write_crops(
    detector: OnnxDetector,
    images_dir: Path,
    out: Path,
    settings: CropSettings,
    labeller: OnnxDetector | None = None,
) -> dict[str, Any]:
    """Crop every detected box into an image-folder dataset.

    Without a labeller: ``OUT/<class>/…png`` (for labelling). With one (L-ML): each crop
    takes the class of the labeller's best-overlapping box and goes to ``OUT/train`` or
    ``OUT/val`` by its source image (seeded: crops of one image never straddle splits);
    crops the labeller does not confirm go to ``OUT/unmatched``. ``crops.csv`` lists every
    crop with its source box, score and label.
    """

    settings.check()
    staging = _staging(out)
    rng = np.random.default_rng(settings.seed)
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    images = 0
    try:
        for found in detector.run(Path(images_dir)):
            images += 1
            split = "val" if rng.random() < settings.val_fraction else "train"
            rgb = read_rgb(found.path)
            labels = _labels(labeller, rgb, found.boxes, settings.label_iou)
            for k, (box, score, cls) in enumerate(
                zip(found.boxes, found.scores, found.classes, strict=True)
            ):
                x1, y1, x2, y2 = crop_box(box, found.width, found.height, settings.margin)
                if min(x2 - x1, y2 - y1) < settings.min_size:
                    continue
                label: str | None
                if labeller is None:
                    label, folder = detector.names[int(cls)], Path(detector.names[int(cls)])
                else:
                    label = labels[k]
                    folder = Path("unmatched") if label is None else Path(split) / label
                stem = Path(found.name).with_suffix("").as_posix().replace("/", "__")
                target = staging / folder / f"{stem}_{k}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rgb[y1:y2, x1:x2]).save(target)
                key = str(folder)
                counts[key] = counts.get(key, 0) + 1
                rows.append(
                    {
                        "crop": str(target.relative_to(staging)),
                        "source": found.name,
                        "x1": x1,
                        "y1": y1,
                        "x2": x2,
                        "y2": y2,
                        "score": f"{float(score):.4f}",
                        "label": label or "",
                    }
                )
        with (staging / "crops.csv").open("w", newline="") as handle:
            fields = ["crop", "source", "x1", "y1", "x2", "y2", "score", "label"]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        _publish(staging, Path(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"images": images, "crops": len(rows), "folders": dict(sorted(counts.items()))}


def _labels(
    labeller: OnnxDetector | None, rgb: np.ndarray, boxes: np.ndarray, min_iou: float
) -> list[str | None]:
    """For each box, the labeller's class of its best-overlapping box (or None)."""
    if labeller is None or not len(boxes):
        return [None] * len(boxes)
    theirs, _scores, classes = labeller.predict(rgb)
    if not len(theirs):
        return [None] * len(boxes)
    overlap = box_iou(boxes, theirs)
    best = overlap.argmax(axis=1)
    return [
        labeller.names[int(classes[j])] if overlap[i, j] >= min_iou else None
        for i, j in enumerate(best)
    ]


def annotate_images(detector: OnnxDetector, images_dir: Path, out: Path) -> dict[str, Any]:
    """YOLO label files (``OUT/labels``), ``OUT/classes.txt`` and CVAT's ``annotations.xml``."""
    staging = _staging(out)
    try:
        found = [f.as_detections() for f in detector.run(Path(images_dir))]
        write_yolo_labels(found, staging / "labels")
        write_cvat_xml(found, detector.names, staging / "annotations.xml")
        (staging / "classes.txt").write_text("\n".join(detector.names) + "\n")
        _publish(staging, Path(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "images": len(found),
        "boxes": int(sum(len(f.boxes) for f in found)),
        "classes": list(detector.names),
    }
