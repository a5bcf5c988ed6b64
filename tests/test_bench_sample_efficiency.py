"""The sample-efficiency benchmark's replay and statistics, on small synthetic tables, and
the committed table replayed with the documented strategies.

No training: each synthetic table is made here with a known seed-mean optimum, three
seeds per point, and learning curves that fall from 0.4 towards each run's final value.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest

from bench import sample_efficiency as se
from tasks.config import SearchParam
from tasks.hpo.study import make_sampler, suggest

SPACE = {
    "lr": SearchParam(type="categorical", choices=[0.01, 0.1, 1.0]),
    "momentum": SearchParam(type="float", low=0.8, high=0.9, step=0.05),
    "swa_start": SearchParam(type="int", low=1, high=4),
}  # 3 x 3 x 4 = 36 points
EPOCHS = 6
BEST = {"lr": 0.1, "momentum": 0.85, "swa_start": 3}  # the best seed mean (0.01)
LUCKY = {"lr": 1.0, "momentum": 0.9, "swa_start": 1}  # the best seed-0 value, a poor mean


def final_value(params: dict[str, Any]) -> float:
    """A bowl with its minimum (0.01) at BEST; every other point is at least 0.02."""
    distance = (
        abs(math.log10(params["lr"]) + 1)
        + round(abs(params["momentum"] - 0.85) * 20, 9)
        + abs(params["swa_start"] - 3)
    )
    return 0.01 + 0.01 * distance


def seed_values(params: dict[str, Any]) -> list[float]:
    """Three seeds around the bowl (mean = the bowl); LUCKY's seed 0 beats every point's."""
    final = final_value(params)
    if params == LUCKY:
        return [0.001, final + 0.05, 2 * final - 0.001 - 0.05]
    return [final - 0.002, final, final + 0.002]


def run_row(final: float, *, failed: bool = False) -> dict[str, Any]:
    """One seed's run in the table format (one second per epoch)."""
    out: dict[str, Any] = {
        "val_augrc": [final + (0.4 - final) * 0.5**e for e in range(EPOCHS)],
        "epoch_s": [float(e + 1) for e in range(EPOCHS)],
        "s": {"train": float(EPOCHS), "export": 0.5, "compile": 2.0, "device": 3.0},
        "float_augrc": final,
        "device_augrc": final + 0.001,
    }
    if failed:
        out["failed"] = {"stage": "compile", "reason": "CompilerError: synthetic"}
    return out


def write_table(
    path: Path, *, skip: int = 0, fail: dict[str, Any] | None = None, seeds: int = 3
) -> Path:
    points = se.grid_points(SPACE)[skip:]
    table = {
        "version": se.TABLE_VERSION,
        "settings": {"space": se.space_dump(SPACE), "device": True},
        "points": {
            se.point_key(p): {
                "params": p,
                "runs": {
                    str(r): run_row(v, failed=p == fail)
                    for r, v in enumerate(seed_values(p)[:seeds])
                },
            }
            for p in points
        },
    }
    path.write_text(se.table_text(table))
    return path


@pytest.fixture
def table(tmp_path: Path) -> tuple[dict[str, SearchParam], dict[str, se.Point]]:
    return se.load_table(write_table(tmp_path / "table.json"), "device_augrc")


def replay(table: Any, label: str, seed: int, **kwargs: Any) -> se.Run:
    space, points = table
    options: dict[str, Any] = {"objective": "device_augrc", "budget": 200} | kwargs
    if "top" not in options:
        options["top"] = se.top_keys(points, "device_augrc", 0.01)
    return se.replay(points, space, se.parse_strategy(label), seed, **options)


def random_asks(space: dict[str, SearchParam], seed: int, n: int) -> list[str]:
    """The random sampler's asks do not depend on the told values: draw them directly."""
    study = optuna.create_study(sampler=make_sampler("random", seed, space))
    asked = []
    for _ in range(n):
        trial = study.ask()
        asked.append(se.point_key(suggest(trial, space)))
        study.tell(trial, 0.0)
    return asked


