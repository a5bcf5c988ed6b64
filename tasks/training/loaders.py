"""Torch datasets and loaders over an inspected image-folder dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from tasks.config import AugmentConfig
from tasks.data import IMAGENET_MEAN, IMAGENET_STD, load_rgb, normalise


def train_transform(augment: AugmentConfig) -> v2.Compose:
    """Augment a resized RGB image, then scale and normalise like the evaluation bundle."""
    steps: list[v2.Transform] = [v2.PILToTensor()]
    if augment.rotation:
        steps.append(v2.RandomRotation(augment.rotation))
    if augment.perspective:
        steps.append(v2.RandomPerspective(distortion_scale=augment.perspective, p=0.5))
    if augment.color_jitter:
        c = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
    ]
    return v2.Compose(steps)


class ImageItems(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, items: Sequence[tuple[Path, int]], image_size: int, transform: v2.Compose):
        self.items = list(items)
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return self.transform(load_rgb(path, self.image_size)), label


def train_loader(
    items: Sequence[tuple[Path, int]],
    image_size: int,
    augment: AugmentConfig,
    batch_size: int,
    *,
    seed: int,
    num_workers: int = 0,
) -> DataLoader[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ImageItems(items, image_size, train_transform(augment)),
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(items) > batch_size,  # BatchNorm cannot train on a batch of one
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def bundle_tensors(bundle: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation bundle as float NCHW inputs and labels: the float model's view of it."""
    images = normalise(bundle["images"], bundle["mean"], bundle["std"])
    return torch.from_numpy(images), torch.from_numpy(bundle["labels"].astype(np.int64))
