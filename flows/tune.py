"""The parent flow: an Optuna ask/tell loop over pipelined trial stages.

``ask → train (subflow, GPU slot) → compile (task) → evaluate on device (task, board slot) → tell``

A trial holds a GPU slot only while it trains and exports; its compilation and device
evaluation overlap the training of the next trials. New trials are asked only while a
GPU slot is free and fewer than ``study.max_pending`` trained models wait for the
compiler or the board, so the sampler always asks with the freshest results told.
Every failure is told FAIL with its stage and reason; nothing is told a sentinel value.
"""

from __future__ import annotations

import contextvars
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun

from flows.train import STOP, train_trial
from tasks import reports, variants, workloads
from tasks.config import apply_overrides, dump_config
from tasks.devices.base import DeviceUnreachableError
from tasks.preflight import check_shared_services
from tasks.recovery import (
    ATTR_HEARTBEAT,
    ATTR_OWNER,
    ATTR_PARENT,
    ATTR_RETRY_OF,
    ATTR_STAGE,
    NothingToReuseError,
    cancel_stage_runs,
    check_fingerprint,
    current_owner,
    enqueue_best,
    enqueue_retry,
    find_stale,
    foreign_running,
    forget_study,
    gone_reason,
    reuse_best_config,
    still_to_ask,
)
from tasks.space import EmptyRange, violated
from tasks.study import (
    ATTR_FAIL_REASON,
    ATTR_FAIL_STAGE,
    ATTR_REJECTED,
    ATTR_RUN_ID,
    best_trial,
    budget_stop,
    goals_for,
    open_study,
    primary_value,
    study_budget,
    suggest,
    summary,
)
from tasks.tracking import CHAMPION, Tracker, mask_uri
from tasks.workloads import StudyTarget
from tasks.wrappers import BoardBusyError, compile_task, device_task, ensure_device_limit

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class Slot:
    """One trial in flight and the stage it is in."""

    trial: optuna.Trial
    params: dict[str, Any]
    run_id: str
    stage: str = "train"
    times: dict[str, float] = field(default_factory=dict)
    float_metrics: dict[str, float] = field(default_factory=dict)


class StageFailed(RuntimeError):
    """A stage's flow run on a work pool did not complete."""


class SampleRejected(RuntimeError):
    """The sampler kept drawing parameters that break the study's constraints."""


#: Samples in a row that may break the constraints before the study gives up.
MAX_REJECTED = 100


class BoardPaused(RuntimeError):
    """The board failed ``device.max_consecutive_failures`` times in a row."""


class LocalStages:
    """Stages in this process: the training subflow and the compile/device tasks."""

    def __init__(
        self,
        config: StudyTarget,
        config_dict: dict[str, Any],
        parent_run_id: str,
        storage: optuna.storages.BaseStorage,
    ):
        self.config, self.config_dict, self.parent_run_id = config, config_dict, parent_run_id
        self.storage = storage

    def train(self, slot: Slot) -> dict[str, Any]:
        trial = slot.trial
        return train_trial(
            self.config_dict,
            trial.number,
            trial._trial_id,
            slot.params,
            slot.run_id,
            self.parent_run_id,
        )

    def compile(self, slot: Slot) -> dict[str, Any]:
        return compile_task(self.config, slot.trial.number, slot.run_id, self.parent_run_id)

    def evaluate(self, slot: Slot, artifact: str) -> dict[str, Any]:
        return device_task(
            self.config, slot.trial.number, slot.run_id, self.parent_run_id, artifact
        )


