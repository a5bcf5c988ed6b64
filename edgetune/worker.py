"""``edgetune worker``: the worker of the gpu, compile and edge pools, which pays the Python
start-up once.

``prefect worker start --type process`` starts a new interpreter for every flow run: it
imports Prefect, edgetune, MLflow (and torch) again and starts the flow engine, 2.5–4 s a
stage on the development machine (``docs/dispatch-benchmark.md``). This worker imports
them once, into a fork server started with the worker, and forks each run of a stage flow
from it into a process of its own. The child runs the stage's function only: a stage
reports its outcome in the trial's MLflow run and beats in the study storage, so the flow
engine has nothing to add. The worker does what the engine did:

- the run's states: PENDING when the worker takes the run, RUNNING while the child is
  forked (its stage starts once RUNNING is accepted; a run refused it has its child stopped
  before anything ran; meanwhile the child does what the flow's module names in
  ``PREPARE``: an evaluation opens its connection for the board's slot); COMPLETED, or
  FAILED with the stage's error; CRASHED when the child died without a word (the process
  worker's rule). Between PENDING and the stage's work there is one API call where
  Prefect's worker makes five: no "Submitting" state, the worker's labels set beside the
  start, the flow remembered, the deployment for a minute (which also answers Prefect's
  check, before PENDING, that the run's deployment still exists); once a run's final
  state is set, the worker looks for the next run at once (the pool's limit counted the
  run until then), rather than at its next poll;
- the child's logs go to the API under the run (``prefect.runtime.flow_run.id`` names it);
- a run cancelled in the UI or by the study (CANCELLING) has its child stopped (SIGTERM,
  which the stage takes as an exception so that its slots and runs are released, then
  SIGKILL) and ends CANCELLED;
- a worker that stops takes its children with it and marks their runs CRASHED; a worker
  that is killed takes them too (each child watches a pipe to the worker), and the
  study's parent finds the silent run by its heartbeat and retries the trial;
- while a stage runs, the worker looks (every second) at the run that waits next on its
  pool, held back by the pool's limit; when that run's stage flow names something to do
  ahead (``PRESTAGE`` in the flow's module: an evaluation's model fetched and sent to the
  board), a child forked for it does that once, so the board's next run finds its inputs
  there when the lease passes to it. A failure there is a warning in the run's logs: the
  run sends its inputs itself.

To the API and the UI it is a ``process`` worker: the pools, their limits and the runs
stay as they were. It leans on parts of Prefect's worker that are not public API
(``_cancel_run``, ``_cancelling_observer``, ``_release_limit_slot``,
``_mark_flow_run_as_cancelled``, ``_has_successfully_synced``, ``_work_pool``); Prefect is
pinned to 3.8.x, and ``tests/test_stage_worker.py`` exercises each of them. A flow that is not one of the stages (a detector's own training on the
gpu pool, say) runs as the process worker runs it, in a new interpreter.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any, ClassVar
from uuid import UUID

from tasks.runlog import RUN_NAME

#: Deployment entrypoints whose runs are forked and run without the flow engine.
STAGE_ENTRYPOINTS = frozenset(
    {"flows.train:train_trial", "flows.stages:compile_trial", "flows.stages:evaluate_trial"}
)

#: What a pool's fork server imports once (a module that does not import is skipped).
PRELOAD: dict[str, tuple[str, ...]] = {
    "gpu": ("flows.train", "mlflow", "torch", "torchvision", "onnx"),
    "compile": ("flows.stages", "mlflow", "onnx", "onnxruntime"),
    "edge": ("flows.stages", "mlflow", "asyncssh"),
}
DEFAULT_PRELOAD = ("flows.stages", "flows.train", "mlflow")

#: Seconds a stage has to end after SIGTERM before it is killed.
STOP_GRACE_S = 10.0

#: Seconds a deployment and its flow, as read from the API, are remembered (a deployment
#: applied again with another flow or other job variables is seen after this long).
DEPLOYMENT_TTL_S = 60.0

#: Exit code of a child whose worker is gone.
WORKER_GONE = 75

#: Seconds a child doing a waiting run's work ahead may take before it is stopped.
AHEAD_TIMEOUT_S = 300.0

#: Waiting runs remembered as looked at (each is done ahead once).
AHEAD_MEMORY = 256


class WorkerSetupError(RuntimeError):
    """The worker cannot serve the pool it was given (a user's fix is named)."""


def check_pool(pool: str) -> None:
    """The pool exists on the configured Prefect server and is a ``process`` pool; a worker
    started on a misspelt pool would otherwise create it, without its limit, and wait."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    try:
        with get_client(sync_client=True) as client:
            found = client.read_work_pool(pool)
    except ObjectNotFound:
        raise WorkerSetupError(
            f"work pool {pool!r} does not exist; create the pools with `edgetune deploy` "
            f"(gpu, compile, edge) or name one that exists"
        ) from None
    except httpx.HTTPError as exc:
        raise WorkerSetupError(
            f"the Prefect API at {PREFECT_API_URL.value()} does not answer ({exc}); start it "
            f"(infra/services.sh up) or fix PREFECT_API_URL"
        ) from None
    if found.type != "process":
        raise WorkerSetupError(
            f"work pool {pool!r} is of type {found.type!r}; edgetune worker serves process "
            f"pools (create them with `edgetune deploy`)"
        )


class StageCancelled(BaseException):
    """Raised in a stage's process when its run is cancelled (SIGTERM)."""


@dataclass(frozen=True)
class StageJob:
    """What a forked child needs to run one stage flow run."""

    flow_run_id: str
    flow_run_name: str
    flow_name: str
    entrypoint: str
    parameters: dict[str, Any]
    env: dict[str, str]
    cwd: str | None
    #: The job's environment changes one of Prefect's settings: read them again.
    reread_settings: bool


def module_entrypoint(entrypoint: str) -> str:
    """``package.module:function``, also from Prefect's module-path form
    ``package.module.function``; a file path (``flows/train.py:train_trial``) is left as is."""
    if ":" in entrypoint:
        return entrypoint
    module, _, name = entrypoint.rpartition(".")
    return f"{module}:{name}"


def preload_for(pool: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [__name__, *PRELOAD.get(pool, DEFAULT_PRELOAD), *extra]


# ---------------------------------------------------------------- in the forked child


def run_stage(job: StageJob, channel: Connection, go: Any) -> None:
    """The child: the stage's function with the run's environment, once ``go`` is set (the
    run is RUNNING: the child is forked while the worker says so); its outcome (``ok``, or
    the error) goes back over ``channel``, and its logs to the API."""
    _leave_with(channel)
    signal.signal(signal.SIGTERM, _cancelled)
    os.environ.update({**job.env, RUN_NAME: job.flow_run_name})
    if job.cwd:
        os.chdir(job.cwd)
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(
        flow_run_id=UUID(job.flow_run_id), flow_run_name=job.flow_run_name, flow_name=job.flow_name
    )
    outcome: tuple[str, str] = ("ok", "")
    with _settings_from_environment() if job.reread_settings else nullcontext():
        try:
            stage = _stage_function(job.entrypoint)
            _prepare(job, logger)
            go.wait()
            stage(**job.parameters)
        except StageCancelled:
            outcome = ("cancelled", "the run was cancelled")
        except BaseException as exc:  # the run's FAILED state carries it
            logger.error("Encountered exception during execution:", exc_info=True)
            outcome = ("failed", f"Flow run encountered an exception: {type(exc).__name__}: {exc}")
        finally:
            _send_logs()
    channel.send(outcome)


def _prepare(job: StageJob, logger: Any) -> None:
    """What the stage flow's module names in ``PREPARE`` for it, before the run is RUNNING;
    a failure is a warning (the stage does it itself)."""
    module, _, name = job.entrypoint.partition(":")
    prepare = getattr(importlib.import_module(module), "PREPARE", {}).get(name)
    if prepare is None:
        return
    try:
        prepare(**job.parameters)
    except Exception as exc:
        logger.warning(
            "not prepared ahead (%s: %s); the stage does it itself", type(exc).__name__, exc
        )


def run_ahead(job: StageJob, channel: Connection) -> None:
    """The child for a waiting run: what its stage flow's module names in ``PRESTAGE`` for
    it, with the run's parameters and environment; the outcome goes to the run's logs."""
    _leave_with(channel)
    os.environ.update({**job.env, RUN_NAME: job.flow_run_name})
    if job.cwd:
        os.chdir(job.cwd)
    module, _, name = job.entrypoint.partition(":")
    ahead = getattr(importlib.import_module(module), "PRESTAGE", {}).get(name)
    if ahead is None:
        return
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(
        flow_run_id=UUID(job.flow_run_id), flow_run_name=job.flow_run_name, flow_name=job.flow_name
    )
    started = time.monotonic()
    with _settings_from_environment() if job.reread_settings else nullcontext():
        try:
            sent = ahead(**job.parameters)
            seconds = time.monotonic() - started
            logger.info(
                "inputs sent ahead while the run waited (%.2f s)"
                if sent
                else "nothing sent ahead: the inputs were there already (%.2f s)",
                seconds,
            )
        except Exception as exc:  # the run sends its inputs itself
            logger.warning(
                "inputs not sent ahead (%s: %s); the run sends them itself",
                type(exc).__name__,
                exc,
            )
        finally:
            _send_logs()


def _cancelled(signum: int, frame: Any) -> None:
    raise StageCancelled()


def _leave_with(channel: Connection) -> None:
    """End this process when the worker's end of ``channel`` closes (the worker died)."""

    def watch() -> None:
        try:
            while True:
                channel.recv()
        except (EOFError, OSError):
            os._exit(WORKER_GONE)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


@contextmanager
def _settings_from_environment() -> Iterator[None]:
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
        yield


def _stage_function(entrypoint: str) -> Any:
    module, _, name = entrypoint.partition(":")
    found = getattr(importlib.import_module(module), name)
    return getattr(found, "fn", found)  # a flow's own function


def _send_logs() -> None:
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)


# ---------------------------------------------------------------- in the worker


def stage_job(flow_run: Any, configuration: Any, entrypoint: str) -> StageJob:
    """What the child needs of ``flow_run`` under the pool's job ``configuration``."""
    env = {k: v for k, v in configuration.env.items() if v is not None}
    # What the fork server's settings were read from (its environment is this process's),
    # and what they are
    base = configuration._base_environment()
    return StageJob(
        flow_run_id=str(flow_run.id),
        flow_run_name=flow_run.name,
        flow_name=entrypoint.rpartition(":")[2],
        entrypoint=entrypoint,
        parameters=dict(flow_run.parameters),
        env=env,
        cwd=str(configuration.working_dir) if configuration.working_dir else None,
        reread_settings=any(
            value not in (base.get(key), os.environ.get(key))
            for key, value in env.items()
            if key.startswith("PREFECT_") and not key.startswith("PREFECT__")
        ),
    )


def fork_stage(context: Any, job: StageJob) -> tuple[Any, Connection, Any]:
    """The child for ``job``, started and set up, waiting for its go: the process, the
    worker's end of its channel, and the go (an event)."""
    ours, theirs = context.Pipe()
    go = context.Event()
    process = context.Process(
        target=run_stage, args=(job, theirs, go), name=f"stage-{job.flow_run_name}"
    )
    process.start()
    theirs.close()
    return process, ours, go


class Remembering:
    """An API client that remembers, in this process, the deployments it read for
    DEPLOYMENT_TTL_S and the flows it read for good (a flow's id names one flow): each
    stage run would otherwise read both again before it starts. Everything else goes to
    ``client``."""

    _known: ClassVar[dict[tuple[str, UUID], tuple[Any, float]]] = {}

    def __init__(self, client: Any) -> None:
        self._client = client
        self._reads = {"deployment": client.read_deployment, "flow": client.read_flow}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def read_deployment(self, deployment_id: UUID) -> Any:
        read = self._reads["deployment"]
        return await self._read("deployment", deployment_id, read, DEPLOYMENT_TTL_S)

    async def read_flow(self, flow_id: UUID) -> Any:
        return await self._read("flow", flow_id, self._reads["flow"], math.inf)

    @classmethod
    def into(cls, client: Any) -> None:
        """``client`` itself answers its deployment and flow reads from this memory, for
        every caller: Prefect's worker reads a run's deployment before it takes the run
        (to cancel the runs of a deleted deployment), then again for the job's
        configuration; once a minute is enough for both. (Deleting a deployment deletes
        its scheduled runs with it; a run read just before that can still be taken within
        the minute.)"""
        remembering = cls(client)
        client.read_deployment = remembering.read_deployment
        client.read_flow = remembering.read_flow

    async def _read(self, kind: str, key: UUID, read: Any, ttl_s: float) -> Any:
        known = self._known.get((kind, key))
        if known is not None and time.monotonic() - known[1] < ttl_s:
            return known[0]
        found = await read(key)
        self._known[(kind, key)] = (found, time.monotonic())
        return found


def _stop(process: Any, grace_s: float) -> None:
    """SIGTERM (the stage ends its work), then SIGKILL after ``grace_s``."""
    if process.exitcode is None:
        process.terminate()
        process.join(grace_s)
    if process.exitcode is None:
        process.kill()
        process.join(5)


def stage_worker_class() -> type[Any]:
    """The worker class (built on first use: it imports Prefect's worker machinery)."""
    import anyio
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterNextScheduledStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import FlowRun, StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import get_current_settings
    from prefect.states import Completed, Crashed, Failed, Running
    from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

    # A worker of type "process" replaces ProcessWorker in this process's registry: wanted.
    warnings.filterwarnings("ignore", message=".*has key 'process'", category=UserWarning)

    class StageJobConfiguration(ProcessJobConfiguration):
        """The process worker's job configuration, with Prefect's settings as environment
        variables dumped once (25 ms of CPU, twice a run). (The deployment and flow it
        reads come from the worker's memory: ``Remembering.into``.)"""

        _base: ClassVar[tuple[Any, dict[str, str]] | None] = None

        @classmethod
        def _base_environment(cls) -> dict[str, str]:
            settings = get_current_settings()  # the worker's, for its whole life
            if cls._base is None or cls._base[0] is not settings:
                cls._base = (settings, super()._base_environment())
            return dict(cls._base[1])

    class StageWorker(ProcessWorker):
        """A ``process`` worker that forks edgetune's stage runs from a warm fork server."""

        context = multiprocessing.get_context("forkserver")
        job_configuration = StageJobConfiguration
        #: Entrypoints run without the flow engine (``edgetune worker --stage`` adds some).
        stages: frozenset[str] = STAGE_ENTRYPOINTS

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._children: dict[UUID, Any] = {}
            self._cancelled: set[UUID] = set()
            self._ahead_busy = False
            self._looked_ahead: dict[UUID, None] = {}  # oldest first

        async def setup(self) -> None:
            await super().setup()
            Remembering.into(self.client)

        async def run(
            self,
            flow_run: FlowRun,
            configuration: ProcessJobConfiguration,
            task_status: Any = None,
        ) -> ProcessWorkerResult:
            entrypoint = await self._entrypoint(flow_run)
            if entrypoint not in self.stages:
                return await super().run(flow_run, configuration, task_status)
            job = stage_job(flow_run, configuration, entrypoint)
            running, (process, ours, go) = await self._fork_while_running(flow_run, job)
            self._children[flow_run.id] = process
            try:
                if running.status != SetStateStatus.ACCEPT:  # cancelled while it waited
                    await anyio.to_thread.run_sync(_stop, process, STOP_GRACE_S)
                    ours.close()
                    if task_status is not None:  # no stage ran: the run gets no pid to kill
                        task_status.started(RuntimeError(f"{flow_run.name}: not started"))
                    return ProcessWorkerResult(status_code=0, identifier="")
                go.set()
                if task_status is not None:
                    task_status.started(process.pid)
                code = await self._follow(flow_run, process, ours)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._end(flow_run, process)
            return ProcessWorkerResult(status_code=code, identifier=str(process.pid))

        async def _fork_while_running(
            self, flow_run: FlowRun, job: StageJob
        ) -> tuple[Any, tuple[Any, Connection, Any]]:
            """The run set RUNNING while the fork server forks its child (which waits for
            its go): the API's answer, and the child."""
            loop = asyncio.get_running_loop()
            forking = loop.run_in_executor(None, fork_stage, self.context, job)
            try:
                running: Any = await self.client.set_flow_run_state(flow_run.id, Running())
            except BaseException:  # no stage ran: its child goes
                with anyio.CancelScope(shield=True):
                    process, ours, _ = await forking
                    await anyio.to_thread.run_sync(_stop, process, 0.0)
                ours.close()
                raise
            return running, await forking

        async def _entrypoint(self, flow_run: FlowRun) -> str | None:
            """The run's deployment's entrypoint, read at most every DEPLOYMENT_TTL_S."""
            if flow_run.deployment_id is None:
                return None
            deployment = await self.client.read_deployment(flow_run.deployment_id)
            return module_entrypoint(deployment.entrypoint) if deployment.entrypoint else None

        async def _propose_submitting_state(self, flow_run: FlowRun) -> None:
            """A stage goes from PENDING straight to RUNNING: Prefect's "Submitting" state
            is one more round trip before its work starts, for a process forked in
            milliseconds."""
            if await self._entrypoint(flow_run) not in self.stages:
                await super()._propose_submitting_state(flow_run)

        async def _give_worker_labels_to_flow_run(self, flow_run_id: UUID) -> None:
            """The worker's labels go on the run beside its start, not before it (they are
            for the UI's filters: the run goes on without them)."""
            label = super()._give_worker_labels_to_flow_run
            self._soon(f"flow run {flow_run_id}: no worker labels", label, flow_run_id)

        def _soon(self, failed: str, work: Callable[..., Awaitable[Any]], *args: Any) -> None:
            """``work(*args)`` beside the runs; if it fails, a warning that starts ``failed``."""
            assert self._runs_task_group is not None  # runs are submitted within it
            self._runs_task_group.start_soon(self._warn_on_failure, failed, work, *args)

        async def _warn_on_failure(
            self, failed: str, work: Callable[..., Awaitable[Any]], *args: Any
        ) -> None:
            try:
                await work(*args)
            except Exception as exc:
                self._logger.warning("%s: %s", failed, exc)

        async def _follow(self, flow_run: FlowRun, process: Any, channel: Connection) -> int:
            """Wait for the child; set the run's final state from what it sent. Returns the
            exit code the process worker reports (non-zero: the run CRASHED)."""
            looked = False
            while process.exitcode is None:
                self._look_ahead()
                await anyio.to_thread.run_sync(process.join, 1.0)
                if process.exitcode is None and self._cancelling_observer is not None:
                    # The observer forgets a run once it is submitted: watch it again, and
                    # look once for a CANCELLING that came in between.
                    self._cancelling_observer.add_in_flight_flow_run_id(flow_run.id)
                    if not looked:
                        looked = True
                        state = (await self.client.read_flow_run(flow_run.id)).state
                        if state is not None and state.is_cancelling():
                            await self._cancel_run(flow_run.id)
            # The slot is free now, before the run's final state wakes its caller: a run
            # submitted at once is taken at once, not left to the next poll.
            self._release_limit_slot(flow_run.id)
            try:
                outcome = channel.recv() if channel.poll() else None
            except (EOFError, OSError):  # it died while it wrote
                outcome = None
            channel.close()
            if flow_run.id in self._cancelled:
                return 0  # _cancel_run marks it CANCELLED
            if outcome is None:
                return process.exitcode or 1  # died without a word: CRASHED
            kind, message = outcome
            final: Any = {"ok": Completed, "failed": Failed}.get(kind, Crashed)(
                message=message or None
            )
            if kind == "cancelled":  # a SIGTERM not from this worker (its host is stopping)
                final.message = "its process was stopped (SIGTERM) before the stage ended"
            await self.client.set_flow_run_state(flow_run.id, final)
            # A run waiting on this pool is taken now, not at the next poll: the pool's limit
            # counted this run until its final state (the edge pool's limit is one per board,
            # so the next evaluation waits for exactly this). If the look fails, the poll looks.
            self._soon("no look for the next run", self.get_and_submit_flow_runs)
            return 0

        def _look_ahead(self) -> None:
            """Do the next waiting run's work ahead (``run_ahead``), unless that is under
            way already."""
            if not self._ahead_busy:
                self._ahead_busy = True
                self._soon("nothing done ahead", self._ahead)

        async def _ahead(self) -> None:
            try:
                flow_run = await self._next_waiting()
                if flow_run is None or flow_run.id in self._looked_ahead:
                    return
                self._looked_ahead[flow_run.id] = None
                while len(self._looked_ahead) > AHEAD_MEMORY:
                    del self._looked_ahead[next(iter(self._looked_ahead))]
                entrypoint = await self._entrypoint(flow_run)
                if entrypoint in self.stages:
                    await self._run_ahead(flow_run, entrypoint)
            finally:
                self._ahead_busy = False

        async def _next_waiting(self) -> FlowRun | None:
            """The run this pool hands out next (SCHEDULED and due), or None."""
            now = datetime.now(UTC)
            found = await self.client.read_flow_runs(
                work_pool_filter=WorkPoolFilter(
                    name=WorkPoolFilterName(any_=[self._work_pool_name])
                ),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    ),
                    next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=now),
                ),
                sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
                limit=1,
            )
            return found[0] if found else None

        async def _run_ahead(self, flow_run: FlowRun, entrypoint: str) -> None:
            configuration = await self.job_configuration.resolve_for_flow_run(
                flow_run,
                client=self.client,
                work_pool=copy.deepcopy(self.work_pool),
                worker_name=self.name,
                worker_id=self.backend_id,
            )
            job = stage_job(flow_run, configuration, entrypoint)
            ours, theirs = self.context.Pipe()
            process = self.context.Process(
                target=run_ahead, args=(job, theirs), name=f"ahead-{job.flow_run_name}"
            )
            await anyio.to_thread.run_sync(process.start)
            theirs.close()
            try:
                deadline = time.monotonic() + AHEAD_TIMEOUT_S
                while process.exitcode is None and time.monotonic() < deadline:
                    await anyio.to_thread.run_sync(process.join, 1.0)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_stop, process, 0.0)
                ours.close()

        async def _end(self, flow_run: FlowRun, process: Any) -> None:
            """The run is over, or the worker stops: no child is left behind."""
            self._children.pop(flow_run.id, None)
            if self._cancelling_observer is not None:
                self._cancelling_observer.remove_in_flight_flow_run_id(flow_run.id)
            self._cancelled.discard(flow_run.id)
            if process.exitcode is None:
                await anyio.to_thread.run_sync(_stop, process, STOP_GRACE_S)
                message = "its stage worker stopped; the stage was stopped with it"
                try:
                    await self.client.set_flow_run_state(flow_run.id, Crashed(message=message))
                except Exception as exc:  # the API is gone too: the parent's stale check
                    self._logger.warning("%s: not marked CRASHED: %s", flow_run.name, exc)

        async def wake_on_new_runs(self) -> None:
            """Look for runs the moment one is scheduled on this pool (its event), rather
            than at the next poll only. Polling goes on beside it (and alone if the events
            stop)."""
            from prefect.events.clients import get_events_subscriber
            from prefect.events.filters import (
                EventAnyResourceFilter,
                EventFilter,
                EventNameFilter,
            )

            while not self._has_successfully_synced or self._work_pool is None:
                await anyio.sleep(0.2)
            scheduled = EventFilter(
                event=EventNameFilter(name=["prefect.flow-run.Scheduled"]),
                any_resource=EventAnyResourceFilter(id=[f"prefect.work-pool.{self._work_pool.id}"]),
            )
            try:
                async with get_events_subscriber(filter=scheduled) as events:
                    async for _ in events:
                        await self.get_and_submit_flow_runs()
            except Exception as exc:  # the next poll finds the runs
                self._logger.warning("no wake-up on new runs (polling only): %s", exc)

        async def _cancel_run(self, flow_run_id: UUID) -> None:
            process = self._children.get(flow_run_id)
            if process is None:
                await super()._cancel_run(flow_run_id)
                return
            self._cancelled.add(flow_run_id)
            await anyio.to_thread.run_sync(_stop, process, STOP_GRACE_S)
            flow_run = await self.client.read_flow_run(flow_run_id)
            await self._mark_flow_run_as_cancelled(
                flow_run, state_updates={"message": "Cancelled: the worker stopped its stage."}
            )

    return StageWorker


