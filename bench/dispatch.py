"""Dispatch benchmark: the round trip of a no-op stage through each way to run it elsewhere.

Starts a Prefect server (SQLite, loopback, in a temporary folder) and, for each route, the
long-lived processes it needs; then runs a no-op stage ``n -> n + 1`` N times in a row and
times each call from the submission to its result back in this process (result read
included). Routes, each written ``NAME`` or ``NAME@POLL`` (seconds between the worker's
queries for scheduled runs):

- ``process``: ``run_deployment`` of a flow deployment on a ``process`` work pool, served
  by ``prefect worker start --type process`` (a new Python process per flow run);
- ``serve``: ``run_deployment`` of a deployment served by ``flow.serve()`` in a long-lived
  process (no work pool; still a new process per flow run; its poll is whole seconds);
- ``task``: ``task.delay()`` on a long-lived ``prefect.task_worker.serve(task, limit=1)``
  (pushed over a websocket, run in a thread of the worker; no flow run, no work pool);
- ``prefork``: ``run_deployment`` on a ``process`` work pool served by a process worker
  that imports the stage flows once and forks each flow run, in its own process, from a
  warm fork server (``PreforkWorker`` below);
- ``lean``: the same pool and fork server, but the forked process runs only the stage's
  function, without Prefect's flow engine: the worker itself marks the run RUNNING and
  then COMPLETED or FAILED by the process's exit code, and the stage leaves its outcome
  where the parent reads it (a file here; the trial's MLflow run in edgetune), as
  edgetune's stages already do (``LeanWorker`` below).

The parent waits for a flow run the way ``.delay()``'s future waits for a task run: on the
server's events (``--parent-poll S`` polls the flow run every S seconds instead, as
``DeploymentStages`` does). Every result is persisted to a folder all processes share.
It prints median, nearest-rank p95, min and max per route, and the median of each phase
of a round trip, read from the run's states afterwards (see ``PHASES``).

    python -m bench.dispatch --repeats 20
    python -m bench.dispatch --repeats 5 --routes process@2,task,prefork@0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from abc import ABC, abstractmethod
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, task

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOW_NAME = "bench-noop"
DEFAULT_ROUTES = "process@2,serve@1,task,prefork@2,prefork@0.2"
CALL_TIMEOUT_S = 120.0


@flow(name=FLOW_NAME, persist_result=True, validate_parameters=False)
def noop_flow(n: int) -> int:
    return n + 1


@flow(name="bench-noop-stage", validate_parameters=False)
def noop_stage(n: int) -> None:
    """The no-op as a stage: its outcome left where the parent reads it (``edgetune worker``
    runs it without the flow engine, as it runs edgetune's stages)."""
    from prefect.runtime import flow_run

    path = lean_outcome(str(flow_run.id))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(n + 1))


@task(name="bench-noop-task", persist_result=True)
def noop_task(n: int) -> int:
    return n + 1


# ---------------------------------------------------------------- statistics and report


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p95: float
    min: float
    max: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below."""
    if not values:
        raise ValueError("percentile of no values: measure at least one round trip")
    if not 0 < q <= 100:
        raise ValueError(f"0 < q <= 100 must hold, but got q={q}")
    ordered = sorted(values)
    return ordered[math.ceil(q / 100 * len(ordered)) - 1]


def summarise(seconds: list[float]) -> Summary:
    return Summary(
        n=len(seconds),
        median=statistics.median(seconds),
        p95=percentile(seconds, 95),
        min=min(seconds),
        max=max(seconds),
    )


@dataclass(frozen=True)
class RouteSpec:
    kind: str
    poll: float | None  # seconds between a worker's queries; None: pushed, no poll

    @property
    def label(self) -> str:
        return self.kind if self.poll is None else f"{self.kind}@{self.poll:g}"


KINDS = ("process", "serve", "task", "prefork", "lean", "stage")


def parse_routes(text: str) -> list[RouteSpec]:
    """``process@2,task`` -> routes; the pushed ``task`` route takes no poll."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, poll = item.partition("@")
        if kind not in KINDS:
            raise ValueError(f"route {item!r}: the kind must be one of {', '.join(KINDS)}")
        if kind == "task":
            if poll:
                raise ValueError(f"route {item!r}: task workers are pushed to; write 'task'")
            specs.append(RouteSpec(kind, None))
            continue
        seconds = float(poll) if poll else 2.0
        if seconds <= 0 or (kind == "serve" and seconds != int(seconds)):
            raise ValueError(
                f"route {item!r}: the poll must be > 0 s (whole seconds for serve), "
                f"but got {poll!r}"
            )
        specs.append(RouteSpec(kind, seconds))
    if not specs:
        raise ValueError(f"no route in {text!r}; name some, e.g. {DEFAULT_ROUTES}")
    return specs


