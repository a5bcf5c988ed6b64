"""The command line: bad input is refused in one line before anything is created."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgetune.cli import app

from conftest import tiny_config

runner = CliRunner()


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("tune", "report", "validate", "data"):
        assert command in result.output


def _broken_dataset(digits_root: Path, tmp_path: Path, how: str) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(digits_root, root)
    if how == "empty class":
        for image in (root / "train" / "2").iterdir():
            image.unlink()
    elif how == "corrupt image":
        next((root / "val" / "4").iterdir()).write_bytes(b"not an image")
    elif how == "classes differ":
        shutil.rmtree(root / "val" / "9")
    return root


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing dataset", r"error: dataset folder .*nowhere not found"),
        ("empty class", r"error: class folder .*train/2 has no images"),
        ("corrupt image", r"error: corrupt image .*val/4/"),
        (
            "classes differ",
            r"error: class folders differ between train/ and val/.*only in train: \['9'\]",
        ),
        ("typo", r"error: .*train\.epoch: unknown key \(did you mean 'epochs'\?\)"),
        (
            "inverted range",
            r"error: .*study\.search_space\.lr: low <= high must hold, but got low=0\.5, high=0\.01",
        ),
        ("hailo", r"error: compiler 'hailo' needs the Hailo Dataflow Compiler.*onnxruntime-int8"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_created(
    digits_root: Path, tmp_path: Path, case: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    root = digits_root
    overrides: list[str] = []
    if case == "missing dataset":
        root = tmp_path / "nowhere"
    elif case in ("empty class", "corrupt image", "classes differ"):
        root = _broken_dataset(digits_root, tmp_path, case)
    elif case == "typo":
        overrides = ["train.epoch=3"]
    elif case == "inverted range":
        overrides = ["study.search_space.lr.low=0.5", "study.search_space.lr.high=0.01"]
    elif case == "hailo":
        overrides = ["compile.backend=hailo"]
    config = _write(tmp_path, tiny_config(root, run_dir))
    result = runner.invoke(app, ["tune", str(config), *overrides])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(message, lines[0]), lines[0]
    assert not run_dir.exists()  # no study, no tracking store, no run folder


def test_validate_reports_the_dataset(digits_root: Path, tmp_path: Path) -> None:
    config = _write(tmp_path, tiny_config(digits_root, tmp_path / "run"))
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "classes ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']" in result.output
    assert not (tmp_path / "run").exists()


def test_data_digits_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    result = runner.invoke(app, ["data", "digits", str(tmp_path / "mine")])
    assert result.exit_code == 2
    assert "not an edgetune digits folder" in result.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_tune_then_report(digits_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "cli"
    config = _write(tmp_path, tiny_config(digits_root, run_dir))
    result = runner.invoke(app, ["tune", str(config), "study.n_trials=2"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "2 complete, 0 pruned, 0 failed" in result.stdout, result.stdout[-2500:]
    assert "models:/cli-classifier@champion (version 1)" in result.stdout.replace("\n", "")

    report = runner.invoke(app, ["report", str(run_dir), "--json"])
    assert report.exit_code == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["counts"]["COMPLETE"] == 2
    assert [row["state"] for row in data["trials"]] == ["COMPLETE", "COMPLETE"]
    best = min(data["trials"], key=lambda row: row["device_augrc"])
    assert data["best"]["trial"] == best["trial"] == data["champion"]["trial"]
    assert set(best["params"]) == {"lr", "momentum"}

    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.stderr
