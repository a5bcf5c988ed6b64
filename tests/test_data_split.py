"""``edgetune data split``: near-duplicates found across splits, and a split by image
features that keeps each group of them in one split.

The digits get planted near-duplicates: train images copied into val with pixel noise
and a contrast change, as a re-saved or lightly edited copy of a photo would be.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from edgetune.cli import EXIT_BAD_INPUT, app
from tasks.data import SPLITS, inspect_dataset
from tasks.data_split import (
    DEFAULT_THRESHOLD,
    Embedding,
    Pairs,
    assign_groups,
    cross_split_pairs,
    near_duplicate_groups,
    read_pool,
    similar_pairs,
)

from conftest import tiny_config

runner = CliRunner()
PLANTED = 15


def _plant(root: Path, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Copy ``count`` train images into val/ (same class) with noise of σ 6/255 and a
    contrast change; the (train, val) pairs as paths relative to ``root``."""
    rng = np.random.default_rng(seed)
    train = sorted((root / "train").rglob("*.png"))
    planted = []
    for index in rng.choice(len(train), size=count, replace=False):
        source = train[index]
        pixels = np.asarray(Image.open(source), dtype=np.float64)
        edited = np.clip(pixels * 0.9 + 8 + rng.normal(0, 6, pixels.shape), 0, 255)
        copy = root / "val" / source.parent.name / f"planted-{source.name}"
        Image.fromarray(edited.round().astype(np.uint8), mode="L").save(copy)
        planted.append((source.relative_to(root).as_posix(), copy.relative_to(root).as_posix()))
    return planted


@pytest.fixture
def planted(tmp_path: Path, digits_root: Path) -> tuple[Path, list[tuple[str, str]]]:
    root = tmp_path / "src"
    shutil.copytree(digits_root, root)
    return root, _plant(root, PLANTED)


def _cross_pairs(
    root: Path, embedding: Embedding, threshold: float
) -> dict[str, set[tuple[str, ...]]]:
    """The near-duplicate pairs across the splits of ``root``, recomputed from its files."""
    pool = read_pool(root)
    pairs = similar_pairs(embedding.vectors(pool.paths, len(pool.classes)), threshold)
    named = {}
    for kind, hits in cross_split_pairs(pairs, pool.splits).items():
        named[kind] = {
            tuple(sorted(pool.paths[int(i)].relative_to(root).as_posix() for i in (a, b)))
            for a, b in zip(pairs.first[hits], pairs.second[hits], strict=True)
        }
    return named


def _contents(root: Path) -> Counter[str]:
    """The images under the split folders of ``root``, by content."""
    return Counter(
        hashlib.sha256(path.read_bytes()).hexdigest()
        for split in SPLITS
        for path in (root / split).rglob("*.png")
    )


def _where(root: Path) -> dict[str, str]:
    """Each image's file name -> its split (the digits' names are unique)."""
    return {p.name: p.relative_to(root).parts[0] for s in SPLITS for p in (root / s).rglob("*.png")}


def _split(*argv: str) -> str:
    result = runner.invoke(app, ["data", "split", *argv])
    assert result.exit_code == 0, result.stderr
    return result.stdout


# The report ---------------------------------------------------------------------------


def test_the_report_finds_every_planted_near_duplicate_across_train_and_val(
    planted: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    root, pairs = planted
    found = _cross_pairs(root, Embedding(), DEFAULT_THRESHOLD)
    missed = [pair for pair in pairs if tuple(sorted(pair)) not in found["train-val"]]
    print(f"train-val near-duplicate pairs: {len(found['train-val'])}, planted {PLANTED}")
    assert missed == []
    before = sorted(tmp_path.rglob("*"))
    out = _split(str(root), "--report-only")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    rows = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[2:5]}
    assert rows == {kind: len(found[kind]) for kind in ("train-val", "train-test", "val-test")}
    assert rows["train-val"] >= PLANTED


# Splitting by features ----------------------------------------------------------------


