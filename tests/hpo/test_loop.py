"""The ask/tell loop driven by fake stages: no Prefect, no training, milliseconds a test.

Fakes (``tests/fakes/engine.py``) stand in for training, compilation and the board; the
study, the sampler, the loop, recovery and the board lock are the real ones.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import tasks.board
from tasks.compilers import CompilerError
from tasks.devices.base import DeviceUnreachableError
from tasks.hpo.launch import Slot
from tasks.hpo.loop import BoardPaused, SampleRejected, StudyLoop, run_studies
from tasks.hpo.recovery import ATTR_HEARTBEAT, ATTR_OWNER, ATTR_RETRY_OF, ATTR_STAGE

from fakes.engine import FakeStages, FakeTracker, fake_config, memory_study

LOG = logging.getLogger("test-loop")


class Hooks:
    """Records the loop's outcome hooks."""

    def __init__(self) -> None:
        self.outcomes: list[int] = []
        self.ends: list[str] = []

    def on_trial_outcome(self, run: Any, trial: Any) -> None:
        self.outcomes.append(trial.number)

    def on_study_end(self, run: Any, state: str) -> None:
        self.ends.append(state)


def make_loop(
    tmp_path: Path,
    stages_kw: dict[str, Any] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    **study: Any,
) -> tuple[StudyLoop, FakeStages, FakeTracker, Hooks]:
    config = fake_config(tmp_path, sections, **study)
    stages = FakeStages(config, **(stages_kw or {}))
    tracker, hooks = FakeTracker(), Hooks()
    loop = StudyLoop(
        config,
        memory_study(config),
        stages=stages,
        logger=LOG,
        tracker=tracker,  # type: ignore[arg-type]
        hooks=hooks,
    )
    return loop, stages, tracker, hooks


def states(loop: StudyLoop) -> list[str]:
    return [t.state.name for t in loop.study.get_trials()]


def test_a_study_completes_its_trials_and_registers_the_best(tmp_path: Path) -> None:
    loop, stages, tracker, hooks = make_loop(tmp_path, n_trials=4, parallel=2)

    result = loop.run()

    assert result["counts"]["COMPLETE"] == 4 and states(loop) == ["COMPLETE"] * 4
    values = {t.number: t.value for t in loop.study.get_trials()}
    best = min(values, key=values.__getitem__)
    assert result["best"]["trial"] == best
    assert result["champion"] == {
        "model": f"{loop.config.study.name}-classifier",
        "version": "1",
        "alias": "champion",
        "trial": best,
        "note": "@champion moved to version 1: the first champion",
    }
    [registered] = tracker.registered
    assert registered["run_id"] == loop.study.trials[best].user_attrs["mlflow_run_id"]
    assert registered["path"] == "mlflow_model"
    # each trial: a FINISHED MLflow run tagged COMPLETE; the parent run FINISHED
    trial_runs = [r for r in tracker.runs.values() if r.name.startswith("trial-")]
    assert sorted(r.tags["edgetune.state"] for r in trial_runs) == ["COMPLETE"] * 4
    assert all(r.status == "FINISHED" for r in tracker.runs.values())
    assert tracker.named(f"study-{loop.config.study.name}").metrics["trials_complete"] == 4
    assert sorted(hooks.outcomes) == [0, 1, 2, 3] and hooks.ends == ["FINISHED"]
    assert len(stages.prepared) == 1 and len(stages.of("device")) == 4


def test_a_gpu_slot_is_freed_when_training_ends_not_when_the_board_is_done(
    tmp_path: Path,
) -> None:
    """One GPU slot, a slow board: trial 1 trains while trial 0 is still on the board."""
    loop, stages, _, _ = make_loop(
        tmp_path, {"train_s": 0.03, "device_s": 0.12}, n_trials=3, parallel=1, max_pending=2
    )
    loop.run()

    trains, boards = stages.of("train"), stages.of("device")
    assert trains[1].start < boards[0].end  # pipelined: no wait for the board
    assert all(a.end <= b.start for a, b in itertools.pairwise(trains))  # 1 GPU slot


