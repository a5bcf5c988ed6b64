"""The sample-efficiency benchmark's replay and statistics, on small synthetic tables.

No training: each table is made here with a known optimum and learning curves that fall
from 0.4 towards each point's final value, worse points staying higher at every epoch.
"""

from __future__ import annotations

import json
import math
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
BEST = {"lr": 0.1, "momentum": 0.85, "swa_start": 3}


def final_value(params: dict[str, Any]) -> float:
    """A bowl with its minimum (0.01) at BEST; every other point is at least 0.02."""
    distance = (
        abs(math.log10(params["lr"]) + 1)
        + round(abs(params["momentum"] - 0.85) * 20, 9)
        + abs(params["swa_start"] - 3)
    )
    return 0.01 + 0.01 * distance


def row(params: dict[str, Any], *, failed: bool = False) -> dict[str, Any]:
    """A table row in the format the table phase writes (one second per epoch)."""
    final = final_value(params)
    history = [
        {
            "epoch": e,
            "val_augrc": final + (0.4 - final) * 0.5**e,
            "val_accuracy": 0.9,
            "seconds": float(e + 1),
        }
        for e in range(EPOCHS)
    ]
    out: dict[str, Any] = {
        "params": params,
        "history": history,
        "seconds": {"train": float(EPOCHS), "export": 0.5, "compile": 2.0, "device": 3.0},
        "float_augrc": final,
        "device_augrc": final + 0.001,
    }
    if failed:
        out["failed"] = {"stage": "compile", "reason": "CompilerError: synthetic"}
    return out


def write_table(path: Path, *, skip: int = 0, fail: dict[str, Any] | None = None) -> Path:
    points = se.grid_points(SPACE)[skip:]
    table = {
        "version": se.TABLE_VERSION,
        "settings": {"space": se.space_dump(SPACE), "device": True},
        "points": {se.point_key(p): row(p, failed=fail is not None and p == fail) for p in points},
    }
    path.write_text(json.dumps(table))
    return path


@pytest.fixture
def table(tmp_path: Path) -> tuple[dict[str, SearchParam], dict[str, se.Point]]:
    return se.load_table(write_table(tmp_path / "table.json"), "device_augrc")


def replay(table: Any, label: str, seed: int, **kwargs: Any) -> se.Run:
    space, points = table
    top = se.top_keys(points, "device_augrc", 0.01)
    options: dict[str, Any] = {"objective": "device_augrc", "top": top, "budget": 200}
    return se.replay(points, space, se.parse_strategies(label)[0], seed, **options | kwargs)


def test_grid_and_keys_match_what_the_study_suggests() -> None:
    points = se.grid_points(SPACE)
    assert len(points) == 36
    assert len({se.point_key(p) for p in points}) == 36
    # A stepped float comes back from Optuna as 0.8500000000000001; the key is the same.
    assert se.point_key({"momentum": 0.8 + 0.05, "lr": 0.1}) == se.point_key(
        {"lr": 0.1, "momentum": 0.85}
    )


def test_top_one_percent_of_a_known_table(table: Any) -> None:
    _, points = table
    assert se.top_keys(points, "device_augrc", 0.01) == {se.point_key(BEST)}
    # 10% of 36 points: the best 4, and every point tied with the 4th: the optimum and its
    # 6 neighbours one step away, all at 0.02.
    top10 = se.top_keys(points, "float_augrc", 0.1)
    assert len(top10) == 7 and se.point_key(BEST) in top10
    assert max(points[k].values["float_augrc"] or 0 for k in top10) == pytest.approx(0.02)


def test_ties_with_the_last_top_point_are_in_the_top() -> None:
    flat = {
        str(i): se.Point({}, (0.1,), (1.0,), {"device_augrc": v}, 1.0, 0.0, 0.0, 0.0)
        for i, v in enumerate([0.5, 0.1, 0.2, 0.2, 0.3])
    }
    assert se.top_keys(flat, "device_augrc", 0.4) == {"1", "2", "3"}


def test_trials_to_top_is_the_first_ask_of_the_optimum(table: Any) -> None:
    space, _ = table
    # The random sampler's asks do not depend on the told values: draw them independently.
    study = optuna.create_study(sampler=make_sampler("random", 7, space))
    asked = []
    for _ in range(200):
        trial = study.ask()
        asked.append(se.point_key(suggest(trial, space)))
        study.tell(trial, 0.0)
    expected = asked.index(se.point_key(BEST)) + 1

    run = replay(table, "random", 7)
    assert run.trials == expected
    assert run.asked == expected and run.sequence == asked[:expected]
    assert run.epochs == EPOCHS * expected
    assert run.board_evaluations == expected
    assert run.seconds == pytest.approx(
        {
            "train": 6.0 * expected,
            "export": 0.5 * expected,
            "compile": 2.0 * expected,
            "device": 3.0 * expected,
        }
    )
    assert run.total_s == pytest.approx(11.5 * expected)

    full = replay(table, "random", 7, stop_at_hit=False)
    assert full.trials == expected and full.asked == 200
    assert full.repeats == 200 - len(set(asked))  # 36 points: most of 200 asks repeat one


def test_pruning_spends_fewer_epochs_on_the_same_asks(table: Any) -> None:
    for seed in range(3):
        plain = replay(table, "random", seed, budget=40, stop_at_hit=False)
        pruned = replay(table, "random+median", seed, budget=40, stop_at_hit=False)
        assert pruned.sequence == plain.sequence  # the same trials were asked
        assert pruned.pruned > 0 and plain.pruned == 0
        assert pruned.epochs < plain.epochs == 40 * EPOCHS
        assert pruned.board_evaluations == 40 - pruned.pruned
        assert pruned.seconds["compile"] < plain.seconds["compile"]
        # A pruned trial is charged the training seconds of the epochs it ran, nothing more.
        assert pruned.seconds["train"] == pytest.approx(pruned.epochs * 1.0)


