"""``edgetune worker`` on the real Prefect test server: stage runs forked from a warm fork
server, with the states, logs, cancellation and crash handling the flow engine gave them.

The worker runs as users run it (``edgetune worker --pool …``, a process of its own) on a
``process`` pool with a limit, and serves the stage flows of ``tests/fakes/stageflows.py``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Cancelling

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "stage-worker-test"
STAGES = {
    "ok": "stageflows:ok_stage",
    "failing": "stageflows:failing_stage",
    "slow": "stageflows:slow_stage",
    "plain": "stageflows:plain_flow",
}


def _deployments(client: SyncPrefectClient, pool: str = POOL, limit: int = 2) -> dict[str, UUID]:
    """One deployment per test flow on a process pool with a limit (2 unless told); a
    deployment's name is the flow's and the pool's, so that each pool has its own."""
    from prefect.exceptions import ObjectAlreadyExists

    with contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process", concurrency_limit=limit))
    ids = {}
    for key, entrypoint in STAGES.items():
        flow_id = client.create_flow_from_name(entrypoint.split(":")[1].replace("_", "-"))
        ids[key] = client.create_deployment(
            flow_id=flow_id, name=f"{key}-{pool}", entrypoint=entrypoint, work_pool_name=pool
        )
    return ids


def _start_worker(
    tmp: Path, name: str, pool: str = POOL, poll: str = "0.2"
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PREFECT_API_URL": str(get_current_settings().api.url),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fakes"), str(ROOT)]),
        "STAGE_PROBE": "from-the-worker",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    command = [str(BIN / "edgetune"), "worker", "--pool", pool, "--name", name, "--poll", poll]
    for entrypoint in list(STAGES.values())[:-1]:  # the plain flow is not a stage
        command += ["--stage", entrypoint]
    log = (tmp / f"{name}.log").open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


def _wait_online(
    client: SyncPrefectClient, name: str, process: subprocess.Popen[bytes], pool: str = POOL
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the worker exited {process.returncode}"
        if any(
            w.name == name and w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool)
        ):
            return
        time.sleep(0.5)
    raise AssertionError(f"worker {name} not online after 120 s")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("stage-worker")
    with get_client(sync_client=True) as client:
        ids = _deployments(client)
        process = _start_worker(tmp, "stage-1")
        try:
            _wait_online(client, "stage-1", process)
            yield {"ids": ids, "process": process, "tmp": tmp, "client": client}
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(30)


def _run(worker: dict[str, Any], key: str, **parameters: Any) -> FlowRun:
    client: SyncPrefectClient = worker["client"]
    return client.create_flow_run_from_deployment(worker["ids"][key], parameters=parameters)


def _final(client: SyncPrefectClient, run: FlowRun, timeout: float = 60) -> FlowRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(0.2)
    raise AssertionError(f"{run.name} still {run.state} after {timeout:g} s")


def _until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_a_stage_runs_forked_with_its_run_id_logs_and_states(
    worker: dict[str, Any], tmp_path: Path
) -> None:
    client: SyncPrefectClient = worker["client"]
    out = tmp_path / "ok.json"
    run = _final(client, _run(worker, "ok", out=str(out), value=41))
    assert run.state is not None and run.state.is_completed(), run.state
    seen = json.loads(out.read_text())
    assert seen["flow_run_id"] == str(run.id)  # prefect.runtime names the run in the child
    assert seen["value"] == 41 and seen["env"] == "from-the-worker"
    assert seen["pid"] != worker["process"].pid  # a process of its own
    assert run.infrastructure_pid == str(seen["pid"])
    assert seen["state"] == "RUNNING"  # its work starts once the run is RUNNING
    # taken, then running: no "Submitting" round trip between them
    states = sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
    assert [(s.type.value, s.name) for s in states] == [
        ("SCHEDULED", "Scheduled"),
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("COMPLETED", "Completed"),
    ]
    # the worker's labels, set beside the start rather than before it
    label = _until(
        lambda: client.read_flow_run(run.id).labels.get("prefect.worker.name"),
        15,
        "the worker's labels on the run",
    )
    assert label == "stage-1"
    logs = _until(
        lambda: [
            log.message
            for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            if "ok-stage saw value 41" in log.message
        ],
        15,
        "the stage's log line in the API",
    )
    assert logs == ["ok-stage saw value 41"]
    # and on the worker's console, under the run's name
    console = (worker["tmp"] / "stage-1.log").read_text()
    assert f"Flow run '{run.name}' - ok-stage saw value 41" in console


def test_a_failing_stage_ends_failed_with_its_error(worker: dict[str, Any], tmp_path: Path) -> None:
    client: SyncPrefectClient = worker["client"]
    run = _final(client, _run(worker, "failing", out=str(tmp_path / "f.json")))
    assert run.state is not None and run.state.type.value == "FAILED", run.state
    assert "ValueError: the stage's input is bad: fix it" in str(run.state.message)


