"""What the model sees: a contact sheet of augmented training images.

The images come from the loader a trial builds (``train_batches``: the config's
``data.loader`` path, its augmentation and decode cache) with a given seed, so the sheet
shows the very draws a trial with that seed trains on first: each tile is one image of
the first batch, un-normalised, scaled up without smoothing, with its class name under it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.config import EdgetuneConfig
from tasks.data import IMAGENET_MEAN, IMAGENET_STD, DataError, inspect_dataset
from tasks.sheets import contact_sheet
from tasks.training.loaders import Balance, train_batches


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
    config: EdgetuneConfig,
    items: list[tuple[Path, int]],
    count: int,
    seed: int,
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[int], str]:
    """The first ``count`` augmented images of ``items`` a trial seeded ``seed`` draws, as
    uint8 N×H×W×3, their labels, and the loader's path."""
    if count > len(items):
        raise DataError(
            f"--images {count} is more than the {len(items)} training images of "
            f"{config.data.root}; ask for at most {len(items)}"
        )
    # with the dataset's classes, drawn as the trial draws (train.sampling)
    balance = Balance.of(config.train, classes) if classes is not None else None
    batches = train_batches(
        config.data, items, count, seed=seed, device=torch.device("cpu"), balance=balance
    )
    inputs, labels = next(iter(batches))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (inputs.float() * std + mean).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy(), [int(y) for y in labels], type(batches).__name__


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
    images, labels, loader = augmented_batch(config, items, count, seed, info.classes)
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
