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

On a GPU nothing here waits for the GPU. The random draws and the warps' 3×3 matrices
(kornia's, inverted and normalised as its ``warp_affine`` and ``warp_perspective`` do) are
CPU work, and reach the device from pinned memory without a wait; only the sampling of
the pixels (kornia's meshgrid and ``grid_sample``) runs there. Kornia's warps called on
GPU images invert their matrices on the GPU, and each ``torch.linalg.inv`` there and each
copy from pageable memory waits for all the GPU work queued before it: about ten waits a
batch, which left the GPU idle between small steps. (That inverse also loads torch's
CUDA linear algebra on first use, which fails when two trials' threads do it at once.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.geometry.conversions import convert_affinematrix_to_homography, normalize_homography
from kornia.geometry.linalg import transform_points
from kornia.geometry.transform import get_perspective_transform, get_rotation_matrix2d
from kornia.utils import create_meshgrid

from tasks.config import AugmentConfig
from tasks.data import IMAGENET_MEAN, IMAGENET_STD
from tasks.training.rng import epoch_order

#: The luma weights kornia's ``rgb_to_grayscale`` uses for float images.
GREY_WEIGHTS = (0.299, 0.587, 0.114)


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
        order = to_device(epoch_order(len(self.images), self.g, self.weights), self.images.device)
        for k in range(len(self)):
            index = order[k * self.batch_size : (k + 1) * self.batch_size]
            batch = self.images[index].float() / 255
            batch = augment_batch(batch, self.augment, self.g)
            yield (batch - self.mean) / self.std, self.labels[index]


def augment_batch(images: torch.Tensor, augment: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One augmentation of each float (N, 3, H, W) image in [0, 1], every choice from ``g``."""
    if augment.rotation:
        angles = _uniform(g, len(images), -augment.rotation, augment.rotation)
        images = _rotate(images, angles)
    if augment.perspective:
        images = _perspective(images, augment.perspective, g)
    if augment.color_jitter:
        images = _jitter(images, augment.color_jitter, g)
    if augment.hflip:
        flip = to_device(_chance(g, len(images)), images.device).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
    return images


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without waiting for the GPU: a copy from pageable memory
    waits for every kernel queued before it, one from pinned memory does not."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _sampling_matrices(warps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per image, the 3×3 map from output to input pixels in [-1, 1] coordinates that
    kornia's warps sample through (the inverse of ``warps`` normalised), on the CPU."""
    return torch.linalg.inv(normalize_homography(warps, size, size))


def _rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """kornia's ``rotate`` about the centre (nearest neighbour, zeros outside), its matrices
    computed on the CPU."""
    n, _, height, width = images.shape
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2]).expand(n, 2)
    rotation = get_rotation_matrix2d(centre, angles, torch.ones_like(centre))
    sampling = _sampling_matrices(convert_affinematrix_to_homography(rotation), (height, width))
    theta = to_device(sampling[:, :2, :].contiguous(), images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=True)


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
    sampling = _sampling_matrices(get_perspective_transform(start, end), (size, size))
    sampling = to_device(sampling, images.device)
    # kornia's warp_perspective from its sampling matrices on: a meshgrid moved through them
    grid = create_meshgrid(size, size, normalized_coordinates=True, device=images.device)
    grid = transform_points(sampling[:, None, None], grid.to(images.dtype).expand(n, -1, -1, 2))
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return torch.where(to_device(chosen, images.device).view(-1, 1, 1, 1), warped, images)


def _jitter(images: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation as torchvision defines them, factors per image."""
    n = len(images)
    factors = [to_device(_uniform(g, n, max(0.0, 1 - c), 1 + c), images.device) for _ in range(3)]
    # kornia's own weights, given: it would make them on the device, a copy that waits
    grey = to_device(torch.tensor(GREY_WEIGHTS, dtype=images.dtype), images.device)
    for k in torch.randperm(3, generator=g).tolist():
        f = factors[k].view(-1, 1, 1, 1)
        if k == 0:  # brightness: towards black
            other = torch.zeros_like(images)
        elif k == 1:  # contrast: towards the image's mean grey
            other = (
                rgb_to_grayscale(images, grey).mean(dim=(1, 2, 3), keepdim=True).expand_as(images)
            )
        else:  # saturation: towards its own grey
            other = rgb_to_grayscale(images, grey).expand_as(images)
        images = (f * images + (1 - f) * other).clamp(0, 1)
    return images
