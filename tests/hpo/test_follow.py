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

from tasks.hpo.launch import DeploymentStages, Slot
from tests.fakes.engine import fake_config

pytestmark = pytest.mark.usefixtures("prefect_server")


@flow(name="follow-probe")
def _probe() -> None:
    """Only its name is used: the flow runs below belong to it."""


def _slot(study: optuna.Study) -> Slot:
    return Slot(study.ask(), {}, run_id="r", parent_run_id="p", waiting=True)


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
    config = fake_config(tmp_path, {"orchestration": {"poll_interval_s": 30.0}})
    study = optuna.create_study()
    slot = _slot(study)
    started: list[float] = []
    slot.on_start = lambda: started.append(time.monotonic())
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(_probe, name="compile-trial-0")
        client.set_flow_run_state(run.id, Running(), force=True)
        begun = time.monotonic()
        _later(1.0, lambda: client.set_flow_run_state(run.id, Completed(), force=True))
        followed = DeploymentStages(config, study._storage)._follow(run, slot)

    took = time.monotonic() - begun
    assert followed.state is not None and followed.state.is_completed()
    assert 1.0 <= took < 10.0, took
    # RUNNING was seen at the first look, before the end
    assert slot.waiting is False and len(started) == 1