def test_the_blocking_design_holds_the_gpu_slot_through_compile_and_board(
    tmp_path: Path,
) -> None:
    loop, stages, _, _ = make_loop(
        tmp_path,
        {"train_s": 0.01, "device_s": 0.03},
        {"orchestration": {"pipelined": False}},
        n_trials=3,
        parallel=1,
    )

    loop.run()

    trains, boards = stages.of("train"), stages.of("device")
    assert [t.trial for t in trains] == [0, 1, 2]
    assert all(board.end <= nxt.start for board, nxt in zip(boards, trains[1:], strict=False))


def test_no_training_starts_while_max_pending_models_wait_for_the_board(
    tmp_path: Path,
) -> None:
    """Backpressure: trained models queue for the board, at most ``max_pending`` of them."""
    loop, stages, _, _ = make_loop(
        tmp_path,
        {"train_s": 0.005, "device_s": 0.03, "board": True},
        n_trials=6,
        parallel=2,
        max_pending=1,
    )
    loop.run()

    trains, boards = stages.of("train"), {w.trial: w for w in stages.of("device")}
    for train in trains:
        # trained, and not yet on the board (the one on the board does not wait)
        waiting = [
            t for t in trains if t.end <= train.start and boards[t.trial].start > train.start
        ]
        # at most max_pending (1), plus a training that ended but was not yet taken to the
        # board when this one was asked (parallel - 1)
        assert len(waiting) <= 2, (train, waiting)
    # without backpressure 2 GPU slots would train all 6 at once; here training is paced
    assert max(t.start for t in trains) > min(b.end for b in boards.values())


def test_models_being_compiled_do_not_hold_back_a_gpu_slot(tmp_path: Path) -> None:
    """``max_pending`` counts models waiting, not trainings just finished: two trainings
    that end together and go straight into compilation leave both GPU slots training."""
    loop, stages, _, _ = make_loop(
        tmp_path,
        {"train_s": 0.02, "compile_s": 0.4, "device_s": 0.01, "board": True},
        n_trials=4,
        parallel=2,
        max_pending=2,
    )
    loop.run()

    trains, compiles = stages.of("train"), stages.of("compile")
    # trials 2 and 3 trained while 0 and 1 were still being compiled
    assert max(t.start for t in trains[2:]) < min(c.end for c in compiles[:2])


def test_a_model_taking_the_board_lets_the_next_trial_train_at_once(tmp_path: Path) -> None:
    """One GPU slot, one place in the queue: the next trial is asked when the waiting model
    takes the board, not at the next heartbeat."""
    loop, stages, _, _ = make_loop(
        tmp_path,
        {"train_s": 0.01, "device_s": 0.3, "board": True},
        n_trials=4,
        parallel=1,
        max_pending=1,
        heartbeat_s=30,
        stale_after_s=120,
    )
    loop.run()

    trains, boards = stages.of("train"), {w.trial: w for w in stages.of("device")}
    # trial 1 waited for the board while trial 0 held it; trial 2 trained once 1 took it
    assert boards[1].start <= trains[2].start < boards[1].start + 0.2


def test_the_board_holds_one_evaluation_at_a_time(tmp_path: Path) -> None:
    loop, stages, _, _ = make_loop(
        tmp_path, {"device_s": 0.02, "board": True}, n_trials=5, parallel=3, max_pending=3
    )
    loop.run()

    boards = stages.of("device")
    assert len(boards) == 5
    assert all(a.end <= b.start for a, b in itertools.pairwise(boards))


