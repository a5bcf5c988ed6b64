"""``edgetune data preview``: a contact sheet of the augmented images a trial trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from edgetune.cli import app
from tasks.config import parse_config
from tasks.data import DataError, inspect_dataset, load_rgb
from tasks.sheets import CAPTION
from tasks.training.preview import augmented_batch, write_preview
from tests.conftest import tiny_config

runner = CliRunner()
AUGMENT = {"rotation": 30.0, "perspective": 0.3, "color_jitter": 0.3, "hflip": True}


def _config(root: Path, tmp_path: Path, **augment: Any) -> Path:
    raw = tiny_config(root, tmp_path / "run", data={"image_size": 16, "augment": augment})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tiles(sheet: Image.Image, count: int, columns: int, tile: int) -> list[np.ndarray]:
    """The tiles of a sheet, back at 16 px (every ``tile // 16``-th pixel)."""
    pixels, step = np.asarray(sheet), tile // 16
    out = []
    for index in range(count):
        x, y = (index % columns) * (tile + 2), (index // columns) * (tile + CAPTION + 2)
        out.append(pixels[y : y + tile : step, x : x + tile : step])
    return out


def test_the_sheet_shows_the_first_batch_a_trial_draws(digits_root: Path, tmp_path: Path) -> None:
    config = parse_config(yaml.safe_load(_config(digits_root, tmp_path, **AUGMENT).read_text()))
    out = tmp_path / "sheet.png"

    preview = write_preview(config, out, count=10, seed=3)

    sheet = Image.open(out)
    assert (preview.columns, preview.tile) == (4, 96)  # 16 px scaled 6x, 3 rows of 4
    assert sheet.size == (4 * 98, 3 * (96 + CAPTION + 2))
    info = inspect_dataset(digits_root, verify_images=False)
    items = info.files["train"]
    batch, labels, loader = augmented_batch(config, items, 10, seed=3)
    assert loader == preview.loader == "BatchedImages"
    assert labels == preview.labels and len(labels) == 10
    for tile, image in zip(_tiles(sheet, 10, 4, 96), batch, strict=True):
        assert np.array_equal(tile, image)
    # another seed, other draws; the same seed, the same sheet
    assert not np.array_equal(augmented_batch(config, items, 10, seed=4)[0], batch)
    assert np.array_equal(augmented_batch(config, items, 10, seed=3)[0], batch)


def test_without_augmentation_the_tiles_are_the_images(digits_root: Path, tmp_path: Path) -> None:
    plain = {"rotation": 0.0, "perspective": 0.0, "color_jitter": 0.0, "hflip": False}
    config = parse_config(yaml.safe_load(_config(digits_root, tmp_path, **plain).read_text()))
    items = inspect_dataset(digits_root, verify_images=False).files["train"]
    batch, labels, _ = augmented_batch(config, items, 6, seed=0)
    by_label = {label: [] for label in labels}
    for path, label in items:
        if label in by_label:
            by_label[label].append(np.asarray(load_rgb(path, 16)))
    for image, label in zip(batch, labels, strict=True):
        # un-normalised, each tile is one image of its class exactly
        assert any(np.array_equal(image, source) for source in by_label[label])


def test_the_command_writes_the_sheet_and_says_what_it_shows(
    digits_root: Path, tmp_path: Path
) -> None:
    config = _config(digits_root, tmp_path, **AUGMENT)
    out = tmp_path / "aug.png"
    result = runner.invoke(
        app, ["data", "preview", str(config), "--out", str(out), "--images", "5", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{out}: 5 training images at 16 px as a trial with seed 1")
    assert "(BatchedImages; rotation=30.0, perspective=0.3, color_jitter=0.3" in result.output
    assert Image.open(out).size == (3 * 98, 2 * (96 + CAPTION + 2))
    per_image = runner.invoke(
        app,
        ["data", "preview", str(config), "data.loader=per_image", "-o", str(out)],
    )
    assert per_image.exit_code == 0, per_image.output
    assert "(DataLoader;" in per_image.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "0"], "error: --images must be at least 1, not 0"),
        (["--images", "5000"], "error: --images 5000 is more than the 1077 training images of"),
        (["--out", "{tmp}/sheet.jpg"], "error: the preview is a PNG file; name it *.png, not"),
        (["--out", "{tmp}/no/sheet.png"], "error: folder {tmp}/no does not exist; create it"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    digits_root: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    config = _config(digits_root, tmp_path, **AUGMENT)
    before = sorted(tmp_path.rglob("*"))
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = runner.invoke(app, ["data", "preview", str(config), *args])
    assert result.exit_code == 2
    assert result.output.startswith(message.format(tmp=tmp_path))
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(DataError):
        write_preview(parse_config(yaml.safe_load(config.read_text())), tmp_path / "x.txt")


def test_the_sheet_draws_as_the_trial_samples(digits_root: Path, tmp_path: Path) -> None:
    """With ``train.sampling: weighted`` the sheet shows the weighted draw a trial makes
    first, not the uniform one."""
    from tasks.training.loaders import Balance, train_batches

    raw = yaml.safe_load(_config(digits_root, tmp_path).read_text())
    raw["train"].update(
        sampling="weighted", class_weights={str(c): 1 + 9 * (c == 3) for c in range(10)}
    )
    config = parse_config(raw)
    preview = write_preview(config, tmp_path / "sheet.png", count=40, seed=5)
    info = inspect_dataset(digits_root, verify_images=False)
    items = info.files["train"]
    import torch

    weighted = train_batches(
        config.data,
        items,
        40,
        seed=5,
        device=torch.device("cpu"),
        balance=Balance.of(config.train, info.classes),
    )
    assert preview.labels == [int(y) for y in next(iter(weighted))[1]]
    # class 3 has 10 of the 19 weight units: about half the draws, not a tenth
    assert preview.labels.count(3) >= 12
    assert preview.labels != augmented_batch(config, items, 40, seed=5)[1]
