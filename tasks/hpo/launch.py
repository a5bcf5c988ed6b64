"""How the engine launches a trial's stages, and the stages as flow runs on work pools.

The loop (``tasks.hpo.loop``) holds a ``Stages`` object and calls it from its pools'
threads; it never builds one. ``flows/stages.py`` composes the in-process stages (a
Prefect subflow and two tasks); ``DeploymentStages`` here runs each stage as a flow run of
its deployment on the ``gpu``, ``compile`` and ``edge`` pools. Tests drive the loop with
fake stages.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import optuna
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.futures import PrefectFlowRunFuture
from prefect.states import Cancelled, Cancelling, Crashed

from tasks.hpo.optuna_ops import trial_id
from tasks.tracking import Tracker
from tasks.workloads.base import (
    Checked,
    CompileOutcome,
    DeviceOutcome,
    Pruned,
    StageOutcome,
    StudyTarget,
    TrainOutcome,
    load_outcome,
)
from tasks.workloads.registry import workload_for

#: A stage's flow runs are named ``<this>-<trial number>`` (as the stage flows name them).
RUN_NAMES = {"train": "train-trial", "compile": "compile-trial", "device": "evaluate-trial"}

#: Trial user attribute: the last beat of the trial's stage run on a work pool.
ATTR_STAGE_BEAT = "stage_heartbeat"


@dataclass
class Slot:
    """One trial in flight, what its stages need to find their inputs, and where it is."""

    trial: optuna.Trial
    params: dict[str, Any]
    run_id: str
    parent_run_id: str
    stage: str = "train"
    times: dict[str, float] = field(default_factory=dict)
    float_metrics: dict[str, float] = field(default_factory=dict)
    #: A trained model queued for its next stage (compile, or the board), not yet in it.
    waiting: bool = False
    #: Called by ``started`` (the loop asks again: a place in the queue came free).
    on_start: Callable[[], None] | None = field(default=None, repr=False)

    def started(self) -> None:
        """The queued stage began its work: the model no longer waits (``study.max_pending``
        counts the models waiting, not those being compiled or on the board)."""
        if self.waiting:
            self.waiting = False
            if self.on_start is not None:
                self.on_start()

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def trial_id(self) -> int:
        return trial_id(self.trial)


class Stages(Protocol):
    """A trial's stages as the loop calls them, each from a thread of its pools.

    ``prepare`` runs once per study in the parent; ``train`` returns ``Pruned`` when the
    pruner stopped the trial; ``compile`` and ``evaluate`` raise on failure (the loop tells
    the trial FAIL with the reason). ``cancel`` ends the stage runs of trials the loop gave
    up (a no-op where stages run in the loop's own process).

    ``compile`` calls ``slot.started()`` when the compilation begins, and the board's slot
    (``tasks.board.ON_BOARD``, set by the loop) when the evaluation takes the board; until
    then the model counts as waiting. A stage that never says so counts as waiting until
    it returns.
    """

    def prepare(self, parent_run_id: str) -> Checked: ...

    def train(self, slot: Slot) -> TrainOutcome | Pruned: ...

    def compile(self, slot: Slot) -> CompileOutcome: ...

    def evaluate(self, slot: Slot, artifact: str) -> DeviceOutcome: ...

    def cancel(self, trial_numbers: list[int]) -> int: ...


class StageFailed(RuntimeError):
    """A stage's flow run on a work pool did not complete."""


class DeploymentStages:
    """Stages as flow runs of their deployments on the gpu, compile and edge pools.

    Each child reads its inputs from MLflow by run id and leaves its outcome there; the
    parent follows the child's state and its heartbeat in the study storage. A child that
    stays RUNNING without a heartbeat for ``study.stale_after_s`` (its worker or host died)
    is marked CRASHED and its stage fails, so no trial waits for it forever. The config
    travels as the validated config, dumped once (its paths are absolute).
    """

    def __init__(self, config: StudyTarget, storage: optuna.storages.BaseStorage) -> None:
        self.config = config
        self.config_dict = config.model_dump(mode="json")
        self.storage = storage

    def prepare(self, parent_run_id: str) -> Checked:
        return workload_for(self.config).prepare(Tracker(self.config.tracking_uri), parent_run_id)

    def train(self, slot: Slot) -> TrainOutcome | Pruned:
        deployment = self.config.orchestration.train_deployment
        outcome = self._run(deployment, "train", slot, params=slot.params)
        assert isinstance(outcome, TrainOutcome | Pruned)
        return outcome

    def compile(self, slot: Slot) -> CompileOutcome:
        outcome = self._run(self.config.orchestration.compile_deployment, "compile", slot)
        assert isinstance(outcome, CompileOutcome)
        return outcome

    def evaluate(self, slot: Slot, artifact: str) -> DeviceOutcome:
        deployment = self.config.orchestration.device_deployment
        outcome = self._run(deployment, "device", slot, artifact=artifact)
        assert isinstance(outcome, DeviceOutcome)
        return outcome

    def cancel(self, trial_numbers: list[int]) -> int:
        return cancel_stage_runs(self.config.study.name, trial_numbers)

    def _run(self, deployment: str, stage: str, slot: Slot, **parameters: Any) -> StageOutcome:
        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync in a sync context
            deployment,
            parameters={
                "config": self.config_dict,
                "trial_number": slot.number,
                "trial_id": slot.trial_id,
                "run_id": slot.run_id,
                "parent_run_id": slot.parent_run_id,
                **parameters,
            },
            timeout=0,
            tags=[f"study:{self.config.study.name}", f"trial:{slot.number}"],
            # The flows' own run names; a stage worker runs no engine that would set them.
            flow_run_name=f"{RUN_NAMES[stage]}-{slot.number}",
        )
        flow_run = self._follow(flow_run, slot)
        state = flow_run.state
        if state is None or not state.is_completed():
            kind = state.type.value if state else "UNKNOWN"
            message = (state.message if state else None) or "no message"
            raise StageFailed(f"{deployment} run {flow_run.name} ended {kind}: {message}")
        return load_outcome(Tracker(self.config.tracking_uri), slot.run_id, stage)

    def _follow(self, flow_run: FlowRun, slot: Slot) -> FlowRun:
        """Follow a child flow run until it ends, or until it is found dead. It is looked at
        every ``orchestration.poll_interval_s``, at once when a worker starts it (the
        model leaves its queue: the loop may ask again) and at once when it ends (their
        events)."""
        interval = self.config.orchestration.poll_interval_s
        StartWatcher.running()  # listening before the run can start
        with get_client(sync_client=True) as client:
            while True:
                try:
                    flow_run = client.read_flow_run(flow_run.id)
                except Exception:  # the API is restarting: ask again next time
                    until_final(flow_run.id, interval)
                    continue
                state = flow_run.state
                if state is None or state.is_final():
                    return flow_run
                if not state.is_running():  # scheduled or pending: queued in its pool
                    since = state.timestamp.timestamp()
                    StartWatcher.running().wait(flow_run.id, interval, since)
                    continue
                slot.started()  # a compile or edge worker took it (the pool limits them)
                self._check_alive(client, flow_run, slot)
                until_final(flow_run.id, interval)

    def _check_alive(self, client: SyncPrefectClient, flow_run: FlowRun, slot: Slot) -> None:
        """Mark a running child CRASHED, and fail its stage, once its beat is too old."""
        stale_after = self.config.study.stale_after_s
        assert flow_run.state is not None
        beat = stage_beat_at(self.storage, slot.trial_id, str(flow_run.id))
        since = beat if beat is not None else flow_run.state.timestamp.timestamp()
        silent = time.time() - since
        if silent > stale_after:
            message = (
                f"no heartbeat for {silent:.0f} s (limit {stale_after:g} s): its worker "
                f"or host is gone"
            )
            client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
            raise StageFailed(f"{flow_run.name}: {message}")