def test_grid_and_keys_match_what_the_study_suggests() -> None:
    points = se.grid_points(SPACE)
    assert len(points) == 36
    assert len({se.point_key(p) for p in points}) == 36
    # A stepped float comes back from Optuna as 0.8500000000000001; the key is the same.
    assert se.point_key({"momentum": 0.8 + 0.05, "lr": 0.1}) == se.point_key(
        {"lr": 0.1, "momentum": 0.85}
    )


def test_a_point_tells_seed_0_and_ranks_by_the_seed_mean(table: Any) -> None:
    _, points = table
    lucky, best = points[se.point_key(LUCKY)], points[se.point_key(BEST)]
    assert lucky.values["device_augrc"] == pytest.approx(0.002)  # seed 0, what a study sees
    assert lucky.mean["device_augrc"] == pytest.approx(final_value(LUCKY) + 0.001)
    assert best.mean["float_augrc"] == pytest.approx(0.01)
    assert best.std["float_augrc"] == pytest.approx(0.002)
    assert len(best.curves) == 3 and best.curve == best.curves[0]
    # The top 1% is the seed-mean optimum, not the point with the best seed 0.
    assert se.top_keys(points, "device_augrc", 0.01) == {se.point_key(BEST)}
    # 10% of 36 points: the best 4 seed means, and every point tied with the 4th: the
    # optimum and its 6 neighbours one step away, all at 0.02.
    top10 = se.top_keys(points, "float_augrc", 0.1)
    assert len(top10) == 7 and se.point_key(BEST) in top10
    assert se.point_key(LUCKY) not in top10


def test_ties_with_the_last_top_point_are_in_the_top() -> None:
    flat = {
        str(i): se.Point({}, (0.1,), (1.0,), {}, 1.0, 0.0, 0.0, 0.0, mean={"device_augrc": v})
        for i, v in enumerate([0.5, 0.1, 0.2, 0.2, 0.3])
    }
    assert se.top_keys(flat, "device_augrc", 0.4) == {"1", "2", "3"}


def test_a_run_is_told_seed_0_and_hits_only_the_seed_mean_top(table: Any) -> None:
    space, points = table
    asked = random_asks(space, 7, 200)
    expected = asked.index(se.point_key(BEST)) + 1
    run = replay(table, "random", 7)
    assert run.trials == expected and run.sequence == asked[:expected]
    assert run.epochs == EPOCHS * expected and run.board_evaluations == expected
    assert run.seconds == pytest.approx(
        {"train": 6.0 * expected, "export": 0.5 * expected, "compile": 2.0 * expected}
        | {"device": 3.0 * expected}
    )
    # The best told value is the best seed-0 value among the asked points.
    assert run.best == min(points[k].values["device_augrc"] for k in run.sequence)

    full = replay(table, "random", 7, stop_at_hit=False)
    assert se.point_key(LUCKY) in full.sequence
    assert full.best_key == se.point_key(LUCKY)  # the study's best trial ...
    assert full.trials == expected  # ... is not a hit; the seed-mean optimum is
    assert full.asked == 200 and full.repeats == 200 - len(set(asked))


def test_warmup_keeps_the_pruner_from_judging_before_swa(table: Any) -> None:
    _, points = table
    for seed in range(3):
        early = replay(table, "random+median:0", seed, budget=60, stop_at_hit=False)
        late = replay(table, "random+median", seed, budget=60, stop_at_hit=False)
        assert early.sequence == late.sequence  # the same asks, judged differently
        judged = [
            (points[k].params["swa_start"], epochs)
            for k, state, epochs in zip(late.sequence, late.outcomes, late.trained, strict=True)
            if state == "PRUNED"
        ]
        assert judged and all(epochs > swa for swa, epochs in judged)
        assert any(
            epochs <= points[k].params["swa_start"]
            for k, state, epochs in zip(early.sequence, early.outcomes, early.trained, strict=True)
            if state == "PRUNED"
        )
        # A pruned trial costs the training seconds of the epochs it ran, nothing more.
        assert late.seconds["train"] == pytest.approx(late.epochs * 1.0)
        assert late.board_evaluations == 60 - late.pruned
    assert se.parse_strategy("tpe+median:2").warmup_of({"swa_start": 4}) == 2
    assert se.parse_strategy("tpe+median").warmup_of({"swa_start": 4}) == 4


