"""``edgetune data relabel``: a reviewed list of label fixes (the doubts CSV with a
``corrected`` column, or a CVAT export) applied to a copy of the dataset."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgetune.cli import app
from tasks.data import DataError, inspect_dataset
from tasks.relabel import read_fixes, relabel

runner = CliRunner()


def _dataset(digits_root: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(digits_root, src)
    return src


def _doubts_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["rank", "path", "given", "suggested", "flagged", "corrected"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for rank, row in enumerate(rows, start=1):
            writer.writerow({"rank": rank, "corrected": "", "flagged": "yes", **row})
    return path


def _labels(root: Path) -> dict[str, str]:
    """Each image's split/name -> its class folder."""
    info = inspect_dataset(root, verify_images=False)
    return {
        f"{split}/{path.name}": info.classes[label]
        for split, items in info.files.items()
        for path, label in items
    }


def test_the_reviewed_fixes_and_nothing_else_change(digits_root: Path, tmp_path: Path) -> None:
    src = _dataset(digits_root, tmp_path)
    info = inspect_dataset(src, verify_images=False)
    (a, la), (b, _), (c, lc) = info.files["train"][0], info.files["train"][5], info.files["val"][3]
    rel = [p.relative_to(src).as_posix() for p in (a, b, c)]
    other = info.classes[(la + 1) % len(info.classes)]
    fixes_file = _doubts_csv(
        tmp_path / "doubts.csv",
        [
            {"path": rel[0], "given": info.classes[la], "suggested": "9", "corrected": other},
            {"path": rel[1], "given": "x", "suggested": "y", "corrected": "drop"},
            # reviewed and kept: the suggestion is not taken without --accept-suggested
            {"path": rel[2], "given": info.classes[lc], "suggested": info.classes[(lc + 1) % 10]},
        ],
    )
    before = _labels(src)
    done = relabel(src, tmp_path / "dst", read_fixes(fixes_file, info.classes, False))
    after = _labels(tmp_path / "dst")
    assert done.images == sum(info.counts().values()) - 1 == len(after)
    assert done.moved == {rel[0]: other} and done.dropped == [rel[1]]
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {f"train/{a.name}", f"train/{b.name}"}
    assert after[f"train/{a.name}"] == other and f"train/{b.name}" not in after
    assert _labels(src) == before  # the source is not touched
    record = json.loads((tmp_path / "dst" / "relabel.json").read_text())
    assert record["moved"] == {rel[0]: other} and record["dropped"] == [rel[1]]
    # --accept-suggested: the flagged row left empty takes its suggestion
    accepted = read_fixes(fixes_file, info.classes, True)
    assert accepted[rel[2]] == info.classes[(lc + 1) % 10]


def test_a_cvat_export_gives_each_image_its_tag(digits_root: Path, tmp_path: Path) -> None:
    src = _dataset(digits_root, tmp_path)
    info = inspect_dataset(src, verify_images=False)
    (a, _), (b, lb) = info.files["train"][1], info.files["train"][2]
    xml = tmp_path / "annotations.xml"
    xml.write_text(
        "<annotations><version>1.1</version>"
        f'<image id="0" name="{a.relative_to(src).as_posix()}"><tag label="7"/></image>'
        f'<image id="1" name="{b.relative_to(src).as_posix()}"><tag label="{info.classes[lb]}"/>'
        "</image></annotations>"
    )
    result = runner.invoke(
        app, ["data", "relabel", str(src), str(tmp_path / "dst"), "--fixes", str(xml)]
    )
    assert result.exit_code == 0, result.output
    assert "1 moved to another class, 0 dropped" in result.output
    assert _labels(tmp_path / "dst")[f"train/{a.name}"] == "7"


@pytest.mark.parametrize(
    ("rows", "accept", "message"),
    [
        ([{"path": "train/0/nope.png", "corrected": "1"}], False, "are not in"),
        ([{"path": "PATH", "corrected": "cat"}], False, "'cat' is not a class of the dataset"),
    ],
)
def test_bad_fixes_write_nothing(
    digits_root: Path, tmp_path: Path, rows: list[dict[str, str]], accept: bool, message: str
) -> None:
    src = _dataset(digits_root, tmp_path)
    info = inspect_dataset(src, verify_images=False)
    first = info.files["train"][0][0].relative_to(src).as_posix()
    rows = [{**row, "path": row["path"].replace("PATH", first)} for row in rows]
    fixes = _doubts_csv(tmp_path / "doubts.csv", rows)
    with pytest.raises(DataError, match=message):
        relabel(src, tmp_path / "dst", read_fixes(fixes, info.classes, accept))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doubts.csv", "src"]


def test_a_csv_without_corrections_says_how_to_give_them(tmp_path: Path) -> None:
    plain = tmp_path / "doubts.csv"
    plain.write_text("rank,path,given,suggested,flagged\n1,train/0/a.png,0,1,yes\n")
    with pytest.raises(DataError, match=r"add one with the class .* or pass --accept-suggested"):
        read_fixes(plain, ("0", "1"), False)
    assert read_fixes(plain, ("0", "1"), True) == {"train/0/a.png": "1"}
