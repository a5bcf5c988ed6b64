"""Image-folder datasets, preprocessing and the bundles shipped to the compiler and board.

A dataset is ``root/{train,val[,test]}/<class>/<image>``. The validation split is turned
once into an *evaluation bundle* (uint8 images at the model's input size + labels +
normalisation) that both the float model on the training host and the device-side
evaluator read, so the float and device metrics see exactly the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.folders import staged_folder

#: ImageNet statistics in 0..255 pixel scale (the pretrained torchvision models expect them).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]] = field(repr=False)

    def counts(self) -> dict[str, int]:
        return {split: len(items) for split, items in self.files.items()}

    def items(self, splits: Iterable[str]) -> list[tuple[Path, int]]:
        """The images of ``splits`` (e.g. ``data.train_splits``), in order, with labels."""
        return [item for split in splits for item in self.files[split]]


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


#: What Pillow raises on a file it cannot open or decode.
_UNREADABLE = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


def unreadable_image(path: Path, exc: Exception) -> DataError:
    """The one line for an image that cannot be read: too large to open (its pixels are
    fine, so the fix is to downscale it), else corrupt."""
    if isinstance(exc, Image.DecompressionBombError):
        size = str(exc).partition(", could be decompression bomb")[0]
        return DataError(
            f"image {path} is too large to open: {size} (Pillow's guard against decompression "
            f"bombs); downscale it (every image is resized to data.image_size anyway) or "
            f"remove it"
        )
    return DataError(
        f"corrupt image {path}: {exc.__class__.__name__}: {exc}; remove or replace the file"
    )


def _verify(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.load()
    except _UNREADABLE as exc:
        raise unreadable_image(path, exc) from None


#: Per dataset folder, the stamp of the files this process last decoded whole there: the
#: study's checks and its inputs' preparation look at the same files seconds apart.
_VERIFIED: dict[Path, str] = {}


def _stamp(files: dict[str, list[tuple[Path, int]]]) -> str:
    """A digest of every image's path, label, size and modification time."""
    digest = hashlib.sha256()
    for items in files.values():
        for path, label in items:
            stat = path.stat()
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _verify_all(base: Path, files: dict[str, list[tuple[Path, int]]]) -> None:
    """Decode every image whole, unless this process did so since none of them changed."""
    stamp = _stamp(files)
    if _VERIFIED.get(base) == stamp:
        return
    for items in files.values():
        for path, _ in items:
            _verify(path)
    _VERIFIED[base] = stamp


def inspect_dataset(root: str | Path, *, verify_images: bool = True) -> DatasetInfo:
    """List and check a dataset before anything is created; raise DataError on the first fault."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(
            f"dataset folder {base} not found; point data.root at a folder with train/ and val/ "
            f"(for the example: edgetune data digits {base})"
        )
    present = [s for s in SPLITS if (base / s).is_dir()]
    missing = [s for s in ("train", "val") if s not in present]
    if missing:
        raise DataError(
            f"dataset {base} has no {'/ '.join(missing)}/ folder; expected train/, val/ and "
            f"optionally test/, each with one folder per class"
        )
    classes_by_split = {s: [d.name for d in _class_dirs(base / s)] for s in present}
    reference = classes_by_split["train"]
    if len(reference) < 2:
        raise DataError(
            f"{base / 'train'} has {len(reference)} class folder(s); a classifier needs at least 2"
        )
    for split, names in classes_by_split.items():
        if names != reference:
            only_train = sorted(set(reference) - set(names))
            only_here = sorted(set(names) - set(reference))
            raise DataError(
                f"class folders differ between train/ and {split}/ in {base}: "
                f"only in train: {only_train or '-'}, only in {split}: {only_here or '-'}; "
                f"give every split the same class folders"
            )
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in present:
        items: list[tuple[Path, int]] = []
        for index, name in enumerate(reference):
            images = _images(base / split / name)
            if not images:
                raise DataError(
                    f"class folder {base / split / name} has no images "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder "
                    f"from every split"
                )
            items.extend((path, index) for path in images)
        files[split] = items
    if verify_images:
        _verify_all(base.resolve(), files)
    return DatasetInfo(root=base, classes=tuple(reference), files=files)


def split_items(info: DatasetInfo, split: str, root: str | Path) -> list[tuple[Path, int]]:
    """The images of one split, or a DataError naming the missing folder."""
    if split not in info.files:
        raise DataError(
            f"data.eval_split: {split}/ not found in {root}; add a {split}/ split (one folder "
            f"per class, like train/) or evaluate on val"
        )
    return info.files[split]


def load_rgb(path: Path, size: int) -> Image.Image:
    """Three channels at the model's input size: the one resize both float and device use.

    An image that cannot be read is the same ``DataError`` as in ``inspect_dataset``: a
    dataset read without verifying (``evaluate``, training) may still hold one."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except _UNREADABLE as exc:
        raise unreadable_image(path, exc) from None


# Bundles ------------------------------------------------------------------------------------


def make_bundle(
    items: Sequence[tuple[Path, int]],
    classes: Sequence[str],
    image_size: int,
    out_path: Path,
) -> Path:
    """Write an evaluation/calibration bundle (see module docstring); atomic."""
    images = np.stack([np.asarray(load_rgb(path, image_size), dtype=np.uint8) for path, _ in items])
    labels = np.asarray([label for _, label in items], dtype=np.int64)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_path.parent, suffix=".npz", delete=False) as handle:
        np.savez(
            handle,
            images=images,
            labels=labels,
            mean=np.asarray(IMAGENET_MEAN, dtype=np.float32),
            std=np.asarray(IMAGENET_STD, dtype=np.float32),
            classes=np.asarray(list(classes)),
        )
    Path(handle.name).replace(out_path)
    return out_path


def calibration_items(
    items: Sequence[tuple[Path, int]], samples: int, seed: int
) -> list[tuple[Path, int]]:
    """A seeded, class-balanced-by-chance sample of the train split for INT8 calibration."""
    rng = np.random.default_rng(seed)
    count = min(samples, len(items))
    chosen = rng.choice(len(items), size=count, replace=False)
    return [items[i] for i in sorted(chosen)]


def load_bundle(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 NHWC → float32 NCHW, the float model's input."""
    scaled = (images.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32)
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


# The bundled example ------------------------------------------------------------------------

DIGITS_MARKER = ".edgetune-digits.json"


def write_digits(
    out_dir: str | Path,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetInfo:
    """Materialise scikit-learn's digits (shipped with the package) as an image-folder dataset.

    Idempotent: a folder written before with the same settings is left as it is; any other
    non-empty folder is refused rather than mixed into.
    """
    # scikit-learn is needed only to write the bundled digits example.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = Path(out_dir)
    settings = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    marker = target / DIGITS_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return inspect_dataset(target)
    if target.exists() and any(target.iterdir()):
        raise DataError(
            f"{target} exists and is not an edgetune digits folder with these settings; "
            f"choose an empty or new folder"
        )
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction and test_fraction must be in (0, 1) and sum below 1, but got "
            f"{val_fraction} and {test_fraction}"
        )
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    index = np.arange(len(pixels))
    rest, test = (
        train_test_split(index, test_size=test_fraction, stratify=digits.target, random_state=seed)
        if test_fraction
        else (index, index[:0])
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        stratify=digits.target[rest],
        random_state=seed,
    )
    with staged_folder(target) as staging:  # an empty target is replaced
        for split, members in (("train", train), ("val", val), ("test", test)):
            for i in members:
                folder = staging / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
        (staging / DIGITS_MARKER).write_text(json.dumps(settings))
    return inspect_dataset(target)