def _warm(context: Any) -> None:
    """Start the fork server now (it imports the preloaded modules) rather than at the
    first run."""
    process = context.Process(target=_nothing)
    process.start()
    process.join()


def _nothing() -> None:
    """Forked once at start-up, so that the fork server is up before the first run."""


def serve(
    pool: str,
    name: str | None,
    limit: int | None,
    poll_s: float,
    preload: tuple[str, ...] = (),
    stages: tuple[str, ...] = (),
) -> None:
    """Run a stage worker for ``pool`` until it is stopped (SIGINT or SIGTERM: its running
    stages are stopped and their runs marked CRASHED)."""
    # Before Prefect reads its settings; the fork server's children see the same value.
    os.environ["PREFECT_WORKER_QUERY_SECONDS"] = repr(poll_s)
    # Prefect's cancellation observer (off by default): it tells the worker of CANCELLING.
    os.environ["PREFECT_WORKER_ENABLE_CANCELLATION"] = "true"
    import anyio
    from prefect.settings import (
        PREFECT_WORKER_ENABLE_CANCELLATION,
        PREFECT_WORKER_QUERY_SECONDS,
        temporary_settings,
    )

    worker_class = stage_worker_class()
    extra = {module_entrypoint(entrypoint) for entrypoint in stages}
    worker_class.stages = STAGE_ENTRYPOINTS | extra
    modules = tuple(entrypoint.partition(":")[0] for entrypoint in sorted(extra))
    worker_class.context.set_forkserver_preload(preload_for(pool, preload + modules))
    _warm(worker_class.context)
    logging.getLogger(__name__).info("fork server ready for pool %s", pool)

    async def main() -> None:
        worker = worker_class(work_pool_name=pool, name=name, limit=limit)
        stop = anyio.CancelScope()
        # The handlers stay until the worker has stopped: a second signal does not cut the
        # stop short (its stages' runs are still being marked).
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as group:

                async def run_worker() -> None:
                    with stop:
                        async with anyio.create_task_group() as inner:
                            inner.start_soon(worker.wake_on_new_runs)
                            await worker.start()
                            inner.cancel_scope.cancel()
                    group.cancel_scope.cancel()

                group.start_soon(run_worker)
                async for _ in signals:
                    stop.cancel()

    settings = {PREFECT_WORKER_QUERY_SECONDS: poll_s, PREFECT_WORKER_ENABLE_CANCELLATION: True}
    with temporary_settings(settings):
        anyio.run(main)
