"""Training batches drawn, augmented and normalised as whole tensors on the training device.

The decoded training set (``tasks.training.cache``) sits on the device as one uint8 tensor;
each batch is indexed out of it, augmented and normalised in a few tensor operations,
with no Python loop over images and no loader process. Every random choice is drawn per
image from the trial's ``shuffle`` generator, as on the per-image path
(``tasks.training.loaders``), and the warps are kornia's:

- rotation: an angle uniform in ±``rotation`` degrees, nearest neighbour, zeros outside;
- perspective: with probability 1/2, each corner moved inwards by up to ``perspective`` of
  half the side, bilinear;
- colour jitter: brightness, contrast and saturation factors uniform in [1-c, 1+c], as
  torchvision defines them, in an order drawn per batch;
- horizontal flip: with probability 1/2.

The per-image path draws the same distributions image by image on uint8 pixels; this one
works in float, so a bilinear pixel is not rounded. The two paths do not give the same
batches for a seed, but each gives the same batches for the same seed, on any machine
with the same device type.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from kornia.color import rgb_to_grayscale
from kornia.geometry.transform import get_perspective_transform, rotate, warp_perspective

from tasks.config import AugmentConfig
from tasks.data import IMAGENET_MEAN, IMAGENET_STD
from tasks.training.rng import epoch_order


class BatchedImages:
    """Shuffled, augmented, normalised batches of a decoded image tensor, on its device.

    ``images``: uint8 (N, 3, H, W) on the training device; ``labels``: int64 (N,) beside
    it; ``g``: the trial's CPU generator every draw comes from; ``weights``: per image, on
    the CPU, for weighted sampling (None: each image once an epoch). Iterating gives one
    epoch; the last partial batch is dropped when there is more than one batch (BatchNorm
    cannot train on a batch of one), as the per-image loader does.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: AugmentConfig,
        batch_size: int,
        g: torch.Generator,
        *,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment
        self.batch_size = batch_size
        self.g = g
        self.weights = weights
        self.drop_last = len(images) > batch_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) / 255
        self.std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) / 255

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.images), self.g, self.weights).to(self.images.device)
        for k in range(len(self)):
            index = order[k * self.batch_size : (k + 1) * self.batch_size]
            batch = self.images[index].float() / 255
            batch = augment_batch(batch, self.augment, self.g)
            yield (batch - self.mean) / self.std, self.labels[index]


def augment_batch(images: torch.Tensor, augment: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One augmentation of each float (N, 3, H, W) image in [0, 1], every choice from ``g``."""
    if augment.rotation:
        angles = _uniform(g, len(images), -augment.rotation, augment.rotation)
        images = rotate(images, angles.to(images.device), mode="nearest")
    if augment.perspective:
        images = _perspective(images, augment.perspective, g)
    if augment.color_jitter:
        images = _jitter(images, augment.color_jitter, g)
    if augment.hflip:
        flip = _chance(g, len(images)).to(images.device).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
    return images


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _chance(g: torch.Generator, n: int) -> torch.Tensor:
    """True with probability 1/2, per image."""
    return torch.rand(n, generator=g) < 0.5


def _perspective(images: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """With probability 1/2 per image, corners moved inwards by up to ``scale`` of half a side."""
    n, size = len(images), images.shape[-1]
    last = float(size - 1)
    start = torch.tensor([[0.0, 0.0], [last, 0.0], [last, last], [0.0, last]]).expand(n, 4, 2)
    reach = int(scale * (size // 2))
    inward = torch.randint(0, reach + 1, (n, 4, 2), generator=g).float()
    towards_centre = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    end = start + inward * towards_centre
    chosen = _chance(g, n)
    warps = get_perspective_transform(start, end).to(images.device)
    warped = warp_perspective(images, warps, (size, size), align_corners=True)
    return torch.where(chosen.to(images.device).view(-1, 1, 1, 1), warped, images)


def _jitter(images: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation as torchvision defines them, factors per image."""
    n = len(images)
    factors = [_uniform(g, n, max(0.0, 1 - c), 1 + c).to(images.device) for _ in range(3)]
    for k in torch.randperm(3, generator=g).tolist():
        f = factors[k].view(-1, 1, 1, 1)
        if k == 0:  # brightness: towards black
            other = torch.zeros_like(images)
        elif k == 1:  # contrast: towards the image's mean grey
            other = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True).expand_as(images)
        else:  # saturation: towards its own grey
            other = rgb_to_grayscale(images).expand_as(images)
        images = (f * images + (1 - f) * other).clamp(0, 1)
    return images
