"""Torch datasets and loaders over an inspected image-folder dataset.

The training loader draws everything random from the trial's seed: its sampler yields,
for every image of an epoch, the image's index and a seed for that image's augmentation,
both from the trial's ``shuffle`` generator. The augmentation of an image therefore
depends on neither the loader's worker count nor on what other trials in the process
draw, and the same trial seed gives the same batches.

``train_batches`` picks the path a trial takes (``data.loader``): whole batches on the
training device (``tasks.training.batched``) when the decoded set fits there, else this
module's loader, image by image in worker processes. Both read the images decoded once per
host (``tasks.training.cache``) unless ``data.cache`` is off.

Both draw an epoch's images the same way (``epoch_order``, ``Balance``): with
``train.sampling: uniform`` a permutation, each image once; with ``weighted`` as many
draws with replacement, so that the classes come in the proportions of
``train.class_weights`` (equal without), however imbalanced the set.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from tasks.config import AugmentConfig, ConfigError, DataConfig, TrainConfig
from tasks.config.schema import class_weights_refusal
from tasks.data import IMAGENET_MEAN, IMAGENET_STD, load_rgb, normalise
from tasks.training.cache import decode_images, decoded_images
from tasks.training.gpus import device_budget
from tasks.training.rng import epoch_order, generator

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
    """Training images keyed by ``(index, augmentation seed)`` (see ``DrawSampler``).

    ``images``: the items decoded (uint8 N×3×H×W, ``tasks.training.cache``); without it
    each image is decoded when drawn.
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, int]],
        image_size: int,
        augment: AugmentConfig,
        images: np.ndarray | None = None,
    ):
        self.items = list(items)
        self.image_size = image_size
        self.augment = augment
        self.images = images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, label = self.items[index]
        if self.images is None:
            image = F.pil_to_tensor(load_rgb(path, self.image_size))
        else:
            image = torch.from_numpy(np.array(self.images[index]))
        image = augment_image(image, self.augment, torch.Generator().manual_seed(seed))
        image = F.to_dtype(image, torch.float32, scale=True)
        return F.normalize(image, _MEAN, _STD), label


@dataclass(frozen=True)
class Balance:
    """What a trial does against class imbalance: how it draws its training images
    (``train.sampling``) and whether its loss weighs the classes
    (``train.class_weighted_loss``), with ``train.class_weights`` in the dataset's class
    order (None: equal). ``classes``: how many the dataset has (0: the labels' largest + 1).
    """

    sampling: str = "uniform"
    class_weights: tuple[float, ...] | None = None
    weighted_loss: bool = False
    classes: int = 0

    @classmethod
    def of(cls, settings: TrainConfig, classes: Sequence[str]) -> Balance:
        """A trial's settings, its weights (keyed by class folder name) checked and put in
        the order of ``classes``, the dataset's class folders."""
        refusal = class_weights_refusal(settings.class_weights, classes)
        if refusal:
            raise ConfigError(refusal)
        given = settings.class_weights
        return cls(
            sampling=settings.sampling,
            class_weights=None if given is None else tuple(given[name] for name in classes),
            weighted_loss=settings.class_weighted_loss,
            classes=len(classes),
        )

    def _counts(self, labels: Sequence[int]) -> np.ndarray:
        """Images per class; classes past the labels' largest count 0."""
        return np.bincount(np.asarray(labels, dtype=np.int64), minlength=self.classes)

    def proportions(self, classes: int) -> np.ndarray:
        """Each class's share of the draws: the class weights over their sum (equal without)."""
        weights = np.ones(classes) if self.class_weights is None else np.array(self.class_weights)
        return weights / weights.sum()

    def image_weights(self, labels: Sequence[int]) -> torch.Tensor | None:
        """Per image, its class's share of the draws over the class's images: the weights
        ``weighted`` sampling draws with (None: ``uniform``, each image once an epoch)."""
        if self.sampling == "uniform":
            return None
        counts = self._counts(labels)
        share = self.proportions(len(counts)) / np.maximum(counts, 1)
        return torch.from_numpy(share[np.asarray(labels, dtype=np.int64)])

    def loss_weights(self, labels: Sequence[int]) -> torch.Tensor | None:
        """Per class, the weight of its images in the cross-entropy (None: unweighted):
        scikit-learn's "balanced" N/(K·n_c), and with class weights times their share,
        scaled to a mean of 1 over the classes. A weighted cross-entropy is a weighted mean,
        so the scale does not change the loss; only the ratios do."""
        if not self.weighted_loss:
            return None
        counts = self._counts(labels)
        k = len(counts)
        weights = np.where(counts > 0, len(labels) / (k * np.maximum(counts, 1)), 0.0)
        if self.class_weights is not None:
            weights = weights * self.proportions(k)
            weights = weights * k / weights.sum()
        return torch.tensor(weights, dtype=torch.float32)


