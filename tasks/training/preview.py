"""What the model sees: a contact sheet of augmented training images.

The images come from the loader a trial builds (``train_batches``: the config's
``data.loader`` path, its augmentation and decode cache) with a given seed, so the sheet
shows the very draws a trial with that seed trains on first: each tile is one image of
the first batch, un-normalised, scaled up without smoothing, with its class name under it.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tasks.config import EdgetuneConfig
from tasks.data import IMAGENET_MEAN, IMAGENET_STD, DataError, inspect_dataset
from tasks.training.loaders import train_batches

#: Smallest side of a tile, in pixels: small images are scaled up by a whole factor.
MIN_TILE = 96
#: Height of the caption strip under each tile.
CAPTION = 14
_GAP = 2


@dataclass(frozen=True)
class Preview:
    """A written contact sheet and what is on it."""

    path: Path
    images: int
    columns: int
    tile: int
    labels: list[int]
    classes: list[str]
    loader: str


def augmented_batch(
    config: EdgetuneConfig, items: list[tuple[Path, int]], count: int, seed: int
) -> tuple[np.ndarray, list[int], str]:
    """The first ``count`` augmented images of ``items`` a trial seeded ``seed`` draws, as
    uint8 N×H×W×3, their labels, and the loader's path."""
    if count > len(items):
        raise DataError(
            f"--images {count} is more than the {len(items)} training images of "
            f"{config.data.root}; ask for at most {len(items)}"
        )
    batches = train_batches(config.data, items, count, seed=seed, device=torch.device("cpu"))
    inputs, labels = next(iter(batches))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (inputs.float() * std + mean).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy(), [int(y) for y in labels], type(batches).__name__


def contact_sheet(images: np.ndarray, captions: list[str]) -> tuple[Image.Image, int, int]:
    """Tiles in a near-square grid, each scaled up by a whole factor with a caption under
    it; the sheet, its columns and the tile's side."""
    count, height, width = images.shape[:3]
    factor = max(1, math.ceil(MIN_TILE / max(height, width)))
    tile_w, tile_h = width * factor, height * factor
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell_w, cell_h = tile_w + _GAP, tile_h + CAPTION + _GAP
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (index % columns) * cell_w, (index // columns) * cell_h
        tile = Image.fromarray(image).resize((tile_w, tile_h), Image.Resampling.NEAREST)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + tile_h + 1), caption[: max(1, tile_w // 6)], fill="black")
    return sheet, columns, tile_w


def write_preview(config: EdgetuneConfig, out: Path, count: int = 32, seed: int = 0) -> Preview:
    """Write the contact sheet of ``count`` augmented training images to ``out`` (PNG);
    nothing is left at ``out`` when it fails."""
    if count < 1:
        raise DataError(f"--images must be at least 1, not {count}")
    if out.suffix.lower() != ".png":
        raise DataError(f"the preview is a PNG file; name it *.png, not {out.name}")
    if not out.parent.is_dir():
        raise DataError(f"folder {out.parent} does not exist; create it or choose another --out")
    info = inspect_dataset(config.data.root, verify_images=False)
    items = info.items(config.data.train_splits)
    images, labels, loader = augmented_batch(config, items, count, seed)
    sheet, columns, tile = contact_sheet(images, [info.classes[label] for label in labels])
    fd, part = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            sheet.save(handle, format="PNG")
        os.replace(part, out)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    return Preview(out, count, columns, tile, labels, list(info.classes), loader)