def test_a_pruned_trial_is_told_pruned_and_never_reaches_compile_or_board(
    tmp_path: Path,
) -> None:
    loop, stages, tracker, hooks = make_loop(
        tmp_path,
        {"prune": lambda slot: "pruned at epoch 0" if slot.number % 2 else None},
        n_trials=4,
        parallel=2,
    )
    result = loop.run()

    assert states(loop) == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert {w.trial for w in stages.of("compile")} == {0, 2}
    pruned = loop.study.trials[1]
    assert pruned.user_attrs["fail_reason"] == "pruned at epoch 0"
    assert (pruned.user_attrs["epochs_run"], pruned.user_attrs["epochs_planned"]) == (1, 4)
    assert tracker.named("trial-1").tags["edgetune.state"] == "PRUNED"
    assert result["pruning_saved"]["epochs"] == 6  # 3 epochs not run, twice
    assert sorted(hooks.outcomes) == [0, 1, 2, 3]


@pytest.mark.parametrize("retries", [0, 1])
def test_a_failed_stage_is_told_fail_with_its_reason_and_the_study_goes_on(
    tmp_path: Path, retries: int
) -> None:
    def fail(stage: str, slot: Slot) -> BaseException | None:
        first = slot.trial.user_attrs.get(ATTR_RETRY_OF) is None
        if stage == "compile" and slot.number == 0 and first:
            return CompilerError("unsupported layer: Foo")
        return None

    loop, _, tracker, _ = make_loop(
        tmp_path, {"fail": fail}, n_trials=3, parallel=1, retries=retries
    )
    result = loop.run()

    failed, *rest = loop.study.get_trials()
    assert failed.state == TrialState.FAIL and failed.value is None  # no sentinel value
    assert failed.user_attrs["fail_stage"] == "compile"
    assert failed.user_attrs["fail_reason"] == "CompilerError: unsupported layer: Foo"
    assert [t.state.name for t in rest] == ["COMPLETE"] * (2 + retries)
    assert result["counts"]["COMPLETE"] == 2 + retries  # a retried FAIL does not count
    run = tracker.named("trial-0")
    assert (run.status, run.tags["edgetune.state"]) == ("FAILED", "FAIL")
    assert run.tags["edgetune.fail_reason"] == "CompilerError: unsupported layer: Foo"
    assert "CompilerError: unsupported layer: Foo" in run.texts["error.txt"]
    assert result["champion"]["trial"] != failed.number
    retry = [t for t in rest if t.user_attrs.get(ATTR_RETRY_OF) == 0]
    if retries:
        # its parameters ran again, traced to it
        assert retry[0].params == failed.params and retry[0].user_attrs["attempt"] == 1
        assert tracker.named(f"trial-{retry[0].number}").tags["edgetune.retry_of"] == "0"
    else:
        assert retry == []


def test_a_trial_with_no_retry_left_counts_as_an_outcome(tmp_path: Path) -> None:
    loop, _, _, _ = make_loop(
        tmp_path,
        {"fail": lambda stage, slot: RuntimeError("boom") if stage == "train" else None},
        n_trials=2,
        parallel=2,
        retries=0,
    )
    result = loop.run()

    assert states(loop) == ["FAIL", "FAIL"] and result["counts"]["FAIL"] == 2
    assert result["best"] is None and result["champion"] is None


