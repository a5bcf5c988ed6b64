"""Training data decoded once per host, and batches augmented whole on the training device.

The cache gives the same pixels as decoding each image (so the same metrics), decodes once
for trials that start together, and leaves nothing behind when an image is unreadable. The
batched path draws per image from the trial's generator and matches the per-image path's
distribution."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F

import tasks.training.batched as batched
import tasks.training.cache as cache
from tasks.config import AugmentConfig, DataConfig, TrainConfig
from tasks.data import DataError, load_rgb
from tasks.models import create_model
from tasks.training.batched import BatchedImages, augment_batch
from tasks.training.fmfp import train_fmfp
from tasks.training.loaders import augment_image, on_device_bytes, train_batches
from tasks.training.rng import build_model, generator

AUGMENT = AugmentConfig(rotation=20, perspective=0.3, color_jitter=0.3, hflip=True)
CPU = torch.device("cpu")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder, and nothing opened yet in this process."""
    folder = tmp_path / "decoded"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    monkeypatch.setattr(cache, "_OPENED", {})
    return folder


@pytest.fixture(scope="module")
def digits(digits16: dict[str, Any]) -> dict[str, Any]:
    return {**digits16, "items": digits16["items"][:300]}


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    decoded: list[Path] = []

    def counting(path: Path, size: int) -> Any:
        decoded.append(path)
        return load_rgb(path, size)

    monkeypatch.setattr(cache, "load_rgb", counting)
    return decoded


