"""The training-throughput benchmark: a tiny real run's figures, and its pure parts."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench import train_throughput as tt


@pytest.fixture(scope="module")
def record(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real run on the CPU: 96 digits, 1 epoch, 1 repeat, a one-step projection."""
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    argv = ["--data", str(digits_root), "--device", "cpu", "--epochs", "1", "--limit", "96"]
    argv += ["--repeats", "1", "--projection-batch", "4", "--projection-steps", "1", "--slots", "2"]
    assert tt.main([*argv, "--json", str(out)]) == 0
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def test_both_sides_report_finite_positive_rates(record: dict[str, Any]) -> None:
    cpu = record["results"]["cpu"]
    assert record["train_images"] == 96 and record["settings"]["epochs"] == 1
    assert record["settings"]["swa_start"] == 0  # SWA still starts before the last epoch
    for side in ("edgetune", "minimal"):
        rate = cpu[f"{side}_images_per_s"]
        assert math.isfinite(rate) and rate > 0
        (run,) = cpu["runs"]
        assert run[f"{side}_images_per_s"] == pytest.approx(96 / run[f"{side}_seconds"])
    assert 0 < cpu["edgetune_first_epoch_s"] <= cpu["runs"][0]["edgetune_seconds"] + 1.0


def test_the_ratio_is_edgetune_over_minimal(record: dict[str, Any]) -> None:
    cpu = record["results"]["cpu"]
    (run,) = cpu["runs"]
    assert run["ratio"] == pytest.approx(run["edgetune_images_per_s"] / run["minimal_images_per_s"])
    assert cpu["ratio"] == pytest.approx(cpu["edgetune_images_per_s"] / cpu["minimal_images_per_s"])


def test_the_projection_is_the_reference_images_over_the_rate(record: dict[str, Any]) -> None:
    projected = record["results"]["cpu"]["projection"]
    assert (projected["batch_size"], projected["steps"]) == (4, 1)
    assert math.isfinite(projected["images_per_s"]) and projected["images_per_s"] > 0
    assert projected["seconds"] == pytest.approx(50_000 * 200 / projected["images_per_s"])
    assert record["reference"] == {"images": 50_000, "epochs": 200}


def test_slots_time_several_trainings_at_once_against_one_alone(record: dict[str, Any]) -> None:
    slots = record["results"]["cpu"]["slots"]
    assert slots["slots"] == 2 and len(slots["each_s"]) == 2
    assert all(0 < each <= slots["together_s"] for each in slots["each_s"])
    assert slots["ratio"] == pytest.approx(2 * slots["alone_s"] / slots["together_s"])
    assert slots["trials_per_hour_together"] == pytest.approx(
        slots["ratio"] * slots["trials_per_hour_alone"]
    )


def test_the_record_states_the_machine_and_the_loader(record: dict[str, Any]) -> None:
    facts = record["machine"]
    assert facts["cpus"] >= 1 and facts["packages"]["torch"] and facts["load_start"]
    assert record["results"]["cpu"]["loader"] == (
        "train_batches(loader=auto, cache=True) → BatchedImages"
    )


def _result(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    runs = [
        {
            "edgetune_images_per_s": e,
            "minimal_images_per_s": m,
            "edgetune_first_epoch_s": 2.0,
            "ratio": e / m,
        }
        for e, m in pairs
    ]
    return {
        "runs": runs,
        "ratio": statistics.median(r["ratio"] for r in runs),
        "edgetune_first_epoch_s": 2.0,
        "projection": {"images_per_s": 1000.0, "seconds": 10_000.0},
    }


def test_the_table_gives_medians_spreads_and_the_pairwise_ratio() -> None:
    # Pairs 100/400, 300/400, 200/100: ratios 0.25, 0.75, 2.0, median 0.75 (not 200/400).
    result = _result([(100.0, 400.0), (300.0, 400.0), (200.0, 100.0)])
    lines = tt.table({"cpu": result}).splitlines()
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells == ["cpu", "200 (100–300)", "400 (100–400)", "0.75", "2.00", "1000", "2 h 47 min"]
    assert tt.goal({"cpu": result}) == (
        "goal (CPU: edgetune >= 0.9x the minimal loop): missed, 0.75x"
    )
    assert "met, 1.00x" in tt.goal({"cpu": _result([(90.0, 90.0)])})


def test_fewer_epochs_keep_swa_before_the_last() -> None:
    config = tt.load_config(tt.QUICKSTART)
    assert (tt._settings(config, None).epochs, tt._settings(config, None).swa_start) == (10, 7)
    short = tt._settings(config, 2)
    assert (short.epochs, short.swa_start) == (2, 1)


def test_the_loader_flags_become_the_data_section(digits_root: Path) -> None:
    args = tt.parse(["--data", str(digits_root), "--loader", "per_image", "--no-cache"])
    data = tt._config(args).data.model_dump()
    assert (data["loader"], data["cache"], data["root"]) == ("per_image", False, str(digits_root))
