"""``edgetune data doubts``: confident learning on out-of-fold probabilities finds the
training images whose labels were deliberately flipped, and writes them for review."""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from edgetune.cli import app
from tasks.config import parse_config
from tasks.data import DataError, inspect_dataset
from tasks.sheets import CAPTION, MIN_TILE
from tasks.training import doubts as doubts_module
from tasks.training.doubts import (
    CSV_COLUMNS,
    Doubts,
    find_doubts,
    fold_settings,
    write_doubts,
)
from tests.conftest import tiny_config

runner = CliRunner()
FLIPPED = 20
TOP = 40
#: Cheap enough for CI on a CPU: 8 px digits (their own size), tinycnn, 5 folds of 6 epochs.
SETTINGS = {"image_size": 8, "epochs": 6, "folds": 5, "batch_size": 64, "lr": 0.05}


def _raw(root: Path, run_dir: Path) -> dict[str, Any]:
    return tiny_config(
        root,
        run_dir,
        data={"image_size": SETTINGS["image_size"], "augment": {"rotation": 0.0}},
        train={"batch_size": SETTINGS["batch_size"], "lr": SETTINGS["lr"]},
    )


def _flip(root: Path, count: int, seed: int) -> set[str]:
    """Move ``count`` training images into another class's folder; their new paths."""
    info = inspect_dataset(root, verify_images=False)
    rng = np.random.default_rng(seed)
    flipped = set()
    for index in rng.choice(len(info.files["train"]), size=count, replace=False):
        path, label = info.files["train"][index]
        other = (label + 1 + int(rng.integers(len(info.classes) - 1))) % len(info.classes)
        moved = root / "train" / info.classes[other] / path.name
        path.replace(moved)
        flipped.add(moved.relative_to(root).as_posix())
    return flipped


