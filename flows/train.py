"""The training stage of one trial: a subflow that runs where the GPUs are."""

from __future__ import annotations

import threading
import time
from typing import Any

import optuna
from prefect import flow, get_run_logger

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
    epochs_run = 0
    with stage_heartbeat(cfg.storage_url, beat_id, cfg.study.heartbeat_s) as gone:

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            nonlocal epochs_run
            epochs_run = epoch + 1
            if STOP.is_set():
                raise Interrupted(f"study interrupted during epoch {epoch}")
            if gone.is_set():
                raise Interrupted(f"the study gave this trial up (epoch {epoch})")
            report(epoch, row)

        tracker = Tracker(cfg.tracking_uri)
        started = time.time()
        try:
            outcome = workloads.train(
                cfg, params, tracker, run_id, parent_run_id, on_epoch=on_epoch
            )
            if "auto" in outcome:  # train.optimizer / train.batch_size: auto
                get_run_logger().info("trial %d: %s", trial_number, outcome["auto"]["summary"])
        except optuna.TrialPruned as pruned:
            # What the pruned trial spent, and what it would have: for the time saved.
            outcome = {
                "pruned": str(pruned),
                "epochs_run": epochs_run,
                "epochs": workloads.planned_epochs(cfg, params),
                "started_at": started,
                "finished_at": time.time(),
            }
    stages.save_outcome(tracker, run_id, "train", outcome)
    return outcome
