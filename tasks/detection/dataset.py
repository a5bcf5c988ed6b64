"""YOLO datasets: read a data.yaml, and build the board's detection bundle from it.

Ultralytics resolves a relative ``path:`` in data.yaml against its own datasets folder;
edgetune resolves it against the data.yaml's folder (what a user means) and hands
Ultralytics an absolute copy. Labels follow Ultralytics' rule: the image path with the
last ``images`` folder replaced by ``labels`` and the suffix by ``.txt``.

The detection bundle is what the board sees: validation images letterboxed to the export
size (uint8 NHWC, grey padding), the normalisation (x / 255), the ground-truth boxes in
letterboxed pixels, and how to map boxes back to each original image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageOps

from tasks.data import unreadable_image

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
PAD_VALUE = 114


class DatasetError(ValueError):
    """The YOLO dataset cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class YoloDataset:
    data_yaml: Path
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, tuple[Path, ...]]  # images per split

    def labels_for(self, image: Path) -> Path:
        return label_path(image)


def label_path(image: Path) -> Path:
    """images/…/x.jpg → labels/…/x.txt (the last `images` folder of the path)."""
    parts = list(image.parts)
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _split_images(root: Path, entry: Any, source: Path, split: str) -> tuple[Path, ...]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        if not isinstance(item, str):
            raise DatasetError(f"{source}: `{split}` must be a folder, a .txt list or a list")
        path = Path(item) if Path(item).is_absolute() else root / item
        if path.is_dir():
            images += list_images(path)
        elif path.is_file() and path.suffix == ".txt":
            for line in path.read_text().splitlines():
                if line.strip():
                    listed = Path(line.strip())
                    images.append(listed if listed.is_absolute() else (root / listed).resolve())
        else:
            raise DatasetError(
                f"{source}: {split} folder {path} does not exist; fix `{split}:` (relative "
                f"to `path:`, itself relative to the data.yaml's folder)"
            )
    if not images:
        raise DatasetError(f"{source}: the {split} split holds no images ({entries})")
    return tuple(images)