#: One round trip, split at the run's first PENDING, RUNNING and COMPLETED state: until a
#: worker took it, until it ran, the run itself, until its result was back in the parent.
PHASES = ("queued", "starting", "running", "back")


def phases(submitted: float, marks: dict[str, float], returned: float) -> dict[str, float]:
    """Seconds per phase from wall-clock times; a state the run never entered takes no time."""
    points = [submitted]
    for state in ("PENDING", "RUNNING", "COMPLETED"):
        points.append(max(points[-1], marks.get(state, points[-1])))
    points.append(returned)
    return {
        name: end - begin for name, begin, end in zip(PHASES, points[:-1], points[1:], strict=True)
    }


@dataclass(frozen=True)
class Row:
    route: str
    pool: str  # "name (limit N)" or "none"
    ui: str  # what the Prefect UI shows for one stage
    summary: Summary
    phases: dict[str, float]  # median seconds per phase


def table(rows: list[Row]) -> str:
    lines = [
        "| route | work pool (limit) | in the UI | n | median s | p95 s | min s | max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row.summary
        lines.append(
            f"| {row.route} | {row.pool} | {row.ui} | {s.n} | {s.median:.3f} | {s.p95:.3f} "
            f"| {s.min:.3f} | {s.max:.3f} |"
        )
    return "\n".join(lines)


def phase_table(rows: list[Row]) -> str:
    lines = ["| route | " + " | ".join(f"{name} s" for name in PHASES) + " |"]
    lines.append("|---|" + "---|" * len(PHASES))
    for row in rows:
        cells = " | ".join(f"{row.phases[name]:.3f}" for name in PHASES)
        lines.append(f"| {row.route} | {cells} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- processes


class Processes:
    """The long-lived processes this benchmark starts, each in a process group of its own,
    so that stopping one also stops the flow-run processes it started."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, env=env, cwd=self.logs, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self.started.append((name, process))

    def check(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {process.returncode}; see {self.logs / name}.log"
                )

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            _stop_group(process)
        self.started.clear()


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM twice (Prefect workers ignore the first), then SIGKILL, to the whole group."""
    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; its children get the last word
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        break


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, processes: Processes, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        processes.check()
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url} within {timeout_s:g} s")


def server_environment(work: Path) -> dict[str, str]:
    """What the server and every client share: one API, one result folder, no telemetry."""
    port = _free_port()
    return {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work / 'prefect.db'}",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(work / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_CLI_PROMPT": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def start_server(env: dict[str, str], processes: Processes) -> None:
    port = env["PREFECT_SERVER_API_PORT"]
    processes.start(
        "server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port,
         "--analytics-off"],
        env,
    )  # fmt: skip
    _wait_healthy(f"{env['PREFECT_API_URL']}/health", processes)


# ---------------------------------------------------------------- routes


