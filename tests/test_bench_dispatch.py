"""The dispatch benchmark's pure parts: route specs, statistics and the table it prints."""

from __future__ import annotations

import pytest

from bench.dispatch import (
    PHASES,
    RouteSpec,
    Row,
    parse_routes,
    percentile,
    phase_table,
    phases,
    summarise,
    table,
)


def test_p95_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1 .. 20
    assert percentile(values, 95) == 19.0  # ceil(0.95 * 20) = 19th value
    assert percentile(values, 100) == 20.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.4], 95) == 0.4


def test_percentile_refuses_no_values_and_a_bad_q() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 95)
    with pytest.raises(ValueError, match="0 < q <= 100 must hold, but got q=0"):
        percentile([1.0], 0)


def test_summary_gives_median_p95_min_max() -> None:
    summary = summarise([0.3, 0.1, 0.2, 5.0])
    assert summary.n == 4
    assert summary.median == pytest.approx(0.25)
    assert summary.p95 == 5.0
    assert (summary.min, summary.max) == (0.1, 5.0)


def test_routes_parse_with_their_polls() -> None:
    specs = parse_routes("process@2, task,prefork@0.2,serve@1,prefork,lean@0.1")
    assert specs == [
        RouteSpec("process", 2.0),
        RouteSpec("task", None),
        RouteSpec("prefork", 0.2),
        RouteSpec("serve", 1.0),
        RouteSpec("prefork", 2.0),  # the poll bench/pipeline.py uses
        RouteSpec("lean", 0.1),
    ]
    assert [spec.label for spec in specs] == [
        "process@2", "task", "prefork@0.2", "serve@1", "prefork@2", "lean@0.1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("celery", "must be one of process, serve, task, prefork, lean, stage"),
        ("task@1", "task workers are pushed to"),
        ("serve@0.5", "whole seconds for serve"),
        ("process@0", "must be > 0 s"),
        (" , ", "no route"),
    ],
)
def test_bad_routes_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_routes(text)


def test_a_round_trip_splits_at_the_runs_states() -> None:
    marks = {"SCHEDULED": 100.1, "PENDING": 101.0, "RUNNING": 103.5, "COMPLETED": 103.75}
    split = phases(100.0, marks, 104.0)
    assert split == {"queued": 1.0, "starting": 2.5, "running": 0.25, "back": 0.25}
    assert sum(split.values()) == 4.0


def test_a_state_never_entered_or_stamped_early_takes_no_time() -> None:
    split = phases(10.0, {"RUNNING": 9.5, "COMPLETED": 11.0}, 12.0)  # no PENDING; skewed clock
    assert split == {"queued": 0.0, "starting": 0.0, "running": 1.0, "back": 1.0}


def _rows() -> list[Row]:
    half = dict.fromkeys(PHASES, 0.5)
    return [
        Row("process@2", "dispatch-process-2 (limit 1)", "flow run", summarise([4.0, 5.0, 6.0]),
            {"queued": 1.0, "starting": 3.0, "running": 0.5, "back": 0.5}),
        Row("task", "none (worker limit 1)", "task run", summarise([0.25, 0.3125]), half),
    ]  # fmt: skip


def test_the_phase_table_gives_each_routes_median_phases() -> None:
    lines = phase_table(_rows()).splitlines()
    assert lines[0] == "| route | queued s | starting s | running s | back s |"
    assert lines[2] == "| process@2 | 1.000 | 3.000 | 0.500 | 0.500 |"
    assert lines[3] == "| task | 0.500 | 0.500 | 0.500 | 0.500 |"


def test_the_table_has_one_row_per_route_in_seconds() -> None:
    rows = _rows()
    lines = table(rows).splitlines()
    assert lines[0].startswith("| route | work pool (limit) | in the UI | n | median s | p95 s")
    assert len(lines) == 4
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells == ["process@2", "dispatch-process-2 (limit 1)", "flow run", "3", "5.000",
                     "6.000", "4.000", "6.000"]  # fmt: skip
    cells = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert cells[3:] == ["2", "0.281", "0.312", "0.250", "0.312"]


def test_the_task_route_waits_for_a_run_whose_first_state_is_not_written_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefect's future gives up at once on a task run that has no state yet (its first
    state can land a moment after ``.delay()`` returned): the route asks again."""
    from uuid import uuid4

    from bench import dispatch

    class Future:
        task_run_id = uuid4()
        asked = 0

        def result(self, timeout: float) -> int:
            self.asked += 1
            if self.asked < 3:
                raise RuntimeError(f"Task run {self.task_run_id} has no state which means ...")
            return 7

    future = Future()
    monkeypatch.setattr(dispatch.noop_task, "delay", lambda n: future)
    route = dispatch.TaskRoute(RouteSpec("task", None), parent_poll=1.0)
    assert route.call(7) == 7 and future.asked == 3
    assert route.last_run == future.task_run_id

    class Broken(Future):
        def result(self, timeout: float) -> int:
            raise RuntimeError("something else")

    monkeypatch.setattr(dispatch.noop_task, "delay", lambda n: Broken())
    with pytest.raises(RuntimeError, match="something else"):
        route.call(1)
