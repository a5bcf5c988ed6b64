"""Synthetic stages for the pipeline benchmark: real flows, real pools, fake work.

Each flow takes the same parameters as the real stage flow, sleeps for a configured time
instead of training, compiling or evaluating, and reports its outcome the way the real
stage does (in the trial's MLflow run). The device stage holds the board's real
concurrency slot as the real one does (``hold_board``, prepared while its run starts).
The sampler gets a smooth objective of the parameters, so TPE behaves as in a real study.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow

from tasks.board import hold_board, prepare_board
from tasks.config import parse_config
from tasks.hpo.trial_stages import stage_heartbeat
from tasks.tracking import Tracker
from tasks.workloads.base import CompileOutcome, DeviceOutcome, TrainOutcome, save_outcome
from tasks.workloads.classifier import COMPILED_DIR


def objective(params: dict[str, Any]) -> float:
    """A smooth bowl in log-lr around 0.01: enough structure for the sampler to follow."""
    return 0.02 + 0.01 * (math.log10(float(params.get("lr", 0.01))) + 2.0) ** 2


@flow(name="bench-train", flow_run_name="bench-train-{trial_number}", validate_parameters=False)
def bench_train(
    config: dict[str, Any],
    trial_number: int,
    trial_id: int,
    params: dict[str, Any],
    run_id: str,
    parent_run_id: str,
    seconds: float = 10.0,
) -> TrainOutcome:
    cfg = parse_config(config)
    started = time.time()
    with stage_heartbeat(cfg.storage_url, trial_id, cfg.study.heartbeat_s):
        time.sleep(seconds)
    outcome = TrainOutcome(
        metrics={"float_augrc": objective(params)}, started_at=started, finished_at=time.time()
    )
    save_outcome(Tracker(cfg.tracking_uri), run_id, "train", outcome)
    return outcome


@flow(name="bench-compile", flow_run_name="bench-compile-{trial_number}", validate_parameters=False)
def bench_compile(
    config: dict[str, Any],
    trial_number: int,
    run_id: str,
    parent_run_id: str,
    trial_id: int | None = None,
    seconds: float = 2.0,
) -> CompileOutcome:
    cfg = parse_config(config)
    tracker = Tracker(cfg.tracking_uri)
    started = time.time()
    with stage_heartbeat(cfg.storage_url, trial_id, cfg.study.heartbeat_s):
        time.sleep(seconds)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "model.synthetic"
        artifact.write_text(f"trial {trial_number}\n")
        tracker.log_artifact(run_id, artifact, COMPILED_DIR)
    outcome = CompileOutcome(
        artifact=f"{COMPILED_DIR}/model.synthetic",
        metrics={},
        started_at=started,
        finished_at=time.time(),
        runtime="synthetic",
    )
    save_outcome(tracker, run_id, "compile", outcome)
    return outcome


@flow(name="bench-device", flow_run_name="bench-device-{trial_number}", validate_parameters=False)
def bench_device(
    config: dict[str, Any],
    trial_number: int,
    run_id: str,
    parent_run_id: str,
    artifact: str,
    trial_id: int | None = None,
    seconds: float = 2.0,
) -> DeviceOutcome:
    cfg = parse_config(config)
    with (
        stage_heartbeat(cfg.storage_url, trial_id, cfg.study.heartbeat_s),
        hold_board(cfg),
    ):
        started = time.time()
        time.sleep(seconds)
        finished = time.time()
    value = objective(_trial_params(cfg, run_id)) + 0.001
    metrics = {
        "device_augrc": value,
        "device_e_augrc": value,
        "device_accuracy": 0.9,
        "device_latency_ms": 1.0,
        "device_augrc_ci_low": value,
        "device_augrc_ci_high": value,
    }
    outcome = DeviceOutcome(metrics=metrics, started_at=started, finished_at=finished)
    save_outcome(Tracker(cfg.tracking_uri), run_id, "device", outcome)
    return outcome


def _trial_params(cfg: Any, run_id: str) -> dict[str, Any]:
    return dict(Tracker(cfg.tracking_uri).client.get_run(run_id).data.params)


def prepare_device(config: dict[str, Any], **_: Any) -> None:
    prepare_board(parse_config(config))


#: What ``edgetune worker`` runs in a stage's process before its run is RUNNING.
PREPARE: dict[str, Callable[..., None]] = {"bench_device": prepare_device}