class Route(ABC):
    """One way for the parent to run a stage on another process.

    ``start`` brings up the long-lived processes the route needs (through ``processes``,
    which stops them) and whatever the server must know (pools, deployments); ``call``
    runs the no-op once, blocks until its result is back in this process and returns it.
    ``pool`` and ``ui`` say what an operator sees of one stage in the Prefect UI.
    """

    def __init__(self, spec: RouteSpec, parent_poll: float) -> None:
        self.spec = spec
        self.parent_poll = parent_poll
        self.pool = "none"
        self.ui = "flow run"
        self.last_run: UUID | None = None  # the flow or task run of the last call

    def state_marks(self, run_id: UUID) -> dict[str, float]:
        """When the run first entered each state type (epoch seconds)."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            states = client.read_flow_run_states(run_id)
        return _first_times(states)

    @property
    def slug(self) -> str:
        return self.spec.label.replace("@", "-").replace(".", "_")

    @abstractmethod
    def start(self, env: dict[str, str], processes: Processes) -> None: ...

    @abstractmethod
    def call(self, n: int) -> int: ...


def _first_times(states: list[Any]) -> dict[str, float]:
    marks: dict[str, float] = {}
    for state in sorted(states, key=lambda state: state.timestamp):
        marks.setdefault(state.type.value, state.timestamp.timestamp())
    return marks


def _internal(*args: str) -> list[str]:
    """A subcommand of this module, run so that the flow and the task keep this module's
    name (``bench.dispatch``, never ``__main__``) in entrypoints and task keys."""
    code = "import sys; from bench.dispatch import main; sys.exit(main())"
    return [sys.executable, "-c", code, *args]


def _poll_env(env: dict[str, str], poll: float | None) -> dict[str, str]:
    assert poll is not None
    return {
        **env,
        "PREFECT_WORKER_QUERY_SECONDS": f"{poll:g}",
        "PREFECT_RUNNER_POLL_FREQUENCY": str(max(1, round(poll))),
    }


class DeploymentRoute(Route):
    """``run_deployment`` of the no-op flow, its result read from the persisted state."""

    deployment = ""
    pool_name: str | None = None

    def call(self, n: int) -> int:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.futures import PrefectFlowRunFuture

        flow_run: Any = run_deployment(
            self.deployment, parameters={"n": n}, timeout=0, as_subflow=False
        )
        self.last_run = flow_run.id
        if flow_run.work_pool_name != self.pool_name:
            raise RuntimeError(
                f"route {self.spec.label}: the flow run is on pool {flow_run.work_pool_name!r}, "
                f"not {self.pool_name!r}"
            )
        if self.parent_poll <= 0:
            return int(PrefectFlowRunFuture(flow_run.id).result(timeout=CALL_TIMEOUT_S))
        deadline = time.monotonic() + CALL_TIMEOUT_S
        with get_client(sync_client=True) as client:
            while flow_run.state is None or not flow_run.state.is_final():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"flow run {flow_run.id} did not end in time")
                time.sleep(self.parent_poll)
                flow_run = client.read_flow_run(flow_run.id)
        return int(flow_run.state.result())


class PoolRoute(DeploymentRoute):
    """A deployment on a ``process`` work pool with a concurrency limit of 1 (as ``edge``)."""

    def deploy(self, stage: Any) -> str:
        """The pool of this route (limit 1) and a deployment of ``stage`` on it."""
        from prefect.client.orchestration import get_client
        from prefect.deployments.runner import EntrypointType

        from tasks.deploy import ensure_pool

        pool = f"dispatch-{self.slug}"
        with get_client(sync_client=True) as client:
            ensure_pool(client, pool, 1)
        deployment: Any = stage.to_deployment(  # sync here: not a coroutine
            name=pool, entrypoint_type=EntrypointType.MODULE_PATH
        )
        deployment.apply(work_pool_name=pool)
        self.deployment, self.pool_name = f"{stage.name}/{pool}", pool
        self.pool = f"{pool} (limit 1)"
        return pool

    def start(self, env: dict[str, str], processes: Processes) -> None:
        pool = self.deploy(noop_flow)
        command = (
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
            if self.spec.kind == "process"
            else _internal(f"{self.spec.kind}-worker", pool)
        )
        processes.start(
            f"worker-{self.slug}", [*command, "--name", pool], _poll_env(env, self.spec.poll)
        )


class ServeRoute(DeploymentRoute):
    """``flow.serve(limit=1)`` in a process of its own: a deployment without a work pool."""

    def start(self, env: dict[str, str], processes: Processes) -> None:
        name = f"dispatch-{self.slug}"
        command = _internal("serve-flow", name)
        processes.start(f"serve-{self.slug}", command, _poll_env(env, self.spec.poll))
        self.deployment = f"{FLOW_NAME}/{name}"
        self.pool = "none (serve limit 1)"
        _wait_for_deployment(self.deployment, processes)


class TaskRoute(Route):
    """``noop_task.delay(n)`` on a task worker; the result read back through its future."""

    def start(self, env: dict[str, str], processes: Processes) -> None:
        command = _internal("serve-task")
        processes.start(f"task-worker-{self.slug}", command, env)
        self.pool = "none (worker limit 1)"
        self.ui = "task run, no flow run"

    def call(self, n: int) -> int:
        future = noop_task.delay(n)
        self.last_run = future.task_run_id
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            try:
                return int(future.result(timeout=max(deadline - time.monotonic(), 0.0)))
            except RuntimeError as exc:
                # Prefect's future reads the task run once before it waits, and gives up
                # if the run has no state yet: its first state can come a moment after
                # ``.delay()`` returned. The wait counts in the round trip.
                if "has no state" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def state_marks(self, run_id: UUID) -> dict[str, float]:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            states = client.read_task_run_states(run_id)
        return _first_times(states)


class LeanRoute(PoolRoute):
    """The pool route, its stage's outcome read where the stage left it (not a result)."""

    def call(self, n: int) -> int:
        from prefect.deployments import run_deployment
        from prefect.futures import PrefectFlowRunFuture

        flow_run: Any = run_deployment(
            self.deployment, parameters={"n": n}, timeout=0, as_subflow=False
        )
        self.last_run = flow_run.id
        future = PrefectFlowRunFuture(flow_run.id)
        future.wait(timeout=CALL_TIMEOUT_S)
        if not future.state.is_completed():
            raise RuntimeError(f"flow run {flow_run.id} ended {future.state.type.value}")
        return int(json.loads(lean_outcome(str(flow_run.id)).read_text()))