def test_a_pruned_optimum_is_not_a_hit(table: Any) -> None:
    space, points = table
    key = se.point_key(BEST)
    # The optimum's curve stays high until the last epoch: the median pruner stops it
    # whenever it is asked after the pruner's 4 startup trials.
    late = (0.4,) * (EPOCHS - 1) + (points[key].curve[-1],)
    rigged = {**points, key: replace(points[key], curve=late)}
    run = replay((space, rigged), "random+median:0", 7, top={key}, stop_at_hit=False)
    asked = [i for i, k in enumerate(run.sequence) if k == key]
    assert [run.outcomes[i] for i in asked].count("PRUNED") >= 2
    assert run.top_pruned == [run.outcomes[i] for i in asked].count("PRUNED")
    assert run.top_pruned_after == [run.trained[i] for i in asked if run.outcomes[i] == "PRUNED"]
    summary = se.summarise([run])
    assert sum(summary["top_pruned_after"].values()) == run.top_pruned
    assert f"{run.top_pruned} of {run.top_asked} (" in se.markdown({"x": summary}, "device_augrc")
    completed = [i + 1 for i in asked if run.outcomes[i] == "COMPLETE"]
    assert run.trials == (completed[0] if completed else None)


def test_reuse_answers_repeats_at_no_cost_and_counts_them(table: Any) -> None:
    for seed in range(3):
        plain = replay(table, "tpe", seed, budget=60, stop_at_hit=False)
        reuse = replay(table, "tpe+reuse", seed, budget=60, stop_at_hit=False)
        # Training a repeat again gives the same told value, so TPE asks the same points.
        assert reuse.sequence == plain.sequence and reuse.trials == plain.trials
        assert reuse.asked == 60 and reuse.reused == plain.repeats > 0
        assert reuse.epochs == EPOCHS * len(set(plain.sequence))
        assert reuse.board_evaluations == len(set(plain.sequence))
        assert reuse.total_s == pytest.approx(plain.total_s * len(set(plain.sequence)) / 60)
        assert reuse.trained.count(0) == reuse.reused


def test_a_pruned_point_asked_again_is_pruned_again_for_free(table: Any) -> None:
    run = replay(table, "random+median:0+reuse", 1, budget=120, stop_at_hit=False)
    first: dict[str, tuple[str, int]] = {}
    for key, state, epochs in zip(run.sequence, run.outcomes, run.trained, strict=True):
        if key in first:
            assert (state, epochs) == (first[key][0], 0)
        else:
            first[key] = (state, epochs)
    assert "PRUNED" in {s for s, _ in first.values()} and run.reused > 0
    assert run.epochs == sum(run.trained)


def test_strategies_parse_and_label() -> None:
    for label in ("random", "tpe", "tpe+median", "tpe+median:0", "tpe+reuse", "tpe+asha+reuse"):
        assert se.parse_strategy(label).label == label
    assert se.parse_strategy("tpe+median:swa").label == "tpe+median"
    assert se.parse_strategy("tpe+median+reuse") == se.Strategy("tpe", "median", "swa", True)
    for bad in ("tpe+often", "tpe+median:soon", "grid", "tpe+median+asha"):
        with pytest.raises(se.BenchError, match="SAMPLER"):
            se.parse_strategy(bad)


def test_random_and_tpe_with_a_fixed_seed_are_reproducible(table: Any) -> None:
    for label in ("random", "tpe", "tpe+median", "tpe+reuse"):
        first, second = replay(table, label, 3), replay(table, label, 3)
        assert first.sequence == second.sequence
        assert (first.trials, first.epochs, first.pruned) == (
            second.trials,
            second.epochs,
            second.pruned,
        )
    assert replay(table, "random", 3).sequence != replay(table, "random", 4).sequence


