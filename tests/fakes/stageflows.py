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
def slow_stage(out: str, seconds: float) -> None:
    """Runs ``seconds``; records that it was stopped, if it was (its clean-up runs)."""
    _record(out)
    try:
        time.sleep(seconds)
    finally:
        Path(out).with_suffix(".ended").write_text("cleaned up")


@flow(name="plain-flow")
def plain_flow(out: str) -> None:
    """Not served as a stage: runs through the flow engine in a new process."""
    _record(out)