class StageRoute(LeanRoute):
    """``edgetune worker`` (edgetune's stage worker) on a pool with a limit of 1, serving the
    no-op stage flow."""

    def start(self, env: dict[str, str], processes: Processes) -> None:
        pool = self.deploy(noop_stage)
        assert self.spec.poll is not None
        command = [
            str(BIN / "edgetune"), "worker", "--pool", pool, "--name", pool, "--limit", "1",
            "--poll", f"{self.spec.poll:g}", "--stage", "bench.dispatch:noop_stage",
        ]  # fmt: skip
        path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        processes.start(f"worker-{self.slug}", command, {**env, "PYTHONPATH": path})


ROUTES: dict[str, type[Route]] = {
    "stage": StageRoute,
    "process": PoolRoute,
    "prefork": PoolRoute,
    "lean": LeanRoute,
    "serve": ServeRoute,
    "task": TaskRoute,
}


def _wait_for_deployment(name: str, processes: Processes, timeout_s: float = 120.0) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            processes.check()
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                time.sleep(0.5)
    raise RuntimeError(f"deployment {name} did not appear within {timeout_s:g} s")


def measure(
    route: Route, repeats: int, warmup: int, first: int
) -> tuple[list[float], list[dict[str, float]]]:
    """``warmup`` calls untimed (they also wait for the route to come up), then ``repeats``;
    each timed call's seconds and, read from its states afterwards, its phases."""
    seconds, timed = [], []
    for i in range(warmup + repeats):
        n = first + i  # a new input each call: each result read back is checked
        submitted, started = time.time(), time.perf_counter()
        value = route.call(n)
        elapsed, returned = time.perf_counter() - started, time.time()
        if value != n + 1:
            raise RuntimeError(
                f"route {route.spec.label}: no-op({n}) returned {value}, not {n + 1}"
            )
        if i >= warmup:
            seconds.append(elapsed)
            assert route.last_run is not None
            timed.append((route.last_run, submitted, returned))
    split = [phases(a, route.state_marks(run), b) for run, a, b in timed]
    return seconds, split


def median_phases(split: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(one[name] for one in split) for name in PHASES}


# ---------------------------------------------------------------- the prefork worker


def _fork_context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bench.dispatch", "prefect.engine", "prefect.flow_engine"])
    return context


def run_flow_run(flow_run_id: str, env: dict[str, str], reread_settings: bool) -> None:
    """What ``python -m prefect.engine`` does, in a process forked with Prefect imported.

    The fork server read Prefect's settings from the worker's environment; they are read
    again (about 0.1 s) only if the job's environment changes one.
    """
    os.environ.update(env)
    from prefect._internal.control_listener import configure_from_env
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import flow_run_logger, load_flow, load_flow_run, run_flow

    configure_from_env()
    run_id = UUID(flow_run_id)
    with client_settings() if reread_settings else nullcontext(), handle_engine_signals(run_id):
        flow_run = load_flow_run(flow_run_id=run_id)
        loaded = load_flow(flow_run)
        logger: Any = flow_run_logger(flow_run)  # an adapter, as prefect.engine passes it
        run_flow(loaded, flow_run=flow_run, error_logger=logger)


def _noop() -> None:
    """Started once so that the fork server is up (and has imported) before the first run."""


