"""The pipeline benchmark's pure parts: the scenarios, the medians and the table."""

from __future__ import annotations

import argparse

import pytest

from bench.pipeline import (
    SCENARIOS,
    dispatch_report,
    handoff_gaps,
    main,
    medians,
    queue_waits,
    report,
    setup_report,
    shortest_span,
)


def _args(**over: float) -> argparse.Namespace:
    base = {
        "gpus": 2,
        "compile_slots": 1,
        "trials": 20,
        "worker_poll": 1.0,
        "parent_poll": 2.0,
        "repeats": 3,
        "workers": "stage",
        **SCENARIOS["gpu"],
    }
    return argparse.Namespace(**{**base, **over})


def test_each_scenario_is_bound_where_its_name_says() -> None:
    def bound(durations: dict[str, float], gpus: int = 2, compile_slots: int = 1) -> str:
        rates = {
            "gpu": gpus / durations["train"],
            "compile": compile_slots / durations["compile"],
            "board": 1 / durations["device"],
        }
        return min(rates, key=rates.__getitem__)

    assert {name: bound(durations) for name, durations in SCENARIOS.items()} == {
        "gpu": "gpu",
        "board": "board",
    }


def test_a_design_reports_the_median_of_its_repeats() -> None:
    runs = [{"wall_s": 300.0, "gpu_utilisation": 0.9}, {"wall_s": 100.0, "gpu_utilisation": 0.5}]
    runs.append({"wall_s": 200.0, "gpu_utilisation": 0.97})
    assert medians(runs) == {"wall_s": 200.0, "gpu_utilisation": 0.9}


def test_waiting_at_a_full_stage_is_queueing_and_the_rest_is_dispatch() -> None:
    """One compile slot: B, ready at 5 while A compiles until 10, waits 5 s for the slot
    (queueing) and starts at 11 (1 s of dispatch, not counted here); C, ready at 30 with
    the slot free, waits nothing. Two slots: B finds one free at once."""
    spans = [(0.5, 10.0), (11.0, 20.0), (31.0, 40.0)]
    assert queue_waits([0.0, 5.0, 30.0], spans, 1) == [0.0, 5.0, 0.0]
    assert queue_waits([0.0, 5.0, 30.0], spans, 2) == [0.0, 0.0, 0.0]
    # three at once on two slots: the third waits for the first to end
    three = [(0.0, 10.0), (0.0, 12.0), (10.5, 20.0)]
    assert queue_waits([0.0, 0.0, 0.0], three, 2) == [0.0, 0.0, 10.0]
    # D, ready at 9 behind C (ready at 8): the slot A left at 10 went to C, so D waits for
    # C's release at 21 and starts 1 s later
    queue = [(0.5, 10.0), (11.0, 21.0), (22.0, 30.0)]
    assert queue_waits([0.0, 8.0, 9.0], queue, 1) == [0.0, 2.0, 12.0]
    # F, ready at 1 while E (ready at 0) is being handed the free slot: F is behind E
    assert queue_waits([0.0, 1.0], [(1.5, 10.0), (11.0, 20.0)], 1) == [0.0, 9.0]


def test_a_handoff_gap_is_the_board_idle_while_the_next_model_was_ready() -> None:
    """B was compiled before A left the board: 1 s of idle board is the handoff. C was
    compiled only after B left: its gap is no handoff and is not counted."""
    board = [(0.5, 10.0), (11.0, 20.0), (31.0, 40.0)]
    assert handoff_gaps([0.0, 5.0, 30.0], board) == [1.0]


def test_the_shortest_span_is_the_head_and_tail_any_schedule_pays() -> None:
    # GPU-bound, 20 trials on 2 GPUs: both slots train 10 times (600 s); their last two
    # models compile one after the other on the one compiler (30 s), then the board (10 s)
    assert shortest_span(20, 2, 1, 60.0, 15.0, 10.0) == 640.0
    # board-bound: the first model reaches the board at 35 s, then 20 evaluations of 20 s
    assert shortest_span(20, 2, 1, 30.0, 5.0, 20.0) == 435.0
    # compile-bound: the first model at 10 s, six compiles of 20 s, one evaluation
    assert shortest_span(6, 2, 1, 10.0, 20.0, 1.0) == 131.0
    # an odd count: one slot trains 3 times, its one last model compiles then evaluates
    assert shortest_span(5, 2, 2, 60.0, 15.0, 10.0) == 180.0 + 25.0


def test_the_dispatch_line_splits_each_trainings_way_by_prefects_state_times() -> None:
    times = [
        {"number": 0, "asked_at": 0.0, "train_started": 1.0, "train_finished": 61.0,
         "train_returned_at": 61.5},
        {"number": 1, "asked_at": 10.0, "train_started": 12.0, "train_finished": 72.0,
         "train_returned_at": 72.2},
        {"number": 2, "asked_at": 20.0},  # never trained: left out
    ]  # fmt: skip
    stages = [
        {"name": "train-trial-0", "created": 0.2, "PENDING": 0.5, "RUNNING": 0.6,
         "COMPLETED": 61.1},
        {"name": "train-trial-1", "created": 10.4, "PENDING": 11.4, "RUNNING": 11.6,
         "COMPLETED": 72.1},
        {"name": "compile-trial-0", "created": 61.6, "RUNNING": 62.0},
    ]  # fmt: skip
    line = dispatch_report(times, stages)
    assert line.startswith("training dispatch, median s (min-max): ")
    assert "asked -> created 0.30 (0.20-0.40)" in line
    assert "created -> pending 0.65 (0.30-1.00)" in line
    assert "pending -> running 0.15 (0.10-0.20)" in line
    assert "running -> work 0.40 (0.40-0.40)" in line
    assert "work done -> completed 0.10 (0.10-0.10)" in line
    assert "completed -> returned 0.25 (0.10-0.40)" in line


def test_the_set_up_of_compile_and_evaluation_runs_is_running_to_their_work() -> None:
    times = [
        {"number": 0, "compile_started": 62.3, "device_started": 70.5},
        {"number": 1, "compile_started": 80.1, "device_started": 91.0},
        {"number": 2, "compile_started": 99.0},  # its evaluation never ran: left out
    ]
    stages = [
        {"name": "compile-trial-0", "RUNNING": 62.0}, {"name": "evaluate-trial-0", "RUNNING": 70.0},
        {"name": "compile-trial-1", "RUNNING": 80.0}, {"name": "evaluate-trial-1", "RUNNING": 90.0},
        {"name": "compile-trial-2", "RUNNING": 98.5}, {"name": "evaluate-trial-2"},
    ]  # fmt: skip
    assert setup_report(times, stages) == (
        "stage set-up (running -> work), median s (min-max): "
        "compile 0.30 (0.10-0.50); evaluate 0.75 (0.50-1.00)"
    )


def test_the_table_has_one_column_per_design_and_states_the_repeats() -> None:
    runs = {
        "pipelined": [{"fraction_of_bound": v} for v in (0.95, 0.97, 0.96)],
        "blocking": [{"fraction_of_bound": v} for v in (0.5, 0.52, 0.51)],
    }
    text = report(_args(), runs)
    assert "3 repeat(s), medians" in text and "E[train]=60.0s" in text
    assert text.splitlines()[-3:] == [
        "| metric | pipelined | blocking |",
        "|---|---|---|",
        "| fraction_of_bound | 0.96 | 0.51 |",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenarios", "gpu,cpu"], "--scenarios takes gpu, board (got 'cpu')"),
        (["--repeats", "0"], "--repeats must be >= 1, but got 0"),
    ],
)
def test_bad_arguments_say_what_to_write(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
