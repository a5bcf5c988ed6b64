"""Image-folder datasets: the digits example, bundles, and each kind of bad dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data import (
    IMAGENET_MEAN,
    DataError,
    calibration_items,
    inspect_dataset,
    load_bundle,
    make_bundle,
    normalise,
    write_digits,
)


def test_digits_is_written_as_an_image_folder(digits_root: Path) -> None:
    info = inspect_dataset(digits_root)
    assert info.classes == tuple(str(d) for d in range(10))
    counts = info.counts()
    assert sum(counts.values()) == 1797
    assert counts["val"] == pytest.approx(0.2 * 1797, abs=2)
    with Image.open(info.files["train"][0][0]) as image:
        assert image.size == (8, 8)


def test_digits_is_idempotent_and_refuses_foreign_folders(
    digits_root: Path, tmp_path: Path
) -> None:
    assert write_digits(digits_root).counts() == inspect_dataset(digits_root).counts()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an edgetune digits folder"):
        write_digits(other)


def test_bundle_holds_resized_rgb_uint8_and_labels(digits_root: Path, tmp_path: Path) -> None:
    info = inspect_dataset(digits_root)
    path = make_bundle(info.files["val"][:10], info.classes, 16, tmp_path / "b.npz")
    bundle = load_bundle(path)
    assert bundle["images"].shape == (10, 16, 16, 3) and bundle["images"].dtype == np.uint8
    assert list(bundle["labels"]) == [label for _, label in info.files["val"][:10]]
    assert np.allclose(bundle["mean"], IMAGENET_MEAN)
    x = normalise(bundle["images"], bundle["mean"], bundle["std"])
    assert x.shape == (10, 3, 16, 16) and x.dtype == np.float32
    # Grey images: the three channels carry the same pixel before normalisation.
    assert np.array_equal(bundle["images"][..., 0], bundle["images"][..., 2])


def test_calibration_sample_is_seeded(digits_root: Path) -> None:
    items = inspect_dataset(digits_root).files["train"]
    first, again = calibration_items(items, 50, seed=3), calibration_items(items, 50, seed=3)
    assert first == again and len(first) == 50
    assert calibration_items(items, 50, seed=4) != first
    assert len(calibration_items(items, 10_000, seed=0)) == len(items)


def _copy(digits_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(digits_root, root)
    return root


def test_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"dataset folder .*missing not found; .*edgetune data digits"
    ):
        inspect_dataset(tmp_path / "missing")


def test_missing_val_split(digits_root: Path, tmp_path: Path) -> None:
    root = _copy(digits_root, tmp_path)
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match=r"has no val/ folder"):
        inspect_dataset(root)


def test_empty_class_folder(digits_root: Path, tmp_path: Path) -> None:
    root = _copy(digits_root, tmp_path)
    for image in (root / "val" / "3").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"class folder .*val/3 has no images"):
        inspect_dataset(root)


def test_class_folders_differ(digits_root: Path, tmp_path: Path) -> None:
    root = _copy(digits_root, tmp_path)
    (root / "val" / "7").rename(root / "val" / "seven")
    with pytest.raises(DataError, match=r"only in train: \['7'\], only in val: \['seven'\]"):
        inspect_dataset(root)


def test_an_image_is_decoded_again_only_once_it_changed(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study's checks and its inputs' preparation inspect the same folder seconds apart:
    the second decodes nothing, unless a file changed since (then it is caught)."""
    import tasks.data

    root = _copy(digits_root, tmp_path)
    opened: list[Path] = []
    real_open = Image.open
    monkeypatch.setattr(
        tasks.data.Image, "open", lambda path, *a: opened.append(Path(path)) or real_open(path, *a)
    )
    info = inspect_dataset(root)
    total = sum(len(items) for items in info.files.values())
    assert len(opened) == total > 0
    opened.clear()
    inspect_dataset(root)
    assert opened == []
    victim = next((root / "val" / "3").iterdir())
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=rf"corrupt image .*{victim.name}"):
        inspect_dataset(root)
    assert opened[-1] == victim and len(set(opened)) == len(opened)
    opened.clear()
    with pytest.raises(DataError, match=rf"corrupt image .*{victim.name}"):
        inspect_dataset(root)  # a failed check is not remembered
    assert opened[-1] == victim


def test_corrupt_image(digits_root: Path, tmp_path: Path) -> None:
    root = _copy(digits_root, tmp_path)
    victim = next((root / "train" / "5").iterdir())
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=rf"corrupt image .*{victim.name}.*remove or replace"):
        inspect_dataset(root)