@pytest.fixture(scope="module")
def flipped(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The digits with 20 training labels flipped, their doubts found and written once."""
    base = tmp_path_factory.mktemp("doubts")
    root = base / "digits"
    shutil.copytree(digits_root, root)
    moved = _flip(root, FLIPPED, seed=7)
    config = parse_config(_raw(root, base / "run"))
    started = time.perf_counter()
    found = find_doubts(config, SETTINGS["folds"], SETTINGS["epochs"], seed=0)
    print(f"find_doubts: {time.perf_counter() - started:.1f} s with {SETTINGS}")
    out = base / "out"
    written = write_doubts(found, out, top=10)
    return {"root": root, "flipped": moved, "doubts": found, "out": out, "written": written}


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "doubts.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_most_flipped_labels_are_among_the_first_doubts(flipped: dict[str, Any]) -> None:
    rows = _rows(flipped["out"])
    first = {row["path"] for row in rows[:TOP]}
    found = len(first & flipped["flipped"])
    print(f"{found} of {FLIPPED} flipped images in the top {TOP} doubts")
    assert found >= 0.8 * FLIPPED
    # the flagged ones are mostly flipped ones: the flags are not the whole top of the list
    flagged = {row["path"] for row in rows if row["flagged"] == "yes"}
    assert len(flagged & flipped["flipped"]) >= len(flagged) / 2


@pytest.mark.slow
def test_the_csv_ranks_every_training_image_by_its_label_quality(
    flipped: dict[str, Any],
) -> None:
    rows, found, root = _rows(flipped["out"]), flipped["doubts"], flipped["root"]
    info = inspect_dataset(root, verify_images=False)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == len(info.files["train"]) == len(found.items)
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    scores = [float(row["label_quality"]) for row in rows]
    assert scores == sorted(scores) and scores[0] < scores[-1]
    by_path = {p.relative_to(root).as_posix(): i for i, (p, _) in enumerate(found.items)}
    assert set(by_path) == {row["path"] for row in rows}
    for row in rows:
        path = root / row["path"]
        assert path.is_file()
        assert row["given"] == path.parent.name  # the folder is the given label
        probs = found.probs[by_path[row["path"]]]
        assert row["suggested"] == info.classes[int(np.argmax(probs))]
        assert float(row["p_given"]) == pytest.approx(probs[int(row["given"])], abs=1e-6)
        assert float(row["p_suggested"]) == pytest.approx(probs.max(), abs=1e-6)
        # self-confidence: the quality score is the probability of the given label
        assert float(row["label_quality"]) == pytest.approx(float(row["p_given"]), abs=1e-6)
    # out-of-fold probabilities: one distribution per image
    assert np.allclose(found.probs.sum(axis=1), 1.0)
    flagged = [row["path"] for row in rows if row["flagged"] == "yes"]
    assert {by_path[p] for p in flagged} == set(found.issues.tolist())
    assert len(flagged) == flipped["written"].flagged > 0


@pytest.mark.slow
def test_the_sheet_shows_the_first_doubts(flipped: dict[str, Any]) -> None:
    sheet = Image.open(flipped["out"] / "doubts.png")
    columns = math.ceil(math.sqrt(10))  # --top 10: 4 columns, 3 rows
    tile = MIN_TILE // 8 * 8  # 8 px images scaled up 12x
    assert flipped["written"].shown == 10
    assert sheet.size == (columns * (tile + 2), 3 * (tile + CAPTION + 2))


@pytest.mark.slow
def test_the_cvat_export_lists_exactly_the_flagged_images(flipped: dict[str, Any]) -> None:
    out, root = flipped["out"], flipped["root"]
    rows = _rows(out)
    flagged = [row for row in rows if row["flagged"] == "yes"]
    tree = ET.parse(out / "annotations.xml").getroot()
    assert tree.tag == "annotations"
    assert tree.findtext("version") == "1.1"
    labels = [node.findtext("name") for node in tree.iter("label")]
    assert labels == list(flipped["doubts"].classes)
    images = tree.findall("image")
    assert sorted(node.get("name") for node in images) == sorted(row["path"] for row in flagged)
    given = {row["path"]: row["given"] for row in rows}
    for node in images:
        name = node.get("name")
        tags = node.findall("tag")
        assert [tag.get("label") for tag in tags] == [given[name]]
        copy = out / "images" / name
        assert copy.read_bytes() == (root / name).read_bytes()
        assert (node.get("width"), node.get("height")) == ("8", "8")
    assert len(list((out / "images").rglob("*.png"))) == len(flagged)


@pytest.mark.slow
def test_the_summary_says_how_the_doubts_were_found(flipped: dict[str, Any]) -> None:
    summary = json.loads((flipped["out"] / "summary.json").read_text())
    assert summary["images"] == len(flipped["doubts"].items)
    assert summary["folds"] == SETTINGS["folds"]
    assert summary["epochs"] == SETTINGS["epochs"]
    assert summary["swa_start"] == 3  # the config's 1 of 2 epochs, kept as a share of 6
    assert summary["seed"] == 0
    assert summary["flagged"] == len(flipped["doubts"].issues)
    assert summary["on_sheet"] == 10


def test_every_image_is_held_out_by_exactly_one_fold(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fold trains on the other folds only; the folds are stratified and seeded."""
    trained: list[set[Path]] = []
    held_sizes: list[int] = []

    def record(config: Any, settings: Any, classes: Any, items: Any, held_x: Any, *_: Any) -> Any:
        trained.append({path for path, _ in items})
        held_sizes.append(len(held_x))
        return np.full((len(held_x), len(classes)), 1.0 / len(classes))

    monkeypatch.setattr(doubts_module, "_fold_probs", record)
    config = parse_config(_raw(digits_root, tmp_path / "run"))
    found = find_doubts(config, folds=4, epochs=1, seed=3)
    every = {path for path, _ in found.items}
    held = [every - fold for fold in trained]
    assert len(held) == 4 and sum(held_sizes) == len(every)
    assert set().union(*held) == every and sum(len(h) for h in held) == len(every)
    labels = dict(found.items)
    for fold in held:  # stratified: each class's share is within one image of a quarter
        counts = np.bincount([labels[p] for p in fold], minlength=len(found.classes))
        totals = np.bincount(found.labels, minlength=len(found.classes))
        assert np.all(np.abs(counts - totals / 4) <= 1)
    trained.clear()
    find_doubts(config, folds=4, epochs=1, seed=3)
    assert [every - fold for fold in trained] == held  # the same seed, the same folds


@pytest.mark.parametrize(
    ("epochs", "swa_start", "given", "expected"),
    [
        (200, 120, None, (200, 120)),
        (200, 120, 10, (10, 6)),
        (200, 120, 1, (1, 0)),
        (10, 9, 3, (3, 2)),
        (4, 3, 40, (40, 30)),
    ],
)
def test_fewer_epochs_keep_the_share_of_the_schedule_before_swa(
    digits_root: Path,
    tmp_path: Path,
    epochs: int,
    swa_start: int,
    given: int | None,
    expected: tuple[int, int],
) -> None:
    raw = _raw(digits_root, tmp_path / "run")
    raw["train"].update(epochs=epochs, swa_start=swa_start)
    settings = fold_settings(parse_config(raw), given)
    assert (settings.epochs, settings.swa_start) == expected


def _doubts_config(root: Path, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_raw(root, tmp_path / "run")))
    return path


