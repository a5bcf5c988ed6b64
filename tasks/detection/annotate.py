"""Writers for detections on images: YOLO label files, CVAT XML, and crop windows.

Every writer takes :class:`ImageDetections`, one per image: boxes in ``xyxy`` pixel
coordinates of the original image, with their class ids and scores. Boxes are clipped to the
image before they are written, and a box left with no area by the clipping is dropped.

* YOLO labels: one ``<name>.txt`` per image under a labels folder (sub-folders of ``name``
  kept), one line ``class cx cy w h`` per box, normalised to ``[0, 1]``, six decimals; an
  image without boxes gets an empty file, which marks it as background.
* CVAT "for images 1.1" XML: one ``<image>`` per image with a ``<box>`` per detection,
  ``source="auto"`` and the score as a ``score`` attribute, for review in CVAT.

Files are written to a temporary file in the target folder and moved into place with
``os.replace``, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt

__all__ = [
    "ImageDetections",
    "crop_box",
    "cvat_xml",
    "write_cvat_xml",
    "write_yolo_labels",
    "yolo_label_lines",
]

_DEFAULT_TASK_NAME = "edgetune auto-annotation"


@dataclass(frozen=True, eq=False)
class ImageDetections:
    """The detections on one image.

    ``name`` is the file name relative to the images folder (``"a/b.jpg"``); ``boxes`` is
    ``(K, 4)`` ``xyxy`` in pixels of the original ``width`` × ``height`` image, ``classes``
    ``(K,)`` class ids and ``scores`` ``(K,)`` confidences.
    """

    name: str
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        parts = PurePosixPath(self.name.replace("\\", "/")).parts
        if not self.name or self.name.startswith(("/", "\\")) or ".." in parts:
            raise ValueError(
                f"image name {self.name!r} must be a path relative to the images folder "
                "(like 'a/b.jpg'), without '..'."
            )
        if self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"image {self.name!r} has size {self.width}x{self.height}; width and height "
                "must be positive pixel counts of the original image."
            )
        boxes = np.asarray(self.boxes, dtype=np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        classes = np.asarray(self.classes).reshape(-1)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"image {self.name!r}: boxes must be a (K, 4) xyxy array; got shape {boxes.shape}."
            )
        k = boxes.shape[0]
        if classes.shape != (k,) or scores.shape != (k,):
            raise ValueError(
                f"image {self.name!r}: {k} boxes but {classes.size} classes and {scores.size} "
                "scores; pass one class id and one score per box."
            )
        if not (np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))):
            raise ValueError(f"image {self.name!r}: boxes and scores must be finite.")
        if classes.size and (
            not np.all(np.asarray(classes, dtype=np.float64) == np.round(classes))
            or np.any(classes < 0)
        ):
            raise ValueError(
                f"image {self.name!r}: class ids must be non-negative whole numbers; "
                f"got {classes.tolist()}."
            )
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "classes", classes.astype(np.int64))
        object.__setattr__(self, "scores", scores)


def _clipped(det: ImageDetections) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Boxes clipped to the image and a mask of those that still have an area."""
    boxes = det.boxes.copy()
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0.0, float(det.width))
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0.0, float(det.height))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, keep


