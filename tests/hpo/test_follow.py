"""How the parent follows a stage's flow run on a work pool (``DeploymentStages._follow``),
on the real Prefect test server: no worker, the run's states are set by the test."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Completed, Running

from tasks.hpo.launch import DeploymentStages, Slot, StartWatcher
from tests.fakes.engine import fake_config

pytestmark = pytest.mark.usefixtures("prefect_server")


@flow(name="follow-probe")
def _probe() -> None:
    """Only its name is used: the flow runs below belong to it."""


def _slot(study: optuna.Study) -> Slot:
    return Slot(study.ask(), {}, run_id="r", parent_run_id="p", waiting=True)


def _followed(tmp_path: Path, poll_s: float) -> tuple[DeploymentStages, Slot, list[float]]:
    """Stages that look every ``poll_s``, a queued model's slot, and when it started."""
    config = fake_config(tmp_path, {"orchestration": {"poll_interval_s": poll_s}})
    study = optuna.create_study()
    slot = _slot(study)
    started: list[float] = []
    slot.on_start = lambda: started.append(time.monotonic())
    return DeploymentStages(config, study._storage), slot, started


def _later(seconds: float, action: Any) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


def test_the_parent_reads_a_stage_that_ended_at_once_not_at_its_next_poll(
    tmp_path: Path,
) -> None:
    """The poll interval is 30 s; the run ends after 1 s and the parent sees it within a
    few seconds (its end's event wakes the wait). The model counted as waiting until a
    worker took the run (RUNNING)."""
    stages, slot, started = _followed(tmp_path, 30.0)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(_probe, name="compile-trial-0")
        client.set_flow_run_state(run.id, Running(), force=True)
        begun = time.monotonic()
        _later(1.0, lambda: client.set_flow_run_state(run.id, Completed(), force=True))
        followed = stages._follow(run, slot)

    took = time.monotonic() - begun
    assert followed.state is not None and followed.state.is_completed()
    assert 1.0 <= took < 10.0, took
    # RUNNING was seen at the first look, before the end
    assert slot.waiting is False and len(started) == 1


def test_the_parent_sees_a_queued_stage_start_at_once_not_at_its_next_poll(
    tmp_path: Path,
) -> None:
    """A trained model waits in the compile queue (its run SCHEDULED); a worker takes the
    run after 1 s. With a poll interval of 30 s the model leaves the queue for the loop
    (``slot.started``: it may ask the next trial) within seconds of the start, long before
    the run ends at 12 s. Before the start's event woke the parent, it saw the start only
    at its next look, here the end, and the model counted as waiting to the end."""
    stages, slot, started = _followed(tmp_path, 30.0)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(_probe, name="compile-trial-0")
        begun = time.monotonic()
        _later(1.0, lambda: client.set_flow_run_state(run.id, Running(), force=True))
        _later(12.0, lambda: client.set_flow_run_state(run.id, Completed(), force=True))
        followed = stages._follow(run, slot)

    assert followed.state is not None and followed.state.is_completed()
    assert len(started) == 1
    assert 1.0 <= started[0] - begun < 8.0, started[0] - begun
    assert slot.waiting is False


def test_a_started_run_queued_again_is_waited_for_not_spun_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that started, then went back to its queue (a retry awaits its turn): the
    start already seen does not wake the parent again and again; it looks once per poll
    until the run starts anew."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import AwaitingRetry

    reads: list[float] = []
    real_read = SyncPrefectClient.read_flow_run

    def counted(self: Any, flow_run_id: Any) -> Any:
        reads.append(time.monotonic())
        return real_read(self, flow_run_id)

    monkeypatch.setattr(SyncPrefectClient, "read_flow_run", counted)
    stages, slot, _ = _followed(tmp_path, 1.0)
    StartWatcher.running()
    time.sleep(1.0)  # listening before the run starts
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(_probe, name="compile-trial-0")
        client.set_flow_run_state(run.id, Running(), force=True)
        time.sleep(0.5)  # the start's event is in
        client.set_flow_run_state(run.id, AwaitingRetry(), force=True)
        begun = time.monotonic()
        _later(4.0, lambda: client.set_flow_run_state(run.id, Completed(), force=True))
        followed = stages._follow(run, slot)

    assert followed.state is not None and followed.state.is_completed()
    # about one look a second for 4 s, and one at the end: far from a loop on the API
    assert 3 <= len(reads) <= 10, len(reads)
    assert time.monotonic() - begun >= 4.0