@pytest.mark.slow
def test_the_command_writes_the_folder_and_refuses_to_mix_into_one(
    digits_root: Path, tmp_path: Path
) -> None:
    config = _doubts_config(digits_root, tmp_path)
    out = tmp_path / "doubts"
    args = ["data", "doubts", str(config), "-o", str(out), "--folds", "2", "--epochs", "1"]
    done = runner.invoke(app, [*args, "--top", "3", "--seed", "5"])
    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"{out}: ")
    assert "of 1077 training images flagged (2 folds, 1 epochs each, seed 5)" in done.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["annotations.xml", "doubts.csv", "doubts.png", "images", "summary.json"]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["folds"], summary["epochs"], summary["seed"]) == (2, 1, 5)
    assert summary["on_sheet"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging
    before = (out / "doubts.csv").read_bytes()

    again = runner.invoke(app, [*args, "--seed", "6"])
    assert again.exit_code == 2
    assert again.output.strip() == (
        f"error: folder {out} exists and is not empty; choose another -o or pass --force to "
        f"replace it"
    )
    assert (out / "doubts.csv").read_bytes() == before

    forced = runner.invoke(app, [*args, "--seed", "6", "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "summary.json").read_text())["seed"] == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--folds", "1"], "error: --folds must be at least 2, not 1"),
        (["--epochs", "0"], "error: --epochs must be at least 1, not 0"),
        (["--top", "0"], "error: --top must be at least 1, not 0"),
        (["--folds", "200"], "error: class '"),
        (["-o", "{tmp}/no/d"], "error: folder {tmp}/no does not exist; create it or choose"),
        (["-o", "{tmp}/config.yaml"], "error: {tmp}/config.yaml is a file, not a folder"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    digits_root: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    config = _doubts_config(digits_root, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    args = [arg.format(tmp=tmp_path) for arg in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "d")]
    result = runner.invoke(app, ["data", "doubts", str(config), *args])
    assert result.exit_code == 2
    assert result.output.startswith(message.format(tmp=tmp_path))
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_a_class_with_fewer_images_than_folds_is_named(digits_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    for extra in sorted((root / "train" / "4").iterdir())[3:]:
        extra.unlink()
    config = parse_config(_raw(root, tmp_path / "run"))
    with pytest.raises(DataError) as caught:
        find_doubts(config, folds=5, epochs=1)
    assert str(caught.value) == (
        f"class '4' has 3 image(s) in train of {root}, fewer than --folds 5: every fold needs "
        f"each class; lower --folds to 3 or add images of that class"
    )


@pytest.mark.slow
def test_a_failed_write_leaves_the_old_folder_and_no_part(
    flipped: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found: Doubts = flipped["doubts"]
    out = tmp_path / "d"
    out.mkdir()
    (out / "mine.txt").write_text("kept")

    def broken(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(doubts_module, "_write_cvat", broken)
    with pytest.raises(OSError, match="disk full"):
        write_doubts(found, out, top=4, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    write_doubts(found, fresh, top=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "fresh"]