def yolo_label_lines(det: ImageDetections) -> list[str]:
    """YOLO label lines ``"cls cx cy w h"`` (normalised, six decimals) for one image."""
    boxes, keep = _clipped(det)
    lines: list[str] = []
    for (x1, y1, x2, y2), cls in zip(boxes[keep], det.classes[keep], strict=True):
        cx = (x1 + x2) / 2.0 / det.width
        cy = (y1 + y2) / 2.0 / det.height
        w = (x2 - x1) / det.width
        h = (y2 - y1) / det.height
        lines.append(f"{int(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_yolo_labels(dets: Sequence[ImageDetections], labels_dir: Path) -> list[Path]:
    """Write one YOLO label file per image under ``labels_dir``; return the paths in order.

    ``"a/b.jpg"`` goes to ``labels_dir/a/b.txt``; an image without boxes gets an empty file.
    """
    root = Path(labels_dir)
    paths = [root / PurePosixPath(d.name.replace("\\", "/")).with_suffix(".txt") for d in dets]
    seen: dict[Path, str] = {}
    for det, path in zip(dets, paths, strict=True):
        if path in seen:
            raise ValueError(
                f"images {seen[path]!r} and {det.name!r} both map to the label file {path}; "
                "give each image a distinct name (apart from its suffix)."
            )
        seen[path] = det.name
    for det, path in zip(dets, paths, strict=True):
        lines = yolo_label_lines(det)
        _atomic_write_text(path, "".join(f"{line}\n" for line in lines))
    return paths


def cvat_xml(
    dets: Sequence[ImageDetections],
    class_names: Sequence[str],
    task_name: str = _DEFAULT_TASK_NAME,
) -> str:
    """CVAT "for images 1.1" annotation XML for the detections, as a string."""
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty; pass the model's class names, indexed by id.")
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(
            f"class name {duplicated[0]!r} appears more than once; CVAT labels must be unique."
        )
    for det in dets:
        outside = det.classes[det.classes >= len(names)]
        if outside.size:
            raise ValueError(
                f"image {det.name!r} has class id {int(outside[0])}, but class_names holds "
                f"{len(names)} classes (ids 0..{len(names) - 1}); pass the model's full list "
                "of class names."
            )

    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = task_name
    ET.SubElement(task, "size").text = str(len(dets))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for name in names:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "type").text = "rectangle"
        declared = ET.SubElement(ET.SubElement(label, "attributes"), "attribute")
        for key, value in (
            ("name", "score"),
            ("mutable", "False"),
            ("input_type", "text"),
            ("default_value", ""),
            ("values", ""),
        ):
            ET.SubElement(declared, key).text = value

    for index, det in enumerate(dets):
        image = ET.SubElement(
            root,
            "image",
            {
                "id": str(index),
                "name": det.name,
                "width": str(det.width),
                "height": str(det.height),
            },
        )
        boxes, keep = _clipped(det)
        for (x1, y1, x2, y2), cls, score in zip(
            boxes[keep], det.classes[keep], det.scores[keep], strict=True
        ):
            box = ET.SubElement(
                image,
                "box",
                {
                    "label": names[int(cls)],
                    "source": "auto",
                    "occluded": "0",
                    "xtl": f"{x1:.2f}",
                    "ytl": f"{y1:.2f}",
                    "xbr": f"{x2:.2f}",
                    "ybr": f"{y2:.2f}",
                    "z_order": "0",
                },
            )
            ET.SubElement(box, "attribute", {"name": "score"}).text = f"{score:.3f}"

    ET.indent(root, space="  ")
    body = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="utf-8"?>\n{body}\n'


def write_cvat_xml(
    dets: Sequence[ImageDetections],
    class_names: Sequence[str],
    path: Path,
    task_name: str = _DEFAULT_TASK_NAME,
) -> Path:
    """Write :func:`cvat_xml` to ``path`` (parent folders created); return ``path``."""
    target = Path(path)
    _atomic_write_text(target, cvat_xml(dets, class_names, task_name))
    return target


def crop_box(
    box: Sequence[float], width: int, height: int, margin: float
) -> tuple[int, int, int, int]:
    """Integer crop window ``(x1, y1, x2, y2)`` around an ``xyxy`` box.

    The box grows by ``margin`` × its width (height) on the left and right (top and bottom),
    is rounded outward to whole pixels and clipped to the ``width`` × ``height`` image.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (a fraction of the box size); got {margin}.")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive.")
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.shape != (4,) or not np.all(np.isfinite(values)):
        raise ValueError(f"box must be 4 finite numbers [x1, y1, x2, y2]; got {list(box)}.")
    x1, y1, x2, y2 = (float(v) for v in values)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {list(box)} has x2 < x1 or y2 < y1; pass corners as xyxy.")
    dx = margin * (x2 - x1)
    dy = margin * (y2 - y1)
    left = min(max(int(np.floor(x1 - dx)), 0), width)
    top = min(max(int(np.floor(y1 - dy)), 0), height)
    right = min(max(int(np.ceil(x2 + dx)), 0), width)
    bottom = min(max(int(np.ceil(y2 + dy)), 0), height)
    if right <= left or bottom <= top:
        raise ValueError(
            f"box {list(box)} leaves an empty crop in the {width}x{height} image; "
            "skip boxes that lie outside the image or have no area."
        )
    return left, top, right, bottom