def test_a_flow_that_is_not_a_stage_runs_as_the_process_worker_runs_it(
    worker: dict[str, Any], tmp_path: Path
) -> None:
    client: SyncPrefectClient = worker["client"]
    out = tmp_path / "plain.json"
    run = _final(client, _run(worker, "plain", out=str(out)), timeout=120)
    assert run.state is not None and run.state.is_completed(), run.state
    assert json.loads(out.read_text())["flow_run_id"] == str(run.id)


def test_cancelling_a_stage_stops_its_process_which_cleans_up(
    worker: dict[str, Any], tmp_path: Path
) -> None:
    client: SyncPrefectClient = worker["client"]
    out = tmp_path / "slow.json"
    run = _run(worker, "slow", out=str(out), seconds=120)
    _until(out.exists, 30, "the slow stage to start")
    pid = json.loads(out.read_text())["pid"]
    client.set_flow_run_state(run.id, Cancelling(), force=True)
    run = _final(client, run, timeout=30)
    assert run.state is not None and run.state.type.value == "CANCELLED", run.state
    assert out.with_suffix(".ended").read_text() == "cleaned up"  # SIGTERM, then its finally
    _until(lambda: not _alive(pid), 10, "the stage's process to end")


@contextlib.contextmanager
def _slow_stage_on_another_worker(
    worker: dict[str, Any], tmp_path: Path, name: str
) -> Iterator[tuple[subprocess.Popen[bytes], FlowRun, int]]:
    """A second worker running a slow stage (the first one paused meanwhile, so that it
    takes nothing): the worker, the run and the stage's pid."""
    client: SyncPrefectClient = worker["client"]
    worker["process"].send_signal(signal.SIGSTOP)
    try:
        other = _start_worker(tmp_path, name)
        _wait_online(client, name, other)
        out = tmp_path / "slow.json"
        run = _run(worker, "slow", out=str(out), seconds=120)
        _until(out.exists, 30, "the slow stage to start")
        yield other, run, json.loads(out.read_text())["pid"]
    finally:
        worker["process"].send_signal(signal.SIGCONT)


def test_a_stopped_worker_stops_its_stages_and_marks_them_crashed(
    worker: dict[str, Any], tmp_path: Path
) -> None:
    """SIGTERM to a worker: its stage stops and its run ends CRASHED at once (the study's
    parent fails the stage then, without waiting for the heartbeat to go stale)."""
    with _slow_stage_on_another_worker(worker, tmp_path, "stage-2") as (second, run, pid):
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    run = _final(worker["client"], run, timeout=10)
    assert run.state is not None and run.state.type.value == "CRASHED", run.state
    assert "stage worker stopped" in str(run.state.message)
    assert not _alive(pid)


