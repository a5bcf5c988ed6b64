"""Flows on the command's own Prefect server send no flow-run heartbeats.

Nothing watches them there (the server ends with the command), and after each flow
Prefect's engine waits for its heartbeat thread to wake from a one-second sleep. On a
Prefect server the user runs, heartbeats stay as configured (automations may watch them).
The flow below runs through Prefect's real engine on the session's test server.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prefect import flow
from prefect.flow_engine import FlowRunEngine

import edgetune.prefect_server as prefect_server
from edgetune.cli import _untraced

pytestmark = pytest.mark.usefixtures("prefect_server")


@flow(name="heartbeat-probe-stage")
def _stage() -> int:
    return 1


@flow(name="heartbeat-probe")
def _probe() -> int:
    """A parent flow whose stage runs as a subflow in a thread of its own, with a copy of
    the parent's context (as the study's loop runs a training)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(contextvars.copy_context().run, _stage).result()


@pytest.fixture
def beats(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The heartbeats the flow engine emits (the first goes out as the flow starts)."""
    sent: list[Any] = []
    monkeypatch.setattr(
        FlowRunEngine, "_emit_flow_run_heartbeat", lambda self, *args: sent.append(args)
    )
    monkeypatch.setattr(prefect_server, "ready", lambda: None)
    return sent


@pytest.mark.parametrize(
    ("own_server", "sent"),
    [(True, 0), (False, 2)],  # on a user's server: the parent's first and the stage's first
    ids=["the command's own server: none", "a user's server: kept"],
)
def test_flows_send_heartbeats_only_on_a_server_the_user_runs(
    beats: list[Any], monkeypatch: pytest.MonkeyPatch, own_server: bool, sent: int
) -> None:
    monkeypatch.setattr(prefect_server, "running", lambda: own_server)
    with _untraced(verbose=False):
        assert _probe() == 1
    assert len(beats) == sent
