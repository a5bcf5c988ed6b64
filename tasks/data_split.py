"""Splitting an image-folder dataset so that near-duplicate images never straddle splits.

A random split puts a photo in train and its burst-mode twin in val, and val then
measures memory rather than generalisation. Here every image gets an embedding (its
pixels at 16×16, or a local checkpoint's penultimate activations), images whose cosine
similarity reaches a threshold are joined into groups (connected components of that
graph), and whole groups go to one split each, greedily, so that each class's split
fractions are met as closely as the groups allow. ``--by random`` is the same assignment
with every image a group of its own: a seeded split stratified by class.

The same similarities give the report: how many near-duplicate pairs the dataset's
current split has across train/val/test, and how many the new one has (none, after a
split by features).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data import (
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    DataError,
    inspect_dataset,
    load_rgb,
    normalise,
)
from tasks.folders import link_or_copy, staged_folder

METHODS = ("random", "features")
#: Cosine similarity from which two images count as near-duplicates. On the digits (8×8
#: pixels, so distinct images of one writer look much alike), a copy with pixel noise of
#: σ 8/255 and a contrast change scores at least 0.98 against its original, while only
#: 68 of the 1797 distinct images have a neighbour at 0.97 or above (356 at 0.95).
DEFAULT_THRESHOLD = 0.97
#: Side of the grey thumbnail the pixel embedding is made of.
PIXEL_SIDE = 16
#: Rows and columns of one tile of the similarity matrix: never N×N at once.
BLOCK = 1024
#: Images through the model at a time for a checkpoint's embedding.
BATCH = 256
#: Float slack at the threshold, so that exact copies count at ``--threshold 1``.
SLACK = 1e-6
#: Pairs listed per pair of splits in split.json (the counts are complete).
LISTED_PAIRS = 100


@dataclass(frozen=True)
class Pool:
    """Every image of a dataset, all splits together, with where each came from."""

    root: Path
    classes: tuple[str, ...]
    paths: list[Path]
    labels: np.ndarray
    #: each image's split in ``root``; "" for a folder of class folders (no split yet)
    splits: list[str]
    #: each image's path below its class folder (kept in the written split)
    names: list[Path]

    @property
    def is_split(self) -> bool:
        return bool(self.splits) and all(self.splits)


@dataclass(frozen=True)
class Pairs:
    """Near-duplicate pairs (``first < second``, indices into a pool) and their similarity."""

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray


@dataclass(frozen=True)
class Embedding:
    """How images become vectors: their pixels, or a local checkpoint's penultimate layer.

    Both are centred on the pool's mean vector before being L2-normalised: the digits'
    thumbnails share a dark border, and a network's post-ReLU features share a large
    positive part, which would otherwise make every pair look alike."""

    checkpoint: Path | None = None
    arch: str | None = None
    image_size: int | None = None
    #: where the checkpoint came from, when not a file of the user's (a registered version)
    source: str | None = None

    def describe(self) -> dict[str, Any]:
        """What split.json records of the embedding."""
        if self.checkpoint is None:
            return {"kind": "pixels", "size": PIXEL_SIDE, "colour": "grey", "centred": True}
        return {
            "kind": "checkpoint",
            "checkpoint": self.source or str(self.checkpoint),
            "arch": self.arch,
            "image_size": self.image_size,
            "layer": "input of the classifier head",
            "centred": True,
        }

    def label(self) -> str:
        """The embedding in a few words, for the printed table."""
        if self.checkpoint is None:
            return f"pixels {PIXEL_SIDE}x{PIXEL_SIDE} grey"
        name = self.source or self.checkpoint.name
        return f"{self.arch} checkpoint {name} at {self.image_size} px"

    def vectors(self, paths: Sequence[Path], num_classes: int) -> np.ndarray:
        """One unit vector per image, float32 N×D."""
        if self.checkpoint is None:
            raw = pixel_vectors(paths)
        else:
            assert self.arch is not None and self.image_size is not None
            raw = model_vectors(paths, self.checkpoint, self.arch, self.image_size, num_classes)
        centred = raw - raw.mean(axis=0, keepdims=True)
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        # An image that is the mean (every blank one, when all are blank) has no direction:
        # it gets one of its own, an extra axis, so that such images match each other only.
        flat = norms < 1e-6
        unit = np.hstack([centred / np.maximum(norms, 1e-6), flat.astype(centred.dtype)])
        return unit.astype(np.float32)


@dataclass(frozen=True)
class Plan:
    """A split worked out and not yet written: each image's new split and why."""

    pool: Pool
    method: str
    fractions: dict[str, float]
    seed: int
    embedding: Embedding
    threshold: float
    #: index into ``SPLITS`` per image of the pool
    assignment: np.ndarray
    pairs: Pairs
    #: near-duplicate groups of two or more images (indices into the pool)
    groups: list[np.ndarray] = field(repr=False)