def test_a_split_by_features_has_no_near_duplicates_across_splits(
    planted: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    root, pairs = planted
    dst = tmp_path / "out"
    out = _split(str(root), str(dst), "--by", "features", "--seed", "3")
    assert sorted(p.name for p in dst.iterdir()) == ["split.json", "test", "train", "val"]
    after = _cross_pairs(dst, Embedding(), DEFAULT_THRESHOLD)
    assert {kind: len(found) for kind, found in after.items()} == {
        "train-val": 0,
        "train-test": 0,
        "val-test": 0,
    }
    assert _contents(dst) == _contents(root)  # every image exactly once
    assert sum(_contents(dst).values()) == 1797 + PLANTED
    where = _where(dst)
    for train_image, val_copy in pairs:  # each planted pair ended up together
        assert where[Path(train_image).name] == where[Path(val_copy).name]
    record = json.loads((dst / "split.json").read_text())
    assert record["method"] == "features" and record["threshold"] == DEFAULT_THRESHOLD
    assert record["cross_split_pairs"]["source"]["train-val"]["pairs"] >= PLANTED
    assert all(v["pairs"] == 0 for v in record["cross_split_pairs"]["result"].values())
    grouped = [len(group) for group in record["near_duplicate_groups"]["groups"]]
    assert grouped and min(grouped) >= 2 and max(grouped) < 100  # groups, not one lump
    assert f"{len(grouped)} near-duplicate groups" in out.splitlines()[0]
    _assert_fractions(dst, {"train": 0.7, "val": 0.15, "test": 0.15}, tolerance=0.02)


def _assert_fractions(dst: Path, asked: dict[str, float], tolerance: float) -> None:
    """Each class's share in each split is within ``tolerance`` of the one asked for."""
    info = inspect_dataset(dst)  # DST is a dataset the project reads as it is
    record = json.loads((dst / "split.json").read_text())
    for name in info.classes:
        total = sum(record["counts"][split][name] for split in asked)
        for split, fraction in asked.items():
            images = len(list((dst / split / name).glob("*.png")))
            assert images == record["counts"][split][name]
            assert abs(images / total - fraction) <= tolerance, (name, split, images, total)


def test_near_duplicates_chain_into_one_group_and_groups_stay_whole() -> None:
    """a~b and b~c put a, b and c in one group even if a and c are not alike."""
    pairs = Pairs(np.array([0, 1, 5]), np.array([1, 2, 6]), np.ones(3, dtype=np.float32))
    groups = near_duplicate_groups(8, pairs)
    assert sorted(sorted(g.tolist()) for g in groups) == [[0, 1, 2], [3], [4], [5, 6], [7]]
    labels = np.zeros(8, dtype=np.int64)
    targets = np.array([[4], [2], [2]])
    assignment = assign_groups(groups, labels, targets, seed=0)
    assert len(set(assignment[[0, 1, 2]])) == 1 and assignment[5] == assignment[6]
    assert np.bincount(assignment, minlength=3).tolist() == [4, 2, 2]  # met exactly here


def test_similarities_in_blocks_are_those_of_the_whole_matrix() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors[10:20] = vectors[:10] + rng.normal(0, 0.05, (10, 8))  # ten near copies
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dense = vectors @ vectors.T
    expected = {(i, j) for i in range(50) for j in range(i + 1, 50) if dense[i, j] >= 0.9}
    pairs = similar_pairs(vectors, 0.9, block=7)
    assert set(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True)) == expected
    assert {(i, i + 10) for i in range(10)} <= expected
    assert np.allclose(pairs.similarity, dense[pairs.first, pairs.second])


# Splitting at random ------------------------------------------------------------------


def test_a_random_split_is_stratified_and_seeded(digits_root: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        _split(str(digits_root), str(tmp_path / name), "--seed", seed, "--test", "0.2")
        runs[name] = _where(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"] and runs["a"].keys() == runs["c"].keys()
    assert _contents(tmp_path / "a") == _contents(digits_root)
    for name in "ac":  # per class, the nearest whole number of images to each share
        _assert_fractions(tmp_path / name, {"train": 0.65, "val": 0.15, "test": 0.2}, 0.006)


def test_a_folder_of_class_folders_is_split_without_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "raw" / cls).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "raw" / cls / f"{i}.png")
    out = _split(str(tmp_path / "raw"), str(tmp_path / "out"), "--by", "features", "--test", "0")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["split.json", "train", "val"]
    assert "had no split" in out
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert record["counts"] == {
        "train": {"cat": 8, "dog": 8},
        "val": {"cat": 2, "dog": 2},
    }
    assert record["cross_split_pairs"]["source"] is None


# The checkpoint's embedding -----------------------------------------------------------


def test_a_checkpoints_penultimate_layer_can_be_the_embedding(
    planted: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    import torch

    from tasks.models import create_model

    root, _ = planted
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(create_model("tinycnn", 10).state_dict(), checkpoint)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root, tmp_path / "run")))
    dst = tmp_path / "out"
    argv = ["--by", "features", "--checkpoint", str(checkpoint), "--config", str(config)]
    out = _split(str(root), str(dst), *argv)
    assert "tinycnn checkpoint tiny.pt at 16 px" in out
    record = json.loads((dst / "split.json").read_text())
    assert record["embedding"]["kind"] == "checkpoint" and record["embedding"]["image_size"] == 16
    embedding = Embedding(checkpoint, "tinycnn", 16)
    vectors = embedding.vectors(read_pool(root).paths[:50], 10)
    assert vectors.shape == (50, 64 + 1)  # tinycnn's 64 pooled features (+ the blank axis)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    after = _cross_pairs(dst, embedding, DEFAULT_THRESHOLD)
    assert [len(found) for found in after.values()] == [0, 0, 0]
    assert _contents(dst) == _contents(root)