def test_a_board_down_pauses_the_study_loses_no_trial_and_a_rerun_finishes_it(
    tmp_path: Path,
) -> None:
    loop, _, tracker, _ = make_loop(
        tmp_path,
        {
            "device_s": 0.01,
            "fail": lambda stage, slot: (
                DeviceUnreachableError("board 10.0.0.9 refused the connection")
                if stage == "device"
                else None
            ),
        },
        {"device": {"max_consecutive_failures": 2}},
        n_trials=6,
        parallel=2,
        retries=0,
    )

    with pytest.raises(BoardPaused, match=r"failed 2 evaluations in a row .*DeviceUnreachable"):
        loop.run()

    trials = loop.study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    # every failure is enqueued again, not charged to the trial (retries=0 notwithstanding);
    # a retry asked before the pause failed in turn and is enqueued again itself
    retried = {t.user_attrs[ATTR_RETRY_OF] for t in trials if ATTR_RETRY_OF in t.user_attrs}
    assert retried == {t.number for t in failed}
    assert len(waiting) == len(failed) - sum(ATTR_RETRY_OF in t.user_attrs for t in failed)
    assert all(t.user_attrs["attempt"] == 0 for t in waiting)
    assert tracker.named(f"study-{loop.config.study.name}").status == "KILLED"
    assert all(r.status != "RUNNING" for r in tracker.runs.values())

    # the board is back: the study runs again and finishes, the failed trials retried
    stages = FakeStages(loop.config)
    again = StudyLoop(
        loop.config,
        loop.study,
        stages=stages,
        logger=LOG,
        tracker=tracker,  # type: ignore[arg-type]
    )
    result = again.run()
    assert result["counts"]["COMPLETE"] == 6
    trials = loop.study.get_trials()
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.FAIL}
    retried = {t.user_attrs.get(ATTR_RETRY_OF) for t in trials if t.state == TrialState.COMPLETE}
    failed_again = {t.user_attrs.get(ATTR_RETRY_OF) for t in failed}  # retries that failed
    assert {t.number for t in failed} - failed_again <= retried
    assert all(r.status != "RUNNING" for r in tracker.runs.values())


