"""The production layout on one machine: every part real, started by the project's scripts.

PostgreSQL (three databases), the Prefect server and the MLflow server come from
``infra/services.sh``; process workers for the controller, gpu (two), compile and edge
pools from ``infra/workers.sh``; pools, the board's limit and the deployments from
``edgetune deploy``; the board is an SSH server on loopback running the real device-side
evaluator. A study of 6 trials with 2 GPU slots is started with ``prefect deployment run``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from tasks.storage import open_storage

from board import start_board
from conftest import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str], env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"{shlex.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def _exports(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = shlex.split(value)[0] if value else ""
    return values


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    state = tmp_path_factory.mktemp("services")
    env = {
        **os.environ,
        "EDGETUNE_STATE_DIR": str(state),
        "EDGETUNE_PG_PORT": str(_free_port()),
        "EDGETUNE_PREFECT_PORT": str(_free_port()),
        "EDGETUNE_MLFLOW_PORT": str(_free_port()),
        "EDGETUNE_VENV": str(BIN.parent),
        "EDGETUNE_GPU_WORKERS": "2",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "EDGETUNE_STORAGE"):
        env.pop(key, None)
    services, workers = str(ROOT / "infra" / "services.sh"), str(ROOT / "infra" / "workers.sh")
    try:
        _run([services, "up"], env)
        env.update(_exports(_run([services, "env"], env)))
        _run([str(BIN / "edgetune"), "deploy", "--device", "board"], env)
        _run([workers, "up"], env)
        yield env
    finally:
        subprocess.run([workers, "down"], env=env, capture_output=True, timeout=120)
        subprocess.run([services, "down"], env=env, capture_output=True, timeout=120)


def _ssh_options(board: Any) -> dict[str, Any]:
    """The board's device.ssh section (its runner options minus the evaluation settings)."""
    keys = {"host", "port", "user", "key_file", "known_hosts", "work_dir", "python"}
    return {k: v for k, v in board.runner_options().items() if k in keys}


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_a_study_runs_on_work_pools(
    cluster: dict[str, str], digits_root: Path, tmp_path: Path
) -> None:
    with start_board(tmp_path) as board:
        raw = tiny_config(digits_root, tmp_path / "run")
        ssh = _ssh_options(board)
        raw["device"] = {
            "name": "board",
            "runner": "ssh",
            "ssh": ssh,
            "warmup": 0,
            "timeout_s": 120,
        }
        raw["study"].update(name="distributed", n_trials=4, parallel=2, max_pending=2)
        # The default run directory, relative: on a process worker it lands in the flow
        # run's temporary working folder, which the worker deletes when the run ends.
        del raw["run_dir"]
        raw["orchestration"] = {"mode": "deployments", "poll_interval_s": 1.0}
        config = tmp_path / "distributed.yaml"
        config.write_text(yaml.safe_dump(raw))

        output = _run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "tune/classifier",
                "--param",
                f"config={config}",
                "--watch",
                "--watch-timeout",
                "1200",
            ],
            cluster,
            timeout=1300,
        )
    assert "Completed" in output, output[-2000:]

    study = optuna.load_study(
        study_name="distributed", storage=open_storage(cluster["EDGETUNE_STORAGE"])
    )
    trials = study.get_trials()
    # the study is the journal in the services' PostgreSQL, as infra/services.sh env says
    assert cluster["EDGETUNE_STORAGE"].startswith("journal+postgresql://edgetune:")
    assert "@127.0.0.1:" in cluster["EDGETUNE_STORAGE"]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert all(0.0 <= t.value <= 0.5 for t in trials)

    device = sorted(
        (t.user_attrs["device_started"], t.user_attrs["device_finished"]) for t in trials
    )
    for (_, end), (start, _) in itertools.pairwise(device):
        assert end <= start, f"device evaluations overlapped: {device}"

    # Pipelined: some trial trained while an earlier trial compiled or sat on the board.
    def train(t: optuna.trial.FrozenTrial) -> tuple[float, float]:
        return t.user_attrs["train_started"], t.user_attrs["train_finished"]

    def evaluate(t: optuna.trial.FrozenTrial) -> tuple[float, float]:
        return t.user_attrs["compile_started"], t.user_attrs["device_finished"]

    assert any(
        _overlaps(train(later), evaluate(earlier))
        for earlier in trials
        for later in trials
        if later.number > earlier.number
    )

    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    assert cluster["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == 4
    for child in children:
        assert [a.path for a in client.list_artifacts(child.info.run_id, "compiled")] == [
            "compiled/model.int8.onnx"
        ]
        result = client.list_artifacts(child.info.run_id, "device")
        assert "device/device_result.json" in {a.path for a in result}
    best = min(trials, key=lambda t: t.value)
    champion = client.get_model_version_by_alias("distributed-classifier", "champion")
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    _everything_survives_the_workers(cluster, client, parent, tmp_path)


def _everything_survives_the_workers(
    cluster: dict[str, str], client: MlflowClient, parent: Any, tmp_path: Path
) -> None:
    """The workers' working folders are gone; the artifacts live behind the tracking
    server's proxy, and the champion loads as an MLflow model from there."""
    import mlflow
    import numpy as np

    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    bundle = client.download_artifacts(parent.info.run_id, "inputs/val_bundle.npz", str(tmp_path))
    images = np.load(bundle)["images"]
    mlflow.set_tracking_uri(cluster["MLFLOW_TRACKING_URI"])
    try:
        model = mlflow.pyfunc.load_model("models:/distributed-classifier@champion")
    finally:
        mlflow.set_tracking_uri(None)
    probabilities = model.predict(images)["probabilities"]
    assert probabilities.shape == (len(images), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


# Faults on the work pools ----------------------------------------------------------------------


def _client(cluster: dict[str, str]) -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _api(cluster: dict[str, str]) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: cluster["PREFECT_API_URL"]})