# Checking the input -------------------------------------------------------------------


def check_settings(method: str, val: float, test: float, threshold: float) -> None:
    """The flags, checked before any image is read."""
    if method not in METHODS:
        raise DataError(f"--by must be {' or '.join(METHODS)}, not {method!r}")
    if not (0 < val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(
            f"--val must be in (0, 1) (every dataset needs a val/ split), --test in [0, 1), "
            f"and --val + --test below 1, but got --val {val} and --test {test}; "
            f"e.g. --val 0.15 --test 0.15"
        )
    if not 0 < threshold <= 1:
        raise DataError(
            f"--threshold is a cosine similarity in (0, 1], not {threshold}; "
            f"the default, {DEFAULT_THRESHOLD}, catches lightly edited copies"
        )


def check_paths(
    dst: Path | None,
    report_only: bool,
    checkpoint: Path | None,
    config: Path | None,
    model: str | None = None,
) -> None:
    """The flags that go together: DST or --report-only, --checkpoint with --config, and
    --model (a registered version: its own checkpoint and study config) alone."""
    if report_only and dst is not None:
        raise DataError(f"--report-only writes nothing, so it takes no DST; drop {dst}")
    if not report_only and dst is None:
        raise DataError(
            "give DST, the new folder to write the split to, or --report-only to only check SRC"
        )
    if model is not None and (checkpoint is not None or config is not None):
        raise DataError(
            f"--model {model} brings its own checkpoint and study config; drop --checkpoint "
            f"and --config, or drop --model"
        )
    if checkpoint is not None and config is None:
        raise DataError(
            f"--checkpoint {checkpoint} needs --config, the study config it was trained with "
            f"(its model.arch and data.image_size); add --config CONFIG"
        )
    if config is not None and checkpoint is None:
        raise DataError(
            f"--config {config} is read only for --checkpoint; add --checkpoint FILE "
            f"(a state dict of its model.arch) or drop --config"
        )


def check_target(dst: Path, src: Path) -> None:
    """DST is written whole or not at all, so it must be new or empty, and outside SRC."""
    if dst.resolve().is_relative_to(src.resolve()):
        raise DataError(f"{dst} is inside the dataset {src}; choose a folder outside it")
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst} is a file; choose a new or empty folder for the split")
    if dst.is_dir() and any(dst.iterdir()):
        raise DataError(
            f"{dst} exists and is not empty; choose a new or empty folder (the split is "
            f"written whole, never into an existing dataset)"
        )


def read_pool(src: Path) -> Pool:
    """The images of SRC: a split dataset (train/, val/, test/: pooled) or a folder of
    class folders. Every image is opened once, so a corrupt one fails here."""
    if not src.is_dir():
        raise DataError(
            f"dataset folder {src} not found; give a folder with train/ and val/ (each with "
            f"class folders) or a folder of class folders"
        )
    if (src / "train").is_dir():
        info = inspect_dataset(src)
        triples = [
            (split, path, label) for split, items in info.files.items() for path, label in items
        ]
        classes = info.classes
    else:
        classes, triples = _class_folders(src)
    return Pool(
        root=src,
        classes=classes,
        paths=[path for _, path, _ in triples],
        labels=np.asarray([label for _, _, label in triples], dtype=np.int64),
        splits=[split for split, _, _ in triples],
        names=[path.relative_to(src / split / classes[label]) for split, path, label in triples],
    )


def _class_folders(src: Path) -> tuple[tuple[str, ...], list[tuple[str, Path, int]]]:
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    listed = [
        (folder.name, sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES))
        for folder in folders
    ]
    empty = [name for name, images in listed if not images]
    if len(listed) < 2 or empty:
        raise DataError(
            f"{src} is not a dataset: it has no train/ split and "
            f"{len(listed) - len(empty)} class folder(s) with images"
            f"{f' (no images in {empty[0]}/)' if empty else ''}; give a folder with train/ "
            f"and val/, or a folder of at least 2 class folders of images"
        )
    triples = [("", path, label) for label, (_, images) in enumerate(listed) for path in images]
    for _, path, _ in triples:
        load_rgb(path, 1)  # the same one-line error as inspect_dataset for a corrupt image
    return tuple(name for name, _ in listed), triples


