"""Run a detector over a folder of images: crops for the classifier, labels for CVAT.

The model is the ONNX export of a detector (a file, or a registered detector such as
``s-ml`` / ``s-ml@champion`` / ``s-ml/3`` fetched from MLflow). Letterbox, decoding and
greedy NMS are the shipped evaluator's, so what is cropped here is what the board finds, with
two differences made for what is written: NMS compares the boxes clipped to the image (a box
reaching past the edge would otherwise survive beside its own clipped copy), and it can be
class-agnostic (two anchors often name one object with two classes; a reviewer in CVAT or a
classifier's dataset wants one box per object, not one per class).
"""

from __future__ import annotations

import ast
import csv
import math
import os
import shutil
from collections.abc import Iterator, Mapping
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
    top_score: float = 0.0  # the best candidate box's score, kept or not (a hint for --conf)

    def as_detections(self) -> ImageDetections:
        return ImageDetections(
            name=self.name,
            width=self.width,
            height=self.height,
            boxes=self.boxes,
            classes=self.classes,
            scores=self.scores,
        )


def select_boxes(
    rows: np.ndarray, conf: float, iou: float, max_det: int, agnostic: bool = False
) -> np.ndarray:
    """(n, 6) x1 y1 x2 y2 score class → the kept boxes, best score first, at most max_det.

    Class-aware NMS (the board's) keeps boxes of different classes however much they overlap;
    class-agnostic NMS drops a box when a higher-scoring box of any class overlaps it by more
    than ``iou``.
    """
    if not agnostic:
        return edgetune_eval.select(rows, conf, iou, max_det)
    rows = rows[rows[:, 4] > conf]
    rows = rows[np.argsort(-rows[:, 4], kind="stable")[: edgetune_eval.MAX_NMS_CANDIDATES]]
    kept = edgetune_eval.nms(rows[:, :4], rows[:, 4], iou)[:max_det]
    return rows[kept].astype(np.float32)


