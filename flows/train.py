"""The training stage of one trial: a subflow that runs where the GPUs are."""

from __future__ import annotations

import threading
from typing import Any

import optuna
from prefect import flow

from tasks import stages, workloads
from tasks.recovery import stage_heartbeat
from tasks.study import epoch_reporter
from tasks.tracking import Tracker

#: Set by the parent when the study is interrupted: running trainings stop at the next epoch.
STOP = threading.Event()


class Interrupted(RuntimeError):
    """The study was stopped while this trial trained."""


@flow(name="train-trial", flow_run_name="train-trial-{trial_number}", validate_parameters=False)
def train_trial(
    config: dict[str, Any],
    trial_number: int,
    trial_id: int,
    params: dict[str, Any],
    run_id: str,
    parent_run_id: str,
) -> dict[str, Any]:
    """Train, export and log one trial; a pruned trial returns ``{"pruned": reason}``."""
    cfg = workloads.parse_study_config(config, source="train-trial parameter 'config'")
    report = epoch_reporter(cfg.storage_url, cfg.study, trial_id, workloads.objective_for(cfg))
    # On a work pool the parent watches this beat; in its own process it beats for us.
    remote = cfg.orchestration.mode == "deployments"
    beat_id = trial_id if remote else None
    with stage_heartbeat(cfg.storage_url, beat_id, cfg.study.heartbeat_s) as gone:

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            if STOP.is_set():
                raise Interrupted(f"study interrupted during epoch {epoch}")
            if gone.is_set():
                raise Interrupted(f"the study gave this trial up (epoch {epoch})")
            report(epoch, row)

        tracker = Tracker(cfg.tracking_uri)
        try:
            outcome = workloads.train(
                cfg, params, tracker, run_id, parent_run_id, on_epoch=on_epoch
            )
        except optuna.TrialPruned as pruned:
            outcome = {"pruned": str(pruned)}
    stages.save_outcome(tracker, run_id, "train", outcome)
    return outcome
