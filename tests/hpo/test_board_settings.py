"""A board whose settings are refused during a study: paused at once, no trial charged.

A host key not trusted, a key refused, a work dir the user may not write, no Python or
runtime for the evaluator (``DeviceConfigError``) fail every evaluation the same way until
someone fixes the settings: counting them up to ``device.max_consecutive_failures`` would
only train more models for nothing. Fake stages (``tests/fakes/engine.py``) stand in for
training, compilation and the board; the study, the loop and recovery are the real ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tasks.devices import DeviceConfigError
from tasks.hpo.launch import Slot, StageFailed
from tasks.hpo.loop import BoardPaused, StudyLoop
from tasks.hpo.recovery import ATTR_RETRY_OF

from fakes.engine import FakeStages, FakeTracker, fake_config, memory_study

LOG = logging.getLogger("test-board-settings")
HOST_KEY = (
    "the host key of 10.0.0.9:22 is not trusted (HostKeyNotVerifiable: Host key is not "
    "trusted); if this is the right board, add its key to known_hosts with `ssh-keyscan -p 22 "
    "10.0.0.9 >> ~/.ssh/known_hosts`, or set device.ssh.check_host_key: false knowingly"
)
#: The same failure as a parent on another host sees it: the edge pool's stage run failed.
REMOTE = StageFailed(
    "evaluate-trial/edge run brave-fox ended FAILED: Flow run encountered an exception: "
    f"DeviceConfigError: {HOST_KEY}"
)


@pytest.mark.parametrize("raised", [DeviceConfigError(HOST_KEY), REMOTE], ids=["local", "remote"])
def test_a_board_settings_error_pauses_at_once_and_charges_no_trial(
    tmp_path: Path, raised: BaseException
) -> None:
    def fail(stage: str, slot: Slot) -> BaseException | None:
        return raised if stage == "device" else None

    config = fake_config(
        tmp_path,
        {"device": {"max_consecutive_failures": 3}},
        n_trials=4,
        parallel=1,
        retries=0,
    )
    # trial 1 trains while trial 0 is on the board, and is still training at the pause
    stages = FakeStages(config, fail=fail, train_s=0.6, compile_s=0.2)
    tracker = FakeTracker()
    loop = StudyLoop(
        config,
        memory_study(config),
        stages=stages,
        logger=LOG,
        tracker=tracker,  # type: ignore[arg-type]
    )

    with pytest.raises(BoardPaused) as caught:
        loop.run()

    message = str(caught.value)
    assert message.startswith(
        f"board {config.device.name!r} refused its settings ({type(raised).__name__}: "
    ), message
    assert "device.ssh.check_host_key: false knowingly" in message
    assert message.endswith(
        "the study is paused at once and its trials are enqueued again, not charged: fix the "
        "device settings it names, check with 'edgetune device check CONFIG', then run the "
        "study again"
    )
    assert "\n" not in message
    # one evaluation: no countdown to max_consecutive_failures; trial 1, training when
    # the study paused, is stopped (the GPU did not wait for the board)
    assert [w.trial for w in stages.of("device")] == [0]
    assert [w.trial for w in stages.of("train")] == [0, 1]
    trials = loop.study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_stage"] == "device"
    # every trial stopped is enqueued again with retries: 0, its attempt not counted
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs[ATTR_RETRY_OF] for t in retries) == failed
    assert all(t.user_attrs["attempt"] == 0 for t in retries)
    assert failed == [0, 1] and len(trials) == 4  # nothing RUNNING, nothing complete
    assert tracker.named(f"study-{config.study.name}").status == "KILLED"
    assert all(run.status != "RUNNING" for run in tracker.runs.values())


def test_a_board_that_is_down_still_counts_to_max_consecutive_failures(tmp_path: Path) -> None:
    """Unreachable is not a settings error: it may come back, so the countdown stays."""
    from tasks.devices import DeviceUnreachableError

    def fail(stage: str, slot: Slot) -> BaseException | None:
        down = DeviceUnreachableError("cannot reach the device at 10.0.0.9:22")
        return down if stage == "device" else None

    config = fake_config(
        tmp_path, {"device": {"max_consecutive_failures": 2}}, n_trials=4, parallel=1, retries=0
    )
    stages = FakeStages(config, fail=fail)
    loop = StudyLoop(
        config,
        memory_study(config),
        stages=stages,
        logger=LOG,
        tracker=FakeTracker(),  # type: ignore[arg-type]
    )

    with pytest.raises(BoardPaused, match=r"failed 2 evaluations in a row"):
        loop.run()
    assert len(stages.of("device")) == 2
