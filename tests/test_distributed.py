"""The production layout on one machine: every part real, started by the project's scripts.

PostgreSQL (three databases), the Prefect server and the MLflow server come from
``infra/services.sh``; process workers for the controller, gpu (two), compile and edge
pools from ``infra/workers.sh``; pools, the board's limit and the deployments from
``edgetune deploy``; the board is an SSH server on loopback running the real device-side
evaluator. A study of 6 trials with 2 GPU slots is started with ``prefect deployment run``.
"""

from __future__ import annotations

import itertools
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

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


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_a_study_runs_on_work_pools(
    cluster: dict[str, str], digits_root: Path, tmp_path: Path
) -> None:
    with start_board(tmp_path) as board:
        raw = tiny_config(digits_root, tmp_path / "run")
        ssh = board.runner_options()
        ssh = {
            k: v
            for k, v in ssh.items()
            if k in {"host", "port", "user", "key_file", "known_hosts", "work_dir", "python"}
        }
        raw["device"] = {
            "name": "board",
            "runner": "ssh",
            "ssh": ssh,
            "warmup": 0,
            "timeout_s": 120,
        }
        raw["study"].update(name="distributed", n_trials=6, parallel=2, max_pending=2)
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

    study = optuna.load_study(study_name="distributed", storage=cluster["EDGETUNE_STORAGE"])
    trials = study.get_trials()
    assert (
        cluster["EDGETUNE_STORAGE"].startswith("postgresql+psycopg2://127.0.0.1")
        or "@127.0.0.1:" in cluster["EDGETUNE_STORAGE"]
    )
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
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
    assert len(children) == 6
    for child in children:
        assert [a.path for a in client.list_artifacts(child.info.run_id, "compiled")] == [
            "compiled/model.int8.onnx"
        ]
        result = client.list_artifacts(child.info.run_id, "device")
        assert "device/device_result.json" in {a.path for a in result}
    best = min(trials, key=lambda t: t.value)
    champion = client.get_model_version_by_alias("distributed-classifier", "champion")
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