def test_a_trial_left_running_by_a_dead_process_is_failed_and_retried(tmp_path: Path) -> None:
    loop, _, _, _ = make_loop(tmp_path, n_trials=2, parallel=1, retries=1)
    orphan = _asked(loop)
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "token": "gone"}
    orphan.set_user_attr(ATTR_OWNER, dead)
    orphan.set_user_attr(ATTR_HEARTBEAT, time.time())
    orphan.set_user_attr(ATTR_STAGE, "device")

    result = loop.run()

    stale = loop.study.trials[0]
    assert stale.state == TrialState.FAIL and stale.user_attrs["fail_stage"] == "device"
    assert stale.user_attrs["fail_reason"] == (
        f"stale: its study process {dead['pid']} on {dead['host']} is gone (stage device)"
    )
    retry = next(t for t in loop.study.trials if t.user_attrs.get(ATTR_RETRY_OF) == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == stale.params
    assert result["counts"]["COMPLETE"] == 2


def test_a_trial_whose_heartbeat_stopped_is_stale(tmp_path: Path) -> None:
    loop, _, _, _ = make_loop(tmp_path, n_trials=1, parallel=1, retries=0)
    silent = _asked(loop)
    silent.set_user_attr(ATTR_OWNER, {"host": "elsewhere", "pid": 1, "token": "other"})
    silent.set_user_attr(ATTR_HEARTBEAT, time.time() - 60)

    loop.run()

    reason = loop.study.trials[0].user_attrs["fail_reason"]
    assert reason.startswith("stale: no heartbeat for 6") and "(limit 5 s)" in reason


def test_an_interrupted_study_tells_its_trials_fail_and_enqueues_them(tmp_path: Path) -> None:
    class Interrupting(Hooks):
        def on_trial_outcome(self, run: Any, trial: Any) -> None:
            raise KeyboardInterrupt

    config = fake_config(tmp_path, n_trials=4, parallel=2, max_pending=2)
    stages = FakeStages(config, train_s=1.0)
    tracker = FakeTracker()
    original = stages._work

    def work(slot: Slot, stage: str, seconds: float) -> Any:
        # trial 0 trains at once and completes (and the hook interrupts); the others train
        return original(slot, stage, 0.0 if slot.number == 0 else seconds)

    stages._work = work  # type: ignore[method-assign]
    loop = StudyLoop(
        config,
        memory_study(config),
        stages=stages,
        logger=LOG,
        tracker=tracker,  # type: ignore[arg-type]
        hooks=Interrupting(),
    )
    started = time.monotonic()

    with pytest.raises(KeyboardInterrupt):
        loop.run()

    assert time.monotonic() - started < 0.5  # the trainings in flight stopped at once (STOP)
    trials = loop.study.get_trials()
    assert trials[0].state == TrialState.COMPLETE
    failed = [t for t in trials if t.state == TrialState.FAIL]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert failed and len(failed) + 1 + len(waiting) == len(trials)
    assert {t.user_attrs["fail_reason"] for t in failed} == {
        "study interrupted: KeyboardInterrupt: "
    }
    assert sorted(t.user_attrs[ATTR_RETRY_OF] for t in waiting) == [t.number for t in failed]
    assert sorted(stages.cancelled) == [t.number for t in failed]
    assert {tracker.named(f"trial-{t.number}").status for t in failed} == {"KILLED"}
    assert tracker.named(f"study-{config.study.name}").status == "KILLED"


@pytest.mark.parametrize("where", ["sampling", "repeat check"])
def test_a_trial_interrupted_as_it_is_asked_is_told_fail_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A Ctrl-C between the ask and the trial's slot (its parameters being sampled, its
    repeat check) left the trial RUNNING: asked, but in no list abandon() reads."""
    import tasks.hpo.loop as loop_module

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    loop, _, _, _ = make_loop(tmp_path, n_trials=2, parallel=1)
    if where == "sampling":
        monkeypatch.setattr(loop_module, "suggest", interrupt)
    else:
        monkeypatch.setattr(loop, "_answered", interrupt)

    with pytest.raises(KeyboardInterrupt):
        loop.run()

    asked, *retry = loop.study.get_trials()
    assert asked.state == TrialState.FAIL
    assert asked.user_attrs["fail_reason"] == "study interrupted: KeyboardInterrupt: "
    if where == "sampling":  # no parameters yet: nothing to run again, the study asks anew
        assert retry == []
    else:
        assert [t.state for t in retry] == [TrialState.WAITING]
        assert retry[0].user_attrs[ATTR_RETRY_OF] == 0
        assert retry[0].system_attrs["fixed_params"] == asked.params  # the same, again


def test_a_time_budget_stops_asking_and_lets_trials_in_flight_finish(tmp_path: Path) -> None:
    loop, _, tracker, _ = make_loop(
        tmp_path, {"train_s": 0.03}, n_trials=50, parallel=2, time_budget="0.1s"
    )
    result = loop.run()

    count = result["counts"]["COMPLETE"]
    assert 2 <= count < 50 and states(loop) == ["COMPLETE"] * count
    assert result["stopped_by"].startswith("time budget 0.1s reached after")
    assert (
        tracker.named(f"study-{loop.config.study.name}").tags["edgetune.stopped_by"]
        == (result["stopped_by"])
    )


def test_patience_stops_after_k_trials_without_a_new_best(tmp_path: Path) -> None:
    loop, _, _, _ = make_loop(
        tmp_path,
        {"value": lambda params: 0.5 if params["lr"] > 0 else 0.0},  # no trial beats the first
        n_trials=20,
        parallel=1,
        patience=3,
    )
    result = loop.run()

    assert result["counts"]["COMPLETE"] == 4
    assert (
        result["stopped_by"] == "no improvement in the 3 trials finished since the best (trial 0)"
    )


def test_samples_that_break_a_constraint_are_rejected_and_not_counted(tmp_path: Path) -> None:
    loop, stages, _, _ = make_loop(tmp_path, n_trials=3, parallel=1, constraints=["lr < 0.04"])
    result = loop.run()

    assert result["counts"]["COMPLETE"] == 3
    rejected = [t for t in loop.study.trials if t.user_attrs.get("rejected")]
    assert all(t.params["lr"] >= 0.04 and t.state == TrialState.PRUNED for t in rejected)
    assert result["counts"]["REJECTED"] == len(rejected)
    assert len(stages.of("train")) == 3


def test_a_constraint_no_sample_meets_stops_the_study_in_one_line(tmp_path: Path) -> None:
    loop, stages, _, _ = make_loop(tmp_path, n_trials=1, parallel=1, constraints=["lr > 1"])

    with pytest.raises(SampleRejected, match=r"the feasible region looks empty"):
        loop.run()
    assert stages.of("train") == []


def test_two_studies_share_the_gpu_slots_and_the_next_trains_during_the_last_ones_tail(
    tmp_path: Path,
) -> None:
    """A variant run: study b opens when a has nothing left to train, not when a is done."""
    loops = []
    shared: list[FakeStages] = []
    for name in ("a", "b"):
        config = fake_config(tmp_path / name, n_trials=2, parallel=2)
        stages = FakeStages(config, train_s=0.02, device_s=0.1, board=True)
        shared.append(stages)
        loops.append(
            StudyLoop(
                config,
                memory_study(config),
                stages=stages,
                logger=LOG,
                tracker=FakeTracker(),  # type: ignore[arg-type]
            )
        )
    results = run_studies(loops, parallel=2)

    assert [r["counts"]["COMPLETE"] for r in results] == [2, 2]
    a_last_board = max(w.end for w in shared[0].of("device"))
    b_first_train = min(w.start for w in shared[1].of("train"))
    assert b_first_train < a_last_board


def _asked(loop: StudyLoop) -> optuna.Trial:
    """A trial asked as another study process would: RUNNING, with its parameters."""
    trial = loop.study.ask()
    trial.suggest_float("lr", 0.01, 0.1, log=True)
    trial.suggest_float("momentum", 0.85, 0.95)
    return trial


def _dead_pid() -> int:
    """A process id that no process has on this host now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