class DeploymentStages(LocalStages):
    """Stages as flow runs of their deployments on the gpu, compile and edge pools.

    Each child reads its inputs from MLflow by run id and leaves its outcome there; the
    parent follows the child's state and its heartbeat in the study storage. A child that
    stays RUNNING without a heartbeat for ``study.stale_after_s`` (its worker or host died)
    is marked CRASHED and its stage fails, so no trial waits for it forever.
    """

    def _run(self, deployment: str, stage: str, slot: Slot, **parameters: Any) -> dict[str, Any]:
        from prefect.deployments import run_deployment

        from tasks.stages import load_outcome

        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync in a sync context
            deployment,
            parameters={
                "config": self.config_dict,
                "trial_number": slot.trial.number,
                "trial_id": slot.trial._trial_id,
                "run_id": slot.run_id,
                "parent_run_id": self.parent_run_id,
                **parameters,
            },
            timeout=0,
            tags=[f"study:{self.config.study.name}", f"trial:{slot.trial.number}"],
        )
        flow_run = self._follow(flow_run, slot)
        state = flow_run.state
        if state is None or not state.is_completed():
            kind = state.type.value if state else "UNKNOWN"
            message = (state.message if state else None) or "no message"
            raise StageFailed(f"{deployment} run {flow_run.name} ended {kind}: {message}")
        return load_outcome(Tracker(self.config.tracking_uri), slot.run_id, stage)

    def _follow(self, flow_run: FlowRun, slot: Slot) -> FlowRun:
        """Poll a child flow run until it ends, or until it is found dead."""
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        from tasks.recovery import stage_beat_at

        stale_after = self.config.study.stale_after_s
        with get_client(sync_client=True) as client:
            while True:
                time.sleep(self.config.orchestration.poll_interval_s)
                try:
                    flow_run = client.read_flow_run(flow_run.id)
                except Exception:  # the API is restarting: ask again next time
                    continue
                state = flow_run.state
                if state is None or state.is_final():
                    return flow_run
                if not state.is_running():
                    continue  # scheduled or pending: waiting for a worker of its pool
                beat = stage_beat_at(self.storage, slot.trial._trial_id, str(flow_run.id))
                since = beat if beat is not None else state.timestamp.timestamp()
                silent = time.time() - since
                if silent > stale_after:
                    message = (
                        f"no heartbeat for {silent:.0f} s (limit {stale_after:g} s): its worker "
                        f"or host is gone"
                    )
                    client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
                    raise StageFailed(f"{flow_run.name}: {message}")

    def train(self, slot: Slot) -> dict[str, Any]:
        deployment = self.config.orchestration.train_deployment
        return self._run(deployment, "train", slot, params=slot.params)

    def compile(self, slot: Slot) -> dict[str, Any]:
        return self._run(self.config.orchestration.compile_deployment, "compile", slot)

    def evaluate(self, slot: Slot, artifact: str) -> dict[str, Any]:
        return self._run(
            self.config.orchestration.device_deployment, "device", slot, artifact=artifact
        )


