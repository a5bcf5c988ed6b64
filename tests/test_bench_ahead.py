"""The sent-ahead benchmark: its figures, its argument checks, and one small run against a
real MLflow server and a real SSH server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ahead import figures, main


def test_the_ratios_are_taken_pair_by_pair_and_the_figures_are_medians() -> None:
    found = figures(
        {
            "ahead": [
                {"ahead_s": 0.5, "before_board_s": 1.0},
                {"ahead_s": 0.7, "before_board_s": 2.0},
                {"ahead_s": 0.9, "before_board_s": 4.0},
            ],
            "plain": [{"before_board_s": 3.0}, {"before_board_s": 2.0}, {"before_board_s": 2.0}],
        }
    )
    # pair by pair: 3, 1, 0.5
    assert found == {
        "plain_s": 2.0,
        "ahead_s": 2.0,
        "ratio": 1.0,
        "ratio_min": 0.5,
        "ratio_max": 3.0,
        "prestage_s": 0.7,
    }


def test_bad_counts_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--evaluations", "0"])
    assert exit_.value.code == 2
    assert "--evaluations must be >= 1 and --model-mb > 0" in capsys.readouterr().err


def test_a_small_run_on_a_real_mlflow_server_and_board(tmp_path: Path) -> None:
    out = tmp_path / "ahead.json"
    assert main(["--images", "20", "--size", "8", "--model-mb", "0.1", "--evaluations", "2",
                 "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    ahead, plain = report["records"]["ahead"], report["records"]["plain"]
    assert len(ahead) == len(plain) == 2
    assert all(r["ahead_s"] > 0 and r["before_board_s"] > 0 for r in ahead)
    assert all(r["before_board_s"] > 0 for r in plain)
    assert report["figures"]["ratio_min"] <= report["figures"]["ratio"]