class DrawSampler(Sampler[tuple[int, int]]):
    """Each epoch: the images' order (``epoch_order``: a permutation, or weighted draws),
    each draw with its own augmentation seed."""

    def __init__(self, size: int, g: torch.Generator, weights: torch.Tensor | None = None) -> None:
        self.size = size
        self.g = g
        self.weights = weights

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(self.size, self.g, self.weights).tolist()
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
    images: np.ndarray | None = None,
    pin_memory: bool = False,
    weights: torch.Tensor | None = None,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Shuffled, augmented batches of ``items``, all drawn from the trial seed ``seed``
    (``weights``: per image, for weighted sampling; see ``Balance.image_weights``)."""
    return DataLoader(
        ImageItems(items, image_size, augment, images),
        batch_size=batch_size,
        sampler=DrawSampler(len(items), generator(seed, "shuffle"), weights),
        drop_last=len(items) > batch_size,  # BatchNorm cannot train on a batch of one
        generator=generator(seed, "workers"),  # the workers' base seed
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
    )


#: Share of a training's device memory (``tasks.training.gpus.device_budget``) the decoded
#: set may take on the batched path.
DEVICE_SHARE = 0.25

#: Decoded sets already on a device, by cache file and device: trainings of one process on
#: one GPU (GPU slots) share one read-only copy; it is freed with the last of them.
_ON_DEVICE: weakref.WeakValueDictionary[tuple[str, str], torch.Tensor] = (
    weakref.WeakValueDictionary()
)
_on_device_lock = threading.Lock()


def train_batches(
    data: DataConfig,
    items: Sequence[tuple[Path, int]],
    batch_size: int,
    *,
    seed: int,
    device: torch.device,
    share: float = DEVICE_SHARE,
    balance: Balance | None = None,
) -> Iterable[Any]:
    """One trial's training batches, on the path ``data.loader`` names (``auto``: batched on
    the device when the decoded set takes at most ``share`` of the training's memory),
    drawn as ``balance`` says (``train.sampling``; None: uniform)."""
    from tasks.training.batched import BatchedImages  # kornia: only on this path

    size = data.image_size
    images = decoded_images(items, size) if data.cache else None
    weights = (balance or Balance()).image_weights([label for _, label in items])
    if use_batched(data.loader, decoded_bytes(items, size), device, share):
        array = images if images is not None else decode_images(items, size)
        labels = torch.tensor([label for _, label in items], dtype=torch.int64, device=device)
        g = generator(seed, "shuffle")
        return BatchedImages(
            on_device(array, device), labels, data.augment, batch_size, g, weights=weights
        )
    return train_loader(
        items,
        size,
        data.augment,
        batch_size,
        seed=seed,
        num_workers=data.num_workers,
        images=images,
        pin_memory=device.type == "cuda",
        weights=weights,
    )


def decoded_bytes(items: Sequence[tuple[Path, int]], size: int) -> int:
    """Bytes of ``items`` decoded at ``size`` (uint8 RGB)."""
    return len(items) * 3 * size * size


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``: a copy (a cached map is read-only), shared with
    the other trainings of this process that hold the same cache entry there."""
    path = getattr(array, "filename", None)
    if path is None:
        return torch.from_numpy(np.array(array)).to(device)
    key = (str(path), str(device))
    with _on_device_lock:
        tensor = _ON_DEVICE.get(key)
        if tensor is None:
            tensor = torch.from_numpy(np.array(array)).to(device)
            _ON_DEVICE[key] = tensor
    return tensor


def use_batched(choice: str, nbytes: int, device: torch.device, share: float) -> bool:
    """Whether a set of ``nbytes`` decoded takes the batched path on ``device``."""
    if choice != "auto":
        return choice == "batched"
    return nbytes <= share * device_budget(device)


def on_device_bytes(
    data: DataConfig,
    items: Sequence[tuple[Path, int]],
    device: torch.device,
    share: float = DEVICE_SHARE,
) -> int:
    """Bytes of GPU memory the decoded set will take for training on ``device`` (0 on a CPU
    or the per-image path): what ``batch_size: auto`` leaves it."""
    nbytes = decoded_bytes(items, data.image_size)
    gpu = device.type == "cuda"
    return nbytes if gpu and use_batched(data.loader, nbytes, device, share) else 0


def bundle_tensors(bundle: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation bundle as float NCHW inputs and labels: the float model's view of it."""
    images = normalise(bundle["images"], bundle["mean"], bundle["std"])
    return torch.from_numpy(images), torch.from_numpy(bundle["labels"].astype(np.int64))
