"""The start-up benchmark's report: medians per side and ratios taken pair by pair."""

from __future__ import annotations

from pathlib import Path

from bench.startup import FIGURES, _config, plain_report, report


def _row(scale: float) -> dict[str, float]:
    return {key: scale * (index + 1) for index, key in enumerate(FIGURES)}


def test_the_report_gives_medians_and_pairwise_ratios() -> None:
    a = [_row(1.0), _row(2.0), _row(4.0)]
    b = [_row(2.0), _row(2.0), _row(2.0)]  # ratios 0.5, 1.0, 2.0: median 1.0
    lines = report({"new": a, "old": b}).splitlines()
    assert lines[0].split() == ["figure", "new", "old", "ratio", "(median)"]
    first = lines[1].split()
    assert first[:3] == ["first", "ask", "2.00"]  # median of 1, 2, 4
    assert first[3] == "(1.00–4.00)" and first[4] == "2.00" and first[-1] == "1.000"
    wall = lines[4].split()
    assert wall[0] == "wall" and wall[1] == "8.00" and wall[-1] == "1.000"


def test_one_side_has_no_ratio_column() -> None:
    lines = report({"only": [_row(1.0)]}).splitlines()
    assert "ratio" not in lines[0] and lines[2].split()[:2] == ["trial", "2.00"]


def test_the_plain_script_ratio_is_taken_round_by_round() -> None:
    runs = {"new": [_row(1.0), _row(3.0)], "old": [_row(2.0), _row(2.0)]}  # walls 4, 12; 8, 8
    lines = plain_report(runs, [4.0, 8.0]).splitlines()
    assert lines[0].split()[:3] == ["plain", "script", "6.00"]
    assert lines[1].startswith("new wall / plain script: 1.250 ")  # 4/4 and 12/8: median 1.25
    assert lines[2].startswith("old wall / plain script: 1.500 ")  # 8/4 and 8/8


def test_one_epoch_starts_swa_at_once() -> None:
    """SWA must start before the last epoch: with one epoch, at epoch 0."""
    train = _config(Path("digits"), epochs=1)["train"]
    assert isinstance(train, dict) and (train["epochs"], train["swa_start"]) == (1, 0)