def split_targets(pool: Pool, val: float, test: float) -> np.ndarray:
    """Images per split (rows: ``SPLITS``) and class (columns): at least one in every
    split asked for, the rest to train."""
    per_class = np.bincount(pool.labels, minlength=len(pool.classes))
    targets = np.zeros((len(SPLITS), len(pool.classes)), dtype=np.int64)
    for label, count in enumerate(per_class):
        n_val = max(1, round(count * val))
        n_test = max(1, round(count * test)) if test > 0 else 0
        if count - n_val - n_test < 1:
            raise DataError(
                f"class {pool.classes[label]!r} has {count} image(s), too few for "
                f"{'train/val/test' if test else 'train/val'} at --val {val} --test {test} "
                f"(each split needs one); add images to it"
                f"{' or drop --test (--test 0)' if test else ''}"
            )
        targets[:, label] = (count - n_val - n_test, n_val, n_test)
    return targets


# Embeddings and similarities ----------------------------------------------------------


def pixel_vectors(paths: Sequence[Path]) -> np.ndarray:
    """Each image as a grey 16×16 thumbnail, standardised (own mean and spread removed):
    exact copies, re-encodings, and copies with noise, brightness or contrast changes
    land close together; anything moved or cropped by more than a pixel or so does not."""
    out = np.empty((len(paths), PIXEL_SIDE * PIXEL_SIDE), dtype=np.float32)
    for row, path in enumerate(paths):
        grey = np.asarray(load_rgb(path, PIXEL_SIDE).convert("L"), dtype=np.float32).ravel()
        grey -= grey.mean()
        out[row] = grey / max(float(grey.std()), 1e-6)
    return out


def model_vectors(
    paths: Sequence[Path], checkpoint: Path, arch: str, image_size: int, num_classes: int
) -> np.ndarray:
    """The activations a trained model feeds its classifier head (the penultimate layer),
    for images preprocessed as training does. Nothing is downloaded: the weights are the
    local ``checkpoint``, a state dict of ``arch`` (a head of another size is ignored)."""
    # torch loads only for a checkpoint's embedding.
    import torch

    from tasks.models import ARCHITECTURES, create_model

    model = create_model(arch, num_classes, weights=checkpoint).eval()
    caught: list[torch.Tensor] = []
    head = model.get_submodule(ARCHITECTURES[arch].head)
    hook = head.register_forward_hook(lambda _m, inputs, _o: caught.append(inputs[0]))
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    try:
        with torch.no_grad():
            for start in range(0, len(paths), BATCH):
                batch = [load_rgb(p, image_size) for p in paths[start : start + BATCH]]
                pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in batch])
                model(torch.from_numpy(normalise(pixels, mean, std)))
    finally:
        hook.remove()
    return torch.cat([torch.flatten(t, 1) for t in caught]).numpy().astype(np.float32)


def similar_pairs(vectors: np.ndarray, threshold: float, block: int = BLOCK) -> Pairs:
    """Every pair of unit vectors whose cosine similarity is at least ``threshold``,
    tile by tile of ``block``×``block`` (the upper triangle only)."""
    firsts, seconds, values = [], [], []
    count = len(vectors)
    for row in range(0, count, block):
        for col in range(row, count, block):
            tile = vectors[row : row + block] @ vectors[col : col + block].T
            i, j = np.nonzero(tile >= threshold - SLACK)
            keep = j + col > i + row
            firsts.append(i[keep] + row)
            seconds.append(j[keep] + col)
            values.append(tile[i[keep], j[keep]])
    if not firsts:
        empty = np.zeros(0, dtype=np.int64)
        return Pairs(empty, empty, np.zeros(0, dtype=np.float32))
    return Pairs(np.concatenate(firsts), np.concatenate(seconds), np.concatenate(values))


