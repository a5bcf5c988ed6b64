"""Torch datasets and loaders over an inspected image-folder dataset.

The training loader draws everything random from the trial's seed: its sampler yields,
for every image of an epoch, the image's index and a seed for that image's augmentation,
both from the trial's ``shuffle`` generator. The augmentation of an image therefore
depends on neither the loader's worker count nor on what other trials in the process
draw, and the same trial seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from tasks.config import AugmentConfig
from tasks.data import IMAGENET_MEAN, IMAGENET_STD, load_rgb, normalise
from tasks.training.rng import generator

_MEAN = [m / 255 for m in IMAGENET_MEAN]
_STD = [s / 255 for s in IMAGENET_STD]


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _perspective_ends(g: torch.Generator, size: int, scale: float) -> list[list[int]]:
    """Corners moved inwards by up to ``scale`` of half the side, clockwise from top left."""
    reach = int(scale * (size // 2))

    def inward() -> int:
        return int(torch.randint(0, reach + 1, (), generator=g))

    last = size - 1
    return [
        [inward(), inward()],
        [last - inward(), inward()],
        [last - inward(), last - inward()],
        [inward(), last - inward()],
    ]


def augment_image(image: torch.Tensor, augment: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One augmentation of a uint8 CHW image, every choice drawn from ``g``."""
    if augment.rotation:
        image = F.rotate(image, _uniform(g, -augment.rotation, augment.rotation))
    if augment.perspective and float(torch.rand((), generator=g)) < 0.5:
        size = image.shape[-1]
        corners = [[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]]
        image = F.perspective(
            image,
            corners,
            _perspective_ends(g, size, augment.perspective),
            interpolation=InterpolationMode.BILINEAR,
        )
    if augment.color_jitter:
        c = augment.color_jitter
        adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
        factors = [_uniform(g, max(0.0, 1 - c), 1 + c) for _ in adjust]
        for k in torch.randperm(len(adjust), generator=g).tolist():
            image = adjust[k](image, factors[k])
    if augment.hflip and float(torch.rand((), generator=g)) < 0.5:
        image = F.horizontal_flip(image)
    return image


class ImageItems(Dataset[tuple[torch.Tensor, int]]):
    """Training images keyed by ``(index, augmentation seed)`` (see ``DrawSampler``)."""

    def __init__(self, items: Sequence[tuple[Path, int]], image_size: int, augment: AugmentConfig):
        self.items = list(items)
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, label = self.items[index]
        image = F.pil_to_tensor(load_rgb(path, self.image_size))
        image = augment_image(image, self.augment, torch.Generator().manual_seed(seed))
        image = F.to_dtype(image, torch.float32, scale=True)
        return F.normalize(image, _MEAN, _STD), label


class DrawSampler(Sampler[tuple[int, int]]):
    """Each epoch: a permutation of the images, each with its own augmentation seed."""

    def __init__(self, size: int, g: torch.Generator) -> None:
        self.size = size
        self.g = g

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=self.g).tolist()
        seeds = torch.randint(0, 2**62, (self.size,), generator=self.g).tolist()
        return iter(zip(order, seeds, strict=True))


def train_loader(
    items: Sequence[tuple[Path, int]],
    image_size: int,
    augment: AugmentConfig,
    batch_size: int,
    *,
    seed: int,
    num_workers: int = 0,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Shuffled, augmented batches of ``items``, all drawn from the trial seed ``seed``."""
    return DataLoader(
        ImageItems(items, image_size, augment),
        batch_size=batch_size,
        sampler=DrawSampler(len(items), generator(seed, "shuffle")),
        drop_last=len(items) > batch_size,  # BatchNorm cannot train on a batch of one
        generator=generator(seed, "workers"),  # the workers' base seed
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def bundle_tensors(bundle: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation bundle as float NCHW inputs and labels: the float model's view of it."""
    images = normalise(bundle["images"], bundle["mean"], bundle["std"])
    return torch.from_numpy(images), torch.from_numpy(bundle["labels"].astype(np.int64))
