"""A corrected copy of a dataset: the label fixes a person accepted, applied.

After a review of the label doubts (``edgetune data doubts``), the fixes come back as

- the doubts CSV with a ``corrected`` column filled in where the reviewer decided: a class
  name (the image moves to that class's folder), ``drop`` (the image is left out), or
  empty (the image stays as it is); with ``accept_suggested`` a flagged row left empty
  takes its ``suggested`` class;
- or a CVAT export ("CVAT for images 1.1" XML) of the review task: each image's tag is
  its label after the review.

``relabel`` writes a new dataset folder (the source is never changed): every image of
every split, in the same split, under its corrected class; ``relabel.json`` lists each
change. Files are hard links where the filesystem allows, else copies. The folder is
written whole or not at all.
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from tasks.data import SPLITS, DataError, DatasetInfo, inspect_dataset
from tasks.folders import link_or_copy, staged_folder

DROP = "drop"
RECORD = "relabel.json"


@dataclass(frozen=True)
class Relabelled:
    """What ``relabel`` wrote: the folder, images kept, moved and dropped."""

    out: Path
    images: int
    moved: dict[str, str]  # path -> new class
    dropped: list[str]


def read_fixes(path: Path, classes: tuple[str, ...], accept_suggested: bool) -> dict[str, str]:
    """``{path relative to the dataset: new class or "drop"}`` from a reviewed doubts CSV
    or a CVAT XML export; an unknown class is a one-line error naming the row."""
    if not path.is_file():
        raise DataError(f"fixes file {path} does not exist; give the reviewed doubts.csv")
    fixes = _from_cvat(path) if path.suffix.lower() == ".xml" else _from_csv(path, accept_suggested)
    for where, label in fixes.items():
        if label != DROP and label not in classes:
            raise DataError(
                f"{path.name}: {where}: {label!r} is not a class of the dataset "
                f"({', '.join(classes)}) nor {DROP!r}; correct the row"
            )
    return fixes


def _from_csv(path: Path, accept_suggested: bool) -> dict[str, str]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0]) if rows else set()
    if "path" not in columns:
        raise DataError(f"{path.name} has no 'path' column; give the doubts.csv of data doubts")
    if "corrected" not in columns and not accept_suggested:
        raise DataError(
            f"{path.name} has no 'corrected' column: add one with the class (or {DROP!r}) for "
            f"each image you reviewed, or pass --accept-suggested to take every flagged "
            f"image's suggestion"
        )
    fixes = {}
    for row in rows:
        label = (row.get("corrected") or "").strip()
        if not label and accept_suggested and row.get("flagged") == "yes":
            label = row.get("suggested", "").strip()
        if label:
            fixes[row["path"]] = label
    return fixes


def _from_cvat(path: Path) -> dict[str, str]:
    """Each image's tag in a CVAT for images 1.1 export (its name is the dataset path)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(
            f"{path.name} is not a CVAT XML export ({exc}); export the task as "
            f"'CVAT for images 1.1'"
        ) from None
    fixes = {}
    for image in root.iter("image"):
        tags = [tag.get("label", "") for tag in image.iter("tag")]
        name = image.get("name", "")
        if len(tags) > 1:
            raise DataError(
                f"{path.name}: image {name} has {len(tags)} tags; keep one label per image"
            )
        fixes[name] = tags[0] if tags else DROP
    return fixes


def relabel(src: Path, dst: Path, fixes: dict[str, str]) -> Relabelled:
    """Write the corrected copy of dataset ``src`` to ``dst`` (which must not exist)."""
    if dst.exists():
        raise DataError(f"{dst} exists; give a new folder for the corrected dataset")
    info = inspect_dataset(src, verify_images=False)
    known = {
        path.relative_to(info.root).as_posix(): (split, label)
        for split, items in info.files.items()
        for path, label in items
    }
    unknown = sorted(set(fixes) - set(known))
    if unknown:
        raise DataError(
            f"{len(unknown)} fixed image(s) are not in {src} (first: {unknown[0]}); give the "
            f"dataset the doubts were found on"
        )
    with staged_folder(dst) as work:
        result = _write(info, known, fixes, work)
    return Relabelled(dst, result[0], result[1], result[2])


def _write(
    info: DatasetInfo, known: dict[str, tuple[str, int]], fixes: dict[str, str], work: Path
) -> tuple[int, dict[str, str], list[str]]:
    classes, root = info.classes, info.root
    moved: dict[str, str] = {}
    dropped: list[str] = []
    kept = 0
    for split in SPLITS:
        for name in classes:
            if (root / split).is_dir():
                (work / split / name).mkdir(parents=True, exist_ok=True)
    # images that keep their class first: a moved image is the one renamed on a clash
    for where, (split, label) in sorted(known.items(), key=lambda kv: kv[0] in fixes):
        target = fixes.get(where, classes[label])
        if target == DROP:
            dropped.append(where)
            continue
        if target != classes[label]:
            moved[where] = target
        source = root / where
        link_or_copy(source, _free(work / split / target / source.name))
        kept += 1
    record = {"source": str(root), "images": kept, "moved": moved, "dropped": dropped}
    (work / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return kept, moved, dropped


def _free(path: Path) -> Path:
    """``path``, or ``name-1.ext``, ``name-2.ext``… when an image of that name is there."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
