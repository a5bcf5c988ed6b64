"""Label doubts: training images whose given label the data itself argues against.

A wrong label moves the AUGRC a whole study optimises, so before a study the training
split(s) can be checked by confident learning (``cleanlab``) on out-of-fold probabilities:
the images are cut into stratified folds and each fold is predicted by a model trained as
a trial trains (``train_fmfp`` on ``train_batches``, the model built and seeded as a
trial's, the config's training settings) on the other folds only, so no image is scored
by a model that saw its label. ``cleanlab.filter.find_label_issues`` flags the images
whose given label disagrees with the probabilities more than the noise it estimates
between the classes allows; ``cleanlab.rank.get_label_quality_scores`` scores every image
(self-confidence: the out-of-fold probability of its given label), lowest first.

``write_doubts`` writes one folder, whole or not at all (built beside it, then renamed):
``doubts.csv`` (every image, ranked), ``doubts.png`` (the first ``top`` of the ranking),
``annotations.xml`` and ``images/`` (the flagged images as a "CVAT for images 1.1"
dataset to review in CVAT: each image tagged with its given label) and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.config import EdgetuneConfig, TrainConfig, trial_train_config
from tasks.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    DatasetInfo,
    inspect_dataset,
    normalise,
    split_items,
)
from tasks.folders import staged_folder
from tasks.seeding import derive
from tasks.sheets import contact_sheet
from tasks.training.cache import decode_images

#: The files ``write_doubts`` puts in its folder.
CSV_NAME = "doubts.csv"
SHEET_NAME = "doubts.png"
CVAT_NAME = "annotations.xml"
IMAGES_DIR = "images"
SUMMARY_NAME = "summary.json"
CSV_COLUMNS = (
    "rank",
    "path",
    "given",
    "suggested",
    "label_quality",
    "p_given",
    "p_suggested",
    "flagged",
)


@dataclass(frozen=True)
class Doubts:
    """Out-of-fold probabilities of the training images and what cleanlab made of them.

    ``issues``: the flagged images' indices, most doubtful first; ``quality``: every
    image's label quality score (low: doubtful)."""

    root: Path
    classes: tuple[str, ...]
    items: list[tuple[Path, int]]
    probs: np.ndarray
    issues: np.ndarray
    quality: np.ndarray
    folds: int
    settings: TrainConfig
    seed: int
    image_size: int

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([label for _, label in self.items], dtype=np.int64)

    def ranking(self) -> np.ndarray:
        """Every image's index, lowest label quality first (ties in dataset order)."""
        return np.argsort(self.quality, kind="stable")


@dataclass(frozen=True)
class Written:
    """A written doubts folder and what is in it."""

    path: Path
    images: int
    flagged: int
    shown: int


def check_settings(folds: int, epochs: int | None, top: int) -> None:
    """The command's numbers, before anything trains or is written."""
    if folds < 2:
        raise DataError(
            f"--folds must be at least 2, not {folds}: each image is predicted by a model "
            f"trained on the other folds; use --folds 5"
        )
    if epochs is not None and epochs < 1:
        raise DataError(f"--epochs must be at least 1, not {epochs}; leave it out for train.epochs")
    if top < 1:
        raise DataError(
            f"--top must be at least 1, not {top}: the images on the sheet; use --top 40"
        )


def check_output(out: Path, force: bool) -> None:
    """``out`` can become the doubts folder: new, empty, or replaced with ``force``."""
    if not out.parent.is_dir():
        raise DataError(f"folder {out.parent} does not exist; create it or choose another -o")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(
            f"folder {out} exists and is not empty; choose another -o or pass --force to replace it"
        )