def read_data_yaml(path: Path) -> YoloDataset:
    """Read and check a YOLO data.yaml: classes, and the train/val images."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data.yaml {path} does not exist; set data.yaml to the dataset's file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: malformed YAML ({exc}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a mapping with path, train, val and names")
    names = raw.get("names")
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DatasetError(f"{path}: names must be numbered 0..{len(keys) - 1}, got {keys}")
        classes = tuple(str(names[k]) for k in keys)
    elif isinstance(names, list):
        classes = tuple(str(n) for n in names)
    else:
        raise DatasetError(f"{path}: `names` is missing; list the class names (0: insulator)")
    if not classes:
        raise DatasetError(f"{path}: `names` is empty; list at least one class")
    base = raw.get("path", ".")
    root = (path.parent / str(base)).resolve() if not Path(str(base)).is_absolute() else Path(base)
    splits = {}
    for split in ("train", "val"):
        if split not in raw:
            raise DatasetError(f"{path}: `{split}:` is missing; name the {split} images folder")
        splits[split] = _split_images(root, raw[split], path, split)
    return YoloDataset(data_yaml=path, root=root, classes=classes, splits=splits)


def write_resolved_yaml(dataset: YoloDataset, out: Path) -> Path:
    """A copy of the data.yaml with an absolute `path:`, for Ultralytics."""
    raw = yaml.safe_load(dataset.data_yaml.read_text(encoding="utf-8"))
    raw["path"] = str(dataset.root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def read_labels(image: Path, width: int, height: int, n_classes: int) -> np.ndarray:
    """(M, 5) class, x1, y1, x2, y2 in pixels from the image's YOLO label file."""
    path = label_path(image)
    if not path.is_file():
        return np.zeros((0, 5), dtype=np.float32)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        values = line.split()
        if not values:
            continue
        try:
            cls, cx, cy, w, h = (float(v) for v in values[:5])
        except ValueError:
            raise DatasetError(
                f"{path}:{number}: expected `class cx cy w h`, got {line!r}"
            ) from None
        if len(values) != 5 or not 0 <= cls < n_classes or int(cls) != cls:
            raise DatasetError(
                f"{path}:{number}: expected `class cx cy w h` with class in 0..{n_classes - 1}"
                f" (boxes only, no segments), got {line!r}"
            )
        rows.append(
            [
                cls,
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width,
                (cy + h / 2) * height,
            ]
        )
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the square model input: scale, then pad."""

    scale: float
    pad_x: float
    pad_y: float

    def to_original(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Boxes (K, 4) in model input pixels → original image pixels, clipped."""
        out = boxes.astype(np.float32).copy()
        out[:, [0, 2]] = np.clip((out[:, [0, 2]] - self.pad_x) / self.scale, 0, width)
        out[:, [1, 3]] = np.clip((out[:, [1, 3]] - self.pad_y) / self.scale, 0, height)
        return out

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        out = boxes.astype(np.float32).copy()
        out[:, [0, 2]] = out[:, [0, 2]] * self.scale + self.pad_x
        out[:, [1, 3]] = out[:, [1, 3]] * self.scale + self.pad_y
        return out


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio so the long side is `size`, centre on grey."""

    height, width = image.shape[:2]
    scale = min(size / height, size / width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(
        Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8
    )
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    return canvas, Letterbox(scale=scale, pad_x=float(pad_x), pad_y=float(pad_y))


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # a fine image, too large for Pillow's guard
        raise DatasetError(str(unreadable_image(path, exc))) from None
    except OSError as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); remove or replace it") from None


def make_detection_bundle(
    dataset: YoloDataset,
    imgsz: int,
    out: Path,
    *,
    single_cls: bool = False,
    single_cls_name: str = "object",
    max_images: int | None = None,
) -> Path:
    """The validation split as the board's bundle (see the module docstring)."""
    images = list(dataset.splits["val"])
    if max_images is not None and len(images) > max_images:
        keep = np.linspace(0, len(images) - 1, num=max_images).round().astype(int)
        images = [images[i] for i in keep]
    classes = (single_cls_name,) if single_cls else dataset.classes
    pixels, boxes, scales, pads, sizes = [], [], [], [], []
    for index, path in enumerate(images):
        rgb = read_rgb(path)
        height, width = rgb.shape[:2]
        canvas, box = letterbox(rgb, imgsz)
        labels = read_labels(path, width, height, len(dataset.classes))
        if single_cls:
            labels[:, 0] = 0
        if len(labels):
            placed = box.to_input(labels[:, 1:])
            column = np.full((len(labels), 1), index, dtype=np.float32)
            boxes.append(np.concatenate([column, labels[:, :1], placed], axis=1))
        pixels.append(canvas)
        scales.append(box.scale)
        pads.append((box.pad_x, box.pad_y))
        sizes.append((height, width))
    return _save_images(
        out,
        pixels,
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 6), dtype=np.float32),
        classes=np.asarray(classes),
        scales=np.asarray(scales, dtype=np.float32),
        pads=np.asarray(pads, dtype=np.float32),
        sizes=np.asarray(sizes, dtype=np.int32),
        names=np.asarray(
            [
                str(p.relative_to(dataset.root)) if p.is_relative_to(dataset.root) else p.name
                for p in images
            ]
        ),
    )


def make_calibration_set(
    dataset: YoloDataset, imgsz: int, count: int, seed: int, out: Path
) -> Path:
    """A seeded sample of train images, letterboxed like the bundle (for INT8 calibration)."""
    train = list(dataset.splits["train"])
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(train), size=min(count, len(train)), replace=False))
    return _save_images(out, [letterbox(read_rgb(train[i]), imgsz)[0] for i in chosen])


def _save_images(out: Path, pixels: list[np.ndarray], **arrays: np.ndarray) -> Path:
    """Images with the detectors' normalisation (x / 255), written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial.npz")
    contents: dict[str, Any] = {
        "images": np.stack(pixels),
        "mean": np.zeros(3, dtype=np.float32),
        "std": np.full(3, 255.0, dtype=np.float32),
        **arrays,
    }
    np.savez_compressed(partial, **contents)
    os.replace(partial, out)
    return out


def load_detection_bundle(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