def test_a_pruned_optimum_is_not_a_hit(table: Any) -> None:
    space, points = table
    key = se.point_key(BEST)
    # The optimum's curve stays high until the last epoch: the median pruner stops it
    # whenever it is asked after the pruner's 4 startup trials.
    late = (0.4,) * (EPOCHS - 1) + (points[key].curve[-1],)
    rigged = {**points, key: replace(points[key], curve=late)}
    run = se.replay(
        rigged,
        space,
        se.Strategy("random", "median"),
        7,
        objective="device_augrc",
        top={key},
        budget=200,
        stop_at_hit=False,
    )
    asked = [i for i, k in enumerate(run.sequence) if k == key]
    assert [run.outcomes[i] for i in asked].count("PRUNED") >= 2
    completed = [i + 1 for i in asked if run.outcomes[i] == "COMPLETE"]
    assert run.trials == (completed[0] if completed else None)


def test_random_and_tpe_with_a_fixed_seed_are_reproducible(table: Any) -> None:
    for label in ("random", "tpe", "tpe+median"):
        first, second = replay(table, label, 3), replay(table, label, 3)
        assert first.sequence == second.sequence
        assert (first.trials, first.epochs, first.pruned) == (
            second.trials,
            second.epochs,
            second.pruned,
        )
    assert replay(table, "random", 3).sequence != replay(table, "random", 4).sequence


def test_a_failed_point_is_told_fail_and_costs_its_time(tmp_path: Path) -> None:
    bad = {"lr": 1.0, "momentum": 0.9, "swa_start": 1}
    space, points = se.load_table(write_table(tmp_path / "t.json", fail=bad), "device_augrc")
    assert points[se.point_key(bad)].values == {"device_augrc": None, "float_augrc": None}
    run = se.replay(
        {k: points[se.point_key(bad)] for k in points},  # every ask fails
        space,
        se.Strategy("random"),
        0,
        objective="device_augrc",
        top={"none"},
        budget=5,
    )
    assert (run.trials, run.failed, run.board_evaluations) == (None, 5, 0)
    assert run.seconds["device"] == pytest.approx(15.0)


def test_quantiles_and_summary_count_unreached_runs_as_infinite() -> None:
    assert se.quantiles([1, 2, 3, 4, 5]) == [2.0, 3.0, 4.0]
    assert se.quantiles([1, 2, 3, 4]) == [1.75, 2.5, 3.25]
    assert se.quantiles([1, 2, 3, math.inf]) == [1.75, 2.5, math.inf]
    runs = [
        se.Run("x", s, trials=t, asked=t or 9, epochs=(t or 9) * 2)
        for s, t in enumerate([1, 3, 5, None])
    ]
    runs[1].pruned = 2
    runs[3].best = 0.2  # the run that missed found the grid's 2nd best point
    summary = se.summarise(runs, ranking=[0.1, 0.2, 0.2, 0.3])
    assert summary["reached"] == 0.75
    assert summary["trials"] == [2.5, 4.0, math.inf]
    assert summary["epochs"] == [5.0, 8.0, math.inf]
    assert summary["pruned_share"] == pytest.approx(2 / 18)
    assert summary["missed_best_rank"] == [2.0, 2.0, 2.0]
    assert summary["stage_s"]["train"][2] == math.inf
    assert "not reached" in se.markdown({"x": summary}, "device_augrc")


def test_expected_random_trials() -> None:
    # 2 of 180: P(miss n times) = (178/180)^n <= 0.5 first at n = 63.
    assert se.expected_random_trials(2, 180) == 63
    assert se.expected_random_trials(5, 5) == 1


def test_modelled_stage_seconds_replace_the_measured_ones(table: Any) -> None:
    _, points = table
    slow = se.with_stage_seconds(points, compile_s=300.0, device_s=None)
    assert {p.compile_s for p in slow.values()} == {300.0}
    assert {p.device_s for p in slow.values()} == {3.0}


def test_incomplete_table_and_bad_input_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = write_table(tmp_path / "partial.json", skip=1)
    assert se.main(["replay", "--table", str(partial)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "35 of 36 points" in err and "run the table phase" in err

    assert se.main(["replay", "--table", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err

    full = write_table(tmp_path / "full.json")
    assert se.main(["replay", "--table", str(full), "--strategies", "tpe+often"]) == 2
    assert "SAMPLER+PRUNER" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        se.main(["replay", "--table", str(full), "--top", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "between 0 and 1" in err

    assert se.main(["table", "--out", str(tmp_path / "t.json"), "--epochs", "5"]) == 2
    assert "--epochs 6 or more" in capsys.readouterr().err


def test_replay_command_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = write_table(tmp_path / "full.json")
    out = tmp_path / "results.json"
    argv = ["replay", "--table", str(full), "--seeds", "3", "--budget", "200"]
    argv += ["--strategies", "random,tpe+median"]
    assert se.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| random |" in printed and "| tpe+median |" in printed
    results = json.loads(out.read_text())
    assert results["top"] == [se.point_key(BEST)]
    assert len(results["runs"]["random"]) == 3
    assert results["summaries"]["random"]["reached"] == 1.0
