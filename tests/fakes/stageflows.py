"""Flows for ``edgetune worker`` tests, served as stages (``--stage``): each leaves what it
saw in a JSON file, as a real stage leaves its outcome in MLflow."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from uuid import UUID

from prefect import flow
from prefect.runtime import flow_run

from tasks.runlog import run_logger


def _record(out: str, **seen: object) -> None:
    Path(out).write_text(
        json.dumps(
            {
                "flow_run_id": flow_run.id,
                "pid": os.getpid(),
                "env": os.environ.get("STAGE_PROBE"),
                **seen,
            }
        )
    )


def _run_state() -> str | None:
    """The state of this stage's run, as the API has it now."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run.id)).state
    return state.type.value if state is not None else None


@flow(name="ok-stage")
def ok_stage(out: str, value: int) -> int:
    run_logger().info("ok-stage saw value %d", value)
    _record(out, value=value, state=_run_state())
    return value + 1


@flow(name="failing-stage")
def failing_stage(out: str) -> None:
    _record(out)
    raise ValueError("the stage's input is bad: fix it")


@flow(name="slow-stage")
def slow_stage(out: str, seconds: float, until: str | None = None) -> None:
    """Runs ``seconds`` (less if the file ``until`` appears); records that it was stopped,
    if it was (its clean-up runs)."""
    _record(out)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until and Path(until).exists()):
            time.sleep(min(0.05, seconds))
    finally:
        Path(out).with_suffix(".ended").write_text("cleaned up")


@flow(name="plain-flow")
def plain_flow(out: str) -> None:
    """Not served as a stage: runs through the flow engine in a new process."""
    _record(out)


def ahead_of_slow(out: str, seconds: float, until: str | None = None) -> bool:
    """What a worker does for a waiting ``slow_stage`` run: a line (when, which process)
    beside the run's own record; a run whose record is named ``fail-ahead*`` fails it (and
    leaves ``.tried``)."""
    if Path(out).name.startswith("fail-ahead"):
        Path(out).with_suffix(".tried").write_text("")
        raise OSError("the board's disk is full")
    with Path(out).with_suffix(".ahead").open("a") as lines:
        lines.write(json.dumps({"at": time.time(), "pid": os.getpid()}) + "\n")
    return True


#: Done by the worker for a waiting run of these stages (``edgetune worker``).
PRESTAGE = {"slow_stage": ahead_of_slow}


def prepare_slow(out: str, **_: object) -> None:
    """What a ``slow_stage`` run's own process does before the run is RUNNING: a record of
    when and where, beside the run's."""
    Path(out).with_suffix(".prepared").write_text(
        json.dumps({"at": time.time(), "pid": os.getpid()})
    )


#: Done by the worker in a ``slow_stage`` run's process before its run is RUNNING.
PREPARE = {"slow_stage": prepare_slow}
