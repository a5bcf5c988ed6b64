"""What runs where a stage runs, around the workload's own work.

- ``train_stage``: trains one trial through its workload, reporting the float metric to
  the trial each epoch (the configured pruner decides there), beating in the study storage
  while a work-pool parent watches, and stopping at the next epoch when the study is
  interrupted (``STOP``) or the trial was given up elsewhere.
- ``compile_stage`` and ``device_stage``: the workload's compile and board evaluation, with
  the same heartbeat.

Each records its outcome in the trial's MLflow run, where a parent on another host reads it.
The flows in ``flows/`` wrap these functions; the engine never imports a flow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from prefect.runtime import flow_run

from tasks.hpo.launch import ATTR_STAGE_BEAT
from tasks.hpo.study import epoch_reporter
from tasks.runlog import run_logger
from tasks.storage import StudyError, open_for_beats
from tasks.tracking import Tracker
from tasks.training.gpus import gpu_slot
from tasks.workloads.base import (
    CompileOutcome,
    DeviceOutcome,
    Pruned,
    StudyTarget,
    TrainOutcome,
    save_outcome,
)
from tasks.workloads.registry import workload_for

#: Set by the parent when the study is interrupted: running trainings stop at the next epoch.
STOP = threading.Event()


class Interrupted(RuntimeError):
    """The study was stopped while this trial trained."""


@contextmanager
def stage_heartbeat(
    storage_url: str, trial_id: int | None, interval_s: float
) -> Iterator[threading.Event]:
    """Mark the trial's stage run alive every ``interval_s`` while the block runs.

    The parent reads the beat to tell a stage that is working from one whose worker died
    (its flow run then stays RUNNING on the server). The event yielded is set once the
    trial has been finished elsewhere (the parent gave up on it): the stage should stop.

    The storage is opened by the beat itself, beside the stage's work, and a journal is
    written without its replay (``open_for_beats``): neither is on the way to the board or
    the compiler. A storage that cannot be opened is a warning in the run's logs at once,
    tried again each beat, and the stage's error when the block ends without it ever
    opening.
    """
    gone = threading.Event()
    if trial_id is None:
        yield gone
        return
    run_id = str(flow_run.id or "")
    stop, opened = threading.Event(), threading.Event()
    failed: list[StudyError] = []  # why the storage did not open, until it does

    def beat() -> None:
        storage = None
        while True:
            try:
                if storage is None:
                    storage = open_for_beats(storage_url)
                    opened.set()
                storage.set_trial_user_attr(
                    trial_id, ATTR_STAGE_BEAT, {"flow_run": run_id, "at": time.time()}
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                gone.set()
                return
            except StudyError as exc:  # said once; the next beat tries again
                if not failed:
                    run_logger().warning("%s (the stage goes on; it beats once it opens)", exc)
                failed[:] = [exc]
            except Exception:  # the database is restarting: beat again next time
                pass
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name="stage-heartbeat", daemon=True)
    thread.start()
    try:
        yield gone
    finally:
        stop.set()
        if opened.is_set():  # a beat being written ends first; an open under way is left
            thread.join(timeout=5)
    if failed and not opened.is_set():
        raise failed[0]


def train_stage(
    config: StudyTarget,
    trial_id: int,
    params: dict[str, Any],
    run_id: str,
    parent_run_id: str,
    *,
    log: Callable[[str], None] | None = None,
) -> TrainOutcome | Pruned:
    """Train, export and log one trial; a trial the pruner stops returns ``Pruned``."""
    workload = workload_for(config)
    report = epoch_reporter(
        config.storage_url,
        config.study,
        trial_id,
        workload.study_objective,
        warmup=workload.pruning_warmup(params),
    )
    # On a work pool the parent watches this beat; in its own process it beats for us.
    remote = config.orchestration.mode == "deployments"
    epochs_run = 0
    tracker = Tracker(config.tracking_uri)
    outcome: TrainOutcome | Pruned
    with stage_heartbeat(
        config.storage_url, trial_id if remote else None, config.study.heartbeat_s
    ) as gone:

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            nonlocal epochs_run
            epochs_run = epoch + 1
            if STOP.is_set():
                raise Interrupted(f"study interrupted during epoch {epoch}")
            if gone.is_set():
                raise Interrupted(f"the study gave this trial up (epoch {epoch})")
            report(epoch, row)

        started = time.time()
        slots = config.gpu.slots_per_device, config.study.parallel
        try:
            with gpu_slot(*slots, in_process=not remote):  # its GPU, shared by how many
                outcome = workload.train(params, tracker, run_id, parent_run_id, on_epoch=on_epoch)
            if outcome.auto is not None and log is not None:  # optimizer / batch_size: auto
                log(str(outcome.auto["summary"]))
        except optuna.TrialPruned as pruned:
            # What the pruned trial spent, and what it would have: for the time saved.
            outcome = Pruned(
                reason=str(pruned),
                epochs_run=epochs_run,
                epochs=workload.planned_epochs(params),
                started_at=started,
                finished_at=time.time(),
            )
    save_outcome(tracker, run_id, "train", outcome)
    return outcome


def compile_stage(
    config: StudyTarget, run_id: str, parent_run_id: str, trial_id: int | None = None
) -> CompileOutcome:
    """Compile the trial. On a work pool (``trial_id`` given) it beats for the parent that
    watches it and records its outcome for the parent to read."""
    tracker = Tracker(config.tracking_uri)
    with stage_heartbeat(config.storage_url, trial_id, config.study.heartbeat_s):
        outcome = workload_for(config).compile(tracker, run_id, parent_run_id)
    if trial_id is not None:
        save_outcome(tracker, run_id, "compile", outcome)
    return outcome


def device_stage(
    config: StudyTarget,
    run_id: str,
    parent_run_id: str,
    artifact: str,
    trial_id: int | None = None,
) -> DeviceOutcome:
    """Evaluate the compiled trial on the board, holding its slot while it runs there; on a
    work pool (``trial_id`` given) with a heartbeat and a recorded outcome, as compiling."""
    tracker = Tracker(config.tracking_uri)
    with stage_heartbeat(config.storage_url, trial_id, config.study.heartbeat_s):
        outcome = workload_for(config).evaluate(tracker, run_id, parent_run_id, artifact)
    if trial_id is not None:
        save_outcome(tracker, run_id, "device", outcome)
    return outcome