class OnnxDetector:
    """A detector ONNX on onnxruntime (CPU), with the board's decoding and NMS on boxes
    clipped to the image.

    ``agnostic`` switches to class-agnostic NMS; ``source`` names the model in messages
    (``models:/s-ml@champion``; the file by default).
    """

    def __init__(
        self,
        path: Path,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        agnostic: bool = False,
        source: str | None = None,
    ):
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
        self.conf, self.iou, self.max_det, self.agnostic = conf, iou, max_det, agnostic
        self.source = source or str(self.path)

    def predict(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes (K, 4) in the image's pixels, scores (K,), classes (K,))."""
        boxes, scores, classes, _top = self._detect(rgb)
        return boxes, scores, classes

    def _detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """:meth:`predict`'s boxes, scores and classes, and the best candidate's score."""
        canvas, placement = letterbox(rgb, self.size)
        x = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        raw = self.session.run(None, {self.input_name: x})[0]
        rows = edgetune_eval.decode_yolo(np.squeeze(raw, axis=0), len(self.names))
        height, width = rgb.shape[:2]
        rows[:, :4] = placement.to_input(placement.to_original(rows[:, :4], width, height))
        kept = select_boxes(rows, self.conf, self.iou, self.max_det, self.agnostic)
        boxes = placement.to_original(kept[:, :4], width, height)
        top = float(rows[:, 4].max()) if len(rows) else 0.0
        return boxes, kept[:, 4], kept[:, 5].astype(np.int64), top

    def run(self, images_dir: Path) -> Iterator[Found]:
        for path in _images(images_dir):
            rgb = read_rgb(path)
            boxes, scores, classes, top = self._detect(rgb)
            yield Found(
                path=path,
                name=str(path.relative_to(images_dir)),
                width=rgb.shape[1],
                height=rgb.shape[0],
                boxes=boxes,
                scores=scores,
                classes=classes,
                top_score=top,
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


def describe_model(ref: str) -> str:
    """How a model reference reads in messages: the file, or its ``models:/`` URI."""
    if Path(ref).suffix == ".onnx":
        return ref
    name, _, alias = ref.partition("@")
    return f"models:/{name}" if "/" in name else f"models:/{name}@{alias or CHAMPION}"


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

    No crop at all is a PredictError that says which threshold to change (nothing is
    written); labelled crops that the classifier study would refuse (a class or a split
    missing) are written, and the summary's ``warning`` says what is missing and the fix.
    """

    settings.check()
    staging = _staging(out)
    rng = np.random.default_rng(settings.seed)
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    seen = _Seen()
    try:
        for found in detector.run(Path(images_dir)):
            seen.add(found)
            split = "val" if rng.random() < settings.val_fraction else "train"
            rgb = read_rgb(found.path)
            labels = _labels(labeller, rgb, found.boxes, settings.label_iou)
            for k, (box, score, cls) in enumerate(
                zip(found.boxes, found.scores, found.classes, strict=True)
            ):
                x1, y1, x2, y2 = crop_box(box, found.width, found.height, settings.margin)
                seen.largest_side = max(seen.largest_side, min(x2 - x1, y2 - y1))
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
        if not rows:
            raise PredictError(_no_crops(detector, settings, seen))
        with (staging / "crops.csv").open("w", newline="") as handle:
            fields = ["crop", "source", "x1", "y1", "x2", "y2", "score", "label"]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        _publish(staging, Path(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    folders = dict(sorted(counts.items()))
    warning = None if labeller is None else _study_warning(Path(out), folders, settings, labeller)
    return {"images": seen.images, "crops": len(rows), "folders": folders, "warning": warning}


@dataclass
class _Seen:
    """What the detector found over all images, for the message when no crop comes out."""

    images: int = 0
    boxes: int = 0  # above --conf, after NMS
    top_score: float = 0.0  # of any candidate box, above --conf or not
    largest_side: int = 0  # the shorter side of the largest crop window, pixels

    def add(self, found: Found) -> None:
        self.images += 1
        self.boxes += len(found.boxes)
        self.top_score = max(self.top_score, found.top_score)


def _no_crops(detector: OnnxDetector, settings: CropSettings, seen: _Seen) -> str:
    head = f"no crop passes the thresholds on {seen.images} images"
    if seen.boxes:
        return (
            f"{head}: {seen.boxes} boxes of {detector.source} score above --conf "
            f"{detector.conf}, but none gives a crop of --min-size {settings.min_size} px on "
            f"each side (the largest gives {seen.largest_side} px); lower --min-size to "
            f"{seen.largest_side} or pass larger images"
        )
    lower = ""
    if seen.top_score > 0:
        lower = (
            f"lower --conf below the best box's score (e.g. --conf {conf_below(seen.top_score)}), "
        )
    return (
        f"{head}: no box of {detector.source} scores above --conf {detector.conf} (the "
        f"highest score is {seen.top_score:.4g}); {lower}check that {detector.source} is the "
        "detector you meant, or train it longer (more train.epochs)"
    )


def conf_below(score: float) -> str:
    """A round --conf that lets a box scoring ``score`` through (a box needs score > conf)."""
    step = 10.0 ** (math.floor(math.log10(score)) - 1)  # two significant digits
    value = math.floor(score / step) * step
    if float(f"{value:.2g}") >= score:
        value -= step
    return f"{value:.2g}"


def study_gaps(folders: Mapping[str, int]) -> list[str]:
    """Why labelled crops (counts by ``train/<class>``, ``val/<class>``, ``unmatched``) are
    not yet a dataset the classifier study accepts (``tasks.data.inspect_dataset``: train/
    and val/ with the same class folders, at least two); empty when they are."""
    train, val = (_classes_in(folders, split) for split in ("train", "val"))
    gaps = []
    if not train:
        gaps.append("train/ has no crops")
    elif len(train) == 1:
        gaps.append(f"train/ has crops of one class only ({min(train)})")
    if not val:
        gaps.append("val/ has no crops")
    elif train - val:
        gaps.append(f"val/ has no {', '.join(sorted(train - val))} crops")
    if val - train:
        gaps.append(f"train/ has no {', '.join(sorted(val - train))} crops")
    return gaps


def _classes_in(folders: Mapping[str, int], split: str) -> set[str]:
    return {key.split("/", 1)[1] for key, n in folders.items() if key.startswith(f"{split}/") and n}


def _study_warning(
    out: Path, folders: Mapping[str, int], settings: CropSettings, labeller: OnnxDetector
) -> str | None:
    gaps = study_gaps(folders)
    if not gaps:
        return None
    total = sum(folders.values())
    labelled = total - folders.get("unmatched", 0)
    fixes = []
    if any(gap.startswith("train/") for gap in gaps):
        fixes.append(
            f"crop more images that show every class, or check the labeller ({labeller.source} "
            f"labelled {labelled} of {total} crops)"
        )
    if any(gap.startswith("val/") for gap in gaps):
        fixes.append(f"raise --val-fraction (now {settings.val_fraction}) or crop more images")
    return (
        f"{out} is not a dataset the classifier study accepts yet (train/ and val/ with the "
        f"same 2 or more class folders): {'; '.join(gaps)}; fix: {'; '.join(fixes)}"
    )


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
