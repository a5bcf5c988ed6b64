"""The stage-inputs benchmark: its figures per checkout, its ratios round by round, and one
small run against a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.stage_inputs import ROOT, main, summarize


def test_the_figures_are_medians_and_the_ratios_are_taken_round_by_round() -> None:
    figures = summarize(
        {
            "this": [[4.0, 1.0, 3.0], [2.0, 1.0, 1.0], [6.0, 2.0, 2.0]],
            "vs": [[4.0, 2.0, 6.0], [2.0, 4.0, 4.0], [12.0, 2.0, 2.0]],
        }
    )
    # this: first 4, 2, 6; later 2, 1, 2; total 8, 4, 10
    assert figures["this"] == {"first": 4.0, "later": 2.0, "total": 8.0}
    # vs: first 4, 2, 12; later 4, 4, 2; total 12, 10, 16
    assert figures["vs"] == {"first": 4.0, "later": 4.0, "total": 12.0}
    # round by round: first 1, 1, 2; later 2, 4, 1; total 1.5, 2.5, 1.6
    assert figures["vs / this"] == {"first": 1.0, "later": 2.0, "total": 1.6}


def test_one_checkout_has_no_ratio() -> None:
    assert set(summarize({"this": [[1.0, 2.0]]})) == {"this"}


def test_bad_counts_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--evaluations", "1"])
    assert exit_.value.code == 2
    assert "--evaluations must be >= 2" in capsys.readouterr().err


def test_a_small_run_on_a_real_mlflow_server(tmp_path: Path) -> None:
    out = tmp_path / "inputs.json"
    assert main(["--images", "20", "--size", "8", "--model-mb", "0.1", "--evaluations", "3",
                 "--rounds", "1", "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["bundle_mb"] == pytest.approx(20 * 8 * 8 * 3 / 1e6)
    (sequence,) = report["seconds"]["this"]
    assert len(sequence) == 3 and all(s > 0 for s in sequence)
    assert report["figures"]["this"]["total"] == pytest.approx(sum(sequence))
    assert report["imported"] == {"this": str(ROOT)}  # the evaluations ran this checkout
