"""A trial's stages in this process (``LocalStages``), and compile and device evaluation as
flows for the ``compile`` and ``edge`` pools.

In the embedded mode the parent calls the training subflow and the two tasks below; on
work pools each stage is a flow run of its own deployment (``tasks.hpo.launch``): it beats
in the study storage while it works and leaves its outcome in the trial's MLflow run.

``PRESTAGE`` names, for a stage flow, what a worker may do for one of its runs while the
run waits for the pool (``edgetune worker``): an evaluation's model is fetched and sent to
the board while the evaluation before it holds the board. ``PREPARE`` names what the
stage's own process does while its run is made RUNNING: an evaluation connects to the
Prefect API, so that taking the board's slot is one request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.train import as_config, train_trial
from tasks.board import prepare_board
from tasks.hpo.launch import Slot
from tasks.hpo.trial_stages import compile_stage, device_stage
from tasks.tracking import Tracker
from tasks.workloads.base import (
    Checked,
    CompileOutcome,
    DeviceOutcome,
    Pruned,
    StudyTarget,
    TrainOutcome,
)
from tasks.workloads.registry import workload_for


@task(name="compile", task_run_name="compile-trial-{trial_number}", cache_policy=NO_CACHE)
def compile_task(
    config: StudyTarget, trial_number: int, run_id: str, parent_run_id: str
) -> CompileOutcome:
    return compile_stage(config, run_id, parent_run_id)


@task(name="evaluate-on-device", task_run_name="device-trial-{trial_number}", cache_policy=NO_CACHE)
def device_task(
    config: StudyTarget, trial_number: int, run_id: str, parent_run_id: str, artifact: str
) -> DeviceOutcome:
    """Evaluate on the board while holding its slot (limit 1, strict: a typo cannot unlock it)."""
    return device_stage(config, run_id, parent_run_id, artifact)


class LocalStages:
    """Stages in this process: the training subflow and the compile and device tasks, which
    receive the typed config (nothing is parsed again)."""

    def __init__(self, config: StudyTarget) -> None:
        self.config = config

    def prepare(self, parent_run_id: str) -> Checked:
        return workload_for(self.config).prepare(Tracker(self.config.tracking_uri), parent_run_id)

    def train(self, slot: Slot) -> TrainOutcome | Pruned:
        return train_trial(
            self.config, slot.number, slot.trial_id, slot.params, slot.run_id, slot.parent_run_id
        )

    def compile(self, slot: Slot) -> CompileOutcome:
        slot.started()  # compiled here and now: no queue
        return compile_task(self.config, slot.number, slot.run_id, slot.parent_run_id)

    def evaluate(self, slot: Slot, artifact: str) -> DeviceOutcome:
        return device_task(self.config, slot.number, slot.run_id, slot.parent_run_id, artifact)

    def cancel(self, trial_numbers: list[int]) -> int:
        return 0  # stages in this process stop with it (trainings at their next epoch)


@flow(name="compile-trial", flow_run_name="compile-trial-{trial_number}", validate_parameters=False)
def compile_trial(
    config: StudyTarget | dict[str, Any],
    trial_number: int,
    run_id: str,
    parent_run_id: str,
    trial_id: int | None = None,
) -> CompileOutcome:
    return compile_stage(as_config(config, "compile-trial"), run_id, parent_run_id, trial_id)


@flow(
    name="evaluate-trial", flow_run_name="evaluate-trial-{trial_number}", validate_parameters=False
)
def evaluate_trial(
    config: StudyTarget | dict[str, Any],
    trial_number: int,
    run_id: str,
    parent_run_id: str,
    artifact: str,
    trial_id: int | None = None,
) -> DeviceOutcome:
    cfg = as_config(config, "evaluate-trial")
    return device_stage(cfg, run_id, parent_run_id, artifact, trial_id)


def prestage_evaluation(
    config: StudyTarget | dict[str, Any], run_id: str, parent_run_id: str, artifact: str, **_: Any
) -> bool:
    """An ``evaluate-trial`` run's inputs sent to its board ahead of it (its parameters: the
    trial's number and id are not needed); True when the board took something ahead."""
    cfg = as_config(config, "evaluate-trial")
    return workload_for(cfg).prestage(Tracker(cfg.tracking_uri), run_id, parent_run_id, artifact)


#: What a worker runs for a waiting run of a stage flow here (by the flow's function name).
PRESTAGE: dict[str, Callable[..., bool]] = {"evaluate_trial": prestage_evaluation}


def prepare_evaluation(config: StudyTarget | dict[str, Any], **_: Any) -> None:
    """The board's slot made one request away for an ``evaluate-trial`` run's process."""
    prepare_board(as_config(config, "evaluate-trial"))


#: What a worker runs in a stage's own process, with the run's parameters, while the run
#: is made RUNNING (before the stage starts).
PREPARE: dict[str, Callable[..., None]] = {"evaluate_trial": prepare_evaluation}