def _in_context(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Submit with a copy of this flow's context, so stages show as its children in Prefect."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


#: Failures of the board rather than of the trial (bounded by device.max_consecutive_failures).
BOARD_DOWN = (DeviceUnreachableError, BoardBusyError)


def _board_down(exc: BaseException) -> bool:
    if isinstance(exc, BOARD_DOWN):
        return True
    # A stage run on the edge pool reports its exception by name in its final state.
    return isinstance(exc, StageFailed) and any(t.__name__ in str(exc) for t in BOARD_DOWN)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class StudyRunner:
    """Runs the ask/tell loop of one study; ``run()`` returns the study summary."""

    def __init__(
        self, config: StudyTarget, study: optuna.Study, group_run_id: str | None = None
    ) -> None:
        self.config = config
        self.group_run_id = group_run_id  # the MLflow run of a variant run, if any
        self.objective = workloads.objective_for(config)
        self.goals = goals_for(config.study, self.objective)
        self.config_dict = config.model_dump(mode="json")
        self.logger = get_run_logger()
        self.study = study
        self.tracker = Tracker(config.tracking_uri)
        self.me = current_owner()
        self.parent_run_id = ""
        self.experiment_id = ""
        self.stages: LocalStages | None = None
        self.slots: dict[Future[Any], Slot] = {}
        self.in_train = 0
        self.in_eval = 0
        self.last_beat = 0.0
        self.last_reconcile = time.time()
        self.board_failures: list[str] = []
        self.waiting_logged = False
        self.started = time.time()
        self.stopped_by: str | None = None
        self.train_pool: ThreadPoolExecutor  # made by open()
        self.eval_pool: ThreadPoolExecutor

    # Setup --------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        check_shared_services(cfg)
        ensure_device_limit(cfg.device.concurrency_limit)
        self.experiment_id = self.tracker.experiment_id(
            cfg.experiment_name, artifact_location=workloads.artifact_location(cfg)
        )
        self.parent_run_id = self.tracker.start_run(
            self.experiment_id,
            f"study-{cfg.study.name}",
            parent_id=self.group_run_id,
            tags={"edgetune.study": cfg.study.name, "edgetune.kind": "study"},
        )
        self._end_previous_parent()
        self.study.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        self.study.set_user_attr(ATTR_PARENT, {"owner": self.me, ATTR_HEARTBEAT: time.time()})
        self.study.set_user_attr("mlflow_tracking_uri", mask_uri(cfg.tracking_uri))
        self.tracker.log_params(self.parent_run_id, _flatten(self.config_dict))
        launcher = DeploymentStages if cfg.orchestration.mode == "deployments" else LocalStages
        self.stages = launcher(cfg, self.config_dict, self.parent_run_id, self.study._storage)
        inputs = workloads.prepare(cfg, self.tracker, self.parent_run_id)
        self.logger.info(
            "study %s: %d classes, splits %s; storage %s; tracking %s",
            cfg.study.name,
            len(inputs.classes),
            inputs.counts,
            mask_uri(cfg.storage_url),
            mask_uri(cfg.tracking_uri),
        )
        self._reconcile()

    def _end_previous_parent(self) -> None:
        """End the MLflow run of a previous study process that died without ending it."""
        previous = self.study.user_attrs.get(ATTR_PARENT) or {}
        run_id = self.study.user_attrs.get("mlflow_parent_run_id")
        if not run_id:
            return
        beat = previous.get(ATTR_HEARTBEAT)
        why = gone_reason(
            previous.get("owner"),
            None if beat is None else float(beat),
            self.me,
            self.config.study.stale_after_s,
            time.time(),
        )
        if why is None or self.tracker.client.get_run(run_id).info.status != "RUNNING":
            return
        self.tracker.set_tags(run_id, {"edgetune.end_reason": f"stale: {why}"})
        self.tracker.end_run(run_id, "KILLED")
        self.logger.warning("previous study run %s ended KILLED: %s", run_id, why)

    def _reconcile(self) -> None:
        """Tell FAIL every RUNNING trial whose owner is gone; retry it while allowed."""
        for stale in find_stale(self.study, self.me, self.config.study.stale_after_s):
            trial = stale.trial
            stage = trial.user_attrs.get(ATTR_STAGE, "unknown")
            reason = f"stale: {stale.reason} (stage {stage})"
            try:
                self.study._storage.set_trial_user_attr(trial._trial_id, ATTR_FAIL_STAGE, stage)
                self.study._storage.set_trial_user_attr(
                    trial._trial_id,
                    ATTR_FAIL_REASON,
                    reason,
                )
                self.study.tell(trial.number, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # its owner finished it meanwhile
            run_id = trial.user_attrs.get(ATTR_RUN_ID)
            if run_id:
                self.tracker.set_tags(
                    run_id, {"edgetune.state": "FAIL", "edgetune.fail_reason": reason}
                )
                self.tracker.end_run(run_id, "FAILED")
            if self.config.orchestration.mode == "deployments":
                cancel_stage_runs(self.config.study.name, [trial.number])
            retried = enqueue_retry(self.study, trial, self.config.study.retries)
            self.logger.warning(
                "trial %d: %s; %s",
                trial.number,
                reason,
                "its parameters are enqueued again" if retried else "no retry left",
            )

    # The loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        return run_studies([self], self.config.study.parallel)[0]

    def open(self) -> None:
        """Start the study: its MLflow run, its inputs, and its training and evaluation pools."""
        self.started = time.time()
        self.start()
        cfg = self.config.study
        self.train_pool = ThreadPoolExecutor(cfg.parallel, thread_name_prefix="train")
        self.eval_pool = ThreadPoolExecutor(
            cfg.max_pending or cfg.parallel, thread_name_prefix="evaluate"
        )

    def fill(self, gpu_free: int) -> int:
        """Ask trials while one of ``gpu_free`` GPU slots and a place in the compile/board
        queue are free; returns how many were asked."""
        cfg = self.config.study
        max_pending = cfg.max_pending or cfg.parallel
        to_ask, asked = self._to_ask(), 0
        while to_ask and asked < gpu_free and self.in_train < cfg.parallel:
            if self.in_eval >= max_pending:
                break
            self._ask(self.train_pool)
            to_ask -= 1
            asked += 1
        return asked

    def training(self) -> bool:
        """Whether the study still trains, or has trials left to ask (it needs the GPU)."""
        return self.in_train > 0 or self._to_ask() > 0

    def done(self) -> bool:
        return not self.slots and not self._others_running()

    def shutdown(self) -> None:
        """Wait for the pools: trainings stop at their next epoch (STOP), stage runs once
        cancelled."""
        self.train_pool.shutdown(wait=True, cancel_futures=True)
        self.eval_pool.shutdown(wait=True, cancel_futures=True)

    def close(self, status: str) -> dict[str, Any]:
        self._finish(status)
        return {**summary(self.study), "stopped_by": self.stopped_by}

    def _to_ask(self) -> int:
        """Trials still to ask: none once a budget (time, ratio, patience) has run out."""
        if self.stopped_by is None:
            self.stopped_by = budget_stop(
                self.config.study,
                self.study.get_trials(deepcopy=False),
                self.started,
                time.time(),
                self.objective.maximize,
            )
            if self.stopped_by is not None:
                self.logger.warning(
                    "study %s: %s; no new trial is asked, the %d in flight finish",
                    self.config.study.name,
                    self.stopped_by,
                    len(self.slots),
                )
                self.tracker.set_tags(self.parent_run_id, {"edgetune.stopped_by": self.stopped_by})
        if self.stopped_by is not None:
            return 0
        return still_to_ask(self.study, study_budget(self.config.study))

    def _others_running(self) -> bool:
        """Whether trials of this study run elsewhere; reconciles the stale ones first."""
        if self.slots:
            return False
        self._reconcile()
        others = foreign_running(self.study, self.me)
        if others and not self.waiting_logged:
            self.waiting_logged = True
            self.logger.warning(
                "waiting for %d trial(s) held by another study process (%s)",
                len(others),
                ", ".join(str(t.user_attrs.get(ATTR_OWNER, "unknown owner")) for t in others),
            )
        if others:
            time.sleep(self.config.study.heartbeat_s)
        return bool(others) or self._to_ask() > 0

    def _beat(self, force: bool = False) -> None:
        """Refresh the heartbeat of every trial this process holds."""
        now = time.time()
        if not force and now - self.last_beat < self.config.study.heartbeat_s:
            return
        self.last_beat = now
        self.study.set_user_attr(ATTR_PARENT, {"owner": self.me, ATTR_HEARTBEAT: now})
        if now - self.last_reconcile >= self.config.study.stale_after_s / 2:
            self.last_reconcile = now
            self._reconcile()
        storage = self.study._storage
        for slot in list(self.slots.values()):
            try:
                storage.set_trial_user_attr(slot.trial._trial_id, ATTR_HEARTBEAT, now)
                storage.set_trial_user_attr(slot.trial._trial_id, ATTR_STAGE, slot.stage)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # told meanwhile

    def _sample(self) -> tuple[optuna.Trial, dict[str, Any]]:
        """Ask for a trial whose parameters meet the study's constraints.

        A sample that breaks a constraint (or whose range is empty for it) is told FAIL
        with the reason and marked rejected: it ran nothing and does not count as a trial.
        """
        study = self.config.study
        base = self.config.train.model_dump()
        for _ in range(MAX_REJECTED):
            trial = self.study.ask()
            trial.set_user_attr(ATTR_OWNER, self.me)
            trial.set_user_attr(ATTR_HEARTBEAT, time.time())
            trial.set_user_attr(ATTR_STAGE, "train")
            try:
                params = suggest(trial, study.search_space, base)
                reason = violated(study.constraints, {**base, **params})
            except EmptyRange as exc:
                reason = f"empty range: {exc}"
            if reason is None:
                return trial, params
            trial.set_user_attr(ATTR_REJECTED, True)
            trial.set_user_attr(ATTR_FAIL_STAGE, "sample")
            trial.set_user_attr(ATTR_FAIL_REASON, reason)
            self.study.tell(trial, state=TrialState.FAIL)
            self.logger.info("trial %d: sample rejected: %s", trial.number, reason)
        raise SampleRejected(
            f"study {study.name}: {MAX_REJECTED} samples in a row broke the constraints (last: "
            f"{reason}); loosen study.constraints or narrow the ranges to where they hold"
        )

    def _ask(self, pool: ThreadPoolExecutor) -> None:
        trial, params = self._sample()
        run_id = self.tracker.start_run(
            self.experiment_id,
            f"trial-{trial.number}",
            parent_id=self.parent_run_id,
            tags={
                "edgetune.study": self.config.study.name,
                "edgetune.trial": str(trial.number),
                **workloads.run_tags(self.config),
            },
        )
        trial.set_user_attr(ATTR_RUN_ID, run_id)
        retry_of = trial.user_attrs.get(ATTR_RETRY_OF)
        self.tracker.log_params(run_id, {**params, "trial": trial.number})
        if retry_of is not None:
            self.tracker.set_tags(run_id, {"edgetune.retry_of": str(retry_of)})
        slot = Slot(trial=trial, params=params, run_id=run_id, times={"asked_at": time.time()})
        assert self.stages is not None
        future = _in_context(pool, self.stages.train, slot)
        self.slots[future] = slot
        self.in_train += 1
        self.logger.info(
            "trial %d: training with %s%s",
            trial.number,
            params,
            f" (retry of trial {retry_of})" if retry_of is not None else "",
        )

    def _advance(self, future: Future[Any]) -> None:
        slot = self.slots.pop(future)
        stage = slot.stage
        phase = "train" if stage == "train" else "evaluate"
        slot.times[f"{phase}_returned_at"] = time.time()  # seen by the parent: overhead included
        pipelined = self.config.orchestration.pipelined
        if stage == "train" and pipelined:
            self.in_train -= 1  # the GPU slot is free as soon as training and export end
        elif stage != "train":
            self.in_eval -= 1
            if not pipelined:
                self.in_train -= 1  # blocking design: the slot was held through evaluation
        try:
            outcome = future.result()
        except BaseException as exc:
            if stage == "train" and not pipelined:
                self.in_train -= 1
            self._fail(slot, stage, exc)
            return
        if stage == "train":
            if "pruned" in outcome:
                if not pipelined:
                    self.in_train -= 1
                if "started_at" in outcome:  # what it spent and would have: the time saved
                    slot.times.update(
                        train_started=outcome["started_at"], train_finished=outcome["finished_at"]
                    )
                    slot.trial.set_user_attr("epochs_run", outcome["epochs_run"])
                    slot.trial.set_user_attr("epochs_planned", outcome["epochs"])
                self._record(slot)
                self._prune(slot, outcome["pruned"])
                return
            slot.float_metrics = outcome["metrics"]
            slot.times.update(
                train_started=outcome["started_at"], train_finished=outcome["finished_at"]
            )
            slot.stage = "evaluate"
            self.slots[_in_context(self.eval_pool, self._evaluate, slot)] = slot
            self.in_eval += 1
        else:
            self._complete(slot, outcome)

    def _evaluate(self, slot: Slot) -> dict[str, Any]:
        """Compile, then evaluate on the board; runs in an evaluation thread."""
        assert self.stages is not None
        slot.stage = "compile"
        compiled = self.stages.compile(slot)
        slot.times.update(
            compile_started=compiled["started_at"], compile_finished=compiled["finished_at"]
        )
        slot.stage = "device"
        device = self.stages.evaluate(slot, compiled["artifact"])
        slot.times.update(
            device_started=device["started_at"], device_finished=device["finished_at"]
        )
        return {"compile": compiled, "device": device}

    # Telling ------------------------------------------------------------------------------
    def _record(self, slot: Slot) -> None:
        for key, value in {**slot.float_metrics, **slot.times}.items():
            slot.trial.set_user_attr(key, value)

    def _complete(self, slot: Slot, outcome: dict[str, Any]) -> None:
        device = outcome["device"]["metrics"]
        objective = self.objective
        self._record(slot)
        measured = {**outcome["compile"].get("metrics", {}), **device}
        for key in (*objective.trial_attrs, "device_latency_ms", "compiled_size_mb"):
            if key in measured:
                slot.trial.set_user_attr(key, measured[key])
        slot.trial.set_user_attr("compiled_artifact", outcome["compile"]["artifact"])
        missing = [m for m in self.goals.metrics if m not in measured]
        if missing:
            self._fail(slot, "evaluate", RuntimeError(f"the stages measured no {missing[0]}"))
            return
        value = device[objective.metric]
        broken = self.goals.constrain(slot.trial, measured)
        values = [float(measured[m]) for m in self.goals.metrics]
        self.study.tell(slot.trial, values if self.goals.multi else value)
        self.board_failures.clear()
        self.tracker.set_tags(slot.run_id, {"edgetune.state": "COMPLETE"})
        self.tracker.end_run(slot.run_id, "FINISHED")
        self.logger.info(
            "trial %d: %s %.5f (float %.5f)%s",
            slot.trial.number,
            objective.label,
            value,
            slot.float_metrics.get(objective.float_metric, float("nan")),
            f"; infeasible: {'; '.join(broken)}" if broken else "",
        )
        reports.on_trial_outcome(self, slot.trial)

    def _fail(self, slot: Slot, stage: str, exc: BaseException) -> None:
        reason = _reason(exc)
        where = slot.stage if stage == "evaluate" else stage
        self._record(slot)
        slot.trial.set_user_attr(ATTR_FAIL_STAGE, where)
        slot.trial.set_user_attr(ATTR_FAIL_REASON, reason)
        self.study.tell(slot.trial, state=TrialState.FAIL)
        self.tracker.set_tags(
            slot.run_id, {"edgetune.state": "FAIL", "edgetune.fail_reason": reason}
        )
        self.tracker.log_text(slot.run_id, "".join(traceback.format_exception(exc)), "error.txt")
        self.tracker.end_run(slot.run_id, "FAILED")
        frozen = self.study._storage.get_trial(slot.trial._trial_id)
        board_down = _board_down(exc)  # not the trial's fault: its retry is not charged
        retried = enqueue_retry(
            self.study, frozen, self.config.study.retries, charge=not board_down
        )
        self.logger.warning(
            "trial %d failed in %s: %s; %s",
            slot.trial.number,
            where,
            reason,
            "its parameters are enqueued again" if retried else "no retry left",
        )
        reports.on_trial_outcome(self, slot.trial)
        if where == "device":
            self._board_failed(reason)

    def _board_failed(self, reason: str) -> None:
        self.board_failures.append(reason)
        limit = self.config.device.max_consecutive_failures
        if len(self.board_failures) >= limit:
            raise BoardPaused(
                f"board {self.config.device.name!r} failed {limit} evaluations in a row (last: "
                f"{reason}); the study is paused and its trials in flight are enqueued again: "
                f"check the board with 'edgetune device check CONFIG', then run the study again"
            )

    def _prune(self, slot: Slot, reason: str) -> None:
        slot.trial.set_user_attr(ATTR_FAIL_REASON, reason)
        self.study.tell(slot.trial, state=TrialState.PRUNED)
        self.tracker.set_tags(slot.run_id, {"edgetune.state": "PRUNED"})
        self.tracker.end_run(slot.run_id, "FINISHED")
        self.logger.info("trial %d: %s", slot.trial.number, reason)
        reports.on_trial_outcome(self, slot.trial)

    def _abandon(self, reason: str) -> None:
        """Tell every trial still in flight FAIL, and enqueue it again, so none is lost."""
        slots = list(self.slots.values())
        self.slots.clear()
        if self.config.orchestration.mode == "deployments" and slots:
            try:
                cancel_stage_runs(self.config.study.name, [s.trial.number for s in slots])
            except Exception as exc:  # the API is gone too: reconciliation cancels them later
                self.logger.warning("could not cancel the stage runs: %s", _reason(exc))
        for slot in slots:
            try:
                slot.trial.set_user_attr(ATTR_FAIL_STAGE, slot.stage)
                slot.trial.set_user_attr(ATTR_FAIL_REASON, reason)
                self.study.tell(slot.trial, state=TrialState.FAIL)
                frozen = self.study._storage.get_trial(slot.trial._trial_id)
                enqueue_retry(self.study, frozen, self.config.study.retries, charge=False)
            except Exception as exc:  # the database is gone: the next run reconciles it
                self.logger.warning(
                    "trial %d left for the next run to reconcile: %s",
                    slot.trial.number,
                    _reason(exc),
                )
            self.tracker.set_tags(
                slot.run_id, {"edgetune.state": "FAIL", "edgetune.fail_reason": reason}
            )
            self.tracker.end_run(slot.run_id, "KILLED")

    # The end ------------------------------------------------------------------------------
    def _finish(self, status: str) -> None:
        best = best_trial(self.study)
        if best is not None and status == "FINISHED":
            self._register(best)
        record = summary(self.study)
        self.tracker.log_text(self.parent_run_id, _json(record), "study/summary.json")
        self.tracker.log_metrics(
            self.parent_run_id, {f"trials_{k.lower()}": v for k, v in record["counts"].items()}
        )
        if best is not None:
            self.tracker.log_metrics(
                self.parent_run_id,
                {
                    f"best_{self.objective.metric}": primary_value(best),
                    "best_trial": best.number,
                },
            )
        reports.on_study_end(self, status)
        self.tracker.end_run(self.parent_run_id, status)

    def _register(self, best: optuna.trial.FrozenTrial) -> None:
        cfg = self.config
        if isinstance(cfg, workloads.DetectorStudy):
            self._register_detector(cfg, best)
            return
        run_id = best.user_attrs[ATTR_RUN_ID]
        variant = variants.variant_name(cfg)
        # A variant's best takes the variant's alias; the run crowns the best variant.
        alias = variant or CHAMPION
        version = self.tracker.register(
            cfg.registered_model_name,
            run_id,
            workloads.registered_path(cfg),
            alias=alias,
            tags={
                "study": cfg.study.name,
                "trial": best.number,
                self.objective.metric: primary_value(best),
                "compiler": cfg.compile.backend,
                "device": cfg.device.name,
                **({"variant": variant} if variant else {}),
            },
            description=(
                f"Best trial of study {cfg.study.name} by {self.objective.label} "
                f"({cfg.device.name})."
            ),
        )
        self._champion(cfg.registered_model_name, version, best.number, alias)

    def _register_detector(
        self, cfg: workloads.DetectorStudy, best: optuna.trial.FrozenTrial
    ) -> None:
        """The detector's champion is the best of all its runs (trainings and trials alike):
        the best trial takes the alias only if it beats the current champion."""
        from tasks.detection.pipeline import select_champion

        chosen = select_champion(cfg, self.tracker)
        if chosen is None:
            return
        won = chosen["run_id"] == best.user_attrs[ATTR_RUN_ID]
        self._champion(chosen["model"], chosen["version"], best.number if won else None)
        if not won:
            self.logger.info(
                "champion unchanged: %s version %s (run %s) is better than trial %d",
                chosen["model"],
                chosen["version"],
                chosen["run_id"],
                best.number,
            )

    def _champion(self, model: str, version: Any, trial: int | None, alias: str = CHAMPION) -> None:
        self.study.set_user_attr(
            "champion", {"model": model, "version": version, "alias": alias, "trial": trial}
        )
        if trial is not None:
            self.logger.info(
                "%s: trial %d registered as %s version %s (@%s)",
                "champion" if alias == CHAMPION else f"variant {alias}",
                trial,
                model,
                version,
                alias,
            )


def run_studies(runners: list[StudyRunner], parallel: int) -> list[dict[str, Any]]:
    """Run studies in turn on ``parallel`` shared GPU slots; return their summaries.

    The next study opens as soon as the open ones have nothing left to train, so its first
    trials train while the last trials of the one before are compiled and measured on the
    board: the GPU does not wait at the seam between studies (a variant run). Stopped by an
    exception, every open study tells its trials in flight FAIL, enqueues them again and
    ends KILLED.
    """
    pending, active = list(runners), list[StudyRunner]()
    results: dict[int, dict[str, Any]] = {}
    status = "FINISHED"
    try:
        while pending or active:
            while pending and not any(r.training() for r in active):
                runner = pending.pop(0)
                runner.open()
                active.append(runner)
            free = parallel - sum(r.in_train for r in active)
            for runner in active:
                free -= runner.fill(free)
            for runner in [r for r in active if r.done()]:
                active.remove(runner)
                runner.shutdown()
                results[id(runner)] = runner.close("FINISHED")
            futures = {future: r for r in active for future in r.slots}
            if futures:
                finished, _ = wait(
                    list(futures),
                    timeout=min(r.config.study.heartbeat_s for r in active),
                    return_when=FIRST_COMPLETED,
                )
                for future in finished:
                    futures[future]._advance(future)
            for runner in active:
                runner._beat()
    except BaseException as exc:
        status = "KILLED"
        STOP.set()
        for runner in active:
            runner._abandon(f"study interrupted: {_reason(exc)}")
        raise
    finally:
        try:
            for runner in active:
                runner.shutdown()
        finally:
            STOP.clear()
            for runner in active:
                runner.close(status)
    return [results[id(r)] for r in runners]


def _resolve(config: dict[str, Any] | str, overrides: list[str] | None) -> StudyTarget:
    if isinstance(config, str):
        return workloads.load_study_config(config, overrides)
    return workloads.parse_study_config(
        apply_overrides(config, overrides or []), source="tune parameter 'config'"
    )


def _run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    if isinstance(config, dict):
        return f"tune-{config.get('study', {}).get('name', 'study')}"
    return f"tune-{Path(str(config)).stem}"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "study.search_space":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = mask_uri(value) if isinstance(value, str) else value
    return flat


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str)


@flow(name="tune", flow_run_name=_run_name, validate_parameters=False)
def tune(
    config: dict[str, Any] | str,
    overrides: list[str] | None = None,
    restart: bool = False,
    reuse_best: bool = False,
) -> dict[str, Any]:
    """Run (or continue) a study until ``study.n_trials`` trials have an outcome.

    ``config`` is a resolved config (a mapping) or the path of a YAML file readable where
    this flow runs; ``overrides`` are ``section.key=value`` items applied on top. Running
    the same study again continues it; ``restart`` deletes it first; ``reuse_best`` skips
    the search and retrains the best parameters found as a one-trial study ``<name>-best``.
    """
    cfg = _resolve(config, overrides)
    if cfg.variants:
        return run_variants(cfg, restart=restart, reuse_best=reuse_best)
    return _tune_one(cfg, restart=restart, reuse_best=reuse_best)


def _tune_one(cfg: StudyTarget, *, restart: bool, reuse_best: bool) -> dict[str, Any]:
    best = None
    if reuse_best:
        cfg, best = reuse_best_config(cfg)
    if restart and forget_study(cfg):
        get_run_logger().warning("study %s deleted: starting afresh", cfg.study.name)
    study = open_study(cfg.storage_url, cfg.study, cfg.seed, objective=workloads.objective_for(cfg))
    check_fingerprint(study, cfg)
    if best is not None:
        enqueue_best(study, best)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    (
        cfg.run_path / f"{cfg.study.name}.yaml" if reuse_best else cfg.run_path / "config.yaml"
    ).write_text(dump_config(cfg))
    started = time.time()
    result = StudyRunner(cfg, study).run()
    if cfg.study.retrain != "none" and not reuse_best and result.get("best"):
        result["retrained"] = retrain_best(cfg)
    result["seconds"] = time.time() - started
    return result


def run_variants(cfg: StudyTarget, *, restart: bool, reuse_best: bool) -> dict[str, Any]:
    """Run each variant as its own study on shared GPU slots, compare them in one record,
    and give the best variant's champion the ``champion`` alias (see tasks/variants.py).

    ``reuse_best`` retrains the winning variant's best parameters (``<study>-<variant>-best``);
    ``study.retrain`` retrains them after the run (``<study>-<variant>-final``).
    """
    logger = get_run_logger()
    started = time.time()
    configs = variants.expand(cfg)
    if reuse_best:
        winner = variants.compare(cfg, configs)["winner"]
        if winner is None:
            raise NothingToReuseError(
                f"no variant of {cfg.study.name!r} has a COMPLETE trial to reuse; run the "
                f"variants first (edgetune tune CONFIG)"
            )
        chosen = next(v for spec, v in configs if spec.name == winner)
        logger.info("reusing the best trial of variant %s, the best of the variants", winner)
        return {**_tune_one(chosen, restart=False, reuse_best=True), "variant": winner}
    objective = workloads.objective_for(cfg)
    studies = []
    for _, variant in configs:
        if restart and forget_study(variant):
            logger.warning("study %s deleted: starting afresh", variant.study.name)
        study = open_study(variant.storage_url, variant.study, variant.seed, objective=objective)
        check_fingerprint(study, variant)  # every variant, before any trains
        studies.append(study)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    (cfg.run_path / "config.yaml").write_text(dump_config(cfg))
    tracker = Tracker(cfg.tracking_uri)
    experiment = tracker.experiment_id(
        cfg.experiment_name, artifact_location=workloads.artifact_location(cfg)
    )
    group = tracker.start_run(
        experiment,
        f"variants-{cfg.study.name}",
        tags={"edgetune.study": cfg.study.name, "edgetune.kind": "variants"},
    )
    runners = []
    for (spec, variant), study in zip(configs, studies, strict=True):
        study.set_user_attr(
            "variant",
            {"of": cfg.study.name, "name": spec.name, "search": spec.search, "set": spec.set},
        )
        records = reports.records_root(variant)
        records.mkdir(parents=True, exist_ok=True)
        (records / "config.yaml").write_text(dump_config(variant))
        runners.append(StudyRunner(variant, study, group_run_id=group))
    logger.info(
        "variants of %s: %s",
        cfg.study.name,
        ", ".join(f"{spec.name} ({'search' if spec.search else 'once'})" for spec, _ in configs),
    )
    status = "FAILED"
    try:
        outcomes = run_studies(runners, cfg.study.parallel)
        record = variants.compare(cfg, configs)
        record["champion"] = _crown(cfg, record, tracker)
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            tracker.end_run(group, "KILLED")
    for row, outcome in zip(record["variants"], outcomes, strict=True):
        row["stopped_by"] = outcome.get("stopped_by")
    variants.write_comparison(cfg, record)
    _log_comparison(tracker, group, record)
    winner = next((v for spec, v in configs if spec.name == record["winner"]), None)
    if cfg.study.retrain != "none" and winner is not None:
        record["retrained"] = retrain_best(winner)
    record["seconds"] = time.time() - started
    return record


def _crown(cfg: StudyTarget, record: dict[str, Any], tracker: Tracker) -> dict[str, Any] | None:
    """Point ``champion`` at the winning variant's registered model (classifiers); for a
    detector, its champion is the best of all its runs, variants included."""
    winner = next((row for row in record["variants"] if row["winner"]), None)
    if isinstance(cfg, workloads.DetectorStudy):
        from tasks.detection.pipeline import select_champion

        chosen = select_champion(cfg, tracker)
        if chosen is None:
            return None
        won = winner is not None and chosen["run_id"] == winner["best"].get("mlflow_run_id")
        return {
            **chosen,
            "trial": winner["best"]["trial"] if won and winner else None,
            "variant": winner["variant"] if won and winner else None,
        }
    if winner is None or not winner.get("champion"):
        return None
    version = winner["champion"]["version"]
    model = winner["champion"]["model"]
    tracker.client.set_registered_model_alias(model, CHAMPION, str(version))
    get_run_logger().info(
        "champion: variant %s, trial %s, registered as %s version %s (@%s)",
        winner["variant"],
        winner["best"]["trial"],
        model,
        version,
        CHAMPION,
    )
    return {
        "model": model,
        "version": version,
        "alias": CHAMPION,
        "trial": winner["best"]["trial"],
        "variant": winner["variant"],
    }


def _log_comparison(tracker: Tracker, run_id: str, record: dict[str, Any]) -> None:
    metric = record["objective"]
    for row in record["variants"]:
        values = {
            f"{metric}.{row['variant']}": (row.get("best") or {}).get(metric),
            f"trials_complete.{row['variant']}": (row.get("counts") or {}).get("COMPLETE"),
        }
        tracker.log_metrics(run_id, {k: v for k, v in values.items() if v is not None})
    tags = {"edgetune.winner": record["winner"]} if record["winner"] else {}
    tracker.set_tags(run_id, tags)
    tracker.log_text(run_id, _json(record), "variants.json")
    tracker.end_run(run_id, "FINISHED")


def retrain_best(cfg: StudyTarget) -> dict[str, Any]:
    """After the search: train the best parameters again as ``<study>-final`` (on train, or
    on train and val), compile, evaluate on the board and register; returns its summary.

    Running the study again after the search ended resumes (or reuses) this one trial.
    """
    logger = get_run_logger()
    final_cfg, best = reuse_best_config(cfg, retrain=cfg.study.retrain)
    final = open_study(
        final_cfg.storage_url,
        final_cfg.study,
        final_cfg.seed,
        objective=workloads.objective_for(cfg),
    )
    enqueue_best(final, best)
    logger.info(
        "retraining trial %d's parameters as study %s (%s, seed %d)",
        best.number,
        final_cfg.study.name,
        cfg.study.retrain,
        final_cfg.seed,
    )
    outcome = StudyRunner(final_cfg, final).run()
    return {
        "study": final_cfg.study.name,
        "from_trial": best.number,
        "data": cfg.study.retrain,
        "seed": final_cfg.seed,
        "best": outcome.get("best"),
        "counts": outcome["counts"],
        "champion": outcome.get("champion"),
    }