# Bad input ----------------------------------------------------------------------------


def test_the_cli_default_threshold_is_the_modules() -> None:
    from typer.main import get_command

    command = get_command(app).commands["data"].commands["split"]  # type: ignore[attr-defined]
    option = next(p for p in command.params if p.name == "threshold")
    assert option.default == DEFAULT_THRESHOLD


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{src}", "{dst}", "--threshold", "0"], "--threshold is a cosine similarity in (0, 1]"),
        (["{src}", "{dst}", "--test", "1"], "--val + --test below 1, but got --val 0.15 and"),
        (["{src}", "{dst}", "--by", "hash"], "--by must be random or features, not 'hash'"),
        (["{src}", "{dst}", "--checkpoint", "x.pt"], "--checkpoint x.pt needs --config"),
        (["{src}", "{src}/train/0/new"], "is inside the dataset"),
        (["{src}/train/0", "{dst}"], "is not a dataset: it has no train/ split and 0 class"),
        (["{tmp}/none", "{dst}"], "dataset folder {tmp}/none not found"),
        (["{src}", "{tmp}/full"], "{tmp}/full exists and is not empty; choose a new or empty"),
        (["{src}", "{dst}", "--report-only"], "--report-only writes nothing, so it takes no DST"),
        (
            ["{src}", "{dst}", "--val", "0.7", "--test", "0.29"],
            "class '0' has 17 image(s), too few for train/val/test at --val 0.7 --test 0.29",
        ),
        (["{src}"], "give DST, the new folder to write the split to, or --report-only"),
        (
            ["{src}", "{dst}", "--model", "models:/m@a", "--config", "c.yaml"],
            "--model models:/m@a brings its own checkpoint and study config; drop --checkpoint",
        ),
        (["{src}", "{dst}", "--model", "models:/m@a"], "no tracking URI; give --tracking-uri URI"),
        (
            ["{src}", "{dst}", "--by", "features"],  # every image blank: all one group
            "near-duplicate groups are too large to split class '0' (17 of its 17 images in one "
            "group; val/ got none); raise --threshold",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    for split, count in (("train", 14), ("val", 3)):
        for cls in "01":
            (src / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("L", (8, 8), i * 9).save(src / split / cls / f"{i}.png")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    names = {"src": str(src), "dst": str(tmp_path / "out"), "tmp": str(tmp_path)}
    result = runner.invoke(app, ["data", "split", *(a.format(**names) for a in argv)])
    assert result.exit_code == EXIT_BAD_INPUT, result.stdout
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert message.format(**names) in result.stderr
    assert result.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_a_registered_version_brings_its_checkpoint_and_study_config(
    planted: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    """``--model models:/NAME@ALIAS``: the version's run's checkpoint, with the arch and
    image size of the study that trained it; the same split as that checkpoint given."""
    import torch

    from tasks.models import create_model
    from tasks.tracking import Tracker

    root, _ = planted
    torch.manual_seed(1)
    (tmp_path / "model").mkdir()
    checkpoint = tmp_path / "model" / "checkpoint.pt"
    torch.save(create_model("tinycnn", 10).state_dict(), checkpoint)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root, tmp_path / "run")))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    experiment = tracker.experiment_id("split", (tmp_path / "artifacts").as_uri())
    study = tracker.start_run(experiment, "study")
    tracker.log_artifact(study, config)
    trial = tracker.start_run(experiment, "trial", parent_id=study)
    tracker.log_artifact(trial, checkpoint, "model")
    tracker.register("digits-split", trial, "model", alias="champion")
    argv = ["--by", "features", "--seed", "5"]
    registered = ["--model", "models:/digits-split@champion", "--tracking-uri", uri]
    out = _split(str(root), str(tmp_path / "a"), *argv, *registered)
    assert f"checkpoint models:/digits-split@champion (run {trial}) at 16 px" in out
    _split(
        str(root),
        str(tmp_path / "b"),
        *argv,
        "--checkpoint",
        str(checkpoint),
        "--config",
        str(config),
    )
    records = [json.loads((tmp_path / n / "split.json").read_text()) for n in "ab"]
    assert records[0]["embedding"]["checkpoint"] == f"models:/digits-split@champion (run {trial})"
    assert records[0]["near_duplicate_groups"] == records[1]["near_duplicate_groups"]
    assert _where(tmp_path / "a") == _where(tmp_path / "b")