class StartWatcher:
    """Wakes the followers of queued stage runs when a worker starts them (their RUNNING
    event, or a final one), rather than at their next poll; one subscription to the
    Prefect API's events per process, in a thread of its own, opened again when it drops.
    Without events the followers wait as a poll would."""

    _instance: StartWatcher | None = None
    _instance_lock = threading.Lock()
    #: Starts remembered for a follower that looks after the event came.
    REMEMBERED = 10_000

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._seen: dict[UUID, float] = {}
        self._waiting: dict[UUID, threading.Event] = {}
        context = contextvars.copy_context()  # the caller's Prefect settings (its API)
        threading.Thread(
            target=context.run, args=(asyncio.run, self._listen()), name="stage-starts", daemon=True
        ).start()

    @classmethod
    def running(cls) -> StartWatcher:
        """This process's watcher (a forked child starts its own: it has no thread)."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def wait(self, flow_run_id: UUID, timeout_s: float, since: float) -> None:
        """Up to ``timeout_s``, until the run starts or ends after ``since`` (the time of the
        state it was last read in: a start before it, of a run now queued again for a
        retry, does not count)."""
        with self._lock:
            # taken once: a follower never spins on one event (clocks of hosts may differ)
            if self._seen.pop(flow_run_id, float("-inf")) > since:
                return
            event = self._waiting.setdefault(flow_run_id, threading.Event())
        event.wait(timeout_s)
        with self._lock:
            self._waiting.pop(flow_run_id, None)

    def _saw(self, flow_run_id: UUID, at: float) -> None:
        with self._lock:
            self._seen.pop(flow_run_id, None)  # the newest last: the oldest go first
            self._seen[flow_run_id] = at
            while len(self._seen) > self.REMEMBERED:
                del self._seen[next(iter(self._seen))]
            event = self._waiting.get(flow_run_id)
        if event is not None:
            event.set()

    async def _listen(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        names = [f"prefect.flow-run.{state.name.title()}" for state in _LEFT_QUEUE]
        while True:
            try:
                async with get_events_subscriber(
                    filter=EventFilter(event=EventNameFilter(name=names))
                ) as events:
                    async for event in events:
                        with contextlib.suppress(ValueError):  # not a flow run's id
                            run = UUID(event.resource.id.removeprefix("prefect.flow-run."))
                            self._saw(run, event.occurred.timestamp())
            except Exception:  # the API is restarting: listen again
                await asyncio.sleep(1.0)


#: The states of a run that is no longer queued in its pool.
_LEFT_QUEUE = (
    StateType.RUNNING,
    StateType.COMPLETED,
    StateType.FAILED,
    StateType.CRASHED,
    StateType.CANCELLED,
)


def until_final(flow_run_id: UUID, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for the flow run to end. Its final state's event wakes the
    wait, so the parent reads the outcome at once rather than at its next poll."""
    try:
        PrefectFlowRunFuture(flow_run_id).wait(timeout=timeout_s)
    except Exception:  # the API or its events are restarting: wait as a poll would
        time.sleep(timeout_s)


def stage_beat_at(
    storage: optuna.storages.BaseStorage, trial_id: int, flow_run_id: str
) -> float | None:
    """When the stage run ``flow_run_id`` of a trial last beat, or None if it never did."""
    beat = storage.get_trial(trial_id).user_attrs.get(ATTR_STAGE_BEAT)
    if isinstance(beat, dict) and beat.get("flow_run") == flow_run_id:
        return float(beat["at"])
    return None


def cancel_stage_runs(study_name: str, trial_numbers: Iterable[int]) -> int:
    """Cancel the stage flow runs of these trials that have not ended; returns how many."""
    final = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
    cancelled = 0
    with get_client(sync_client=True) as client:
        for number in trial_numbers:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[f"study:{study_name}", f"trial:{number}"]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=final)),
                )
            )
            for run in runs:
                started = run.state is not None and run.state.is_running()
                state: Any = Cancelling() if started else Cancelled()
                client.set_flow_run_state(run.id, state, force=True)
                cancelled += 1
    return cancelled