def _flow_runs(cluster: dict[str, str], study: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with _api(cluster), _client(cluster) as client:
        return list(
            client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"study:{study}"]))
            )
        )


def _process_of(run: Any) -> int | None:
    """The pid of the process running a stage's flow run, as its worker recorded it (the
    stage worker forks it: it has no environment of its own to find it by)."""
    pid = run.infrastructure_pid
    return int(pid) if pid and Path(f"/proc/{pid}").exists() else None


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _worker_of(pid: int) -> int:
    """The nearest ancestor of ``pid`` that is a worker (``edgetune worker``)."""
    ancestor = _ppid(pid)
    while ancestor > 1:
        cmdline = Path(f"/proc/{ancestor}/cmdline").read_bytes().split(b"\0")
        if b"worker" in cmdline and b"--pool" in cmdline:
            return ancestor
        ancestor = _ppid(ancestor)
    raise AssertionError(f"no worker above process {pid}")


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(1)


def _start_study(cluster: dict[str, str], config: Path) -> str:
    out = _run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "tune/classifier",
            "--param",
            f"config={config}",
        ],
        cluster,
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def _state(cluster: dict[str, str], flow_run_id: str) -> Any:
    with _api(cluster), _client(cluster) as client:
        return client.read_flow_run(UUID(flow_run_id)).state


def _board_config(board: Any, digits_root: Path, tmp_path: Path, name: str) -> Path:
    raw = tiny_config(digits_root, tmp_path / name)
    ssh = _ssh_options(board)
    raw["device"] = {"name": "board", "runner": "ssh", "ssh": ssh, "warmup": 0, "timeout_s": 120}
    raw["train"]["epochs"] = 4
    raw["study"].update(
        name=name, n_trials=4, parallel=2, max_pending=2, retries=2, heartbeat_s=2, stale_after_s=20
    )
    raw["orchestration"] = {"mode": "deployments", "poll_interval_s": 1.0}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _no_mlflow_run_running(cluster: dict[str, str], experiment: str) -> None:
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    assert runs and [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []


def test_a_killed_gpu_worker_and_a_database_restart_lose_no_trial(
    cluster: dict[str, str], digits_root: Path, tmp_path: Path
) -> None:
    with start_board(tmp_path) as board:
        config = _board_config(board, digits_root, tmp_path, "faults")
        parent = _start_study(cluster, config)

        def training() -> Any:
            runs = [
                r
                for r in _flow_runs(cluster, "faults")
                if r.name.startswith("train-trial") and r.state and r.state.is_running()
            ]
            return runs and _process_of(runs[0]) and runs[0]

        victim = _wait_for(training, 300, "a training on the gpu pool")
        time.sleep(3)  # mid-training
        pid = _process_of(victim)
        assert pid is not None
        worker = _worker_of(pid)  # the gpu worker that started it (through its fork server)
        # The worker's host dies: the worker and the training it runs, with no goodbye.
        os.kill(pid, signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)
        # And the database restarts while the other trials run.
        _run([str(ROOT / "infra" / "services.sh"), "restart-db"], cluster)

        final = _wait_for(
            lambda: (s := _state(cluster, parent)) is not None and s.is_final() and s,
            900,
            "the study to end",
        )
    assert final.is_completed(), final
    study = optuna.load_study(
        study_name="faults", storage=open_storage(cluster["EDGETUNE_STORAGE"])
    )
    trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 4, states
    assert "RUNNING" not in states and "WAITING" not in states
    crashed = [t for t in trials if "no heartbeat" in str(t.user_attrs.get("fail_reason"))]
    assert len(crashed) == 1, [t.user_attrs.get("fail_reason") for t in trials]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == crashed[0].number)
    assert retry.params == crashed[0].params
    assert _state(cluster, str(victim.id)).type.value == "CRASHED"
    done = [t for t in trials if t.state.name == "COMPLETE"]
    device = sorted((t.user_attrs["device_started"], t.user_attrs["device_finished"]) for t in done)
    for (_, end), (start, _) in itertools.pairwise(device):
        assert end <= start, f"device evaluations overlapped: {device}"
    _no_mlflow_run_running(cluster, "faults")