def test_a_failed_point_is_told_fail_costs_its_time_and_is_not_reused(tmp_path: Path) -> None:
    bad = {"lr": 1.0, "momentum": 0.9, "swa_start": 2}
    space, points = se.load_table(write_table(tmp_path / "t.json", fail=bad), "device_augrc")
    point = points[se.point_key(bad)]
    assert point.values == {"device_augrc": None, "float_augrc": None}
    assert point.mean == {"device_augrc": None, "float_augrc": None}
    every_ask_fails = {k: point for k in points}
    run = replay((space, every_ask_fails), "random+reuse", 0, top={"none"}, budget=5)
    assert (run.trials, run.failed, run.reused, run.board_evaluations) == (None, 5, 0, 0)
    assert run.seconds["device"] == pytest.approx(15.0)


def test_statistics() -> None:
    assert se.quantiles([1, 2, 3, 4, 5]) == [2.0, 3.0, 4.0]
    assert se.quantiles([1, 2, 3, 4]) == [1.75, 2.5, 3.25]
    assert se.quantiles([1, 2, 3, math.inf]) == [1.75, 2.5, math.inf]
    assert se.ranks([0.3, 0.1, 0.3, 0.2]) == [3.5, 1.0, 3.5, 2.0]
    assert se.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert se.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert se.spearman([1, 2], [1, 2]) is None
    assert se.spearman([1, 1, 1], [1, 2, 3]) is None
    low, high = se.wilson(45, 50)  # 90% of 50 runs
    assert (round(low, 3), round(high, 3)) == (0.786, 0.957)
    assert se.wilson(50, 50)[1] == 1.0 and se.wilson(0, 50)[0] == 0.0


def test_summary_counts_unreached_runs_as_infinite() -> None:
    runs = [
        se.Run("x", s, trials=t, asked=t or 9, epochs=(t or 9) * 2)
        for s, t in enumerate([1, 3, 5, None])
    ]
    runs[1].pruned = 2
    runs[2].reused = 1
    runs[3].best_key = "b"  # the run that missed found the grid's 2nd best point
    summary = se.summarise(runs, rank={"a": 1, "b": 2})
    assert summary["reached"] == 0.75
    assert summary["reached_95"] == pytest.approx(list(se.wilson(3, 4)))
    assert summary["trials"] == [2.5, 4.0, math.inf]
    assert summary["epochs"] == [5.0, 8.0, math.inf]
    assert summary["pruned_share"] == pytest.approx(2 / 18)
    assert summary["reused_share"] == pytest.approx(1 / 18)
    assert summary["missed_best_rank"] == [2.0, 2.0, 2.0]
    assert summary["stage_s"]["train"][2] == math.inf
    assert "not reached" in se.markdown({"x": summary}, "device_augrc")


def test_goal_lines_compare_reach_and_compute_with_tpe() -> None:
    def summary(reached: float, compute: float) -> dict[str, Any]:
        return {"reached": reached, "compute_s": [0.0, compute, 0.0]}

    lines = se.goal_lines(
        {
            "tpe": summary(1.0, 100.0),
            "tpe+median": summary(0.92, 90.0),
            "tpe+median:0": summary(0.5, 80.0),
            "tpe+reuse": summary(1.0, 50.0),
        }
    )
    assert len(lines) == 2
    assert lines[0].startswith("goal tpe+median:") and lines[0].endswith(": holds")
    assert "(>= 90%: no)" in lines[1] and lines[1].endswith("does not hold")


def test_noise_report_on_a_known_table(table: Any) -> None:
    _, points = table
    report = se.noise_report(points, "float_augrc")
    assert report["seeds"] == 3 and report["points"] == 36
    assert report["best"][0]["params"] == BEST
    assert report["best"][0]["std"] == pytest.approx(0.002)
    assert report["told_best"]["params"] == LUCKY
    assert report["told_best"]["seed_mean_rank"] > 1
    assert report["gaps_from_best"][0] == pytest.approx(0.01)
    # Only LUCKY's seeds spread enough to leave it within two standard errors of the best.
    assert report["within_noise_of_best"] == 2
    # Every synthetic curve starts at 0.4 (no ranking: None), then keeps the final order
    # but for LUCKY's seed 0.
    first, *later = report["epoch_vs_mean"]["all points"]
    assert first is None and all(r is not None and r > 0.8 for r in later)
    assert "| seed-mean rank |" in se.noise_markdown(report)