def test_the_cache_holds_the_decoded_pixels_and_decodes_once_per_host(
    fresh_cache: Path, digits: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = digits["items"][:40]
    decoded = _count_decodes(monkeypatch)

    images = cache.decoded_images(items, 24)

    assert images.dtype == np.uint8 and images.shape == (40, 3, 24, 24)
    for k in (0, 17, 39):
        assert np.array_equal(images[k], np.asarray(load_rgb(items[k][0], 24)).transpose(2, 0, 1))
    assert len(decoded) == 40
    assert [p.suffix for p in fresh_cache.iterdir() if p.suffix != ".lock"] == [".npy"]
    monkeypatch.setattr(cache, "_OPENED", {})  # another process on the host
    again = cache.decoded_images(items, 24)
    assert len(decoded) == 40 and np.array_equal(again, images)
    cache.decoded_images(items, 16)  # another size: another entry
    assert len(decoded) == 80


def test_the_key_follows_the_images_bytes_not_their_place(
    fresh_cache: Path, digits: dict[str, Any], tmp_path: Path
) -> None:
    items = digits["items"][:5]
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = [
        (Path(shutil.copy(path, moved / f"{k}.png")), label)
        for k, (path, label) in enumerate(items)
    ]
    assert cache.dataset_key(copies, 16) == cache.dataset_key(items, 16)
    assert cache.dataset_key(copies[::-1], 16) != cache.dataset_key(items, 16)
    copies[2][0].write_bytes(items[3][0].read_bytes())  # one image changed
    assert cache.dataset_key(copies, 16) != cache.dataset_key(items, 16)


def test_trials_starting_together_decode_once(
    fresh_cache: Path, digits: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = digits["items"][:30]
    writes: list[int] = []
    real_write = cache._write

    def counting(*args: Any) -> None:
        writes.append(1)
        real_write(*args)

    monkeypatch.setattr(cache, "_write", counting)
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.decoded_images(items, 16)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(writes) == 1 and len(results) == 4
    assert all(np.array_equal(r, results[0]) for r in results)


def test_an_unreadable_image_leaves_no_entry(
    fresh_cache: Path, digits: dict[str, Any], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items = [*digits["items"][:3], (broken, 0)]

    with pytest.raises(DataError, match=r"broken\.png"):
        cache.decoded_images(items, 16)

    assert [p.name for p in fresh_cache.iterdir() if p.suffix != ".lock"] == []


def test_a_cache_folder_that_cannot_be_used_names_it_and_the_ways_out(
    fresh_cache: Path, digits: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    items = digits["items"][:3]
    taken = tmp_path / "a-file"
    taken.write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(taken / "decoded"))  # under a file: no folder

    with pytest.raises(
        cache.CacheError, match=r"cannot be used .*EDGETUNE_CACHE_DIR.*data\.cache: false"
    ):
        cache.decoded_images(items, 16)

    monkeypatch.setenv(cache.CACHE_ENV, str(fresh_cache))
    fresh_cache.mkdir()
    damaged = fresh_cache / f"{cache.dataset_key(items, 16)}.npy"
    damaged.write_bytes(b"half a file")
    with pytest.raises(cache.CacheError, match=re.escape(str(damaged)) + ".*remove it"):
        cache.decoded_images(items, 16)


def _train(data: DataConfig, digits: dict[str, Any]) -> list[dict[str, float]]:
    loader = train_batches(data, digits["items"], 64, seed=5, device=CPU)
    model = build_model(5, lambda: create_model("tinycnn", 10))
    settings = TrainConfig(epochs=2, swa_start=1, batch_size=64, device="cpu")
    return train_fmfp(model, loader, digits["val_x"], digits["val_y"], settings).history


@pytest.mark.parametrize("loader", ["per_image", "batched"])
def test_a_trial_gives_the_same_metrics_with_and_without_the_cache(
    fresh_cache: Path, digits: dict[str, Any], loader: str
) -> None:
    data = DataConfig(root="unused", image_size=16, augment=AUGMENT, loader=loader)  # type: ignore[arg-type]

    cached = _train(data, digits)
    plain = _train(data.model_copy(update={"cache": False}), digits)

    assert [p.suffix for p in fresh_cache.iterdir() if p.suffix != ".lock"] == [".npy"]
    assert cached == plain
    assert cached[-1]["val_loss"] > 0


def test_auto_takes_the_batched_path_only_when_the_set_fits(
    fresh_cache: Path, digits: dict[str, Any]
) -> None:
    data = DataConfig(root="unused", image_size=16, augment=AUGMENT)
    assert data.loader == "auto" and data.cache
    items = digits["items"]

    assert isinstance(train_batches(data, items, 64, seed=0, device=CPU), BatchedImages)
    assert isinstance(train_batches(data, items, 64, seed=0, device=CPU, share=0), DataLoader)
    forced = data.model_copy(update={"loader": "batched"})
    assert isinstance(train_batches(forced, items, 64, seed=0, device=CPU, share=0), BatchedImages)


def test_trainings_of_one_process_share_the_set_on_their_device(
    fresh_cache: Path, digits: dict[str, Any]
) -> None:
    data = DataConfig(root="unused", image_size=16, augment=AUGMENT, loader="batched")
    items = digits["items"]
    first = train_batches(data, items, 64, seed=0, device=CPU)
    second = train_batches(data, items, 64, seed=1, device=CPU)
    assert isinstance(first, BatchedImages) and isinstance(second, BatchedImages)
    assert first.images is second.images  # one copy, read by both
    assert not first.images.is_inference() and first.images.dtype == torch.uint8
    uncached = train_batches(
        data.model_copy(update={"cache": False}), items, 64, seed=0, device=CPU
    )
    assert isinstance(uncached, BatchedImages) and uncached.images is not first.images
    assert torch.equal(uncached.images, first.images)
    # what batch_size: auto leaves for the set: nothing on a CPU or on the per-image path
    assert on_device_bytes(data, items, CPU) == 0


def _batches(seed: int, images: torch.Tensor, batch_size: int = 32) -> list[torch.Tensor]:
    labels = torch.arange(len(images))
    return [
        x for x, _ in BatchedImages(images, labels, AUGMENT, batch_size, generator(seed, "shuffle"))
    ]


def test_batches_follow_the_trial_seed_and_drop_only_a_last_partial_batch(
    digits: dict[str, Any],
) -> None:
    images = torch.from_numpy(cache.decode_images(digits["items"][:100], 16))

    first, again, other = _batches(1, images), _batches(1, images), _batches(2, images)

    assert len(first) == 3 == len(BatchedImages(images, images, AUGMENT, 32, generator(1, "x")))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (32, 3, 16, 16) and first[0].dtype == torch.float32
    single = BatchedImages(images[:10], torch.arange(10), AUGMENT, 32, generator(1, "x"))
    assert [len(x) for x, _ in single] == [10]  # one short batch is kept


def test_each_image_of_a_batch_gets_its_own_draw() -> None:
    one = torch.rand(1, 3, 64, 64)
    batch = augment_batch(
        one.expand(16, 3, 64, 64).clone(), AugmentConfig(rotation=30), generator(0, "x")
    )
    distinct = {tuple(image.flatten().tolist()) for image in batch}
    assert len(distinct) == 16


@pytest.mark.parametrize("size", [16, 31])
def test_the_warps_are_kornias_to_the_bit(size: int) -> None:
    """The matrices are computed on the CPU and only the sampling runs on the images'
    device: on the CPU the pixels are exactly those of kornia's own rotate and
    warp_perspective."""
    from kornia.color import rgb_to_grayscale
    from kornia.geometry.transform import get_perspective_transform, rotate, warp_perspective

    images = torch.rand(12, 3, size, size, generator=torch.Generator().manual_seed(size))
    angles = torch.linspace(-30, 30, 12)
    assert torch.equal(batched._rotate(images, angles), rotate(images, angles, mode="nearest"))

    g, again = generator(0, "p"), generator(0, "p")
    ours = batched._perspective(images, 0.3, g)
    last = float(size - 1)
    start = torch.tensor([[0.0, 0.0], [last, 0.0], [last, last], [0.0, last]]).expand(12, 4, 2)
    inward = torch.randint(0, int(0.3 * (size // 2)) + 1, (12, 4, 2), generator=again).float()
    end = start + inward * torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    chosen = batched._chance(again, 12).view(-1, 1, 1, 1)
    theirs = warp_perspective(
        images, get_perspective_transform(start, end), (size, size), align_corners=True
    )
    assert chosen.any() and not chosen.all()
    assert torch.equal(ours, torch.where(chosen, theirs, images))
    grey = torch.tensor(batched.GREY_WEIGHTS)  # the jitter gives kornia its own weights
    assert torch.equal(rgb_to_grayscale(images, grey), rgb_to_grayscale(images))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_epoch_of_augmented_batches_never_waits_for_the_gpu() -> None:
    """Each wait (a copy from pageable memory, a matrix inverse on the GPU) would leave the
    GPU idle between a trial's small steps; under torch's sync debug mode a wait raises."""
    gpu = torch.device("cuda")
    images = torch.randint(0, 256, (256, 3, 16, 16), dtype=torch.uint8, device=gpu)
    labels = torch.arange(256, device=gpu) % 10
    loader = BatchedImages(images, labels, AUGMENT, 64, generator(0, "x"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [x for x, _ in loader]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 4 and all(x.shape == (64, 3, 16, 16) for x in batches)
    assert all(bool(torch.isfinite(x).all()) for x in batches)


def test_the_batched_augmentation_matches_the_per_image_distribution(
    digits: dict[str, Any],
) -> None:
    """Mean image, pixel spread and spread of image brightness over 16 draws of 150 images,
    the two paths side by side (leaving out any one augmentation on one side fails one)."""
    images = torch.from_numpy(cache.decode_images(digits["items"][:150], 16))
    g_image, g_batch = generator(0, "image"), generator(0, "batch")
    per_image, batched = [], []
    for _ in range(16):
        per_image += [
            F.to_dtype(augment_image(image, AUGMENT, g_image), torch.float32, scale=True)
            for image in images
        ]
        batched.append(augment_batch(images.float() / 255, AUGMENT, g_batch))
    a, b = torch.stack(per_image), torch.cat(batched)
    unaugmented = images.float().div(255).mean(0)

    moved = (a.mean(0) - unaugmented).abs().mean()
    assert moved > 0.01  # the augmentations change the mean image measurably
    assert (a.mean(0) - b.mean(0)).abs().mean() < 0.15 * moved  # 0.06 here; 0.17-0.78 without one
    brightness_a, brightness_b = a.mean((1, 2, 3)).std(), b.mean((1, 2, 3)).std()
    assert abs(brightness_a - brightness_b) < 0.05 * brightness_a  # 0.014; 0.23 without jitter
    assert abs(float(a.std()) - float(b.std())) < 0.03 * float(a.std())
    assert abs(float(a.mean()) - float(b.mean())) < 0.03 * float(a.mean())