def test_a_killed_worker_takes_its_stages_with_it(worker: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL, no goodbye: the stage's process ends too (it watches a pipe to the worker);
    its run stays RUNNING for the study's parent to find by its silent heartbeat."""
    client: SyncPrefectClient = worker["client"]
    with _slow_stage_on_another_worker(worker, tmp_path, "stage-3") as (third, run, pid):
        third.kill()
        third.wait(10)
        _until(lambda: not _alive(pid), 10, "the stage's process to end with its worker")
    assert client.read_flow_run(run.id).state.type.value == "RUNNING"  # type: ignore[union-attr]
    client.set_flow_run_state(run.id, Cancelled(), force=True)  # nobody else will end it


def test_a_worker_on_a_pool_that_does_not_exist_says_so_and_creates_nothing(
    tmp_path: Path,
) -> None:
    """Prefect's own worker would create the misspelt pool (without its limit) and wait."""
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    done = subprocess.run(
        [str(BIN / "edgetune"), "worker", "--pool", "gpuu"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: work pool 'gpuu' does not exist; create the pools with `edgetune deploy` "
        "(gpu, compile, edge) or name one that exists"
    ]
    with get_client(sync_client=True) as client:
        assert "gpuu" not in [pool.name for pool in client.read_work_pools()]


def test_a_run_held_back_by_the_pools_limit_is_taken_as_the_running_one_ends(
    tmp_path: Path,
) -> None:
    """On a pool whose limit is 1 (the edge pool's, per board) the next run waits for the
    running one's final state; the worker takes it then, not at its next poll (600 s here;
    every 0.25 s on the edge pool, where the board idled up to that much more between two
    evaluations)."""
    pool = "stage-worker-limit-1"
    with get_client(sync_client=True) as client:
        ids = _deployments(client, pool, limit=1)
        first_out, second_out = tmp_path / "first.json", tmp_path / "second.json"
        first = client.create_flow_run_from_deployment(
            ids["slow"], parameters={"out": str(first_out), "seconds": 5}
        )
        worker = _start_worker(tmp_path, "limit-1", pool, poll="600")
        try:
            _wait_online(client, "limit-1", worker, pool)
            _until(first_out.exists, 60, "the first run to start (the worker's first look)")
            second = client.create_flow_run_from_deployment(
                ids["ok"], parameters={"out": str(second_out), "value": 1}
            )
            first = _final(client, first)
            second = _final(client, second, timeout=30)
        finally:
            worker.terminate()
            worker.wait(30)
        states = {
            run.id: {s.type.value: s.timestamp for s in client.read_flow_run_states(run.id)}
            for run in (first, second)
        }
    assert first.state is not None and first.state.is_completed(), first.state
    assert second.state is not None and second.state.is_completed(), second.state
    assert json.loads(second_out.read_text())["value"] == 1
    # the pool's limit held the second run until the first one's end
    assert states[second.id]["PENDING"] >= states[first.id]["COMPLETED"]


def _run_logs(client: SyncPrefectClient, run: FlowRun, text: str) -> list[str]:
    found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return [log.message for log in found if text in log.message]


def test_the_run_waiting_next_has_its_work_done_ahead_while_the_pools_limit_holds_it(
    tmp_path: Path,
) -> None:
    """On a pool whose limit is 1 (the edge pool's, per board) the worker does the waiting
    run's ``PRESTAGE`` work (an evaluation's model sent to the board) while the run before
    it runs: once, in a process of its own, before the run starts. A failure there is a
    warning in the waiting run's logs, and the run goes on."""
    pool = "stage-worker-ahead"
    with get_client(sync_client=True) as client:
        ids = _deployments(client, pool, limit=1)
        outs = [tmp_path / "first.json", tmp_path / "second.json", tmp_path / "fail-ahead.json"]
        # each run holds the pool until the next one's work ahead is done (or 60 s)
        ahead_of = [outs[1].with_suffix(".ahead"), outs[2].with_suffix(".tried")]
        runs = [
            client.create_flow_run_from_deployment(
                ids["slow"],
                parameters={"out": str(outs[0]), "seconds": 60, "until": str(ahead_of[0])},
            )
        ]
        worker = _start_worker(tmp_path, "ahead-1", pool)
        try:
            _wait_online(client, "ahead-1", worker, pool)
            _until(outs[0].exists, 60, "the first run to start")
            for out, seconds, until in ((outs[1], 60, ahead_of[1]), (outs[2], 0, None)):
                parameters = {"out": str(out), "seconds": seconds, "until": until and str(until)}
                runs.append(
                    client.create_flow_run_from_deployment(ids["slow"], parameters=parameters)
                )
                time.sleep(0.1)  # the third is scheduled after the second
            runs = [_final(client, run, timeout=120) for run in runs]
            failed = _until(lambda: _run_logs(client, runs[2], "not sent ahead"), 15, "the warning")
            sent = _run_logs(client, runs[1], "inputs sent ahead while the run waited")
        finally:
            worker.terminate()
            worker.wait(30)
        running = {
            run.id: next(s.timestamp for s in client.read_flow_run_states(run.id) if s.is_running())
            for run in runs
        }
    assert all(run.state is not None and run.state.is_completed() for run in runs), [
        run.state for run in runs
    ]
    ahead = [json.loads(line) for line in outs[1].with_suffix(".ahead").read_text().splitlines()]
    assert len(ahead) == 1, ahead  # once
    assert ahead[0]["at"] < running[runs[1].id].timestamp()  # before the run started
    assert ahead[0]["pid"] != json.loads(outs[1].read_text())["pid"]
    assert not outs[0].with_suffix(".ahead").exists()  # the first run did not wait
    assert len(sent) == 1, sent
    assert failed == [
        "inputs not sent ahead (OSError: the board's disk is full); the run sends them itself"
    ]


def _gate_job(out: Path) -> Any:
    from edgetune.worker import StageJob

    return StageJob(
        flow_run_id=str(uuid4()), flow_run_name=out.stem, flow_name="slow_stage",
        entrypoint="fakes.stageflows:slow_stage", parameters={"out": str(out), "seconds": 0},
        env={}, cwd=None, reread_settings=False,
    )  # fmt: skip


def test_a_forked_stage_waits_for_its_run_to_be_running_and_a_refused_one_runs_nothing(
    tmp_path: Path,
) -> None:
    """The worker forks a stage's process while it sets the run RUNNING (one round trip
    less before the work starts): the stage starts only once that is accepted, and a run
    refused RUNNING (cancelled meanwhile) has its process stopped before the stage ran.
    Meanwhile the process does what the flow's module names in ``PREPARE`` (an evaluation
    connects for the board's slot): in the stage's process, before the stage."""
    from edgetune.worker import _stop, fork_stage

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["edgetune.worker", "fakes.stageflows"])
    accepted = tmp_path / "accepted.json"
    process, channel, go = fork_stage(context, _gate_job(accepted))
    time.sleep(1.0)  # a forked stage is set up in milliseconds
    assert not accepted.exists(), "the stage ran before its run was RUNNING"
    prepared = json.loads(accepted.with_suffix(".prepared").read_text())
    go.set()
    process.join(30)
    assert process.exitcode == 0 and channel.recv() == ("ok", "")
    assert accepted.with_suffix(".ended").read_text() == "cleaned up"
    assert prepared["pid"] == json.loads(accepted.read_text())["pid"] == process.pid

    refused = tmp_path / "refused.json"
    process, channel, go = fork_stage(context, _gate_job(refused))
    time.sleep(1.0)
    _stop(process, 10)
    assert process.exitcode == 0 and channel.recv() == ("cancelled", "the run was cancelled")
    assert not refused.exists() and not refused.with_suffix(".ended").exists()
    assert refused.with_suffix(".prepared").exists()  # what it prepared takes nothing


def test_the_worker_reads_a_deployment_once_a_minute_and_a_flow_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each stage run would read its deployment and flow from the API again before it
    starts (two round trips); the worker reads a deployment once per DEPLOYMENT_TTL_S (a
    deployment applied again is seen after that) and a flow once."""
    import asyncio

    from edgetune import worker as stage_worker

    class Client:  # records the reads of the API client it stands in for
        def __init__(self) -> None:
            self.reads: list[tuple[str, UUID]] = []
            self.api_url = "http://127.0.0.1:1/api"

        async def read_deployment(self, key: UUID) -> str:
            self.reads.append(("deployment", key))
            return f"deployment {key} read {len(self.reads)}"

        async def read_flow(self, key: UUID) -> str:
            self.reads.append(("flow", key))
            return f"flow {key} read {len(self.reads)}"

    monkeypatch.setattr(stage_worker.Remembering, "_known", {})
    client = Client()
    deployment, other, flow_id = uuid4(), uuid4(), uuid4()

    async def reads() -> list[str]:
        remembering = stage_worker.Remembering(client)
        return [
            await remembering.read_deployment(deployment),
            await remembering.read_flow(flow_id),
            await stage_worker.Remembering(client).read_deployment(deployment),
            await remembering.read_deployment(other),
        ]

    first = asyncio.run(reads())
    assert first[2] == first[0] and client.reads == [
        ("deployment", deployment), ("flow", flow_id), ("deployment", other)
    ]  # fmt: skip
    assert stage_worker.Remembering(client).api_url == client.api_url  # the rest: the client
    monkeypatch.setattr(stage_worker, "DEPLOYMENT_TTL_S", 0.0)  # as if a minute went by
    again = asyncio.run(reads())
    assert again[0] != first[0] and again[1] == first[1]
    assert client.reads[3:] == [("deployment", deployment)] * 2 + [("deployment", other)]


def test_prefects_check_of_a_runs_deployment_before_it_takes_the_run_is_read_from_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefect's worker reads a run's deployment before it takes the run (PENDING), to
    cancel the runs of a deleted deployment: one round trip on the way of every stage. The
    stage worker's client answers it from the memory its other reads use."""
    import asyncio

    from prefect.client.orchestration import PrefectClient

    from edgetune import worker as stage_worker

    reads: list[UUID] = []
    original = PrefectClient.read_deployment

    async def counted(self: PrefectClient, deployment_id: UUID) -> Any:
        reads.append(deployment_id)
        return await original(self, deployment_id)

    monkeypatch.setattr(PrefectClient, "read_deployment", counted)
    monkeypatch.setattr(stage_worker.Remembering, "_known", {})
    pool = "stage-worker-memory-test"
    with get_client(sync_client=True) as client:
        ids = _deployments(client, pool=pool)
        runs = [client.create_flow_run_from_deployment(ids["ok"]) for _ in range(2)]
    taken: list[UUID] = []

    async def take_both() -> None:
        worker = stage_worker.stage_worker_class()(work_pool_name=pool, name="memory")

        async def not_taken(flow_run: FlowRun) -> bool:  # the check comes before this
            taken.append(flow_run.id)
            return False

        monkeypatch.setattr(worker, "_propose_pending_state", not_taken)
        async with worker:
            for run in runs:
                worker._submitting_flow_run_ids.add(run.id)
                await worker._submit_run(run)

    asyncio.run(take_both())
    assert taken == [run.id for run in runs]  # each got past the deployment's check
    assert reads == [ids["ok"]]  # read once, for both runs