def test_modelled_stage_seconds_replace_the_measured_ones(table: Any) -> None:
    _, points = table
    slow = se.with_stage_seconds(points, compile_s=300.0, device_s=None)
    assert {p.compile_s for p in slow.values()} == {300.0}
    assert {p.device_s for p in slow.values()} == {3.0}


def test_pending_runs_and_resume(tmp_path: Path) -> None:
    grid = se.grid_points(SPACE)
    table = json.loads(write_table(tmp_path / "t.json", seeds=2).read_text())
    todo = se.pending(table, grid, 3)
    assert len(todo) == 36 and {r for _, r in todo} == {2}
    assert todo[0][0] == grid[-1]  # measured from the last grid point back
    assert len(se.pending(table, grid, 2)) == 0
    del table["points"][se.point_key(grid[0])]
    assert se.pending(table, grid, 2) == [(grid[0], 0), (grid[0], 1)]


def test_incomplete_table_and_bad_input_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = write_table(tmp_path / "partial.json", skip=1)
    assert se.main(["replay", "--table", str(partial)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1 of 36 points" in err and "run the table" in err

    uneven = json.loads(write_table(tmp_path / "uneven.json").read_text())
    del next(iter(uneven["points"].values()))["runs"]["2"]
    (tmp_path / "uneven.json").write_text(json.dumps(uneven))
    assert se.main(["noise", "--table", str(tmp_path / "uneven.json")]) == 2
    assert "replicates 0, 1, 2" in capsys.readouterr().err

    assert se.main(["replay", "--table", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err

    full = write_table(tmp_path / "full.json")
    assert se.main(["replay", "--table", str(full), "--strategies", "tpe+often"]) == 2
    assert "SAMPLER[+PRUNER" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        se.main(["replay", "--table", str(full), "--top", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "between 0 and 1" in err

    assert se.main(["table", "--out", str(tmp_path / "t.json"), "--epochs", "5"]) == 2
    assert "--epochs 6 or more" in capsys.readouterr().err


def test_replay_and_noise_commands_print_tables_and_write_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = write_table(tmp_path / "full.json")
    out = tmp_path / "results.json"
    argv = ["replay", "--table", str(full), "--seeds", "3", "--budget", "200"]
    argv += ["--strategies", "random,tpe,tpe+median"]
    assert se.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| random |" in printed and "| tpe+median |" in printed
    assert "goal tpe+median:" in printed
    results = json.loads(out.read_text())
    assert results["top"] == [se.point_key(BEST)]
    assert len(results["runs"]["random"]) == 3
    assert results["summaries"]["random"]["reached"] == 1.0

    assert se.main(["noise", "--table", str(full), "--json", str(tmp_path / "n.json")]) == 0
    assert "val_augrc of seed 0 after epoch" in capsys.readouterr().out
    assert json.loads((tmp_path / "n.json").read_text())["seeds"] == 3


def test_the_committed_table_replays_in_seconds() -> None:
    path = se.DEFAULT_TABLE
    assert path.stat().st_size < 1_000_000
    space, points = se.load_table(path)
    assert len(points) == len(se.grid_points(space)) == 180
    assert {len(p.curves) for p in points.values()} == {3}
    top = se.top_keys(points, "device_augrc", 0.01)
    assert len(top) == 2
    started = time.perf_counter()
    runs = se.replay_all(
        points,
        space,
        se.parse_strategies(se.DEFAULT_STRATEGIES),
        range(2),
        objective="device_augrc",
        top=top,
        budget=60,
    )
    assert time.perf_counter() - started < 60
    assert set(runs) == set(se.DEFAULT_STRATEGIES.split(","))
    for label, replayed in runs.items():
        for run in replayed:
            assert run.trials is None or run.sequence[run.trials - 1] in top, label
