"""A compiled model that collapsed is flagged (or failed, by config), never hidden; the
float→device gaps of every classifier trial are measured and shown."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from edgetune.progress import results_table
from tasks.hpo.launch import Slot
from tasks.hpo.loop import StudyLoop
from tasks.workloads.base import DeviceOutcome
from tasks.workloads.classifier import collapse_flags

from fakes.engine import FakeStages, FakeTracker, fake_config, memory_study

WHY = "device accuracy 0.400 below the float model's (compile.max_accuracy_drop 0.1)"


@dataclass
class CollapsingStages(FakeStages):
    """Even-numbered trials come back from the board collapsed."""

    fails: bool = False

    def evaluate(self, slot: Slot, artifact: str) -> DeviceOutcome:
        outcome = super().evaluate(slot, artifact)
        if slot.number % 2:
            return outcome
        return replace(outcome, flags={"collapsed": WHY}, fails=self.fails)


def _loop(tmp_path: Path, fails: bool, **study: Any) -> tuple[StudyLoop, FakeTracker]:
    config = fake_config(tmp_path, {"device": {"max_consecutive_failures": 2}}, **study)
    tracker = FakeTracker()
    loop = StudyLoop(
        config,
        memory_study(config),
        stages=CollapsingStages(config, fails=fails),
        logger=logging.getLogger("test-quality"),
        tracker=tracker,  # type: ignore[arg-type]
    )
    return loop, tracker


def test_a_collapsed_trial_is_kept_and_marked_in_the_table(tmp_path: Path) -> None:
    loop, tracker = _loop(tmp_path, fails=False, n_trials=4, parallel=1)
    result = loop.run()

    trials = loop.study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert [t.user_attrs.get("flags") for t in trials] == [{"collapsed": WHY}, None] * 2
    assert tracker.named("trial-0").tags["edgetune.collapsed"] == WHY
    assert "edgetune.collapsed" not in tracker.named("trial-1").tags
    rows = {row["trial"]: row for row in result["trials"]}
    assert rows[0]["flags"] == {"collapsed": WHY} and "flags" not in rows[1]
    states = results_table(result).columns[-1]._cells
    assert states[0].startswith("COMPLETE (collapsed: device accuracy 0.400 below")
    assert states[1] == "COMPLETE"


def test_a_collapse_fails_the_trial_when_asked_without_pausing_the_board(
    tmp_path: Path,
) -> None:
    # every other trial collapses; two failed evaluations in a row would pause the board,
    # and a retry (study.retries is 1) would collapse again: none is made
    loop, tracker = _loop(tmp_path, fails=True, n_trials=4, parallel=1)
    result = loop.run()

    trials = loop.study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] * 2
    assert trials[0].value is None  # no sentinel value
    assert not any("retry_of" in t.user_attrs for t in trials)
    assert trials[0].user_attrs["fail_stage"] == "quality"
    assert trials[0].user_attrs["fail_reason"] == f"QualityFailed: {WHY}"
    assert result["counts"]["FAIL"] == 2 and result["counts"]["COMPLETE"] == 2
    assert tracker.named("trial-0").status == "FAILED"


@pytest.mark.parametrize(
    ("compile_settings", "gaps", "expected"),
    [
        ({}, {"accuracy_gap": -0.05, "augrc_gap": 0.2}, {}),  # default: accuracy drop 0.1
        ({}, {"accuracy_gap": -0.25, "augrc_gap": 0.01}, "device accuracy 0.250 below"),
        ({"max_accuracy_drop": None}, {"accuracy_gap": -0.9}, {}),
        ({"max_augrc_gap": 0.05}, {"accuracy_gap": 0.0, "augrc_gap": 0.06}, "device AUGRC 0.0600"),
    ],
)
def test_collapse_limits(
    tmp_path: Path, compile_settings: dict[str, Any], gaps: dict[str, float], expected: Any
) -> None:
    config = fake_config(tmp_path, {"compile": compile_settings})
    flags = collapse_flags(config, gaps)  # type: ignore[arg-type]
    if expected == {}:
        assert flags == {}
    else:
        assert flags["collapsed"].startswith(expected)