def near_duplicate_groups(count: int, pairs: Pairs) -> list[np.ndarray]:
    """Connected components of the near-duplicate graph: every image in exactly one."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix(
        (np.ones(len(pairs.first), dtype=np.int8), (pairs.first, pairs.second)),
        shape=(count, count),
    )
    _, component = connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")
    return np.split(order, np.cumsum(np.bincount(component))[:-1])


# The split ----------------------------------------------------------------------------


def assign_groups(
    groups: Sequence[np.ndarray], labels: np.ndarray, targets: np.ndarray, seed: int
) -> np.ndarray:
    """Each group to the split where it brings the per-class counts closest to
    ``targets`` (least added squared error); the largest groups first, equal sizes in a
    seeded order. Singletons fill each split's deficit, so with no groups of two or more
    the counts are the targets exactly. Returns an index into ``SPLITS`` per image."""
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(groups)), key=lambda g: -len(groups[g]))
    filled = np.zeros(targets.shape, dtype=np.float64)
    closed = targets.sum(axis=1) == 0  # a split not asked for (test at --test 0)
    assignment = np.full(len(labels), -1, dtype=np.int64)
    for g in order:
        classes, counts = np.unique(labels[groups[g]], return_counts=True)
        before = filled[:, classes] - targets[:, classes]
        cost = ((before + counts) ** 2 - before**2).sum(axis=1)
        cost[closed] = np.inf
        split = int(np.argmin(cost))
        filled[split, classes] += counts
        assignment[groups[g]] = split
    return assignment


def _check_every_split_has_every_class(plan: Plan, targets: np.ndarray) -> None:
    got = np.zeros(targets.shape, dtype=np.int64)
    np.add.at(got, (plan.assignment, plan.pool.labels), 1)
    for split, label in zip(*np.nonzero((got == 0) & (targets > 0)), strict=True):
        largest = max((int(np.sum(plan.pool.labels[g] == label)) for g in plan.groups), default=1)
        raise DataError(
            f"near-duplicate groups are too large to split class "
            f"{plan.pool.classes[label]!r} ({largest} of its {int(targets[:, label].sum())} "
            f"images in one group; {SPLITS[split]}/ got none); raise --threshold so that "
            f"fewer images count as near-duplicates, or use --by random"
        )


def plan_split(
    pool: Pool,
    method: str,
    fractions: tuple[float, float],
    seed: int,
    embedding: Embedding,
    threshold: float,
) -> Plan:
    """Work out the split (nothing is written): by groups of near-duplicates, or at
    random; the similarities are computed either way, for the report."""
    val, test = fractions
    targets = split_targets(pool, val, test)
    vectors = embedding.vectors(pool.paths, len(pool.classes))
    pairs = similar_pairs(vectors, threshold)
    groups = near_duplicate_groups(len(pool.paths), pairs)
    units = groups if method == "features" else [np.asarray([i]) for i in range(len(pool.paths))]
    plan = Plan(
        pool=pool,
        method=method,
        fractions={"train": round(1 - val - test, 6), "val": val, "test": test},
        seed=seed,
        embedding=embedding,
        threshold=threshold,
        assignment=assign_groups(units, pool.labels, targets, seed),
        pairs=pairs,
        groups=[g for g in groups if len(g) > 1],
    )
    _check_every_split_has_every_class(plan, targets)
    return plan


# The report ---------------------------------------------------------------------------

SPLIT_PAIRS = tuple(f"{a}-{b}" for a, b in combinations(SPLITS, 2))


def cross_split_pairs(pairs: Pairs, splits: Sequence[str]) -> dict[str, np.ndarray]:
    """For each pair of splits (``train-val``, ``train-test``, ``val-test``), the
    positions in ``pairs`` of near-duplicates with one image in each, most similar first."""
    where = np.asarray(splits)
    a, b = where[pairs.first], where[pairs.second]
    found: dict[str, np.ndarray] = {}
    for kind in SPLIT_PAIRS:
        one, other = kind.split("-")
        hit = np.nonzero(((a == one) & (b == other)) | ((a == other) & (b == one)))[0]
        found[kind] = hit[np.argsort(-pairs.similarity[hit], kind="stable")]
    return found


def pair_record(pool: Pool, pairs: Pairs, splits: Sequence[str]) -> dict[str, Any]:
    """The cross-split pairs as split.json holds them: counts, and the most similar."""
    record: dict[str, Any] = {}
    for kind, hits in cross_split_pairs(pairs, splits).items():
        listed = [
            {
                "images": [
                    _relative(pool, int(pairs.first[h])),
                    _relative(pool, int(pairs.second[h])),
                ],
                "similarity": round(float(pairs.similarity[h]), 4),
            }
            for h in hits[:LISTED_PAIRS]
        ]
        record[kind] = {"pairs": len(hits), "listed": listed}
    return record


def _relative(pool: Pool, index: int) -> str:
    return pool.paths[index].relative_to(pool.root).as_posix()


def report_lines(
    pool: Pool, pairs: Pairs, threshold: float, embedding: Embedding, after: Plan | None = None
) -> list[str]:
    """The short table printed: near-duplicate pairs across splits in SRC's current split
    (and in the new one), then the most similar few."""
    source = cross_split_pairs(pairs, pool.splits) if pool.is_split else None
    result = cross_split_pairs(pairs, new_splits(after)) if after is not None else None
    lines = [f"near-duplicate pairs across splits (cosine >= {threshold:g}, {embedding.label()}):"]
    header = "  splits     " + ("  source" if source else "") + ("  result" if result else "")
    lines.append(header)
    for kind in SPLIT_PAIRS:
        cells = [f"{len(found[kind]):>8}" for found in (source, result) if found is not None]
        lines.append(f"  {kind:<11}{''.join(cells)}")
    if source is None:
        lines.append(f"  ({pool.root} had no split: nothing to compare before)")
    shown = sorted(
        (h for hits in (source or {}).values() for h in hits[:5]),
        key=lambda h: -pairs.similarity[h],
    )[:5]
    for h in shown:
        first, second = _relative(pool, int(pairs.first[h])), _relative(pool, int(pairs.second[h]))
        lines.append(f"  {pairs.similarity[h]:.4f}  {first} ~ {second}")
    return lines


def new_splits(plan: Plan) -> list[str]:
    """Each image's split in the plan, by name."""
    return [SPLITS[s] for s in plan.assignment]


