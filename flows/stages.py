"""Compile and device-evaluation stages as flows, for the ``compile`` and ``edge`` pools.

In the embedded mode the parent calls the same tasks directly; on work pools each stage is
a flow run of its own deployment: it beats in the study storage while it works (so the
parent can tell a dead worker from a slow one) and leaves its outcome in the trial's MLflow
run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.recovery import stage_heartbeat
from tasks.stages import save_outcome
from tasks.tracking import Tracker
from tasks.workloads import parse_study_config
from tasks.wrappers import compile_task, device_task


@flow(name="compile-trial", flow_run_name="compile-trial-{trial_number}", validate_parameters=False)
def compile_trial(
    config: dict[str, Any],
    trial_number: int,
    run_id: str,
    parent_run_id: str,
    trial_id: int | None = None,
) -> dict[str, Any]:
    cfg = parse_study_config(config, source="compile-trial parameter 'config'")
    with stage_heartbeat(cfg.storage_url, trial_id, cfg.study.heartbeat_s):
        outcome = compile_task(cfg, trial_number, run_id, parent_run_id)
    save_outcome(Tracker(cfg.tracking_uri), run_id, "compile", outcome)
    return outcome


@flow(
    name="evaluate-trial", flow_run_name="evaluate-trial-{trial_number}", validate_parameters=False
)
def evaluate_trial(
    config: dict[str, Any],
    trial_number: int,
    run_id: str,
    parent_run_id: str,
    artifact: str,
    trial_id: int | None = None,
) -> dict[str, Any]:
    cfg = parse_study_config(config, source="evaluate-trial parameter 'config'")
    with stage_heartbeat(cfg.storage_url, trial_id, cfg.study.heartbeat_s):
        outcome = device_task(cfg, trial_number, run_id, parent_run_id, artifact)
    save_outcome(Tracker(cfg.tracking_uri), run_id, "device", outcome)
    return outcome