def prefork_worker_class() -> type[Any]:
    """A ``process`` worker whose flow runs are forked from a fork server that imported the
    stage flows and Prefect once, instead of a new interpreter each; the flow run keeps
    its own process, the pool, its limit, Prefect's cancellation and crash detection."""
    import anyio
    from prefect.flows import load_flow_from_flow_run
    from prefect.runner._flow_run_executor import FlowRunExecutorContext
    from prefect.runner._process_manager import ProcessHandle
    from prefect.workers.base import BaseJobConfiguration
    from prefect.workers.process import ProcessWorker, ProcessWorkerResult

    # Defining a worker of type "process" replaces ProcessWorker in this process's registry.
    warnings.filterwarnings("ignore", message=".*has key 'process'", category=UserWarning)

    class ForkStarter:
        def __init__(self, context: Any, env: dict[str, str | None], channel: Any) -> None:
            self.context, self.env, self.channel = context, env, channel

        async def start(self, flow_run: Any, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            env = {key: value for key, value in self.env.items() if value is not None}
            with suppress(RuntimeError):  # no control channel: cancellation kills the process
                port, token = self.channel.register(flow_run.id)
                env.update({"PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token})
            base = BaseJobConfiguration._base_environment()  # what the worker's settings give
            reread = any(
                base.get(key) != value
                for key, value in env.items()
                if key.startswith("PREFECT_") and not key.startswith("PREFECT__")
            )
            args = (str(flow_run.id), env, reread)
            process = self.context.Process(target=run_flow_run, args=args)
            process.start()
            task_status.started(ProcessHandle(process))
            await anyio.to_thread.run_sync(process.join)

    class PreforkWorker(ProcessWorker):
        context = _fork_context()

        async def run(self, flow_run: Any, configuration: Any, task_status: Any = None) -> Any:
            async with FlowRunExecutorContext() as ctx:
                starter = ForkStarter(self.context, configuration.env, ctx.control_channel)
                executor = ctx.create_executor(
                    flow_run, starter, resolve_flow=load_flow_from_flow_run,
                    propose_submitting=False,
                )  # fmt: skip
                ended: list[Any] = []

                async def execute(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                    ended.append(await executor.submit(task_status=task_status))

                async with anyio.create_task_group() as group:
                    handle = await group.start(execute)
                    if task_status is not None:
                        task_status.started(handle.pid)
            if not ended or ended[0] is None or ended[0].status_code is None:
                raise RuntimeError(f"flow run {flow_run.id}: its process did not start")
            return ProcessWorkerResult(status_code=ended[0].status_code, identifier=str(handle.pid))

    return PreforkWorker


def lean_outcome(flow_run_id: str) -> Path:
    return Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"]) / "lean" / f"{flow_run_id}.json"


def run_stage_only(flow_run_id: str, parameters: dict[str, Any]) -> None:
    """The stage's function alone, in a process forked with it imported; its outcome goes
    where the parent reads it."""
    path = lean_outcome(flow_run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(noop_flow.fn(**parameters)))


def lean_worker_class() -> type[Any]:
    """A ``process`` worker that forks only the stage's function from its fork server and
    sets the flow run's states itself (no flow engine in the child)."""
    import anyio
    from prefect.states import Completed, Failed, Running
    from prefect.workers.process import ProcessWorker, ProcessWorkerResult

    warnings.filterwarnings("ignore", message=".*has key 'process'", category=UserWarning)

    class LeanWorker(ProcessWorker):
        context = _fork_context()

        async def run(self, flow_run: Any, configuration: Any, task_status: Any = None) -> Any:
            await self.client.set_flow_run_state(flow_run.id, Running())
            args = (str(flow_run.id), dict(flow_run.parameters))
            process = self.context.Process(target=run_stage_only, args=args)
            process.start()
            if task_status is not None:
                task_status.started(process.pid)
            await anyio.to_thread.run_sync(process.join)
            code = process.exitcode
            final = Completed() if code == 0 else Failed(message=f"the stage exited {code}")
            await self.client.set_flow_run_state(flow_run.id, final)
            return ProcessWorkerResult(status_code=code or 0, identifier=str(process.pid))

    return LeanWorker


def serve_prefork(pool: str, name: str, lean: bool = False) -> None:
    worker_class = lean_worker_class() if lean else prefork_worker_class()
    warm = worker_class.context.Process(target=_noop)
    warm.start()
    warm.join()

    async def main() -> None:
        async with worker_class(work_pool_name=pool, name=name) as worker:
            await worker.start()

    asyncio.run(main())


# ---------------------------------------------------------------- command line


def header(args: argparse.Namespace, loads: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    from importlib.metadata import version

    wait = (
        "events (the futures' waiter)"
        if args.parent_poll <= 0
        else f"polling every {args.parent_poll:g} s"
    )
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"load average (1, 5, 15 min) at start {_loads(loads[0])}, at end {_loads(loads[1])}\n"
        f"Python {platform.python_version()}; prefect {version('prefect')}; server on SQLite, "
        f"loopback\n"
        f"repeats: {args.repeats} per route after {args.warmup} warm-up calls; calls in series; "
        f"parent waits on {wait}; ROUTE@S = worker polls every S s"
    )


def _loads(load: tuple[float, ...]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def client_settings() -> Any:
    """Prefect read its settings when this module imported it; read them from the
    environment again, now that it names the benchmark's server."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    return SettingsContext(profile=get_settings_context().profile, settings=Settings())


def run_benchmark(args: argparse.Namespace) -> list[Row]:
    specs = parse_routes(args.routes)
    work = Path(tempfile.mkdtemp(prefix="edgetune-dispatch-"))
    (work / "logs").mkdir()
    env = server_environment(work)
    server, workers = Processes(work / "logs"), Processes(work / "logs")
    saved = dict(os.environ)
    rows = []
    try:
        start_server(env, server)
        os.environ.update(env)
        logging.getLogger("prefect").setLevel(logging.WARNING)  # no line per submitted run
        with client_settings():
            for index, spec in enumerate(specs):
                route = ROUTES[spec.kind](spec, args.parent_poll)
                route.start(env, workers)
                first = 1000 * (index + 1)
                seconds, split = measure(route, args.repeats, args.warmup, first)
                workers.stop_all()  # one route's processes at a time on the CPUs
                summary, parts = summarise(seconds), median_phases(split)
                rows.append(Row(spec.label, route.pool, route.ui, summary, parts))
                print(f"{spec.label}: median {rows[-1].summary.median:.3f} s", file=sys.stderr)
    except BaseException:
        print(f"error: the processes' logs are kept in {work / 'logs'}", file=sys.stderr)
        raise
    finally:
        workers.stop_all()
        server.stop_all()
        os.environ.clear()
        os.environ.update(saved)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per route")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--routes", default=DEFAULT_ROUTES, help="NAME[@POLL],...")
    parser.add_argument(
        "--parent-poll", type=float, default=0.0,
        help="seconds between the parent's flow-run reads; 0: wait on events",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve-task", help="(internal) a task worker for the no-op task")
    serve = sub.add_parser("serve-flow", help="(internal) flow.serve() of the no-op flow")
    serve.add_argument("name")
    for kind in ("prefork", "lean"):
        worker = sub.add_parser(f"{kind}-worker", help=f"(internal) the {kind} pool worker")
        worker.add_argument("pool")
        worker.add_argument("--name", required=True)
    args = parser.parse_args(argv)

    if args.command == "serve-task":
        from prefect.task_worker import serve as serve_tasks

        serve_tasks(noop_task, limit=1)
        return 0
    if args.command == "serve-flow":
        noop_flow.serve(name=args.name, limit=1, print_starting_message=False)
        return 0
    if args.command in ("prefork-worker", "lean-worker"):
        serve_prefork(args.pool, args.name, lean=args.command == "lean-worker")
        return 0
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    try:
        parse_routes(args.routes)
    except ValueError as error:
        parser.error(str(error))
    # SIGTERM too unwinds through run_benchmark's cleanup, which stops every process group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = os.getloadavg()
    rows = run_benchmark(args)
    loads = (started, os.getloadavg())
    print(header(args, loads))
    print(table(rows))
    print(
        "\nmedian seconds per phase: queued (until a worker took the run), starting (until it "
        "ran), running, back (until its result was in the parent)"
    )
    print(phase_table(rows))
    if args.json:
        results = [asdict(row) for row in rows]
        args.json.write_text(json.dumps({"header": header(args, loads), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    from bench.dispatch import main as module_main  # the flow's entrypoint is bench.dispatch

    sys.exit(module_main())