def source_report(pool: Pool, embedding: Embedding, threshold: float) -> list[str]:
    """``--report-only``: the near-duplicate pairs across SRC's current splits."""
    if not pool.is_split:
        raise DataError(
            f"--report-only checks a dataset's current split, but {pool.root} has no train/ "
            f"and val/; split it first: edgetune data split {pool.root} DST --by features"
        )
    pairs = similar_pairs(embedding.vectors(pool.paths, len(pool.classes)), threshold)
    return report_lines(pool, pairs, threshold, embedding)


def summary_line(plan: Plan, dst: Path) -> str:
    """The first line printed after writing: what DST now holds."""
    counts = np.bincount(plan.assignment, minlength=len(SPLITS))
    sizes = ", ".join(f"{s} {counts[i]}" for i, s in enumerate(SPLITS) if plan.fractions[s] > 0)
    grouped = sum(len(g) for g in plan.groups)
    kept = "each kept in one split" if plan.method == "features" else "not kept together"
    return (
        f"{dst}: {plan.method} split of {len(plan.assignment)} images, "
        f"{len(plan.pool.classes)} classes, seed {plan.seed}: {sizes}; "
        f"{len(plan.groups)} near-duplicate groups ({grouped} images) {kept}; "
        f"{dst / 'split.json'} says how"
    )


# Writing ------------------------------------------------------------------------------


def split_record(plan: Plan) -> dict[str, Any]:
    """What split.json holds: how the split was made, its counts, and its groups."""
    pool, splits = plan.pool, new_splits(plan)
    counts = {
        split: {
            name: int(np.sum((plan.assignment == s) & (pool.labels == label)))
            for label, name in enumerate(pool.classes)
        }
        for s, split in enumerate(SPLITS)
        if plan.fractions[split] > 0
    }
    return {
        "source": str(pool.root),
        "method": plan.method,
        "fractions": plan.fractions,
        "seed": plan.seed,
        "embedding": plan.embedding.describe(),
        "threshold": plan.threshold,
        "counts": counts,
        "near_duplicate_groups": {
            "kept_whole": plan.method == "features",
            "groups": [
                [{"source": _relative(pool, int(i)), "split": splits[i]} for i in group]
                for group in plan.groups
            ],
        },
        "cross_split_pairs": {
            "source": pair_record(pool, plan.pairs, pool.splits) if pool.is_split else None,
            "result": pair_record(pool, plan.pairs, splits),
        },
    }


def write_split(plan: Plan, dst: Path) -> Path:
    """Write DST whole (``split/class/image``, hard links where the filesystem allows,
    else copies, and split.json): built in a folder beside it and renamed at the end, so
    a failure leaves nothing."""
    check_target(dst, plan.pool.root)
    with staged_folder(dst) as staging:  # an empty DST is replaced
        for index, split in enumerate(new_splits(plan)):
            folder = staging / split / plan.pool.classes[plan.pool.labels[index]]
            target = _free_name(folder / plan.pool.names[index], plan.pool.splits[index])
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(plan.pool.paths[index], target)
        record = json.dumps(split_record(plan), indent=2)
        (staging / "split.json").write_text(record + "\n")
    return dst


def _free_name(target: Path, came_from: str) -> Path:
    """Pooled splits may hold the same file name twice: the later one gets its old
    split as a prefix (``val-0001.png``), then a number if need be."""
    if not target.exists():
        return target
    candidate = target.with_name(f"{came_from}-{target.name}")
    number = 2
    while candidate.exists():
        candidate = target.with_name(f"{came_from}-{number}-{target.name}")
        number += 1
    return candidate
