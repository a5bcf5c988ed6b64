"""A small synthetic YOLO dataset of insulator-like shapes, generated from a seed.

Drawn here rather than downloaded, so the detector commands, the two-tier example and the
tests run offline anywhere. Every image holds one to three "insulators": vertical strings
of discs on a noisy background; a ``broken`` one misses a disc in the middle. The
dataset has the YOLO layout Ultralytics reads::

    ROOT/data.yaml
    ROOT/images/{train,val}/NNNN.png
    ROOT/labels/{train,val}/NNNN.txt      class cx cy w h, normalised

``single_class=True`` writes the S-ML layout: one class ``insulator``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

CLASSES = ("healthy", "broken")
MARKER = ".edgetune-shapes.json"


def _draw_insulator(
    canvas: np.ndarray, rng: np.random.Generator, x: int, y: int, w: int, h: int, broken: bool
) -> None:
    """Discs stacked from (x, y) to (x + w, y + h); a broken string lacks one disc."""
    discs = max(3, h // max(3, w // 2))
    pitch = h / discs
    colour = rng.integers(140, 230, size=3)
    gap = int(rng.integers(1, discs - 1)) if broken else -1
    yy, xx = np.mgrid[0 : canvas.shape[0], 0 : canvas.shape[1]]
    for k in range(discs):
        if k == gap:
            continue
        cy, cx = y + (k + 0.5) * pitch, x + w / 2
        inside = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (pitch / 2)) ** 2 <= 1.0
        canvas[inside] = colour
    canvas[y : y + h, x + w // 2 - 1 : x + w // 2 + 1] = colour // 2  # the rod through them


def _image(
    rng: np.random.Generator, width: int, height: int, n_classes: int
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    background = rng.integers(20, 90, size=3)
    canvas = np.clip(background + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(
        np.uint8
    )
    labels: list[tuple[int, float, float, float, float]] = []
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, 4))):
        w = int(rng.integers(width // 10, width // 5))
        h = int(rng.integers(height // 3, int(height * 0.8)))
        for _attempt in range(20):
            x = int(rng.integers(0, width - w))
            y = int(rng.integers(0, height - h))
            if all(x + w < a or a + c < x for a, _b, c, _d in taken):
                break
        else:
            continue
        taken.append((x, y, w, h))
        broken = bool(rng.random() < 0.5)
        _draw_insulator(canvas, rng, x, y, w, h, broken)
        cls = int(broken) if n_classes == 2 else 0
        labels.append((cls, (x + w / 2) / width, (y + h / 2) / height, w / width, h / height))
    return canvas, labels


def write_shapes_dataset(
    root: Path,
    *,
    train: int = 48,
    val: int = 16,
    width: int = 160,
    height: int = 128,
    single_class: bool = False,
    seed: int = 0,
) -> Path:
    """Write the dataset under `root` and return its data.yaml (refuses a non-empty root)."""

    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise FileExistsError(
            f"{root} exists and is not an edgetune shapes dataset; choose an empty folder"
        )
    if train < 1 or val < 1 or width < 32 or height < 32:
        raise ValueError(
            f"train={train}, val={val}, {width}x{height}: need at least one image per split "
            "and images of at least 32x32 pixels"
        )
    names = ["insulator"] if single_class else list(CLASSES)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels, boxes = _image(rng, width, height, len(names))
            Image.fromarray(pixels).save(images / f"{index:04d}.png")
            lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in boxes]
            (labels / f"{index:04d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump(
            {
                "path": ".",
                "train": "images/train",
                "val": "images/val",
                "names": dict(enumerate(names)),
            },
            sort_keys=False,
        )
    )
    (root / MARKER).write_text(
        json.dumps({"train": train, "val": val, "classes": names, "seed": seed}) + "\n"
    )
    return data_yaml