@pytest.fixture(autouse=True)
def _no_prefect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The board's slot is the one-machine file lock, whether or not a Prefect server runs
    in this test session: the engine's tests need no Prefect."""
    monkeypatch.setattr(tasks.board, "embedded", lambda: True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_an_interrupted_run_of_two_studies_loses_no_trial_and_a_rerun_finishes_both(
    tmp_path: Path,
) -> None:
    """A variant run stopped while both studies have trials in flight: every trial in
    flight, in both, is told FAIL and enqueued again; running both again finishes them."""

    class Crashing(StudyLoop):
        def beat(self, force: bool = False) -> None:
            others = [loop for loop in loops if loop is not self]
            if self.slots and any(other.slots for other in others):
                raise RuntimeError("the study process crashed")
            super().beat(force)

    configs = {
        "a": fake_config(tmp_path / "a", n_trials=2, parallel=2),
        "b": fake_config(tmp_path / "b", n_trials=1, parallel=2),
    }
    studies = {name: memory_study(config) for name, config in configs.items()}
    trackers = {name: FakeTracker() for name in configs}

    def make(kind: type[StudyLoop], name: str, **stages: Any) -> StudyLoop:
        return kind(
            configs[name],
            studies[name],
            stages=FakeStages(configs[name], **stages),
            logger=LOG,
            tracker=trackers[name],  # type: ignore[arg-type]
        )

    # a's trials wait on a slow board while b trains: both have trials in flight
    loops = [make(StudyLoop, "a", device_s=0.3), make(Crashing, "b", train_s=0.3)]
    with pytest.raises(RuntimeError, match="the study process crashed"):
        run_studies(loops, parallel=2)

    for name, in_flight in (("a", 2), ("b", 1)):
        trials = studies[name].get_trials()
        assert [t.state.name for t in trials] == ["FAIL"] * in_flight + ["WAITING"] * in_flight
        for trial in trials[:in_flight]:
            assert trial.user_attrs["fail_reason"].startswith("study interrupted: RuntimeError")
        assert all(r.status != "RUNNING" for r in trackers[name].runs.values())

    results = run_studies([make(StudyLoop, "a"), make(StudyLoop, "b")], parallel=2)
    assert [r["counts"]["COMPLETE"] for r in results] == [2, 1]
    for name in configs:
        assert all(r.status != "RUNNING" for r in trackers[name].runs.values())
