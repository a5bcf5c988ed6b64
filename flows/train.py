"""The training stage of one trial: a subflow that runs where the GPUs are."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.hpo.trial_stages import train_stage
from tasks.runlog import run_logger
from tasks.workloads.base import Pruned, StudyTarget, TrainOutcome
from tasks.workloads.registry import parse_study_config


def as_config(config: StudyTarget | dict[str, Any], flow_name: str) -> StudyTarget:
    """The typed config: given as is in this process, or parsed once from the validated
    config a parent on another host dumped (a deployment's parameter)."""
    if isinstance(config, dict):
        return parse_study_config(config, source=f"{flow_name} parameter 'config'")
    return config


@flow(name="train-trial", flow_run_name="train-trial-{trial_number}", validate_parameters=False)
def train_trial(
    config: StudyTarget | dict[str, Any],
    trial_number: int,
    trial_id: int,
    params: dict[str, Any],
    run_id: str,
    parent_run_id: str,
) -> TrainOutcome | Pruned:
    """Train, export and log one trial; a trial the pruner stopped returns ``Pruned``."""
    logger = run_logger()
    return train_stage(
        as_config(config, "train-trial"),
        trial_id,
        params,
        run_id,
        parent_run_id,
        log=lambda line: logger.info("trial %d: %s", trial_number, line),
    )