def test_cancelling_the_study_cancels_its_stage_runs_and_leaves_nothing_running(
    cluster: dict[str, str], digits_root: Path, tmp_path: Path
) -> None:
    with start_board(tmp_path) as board:
        config = _board_config(board, digits_root, tmp_path, "cancelled")
        parent = _start_study(cluster, config)
        _wait_for(
            lambda: any(
                r.name.startswith("train-trial") and r.state and r.state.is_running()
                for r in _flow_runs(cluster, "cancelled")
            ),
            300,
            "a training on the gpu pool",
        )
        _run([str(BIN / "prefect"), "flow-run", "cancel", parent], cluster)
        final = _wait_for(
            lambda: (s := _state(cluster, parent)) is not None and s.is_final() and s,
            180,
            "the study to be cancelled",
        )
        assert final.type.value == "CANCELLED", final
        _wait_for(
            lambda: all(r.state and r.state.is_final() for r in _flow_runs(cluster, "cancelled")),
            120,
            "the stage runs to end",
        )
    study = optuna.load_study(
        study_name="cancelled", storage=open_storage(cluster["EDGETUNE_STORAGE"])
    )
    states = [t.state.name for t in study.get_trials()]
    assert "RUNNING" not in states, states
    stages = _flow_runs(cluster, "cancelled")
    assert any(r.state.type.value == "CANCELLED" for r in stages)
    _no_mlflow_run_running(cluster, "cancelled")


def _tiny_s_ml(tmp_path: Path, tracking: dict[str, str]) -> dict[str, Any]:
    """configs/detectors/s-ml.yaml on a one-class shapes dataset, one epoch at 64 px."""
    from tasks.detection.synthetic import write_shapes_dataset

    data_yaml = write_shapes_dataset(tmp_path / "shapes", train=16, val=8, single_class=True)
    raw: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "detectors" / "s-ml.yaml").read_text())
    raw["data"] = {"yaml": str(data_yaml)}
    raw["run_dir"] = str(tmp_path / "runs")
    raw["tracking"] = tracking
    raw["train"].update(imgsz=64, epochs=1, batch=8, cache=False, workers=0, device="cpu")
    raw["train"]["plots"] = False
    raw["compile"] = {"calibration_samples": 8}
    return raw


def _run_on_board(
    cluster: dict[str, str], tmp_path: Path, raw: dict[str, Any], deployment: str
) -> str:
    """Run `deployment` on `raw` with an SSH board on loopback; the watched run's output."""
    with start_board(tmp_path) as board:
        raw["device"] = {"name": "board", "runner": "ssh", "ssh": _ssh_options(board), "warmup": 0}
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(raw))
        return _run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                deployment,
                "--param",
                f"config={config}",
                "--watch",
                "--watch-timeout",
                "600",
            ],
            cluster,
            timeout=700,
        )


def test_a_detector_trains_on_the_gpu_pool_and_is_measured_on_the_board(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    raw = _tiny_s_ml(tmp_path, {"experiment": "detector-distributed"})
    output = _run_on_board(cluster, tmp_path, raw, "detect-train/gpu")
    assert "Completed" in output, output[-2000:]
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("s-ml", "champion")
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["edgetune.runtime"] == "onnxruntime"
    assert {"device_map50_95", "float_map50_95", "map50_95_gap", "device_latency_ms"} <= set(
        run.data.metrics
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = client.download_artifacts(champion.run_id, "device/device_result.json", tmp)
        info = json.loads(Path(result).read_text())
    assert info["task"] == "detect" and info["n"] == 8 and info["model"] == "model.int8.onnx"


def test_a_detector_study_runs_its_stages_on_the_pools(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """`tune/detector`: each trial's training, compilation and board run is a stage flow run."""
    raw = _tiny_s_ml(
        tmp_path, {"experiment": "detector-study-distributed", "registered_model": "s-ml-pools"}
    )
    raw["study"].update(name="s-ml-pools", n_trials=2, pruner="none")
    raw["study"]["search_space"] = {
        "lr0": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}
    }
    raw["orchestration"] = {"mode": "deployments", "poll_interval_s": 1.0}
    output = _run_on_board(cluster, tmp_path, raw, "tune/detector")
    assert "Completed" in output, output[-2000:]
    names = sorted(run.name for run in _flow_runs(cluster, "s-ml-pools"))
    assert names == [
        f"{stage}-trial-{n}" for stage in ("compile", "evaluate", "train") for n in (0, 1)
    ]
    import optuna

    study = optuna.load_study(
        study_name="s-ml-pools", storage=open_storage(cluster["EDGETUNE_STORAGE"])
    )
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    for trial in complete:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.params["lr0"] == str(trial.params["lr0"])
        assert trial.value == run.data.metrics["device_map50_95"]
        assert run.data.tags["edgetune.runtime"] == "onnxruntime"
    champion = client.get_model_version_by_alias("s-ml-pools", "champion")
    assert champion.run_id in {t.user_attrs["mlflow_run_id"] for t in complete}