def fold_settings(config: EdgetuneConfig, epochs: int | None) -> TrainConfig:
    """The config's training settings for each fold, with ``epochs`` when given: SWA then
    starts at the config's share of the schedule (``swa_start/epochs``), before the last
    epoch, so a shorter run still averages its last epochs as the full one does."""
    if epochs is None or epochs == config.train.epochs:
        return trial_train_config(config, {})
    swa_start = min(config.train.swa_start * epochs // config.train.epochs, epochs - 1)
    return trial_train_config(config, {"epochs": epochs, "swa_start": swa_start})


def _check_classes(
    info: DatasetInfo, labels: np.ndarray, folds: int, splits: Sequence[str]
) -> None:
    counts = np.bincount(labels, minlength=len(info.classes))
    few = [(info.classes[k], int(n)) for k, n in enumerate(counts) if n < folds]
    if few:
        name, count = min(few, key=lambda pair: pair[1])
        fix = f"lower --folds to {count} or add" if count >= 2 else "add at least 2"
        raise DataError(
            f"class {name!r} has {count} image(s) in {'+'.join(splits)} of {info.root}, fewer "
            f"than --folds {folds}: every fold needs each class; {fix} images of that class"
        )


def _tensors(
    pixels: np.ndarray, labels: Sequence[int] | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded uint8 N×3×H×W images as the float model's inputs (the bundle's pixels)."""
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    images = normalise(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)), mean, std)
    return torch.from_numpy(images), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def _split_tensors(
    config: EdgetuneConfig, info: DatasetInfo, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    items = split_items(info, split, config.data.root)
    return _tensors(decode_images(items, config.data.image_size), [y for _, y in items])


def find_doubts(
    config: EdgetuneConfig, folds: int = 5, epochs: int | None = None, seed: int = 0
) -> Doubts:
    """Out-of-fold probabilities of every image of ``data.train_splits`` (``folds``
    stratified folds, seeded by ``seed``), each fold's model trained as a trial on the
    others (``epochs``: ``train.epochs`` unless given), and cleanlab's label issues."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    check_settings(folds, epochs, 1)
    info = inspect_dataset(config.data.root, verify_images=False)
    splits = list(config.data.train_splits)
    items = info.items(splits)
    labels = np.asarray([label for _, label in items], dtype=np.int64)
    _check_classes(info, labels, folds, splits)
    settings = fold_settings(config, epochs)
    val = _split_tensors(config, info, config.data.eval_split)
    select = val  # optimizer: auto chooses on val, never on test (as a trial does)
    if settings.optimizer == "auto" and config.data.eval_split != "val":
        select = _split_tensors(config, info, "val")
    pixels = decode_images(items, config.data.image_size)
    probs = np.zeros((len(items), len(info.classes)), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    for fold, (trained, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        held_x, _ = _tensors(pixels[held], labels[held])
        probs[held] = _fold_probs(
            config,
            settings,
            info.classes,
            [items[i] for i in trained],
            held_x,
            (val, select),
            derive(seed, f"doubts fold {fold}"),
        )
    issues = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    return Doubts(
        root=Path(config.data.root),
        classes=info.classes,
        items=items,
        probs=probs,
        issues=np.asarray(issues, dtype=np.int64),
        quality=np.asarray(quality, dtype=np.float64),
        folds=folds,
        settings=settings,
        seed=seed,
        image_size=config.data.image_size,
    )


def _fold_probs(
    config: EdgetuneConfig,
    settings: TrainConfig,
    classes: Sequence[str],
    trained: list[tuple[Path, int]],
    held_x: torch.Tensor,
    validation: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    seed: int,
) -> np.ndarray:
    """One fold: a model trained as a trial seeded ``seed`` on ``trained`` (validated on
    the config's eval split), then its probabilities of the held-out images."""
    from tasks.models import create_model
    from tasks.training.auto import resolve_auto
    from tasks.training.fmfp import loader_batch, predict_proba, resolve_device, train_fmfp
    from tasks.training.loaders import Balance, train_batches
    from tasks.training.rng import build_model

    (val_x, val_y), (select_x, select_y) = validation
    balance = Balance.of(settings, classes)  # train.sampling, class weights and loss

    def make_model() -> Any:
        return build_model(
            seed,
            lambda: create_model(
                config.model.arch,
                len(classes),
                weights=config.model.weights,
                finetune=config.model.finetune,
            ),
        )

    settings = resolve_auto(
        settings,
        make_model=make_model,
        train_items=trained,
        val_images=select_x,
        val_labels=select_y,
        data=config.data,
        num_classes=len(classes),
        seed=seed,
        balance=balance,
    ).settings
    assert isinstance(settings.batch_size, int)
    device = resolve_device(settings.device)
    loader = train_batches(
        config.data, trained, settings.batch_size, seed=seed, device=device, balance=balance
    )
    weights = balance.loss_weights([label for _, label in trained])  # None: unweighted
    result = train_fmfp(make_model(), loader, val_x, val_y, settings, loss_weights=weights)
    return predict_proba(result.model.to(device), held_x, device, loader_batch(loader, settings))


# Writing ------------------------------------------------------------------------------------


def doubt_rows(doubts: Doubts) -> list[dict[str, Any]]:
    """The CSV's rows: every image, lowest label quality first."""
    flagged = set(doubts.issues.tolist())
    rows = []
    for rank, index in enumerate(doubts.ranking().tolist(), start=1):
        path, given = doubts.items[index]
        suggested = int(np.argmax(doubts.probs[index]))
        rows.append(
            {
                "rank": rank,
                "path": path.relative_to(doubts.root).as_posix(),
                "given": doubts.classes[given],
                "suggested": doubts.classes[suggested],
                "label_quality": f"{doubts.quality[index]:.6f}",
                "p_given": f"{doubts.probs[index, given]:.6f}",
                "p_suggested": f"{doubts.probs[index, suggested]:.6f}",
                "flagged": "yes" if index in flagged else "no",
            }
        )
    return rows


def _write_csv(rows: list[dict[str, Any]], out: Path) -> None:
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _write_sheet(doubts: Doubts, rows: list[dict[str, Any]], top: int, out: Path) -> int:
    """The first ``top`` images of the ranking as the model sees them, captioned
    ``given>suggested score``; the number of tiles."""
    shown = rows[:top]
    chosen = [doubts.items[i] for i in doubts.ranking()[: len(shown)].tolist()]
    pixels = decode_images(chosen, doubts.image_size).transpose(0, 2, 3, 1)
    captions = [
        f"{row['given']}>{row['suggested']} {float(row['label_quality']):.2f}" for row in shown
    ]
    sheet, _, _ = contact_sheet(np.ascontiguousarray(pixels), captions)
    sheet.save(out, format="PNG")
    return len(shown)


def _write_cvat(doubts: Doubts, folder: Path) -> None:
    """The flagged images, most doubtful first, as a "CVAT for images 1.1" dataset:
    ``annotations.xml`` (every class as a label, each image tagged with its given label)
    beside ``images/`` (the files, at their paths under ``data.root``)."""
    from PIL import Image

    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = "label doubts"
    ET.SubElement(task, "size").text = str(len(doubts.issues))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for name in doubts.classes:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "attributes")
    for number, index in enumerate(doubts.issues.tolist()):
        path, given = doubts.items[index]
        name = path.relative_to(doubts.root).as_posix()
        copy = folder / IMAGES_DIR / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
        with Image.open(path) as image:
            width, height = image.size
        image_node = ET.SubElement(
            root,
            "image",
            {"id": str(number), "name": name, "width": str(width), "height": str(height)},
        )
        ET.SubElement(image_node, "tag", {"label": doubts.classes[given], "source": "manual"})
    (folder / IMAGES_DIR).mkdir(exist_ok=True)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    tree.write(folder / CVAT_NAME, encoding="utf-8", xml_declaration=True)


def _summary(doubts: Doubts, shown: int) -> dict[str, Any]:
    return {
        "images": len(doubts.items),
        "classes": list(doubts.classes),
        "folds": doubts.folds,
        "epochs": doubts.settings.epochs,
        "swa_start": doubts.settings.swa_start,
        "seed": doubts.seed,
        "flagged": len(doubts.issues),
        "on_sheet": shown,
        "root": str(doubts.root),
    }


def write_doubts(doubts: Doubts, out: Path, top: int = 40, *, force: bool = False) -> Written:
    """Write the doubts folder ``out`` (see the module docstring) whole or not at all:
    built in a hidden folder beside it, then renamed; with ``force`` an existing folder is
    replaced only once the new one is complete."""
    check_settings(doubts.folds, None, top)
    check_output(out, force)
    with staged_folder(out) as staging:  # with force, an earlier folder is replaced
        rows = doubt_rows(doubts)
        _write_csv(rows, staging / CSV_NAME)
        shown = _write_sheet(doubts, rows, top, staging / SHEET_NAME)
        _write_cvat(doubts, staging)
        summary = json.dumps(_summary(doubts, shown), indent=2) + "\n"
        (staging / SUMMARY_NAME).write_text(summary)
    return Written(out, len(doubts.items), len(doubts.issues), shown)
