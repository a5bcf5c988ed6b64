"""The ask/tell loop of a study over pipelined trial stages.

``ask → train (GPU slot) → compile → evaluate on the board (board slot) → tell``

A trial holds a GPU slot only while it trains and exports; its compilation and board
evaluation overlap the training of the next trials. New trials are asked only while a GPU
slot is free and fewer than ``study.max_pending`` trained models wait for the compiler or
the board (queued, not yet being compiled or on the board), so the sampler always asks
with the freshest results told, and a GPU never idles while the queues have room. Every failure is
told FAIL with its stage and reason; nothing is told a sentinel value.

The loop builds nothing it talks to: it receives its stages (``tasks.hpo.launch.Stages``),
its logger, its tracker and its outcome hooks, so tests drive it with fakes in
milliseconds. ``run_studies`` runs several loops (a variant run) on shared GPU slots.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks.board import ON_BOARD, BoardBusyError
from tasks.devices.base import DeviceConfigError, DeviceUnreachableError
from tasks.failures import DeterministicFailure, deterministic_names
from tasks.hpo import optuna_ops
from tasks.hpo.launch import Slot, StageFailed, Stages
from tasks.hpo.recovery import (
    ATTR_HEARTBEAT,
    ATTR_INFRA,
    ATTR_OWNER,
    ATTR_PARENT,
    ATTR_RETRY_OF,
    ATTR_STAGE,
    DiskFull,
    SpaceReserve,
    current_owner,
    disk_full_error,
    enqueue_missing_retries,
    enqueue_retry,
    find_stale,
    foreign_running,
    gone_reason,
    own_alias,
    still_to_ask,
)
from tasks.hpo.repeats import answer, earlier_result
from tasks.hpo.study import (
    ATTR_DRAWN,
    ATTR_FAIL_REASON,
    ATTR_FAIL_STAGE,
    ATTR_FLAGS,
    ATTR_REJECTED,
    ATTR_RUN_ID,
    best_trial,
    budget_stop,
    goals_for,
    learns_from_rejections,
    primary_value,
    study_budget,
    suggest,
    summary,
)
from tasks.hpo.trial_stages import STOP
from tasks.space import EmptyRange, feasible_draw, shortfalls, violated
from tasks.tracking import CHAMPION, Tracker, mask_uri
from tasks.workloads.base import (
    CompileOutcome,
    DeviceOutcome,
    Pruned,
    Registration,
    StudyTarget,
    TrainOutcome,
    Workload,
)
from tasks.workloads.registry import workload_for


class SampleRejected(RuntimeError):
    """No parameters meet the study's constraints: its feasible region looks empty."""


class QualityFailed(RuntimeError):
    """The measured model is broken in a way the config fails trials for (a collapse)."""


class BoardPaused(RuntimeError):
    """The board failed ``device.max_consecutive_failures`` times in a row."""


#: Samples in a row the sampler may propose that break the constraints before parameters
#: drawn at random are asked instead (each rejected sample is a stored trial, cheap but kept).
MAX_REJECTED = 20
#: Random draws that may all break the constraints before the study gives up.
MAX_DRAWS = 10_000
#: Failures of the board rather than of the trial (bounded by device.max_consecutive_failures).
BOARD_DOWN = (DeviceUnreachableError, BoardBusyError)


class Logger(Protocol):
    def info(self, msg: str, *args: Any) -> None: ...

    def warning(self, msg: str, *args: Any) -> None: ...


class Hooks(Protocol):
    """Called after each trial is told and when the study ends (``tasks.hpo.reports``)."""

    def on_trial_outcome(self, run: Any, trial: optuna.Trial | FrozenTrial) -> None: ...

    def on_study_end(self, run: Any, state: str) -> None: ...


class NoHooks:
    def on_trial_outcome(self, run: Any, trial: optuna.Trial | FrozenTrial) -> None:
        return None

    def on_study_end(self, run: Any, state: str) -> None:
        return None


def board_down(exc: BaseException) -> bool:
    """Whether a failure is the board's rather than the trial's (its retry is not charged):
    the board is down or busy (``BOARD_DOWN``), or refuses its settings (``DeviceConfigError``:
    host key, key, work dir, no Python or runtime for the evaluator)."""
    kinds = (*BOARD_DOWN, DeviceConfigError)
    if isinstance(exc, kinds):
        return True
    # A stage run on the edge pool reports its exception by name in its final state.
    return isinstance(exc, StageFailed) and any(t.__name__ in str(exc) for t in kinds)


def deterministic(exc: BaseException) -> bool:
    """Whether a failure would repeat with the same parameters (a divergence, a refused
    input, a collapse): its trial is not retried."""
    if isinstance(exc, DeterministicFailure | QualityFailed):
        return True
    # A stage run on a work pool reports its exception by name in its final state.
    text = str(exc)
    return isinstance(exc, StageFailed) and any(f"{n}:" in text for n in deterministic_names())


def reason(exc: BaseException) -> str:
    """An exception as a one-line reason: its type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _in_context(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Submit with a copy of the caller's context (stages show as its children in Prefect)."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


class StudyLoop:
    """The ask/tell loop of one study; ``run()`` returns the study's summary.

    ``stages`` launches the trials' stages; ``tracker`` records the study and its trials in
    MLflow; ``hooks`` write the study's records after each outcome and at the end.
    """

    def __init__(
        self,
        config: StudyTarget,
        study: optuna.Study,
        *,
        stages: Stages,
        logger: Logger,
        tracker: Tracker | None = None,
        hooks: Hooks | None = None,
        workload: Workload[Any] | None = None,
        group_run_id: str | None = None,
    ) -> None:
        self.config = config
        self.study = study
        self.stages = stages
        self.logger = logger
        self.tracker = tracker if tracker is not None else Tracker(config.tracking_uri)
        self.hooks: Hooks = hooks if hooks is not None else NoHooks()
        self.workload = workload if workload is not None else workload_for(config)
        self.objective = self.workload.study_objective
        self.goals = goals_for(config.study, self.objective)
        self.group_run_id = group_run_id  # the MLflow run of a variant run, if any
        self.me = current_owner()
        self.parent_run_id = ""
        self.experiment_id = ""
        self.slots: dict[Future[Any], Slot] = {}
        self.asking: Slot | None = None  # a trial asked whose training is not submitted yet
        self.cut_short: list[Slot] = []  # trials whose telling a fault cut short
        self.failing: dict[int, BaseException] = {}  # trials being told FAIL, and why
        self.in_train = 0  # trials holding a GPU slot
        self.kick: Future[None] = Future()  # set when a queued model's stage begins
        self.kick_lock = threading.Lock()
        self.stage_lock = threading.Lock()  # a trial's stage is written in the order it moves
        self.board_failures: list[str] = []
        self.stopped_by: str | None = None
        #: The study's trials as ``_to_ask`` last read them (one read per turn).
        self.seen: list[FrozenTrial] = []
        self.started = time.time()
        self.last_beat = 0.0
        self.last_reconcile = self.started
        self.waiting_logged = False
        self.train_pool: ThreadPoolExecutor  # made by open()
        self.eval_pool: ThreadPoolExecutor

    # Setup ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        return run_studies([self], self.config.study.parallel)[0]

    def open(self) -> None:
        """Start the study: its training and evaluation pools (first: a study that fails to
        start is stopped like one that ran), its MLflow run and its inputs."""
        self.started = time.time()
        cfg = self.config.study
        self.train_pool = ThreadPoolExecutor(cfg.parallel, thread_name_prefix="train")
        # room for the models waiting, and for those being compiled or on the board
        self.eval_pool = ThreadPoolExecutor(
            (cfg.max_pending or cfg.parallel) + cfg.parallel, thread_name_prefix="evaluate"
        )
        self._start()

    def _start(self) -> None:
        cfg = self.config
        self.experiment_id = self.tracker.experiment_id(
            cfg.experiment_name, artifact_location=self.workload.artifact_location()
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
        self.tracker.log_params(self.parent_run_id, flatten(cfg.model_dump(mode="json")))
        inputs = self.stages.prepare(self.parent_run_id)
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
            why = f"stale: {stale.reason} (stage {stage})"
            try:
                optuna_ops.set_trial_attrs(
                    self.study,
                    optuna_ops.trial_id(trial),
                    {ATTR_FAIL_STAGE: stage, ATTR_FAIL_REASON: why},
                )
                self.study.tell(trial.number, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # its owner finished it meanwhile
            run_id = trial.user_attrs.get(ATTR_RUN_ID)
            if run_id:
                self._end_trial_run(run_id, "FAIL", "FAILED", why)
            self.stages.cancel([trial.number])
            # marked by its study process, which could not tell it FAIL (the disk was full)
            charge = not trial.user_attrs.get(ATTR_INFRA)
            retried = enqueue_retry(self.study, trial, self.config.study.retries, charge=charge)
            self.logger.warning(
                "trial %d: %s; %s",
                trial.number,
                why,
                "its parameters are enqueued again" if retried else "no retry left",
            )
        for number in enqueue_missing_retries(self.study):
            self.logger.warning(
                "trial %d: failed for a fault outside it and its retry was missing (the disk "
                "was full); its parameters are enqueued again",
                number,
            )

    # The loop, as run_studies drives it ------------------------------------------------------
    def fill(self, gpu_free: int) -> int:
        """Ask trials while one of ``gpu_free`` GPU slots and a place in the compile/board
        queue are free; returns how many were asked."""
        cfg = self.config.study
        max_pending = cfg.max_pending or cfg.parallel
        if gpu_free <= 0 or self.in_train >= cfg.parallel or self.waiting() >= max_pending:
            return 0  # no room: the study's trials are not read (each turn would)
        to_ask, asked = self._to_ask(), 0
        while to_ask and asked < gpu_free and self.in_train < cfg.parallel:
            if self.waiting() >= max_pending:
                break
            to_ask -= 1
            if self._ask():  # a repeat answered from an earlier trial takes no GPU slot
                asked += 1
        return asked

    def waiting(self) -> int:
        """Trained models queued for the compiler or the board (not those in either)."""
        return sum(slot.waiting for slot in list(self.slots.values()))

    def rearm(self) -> Future[None]:
        """A future that ``_started`` will set: the driver waits on it with the stages."""
        with self.kick_lock:
            if self.kick.done():
                self.kick = Future()
            return self.kick

    def _started(self) -> None:
        with self.kick_lock:
            if not self.kick.done():
                self.kick.set_result(None)

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

    def stop(self, status: str, why: str, *, records: bool = True) -> None:
        """End a study stopped by a fault or an interrupt: its MLflow run first, then its
        records (not on a full disk: the next run writes them). Never raises: the fault
        that stopped the study is the error to show, and the next run ends what is left."""
        if not self.parent_run_id:
            return  # it stopped before its MLflow run started
        steps: list[tuple[str, Callable[[], None]]] = [
            ("its MLflow run is left for the next run to end", lambda: self._end(status, why))
        ]
        if records:
            steps.append(("its records are not saved", lambda: self._records(status)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                self.logger.warning("study %s: %s: %s", self.config.study.name, what, reason(exc))

    def _end(self, status: str, why: str) -> None:
        self.tracker.set_tags(self.parent_run_id, {"edgetune.end_reason": why})
        self.tracker.end_run(self.parent_run_id, status)

    def _to_ask(self) -> int:
        """Trials still to ask: none once a budget (time, ratio, patience) has run out.

        Reads the study's trials once (``self.seen``); the asks of the same turn look for a
        repeated parameter set in that read, not in one of their own."""
        if self.stopped_by is not None:
            return 0
        self.seen = trials = self.study.get_trials(deepcopy=False)
        self.stopped_by = budget_stop(
            self.config.study, trials, self.started, time.time(), self.objective.maximize
        )
        if self.stopped_by is not None:
            self.logger.warning(
                "study %s: %s; no new trial is asked, the %d in flight finish",
                self.config.study.name,
                self.stopped_by,
                len(self.slots),
            )
            self.tracker.set_tags(self.parent_run_id, {"edgetune.stopped_by": self.stopped_by})
            return 0
        return still_to_ask(trials, study_budget(self.config.study))

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

    def beat(self, force: bool = False) -> None:
        """Refresh the heartbeat of every trial this process holds."""
        now = time.time()
        if not force and now - self.last_beat < self.config.study.heartbeat_s:
            return
        self.last_beat = now
        self.study.set_user_attr(ATTR_PARENT, {"owner": self.me, ATTR_HEARTBEAT: now})
        if now - self.last_reconcile >= self.config.study.stale_after_s / 2:
            self.last_reconcile = now
            self._reconcile()
        for slot in list(self.slots.values()):
            # under the stage lock: an evaluation thread moving the trial on (``_enter``)
            # writes its new stage after this, never before
            with (
                self.stage_lock,
                contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError),  # told
            ):
                optuna_ops.set_trial_attrs(
                    self.study, slot.trial_id, {ATTR_HEARTBEAT: now, ATTR_STAGE: slot.stage}
                )

    # Asking -----------------------------------------------------------------------------------
    def _sample(self) -> tuple[optuna.Trial, dict[str, Any]]:
        """Ask for a trial whose parameters meet the study's constraints.

        A sample that breaks a constraint (or whose range is empty for it) is rejected
        (``_reject``): it runs nothing and counts as no trial, and TPE learns from it. After
        MAX_REJECTED of them in a row, parameters drawn at random that meet the constraints
        are enqueued and asked (``_enqueue_feasible``): a sampler that keeps proposing
        infeasible samples never stops a study whose feasible region is not empty.
        """
        cfg = self.config.study
        base = self.config.train.model_dump()
        why: str | None = None
        for attempt in range(MAX_REJECTED + 2):
            if attempt >= MAX_REJECTED:
                self._enqueue_feasible(base, attempt)
            trial = self.study.ask()
            # From here a stop (Ctrl-C) tells it FAIL: abandon() reads ``asking``.
            self.asking = Slot(trial, {}, "", self.parent_run_id)
            optuna_ops.set_attrs(
                trial, {ATTR_OWNER: self.me, ATTR_HEARTBEAT: time.time(), ATTR_STAGE: "train"}
            )
            try:
                params = suggest(trial, cfg.search_space, base)
                why = violated(cfg.constraints, {**base, **params})
                amounts = shortfalls(cfg.constraints, {**base, **params})
            except EmptyRange as exc:
                why, amounts = f"empty range: {exc}", {"empty range": 1.0}
            if why is None:
                return trial, params
            self._reject(trial, why, amounts)
        # Only parameters drawn to meet the constraints, then rejected when asked, get here
        # (another process of the study asked the enqueued parameters first).
        raise SampleRejected(
            f"study {cfg.name}: parameters drawn at random to meet the constraints were "
            f"rejected when asked (last: {why}); run the study again"
        )

    def _reject(self, trial: optuna.Trial, why: str, amounts: dict[str, float]) -> None:
        """Tell a rejected sample PRUNED, with how far it is from each constraint where the
        sampler reads it (TPE ranks it with the worst trials, and asks elsewhere); FAIL
        would teach the sampler nothing. It carries no value and no intermediate value,
        so no pruner reads it, and ``state_name`` shows it as REJECTED."""
        optuna_ops.set_attrs(
            trial, {ATTR_REJECTED: True, ATTR_FAIL_STAGE: "sample", ATTR_FAIL_REASON: why}
        )
        if learns_from_rejections(self.study.sampler):
            for key, amount in amounts.items():
                trial.set_constraint(key[:200], amount)
        self.study.tell(trial, state=TrialState.PRUNED)
        self.logger.info("trial %d: sample rejected: %s", trial.number, why)

    def _enqueue_feasible(self, base: dict[str, Any], attempt: int) -> None:
        """Enqueue parameters drawn at random from the space that meet the constraints
        (draws cost no trial); raise SampleRejected when MAX_DRAWS draws all break them.

        The generator is seeded by the study's seed and its trial count: a rerun draws the
        same parameters, and each fallback of a study draws new ones.
        """
        cfg = self.config.study
        salt = len(self.study.get_trials(deepcopy=False)) + attempt
        rng = np.random.default_rng([self.config.seed % 2**32, salt])
        params, why = feasible_draw(cfg.search_space, cfg.constraints, base, rng, MAX_DRAWS)
        if params is None:
            raise SampleRejected(
                f"study {cfg.name}: {MAX_REJECTED} samples in a row from the sampler and "
                f"{MAX_DRAWS} drawn at random broke the constraints (last: {why}); the "
                f"feasible region looks empty: loosen study.constraints or widen the ranges "
                f"to where they hold"
            )
        self.study.enqueue_trial(params, user_attrs={ATTR_DRAWN: True}, skip_if_exists=False)
        self.logger.warning(
            "study %s: the sampler proposed %d samples in a row that break the constraints; "
            "asking parameters drawn at random that meet them: %s",
            cfg.name,
            MAX_REJECTED,
            params,
        )

    def _ask(self) -> bool:
        """Ask a trial and start its training; False when it was answered from an earlier
        trial with the same parameters instead (``study.repeats: reuse``)."""
        trial, params = self._sample()
        if self._answered(trial):
            self.asking = None
            return False
        slot = Slot(trial, params, "", self.parent_run_id, times={"asked_at": time.time()})
        self.asking = slot  # stopped before its training is submitted, abandon() tells it
        slot.run_id = run_id = self.tracker.start_run(
            self.experiment_id,
            f"trial-{trial.number}",
            parent_id=self.parent_run_id,
            tags={
                "edgetune.study": self.config.study.name,
                "edgetune.trial": str(trial.number),
                **self.workload.run_tags(),
            },
        )
        trial.set_user_attr(ATTR_RUN_ID, run_id)
        retry_of = trial.user_attrs.get(ATTR_RETRY_OF)
        settings = flatten(self.workload.trial_settings(params))
        self.tracker.log_params(run_id, {**settings, **params, "trial": trial.number})
        if retry_of is not None:
            self.tracker.set_tags(run_id, {"edgetune.retry_of": str(retry_of)})
        self.slots[_in_context(self.train_pool, self.stages.train, slot)] = slot
        self.asking = None
        self.in_train += 1
        self.logger.info(
            "trial %d: training with %s%s",
            trial.number,
            params,
            f" (retry of trial {retry_of})" if retry_of is not None else "",
        )
        return True

    def _answered(self, trial: optuna.Trial) -> bool:
        """Tell a repeated parameter set the earlier trial's result: no second training."""
        earlier = earlier_result(self.seen, trial) if self.config.study.repeats == "reuse" else None
        if earlier is None:
            return False
        state = answer(self.study, trial, earlier, self.goals)
        self.logger.info(
            "trial %d: the parameters of trial %d again; its result is reused (%s, no training)",
            trial.number,
            earlier.number,
            state.name,
        )
        self.hooks.on_trial_outcome(self, trial)
        return True

    # Advancing a trial when its stage returns ------------------------------------------------
    def advance(self, future: Future[Any]) -> None:
        """Take the trial whose stage ``future`` ended to its next stage, or tell it."""
        slot = self.slots.pop(future)
        stage = slot.stage
        phase = "train" if stage == "train" else "evaluate"
        slot.times[f"{phase}_returned_at"] = time.time()  # seen by the parent: overhead included
        self._free_slots(stage, failed=future.cancelled() or future.exception() is not None)
        try:
            outcome = future.result()
        except BaseException as exc:
            self._failed(slot, stage, exc)
            return
        if isinstance(outcome, TrainOutcome):
            self._trained(slot, outcome)
            return
        try:
            if isinstance(outcome, Pruned):
                self._pruned(slot, outcome)
            else:
                compiled, measured = outcome
                self._complete(slot, compiled, measured)
        except BoardPaused:
            raise  # told, and retried: the board's failures stop the study
        except BaseException:
            self.cut_short.append(slot)  # the disk filled up, say: abandon() ends it
            raise

    def _failed(self, slot: Slot, stage: str, exc: BaseException) -> None:
        """Tell the trial FAIL (``_fail``). A full disk stops the study instead, and
        ``abandon`` tells the trial FAIL as a fault outside it and enqueues it again; it
        also finishes a ``_fail`` cut short (the disk filled up meanwhile), with the retry
        that was owed."""
        full = disk_full_error(exc, self.config)
        if full is not None:
            self.cut_short.append(slot)
            raise full from exc
        self.failing[slot.number] = exc
        try:
            self._fail(slot, stage, exc)
        except BoardPaused:
            self.failing.pop(slot.number)
            raise  # told, and retried: the board's failures stop the study
        except BaseException:
            self.cut_short.append(slot)
            raise
        self.failing.pop(slot.number)

    def _free_slots(self, stage: str, *, failed: bool) -> None:
        """Pipelined, the GPU slot is free as soon as training and export end; in the
        blocking design it is held through compile and evaluation too."""
        pipelined = self.config.orchestration.pipelined
        if stage == "train":
            if pipelined or failed:
                self.in_train -= 1
            return
        if not pipelined:
            self.in_train -= 1

    def _pruned(self, slot: Slot, outcome: Pruned) -> None:
        if not self.config.orchestration.pipelined:
            self.in_train -= 1
        # What it spent and would have: the time saved.
        slot.times.update(train_started=outcome.started_at, train_finished=outcome.finished_at)
        spent = {"epochs_run": outcome.epochs_run, "epochs_planned": outcome.epochs}
        optuna_ops.set_attrs(
            slot.trial, {**spent, **self._recorded(slot), ATTR_FAIL_REASON: outcome.reason}
        )
        self.study.tell(slot.trial, state=TrialState.PRUNED)
        self._end_trial_run(slot.run_id, "PRUNED", "FINISHED")
        self.logger.info("trial %d: %s", slot.number, outcome.reason)
        self.hooks.on_trial_outcome(self, slot.trial)

    def _trained(self, slot: Slot, outcome: TrainOutcome) -> None:
        slot.float_metrics = outcome.metrics
        slot.times.update(train_started=outcome.started_at, train_finished=outcome.finished_at)
        # Not written: the evaluation thread writes "compile" at once (a heartbeat before
        # that writes this one).
        slot.stage = "evaluate"
        slot.waiting, slot.on_start = True, self._started  # queued for the compiler
        self.slots[_in_context(self.eval_pool, self._evaluate, slot)] = slot

    def _evaluate(self, slot: Slot) -> tuple[CompileOutcome, DeviceOutcome]:
        """Compile, then evaluate on the board; runs in an evaluation thread. The model
        waits in each queue until the stage says it began (``Slot.started``)."""
        try:
            self._enter(slot, "compile")
            compiled = self.stages.compile(slot)
            slot.times.update(
                compile_started=compiled.started_at, compile_finished=compiled.finished_at
            )
            self._enter(slot, "device")
            slot.waiting = True  # queued for the board
            ON_BOARD.set(slot.started)
            device = self.stages.evaluate(slot, compiled.artifact)
        finally:
            slot.waiting = False
        slot.times.update(device_started=device.started_at, device_finished=device.finished_at)
        return compiled, device

    def _enter(self, slot: Slot, stage: str) -> None:
        """Move the trial to ``stage``, and record it at once for those who watch the study
        (``edgetune tune``'s progress) rather than at the next heartbeat."""
        # Told meanwhile, or the database is busy: the next heartbeat records the stage.
        with (
            self.stage_lock,
            contextlib.suppress(
                optuna.exceptions.UpdateFinishedTrialError, optuna.exceptions.StorageInternalError
            ),
        ):
            slot.stage = stage
            optuna_ops.set_trial_attr(self.study, slot.trial_id, ATTR_STAGE, stage)

    # Telling ----------------------------------------------------------------------------------
    def _recorded(self, slot: Slot) -> dict[str, Any]:
        """What the trial's stages measured and when they ran, as its user attributes."""
        return {**slot.float_metrics, **slot.times}

    def _end_trial_run(self, run_id: str, state: str, status: str, why: str = "") -> None:
        tags = {"edgetune.state": state, **({"edgetune.fail_reason": why} if why else {})}
        self.tracker.set_tags(run_id, tags)
        self.tracker.end_run(run_id, status)

    def _complete(self, slot: Slot, compiled: CompileOutcome, device: DeviceOutcome) -> None:
        objective, trial = self.objective, slot.trial
        measured = {**compiled.metrics, **device.metrics}
        kept = (*objective.trial_attrs, "device_latency_ms", "compiled_size_mb")
        attrs = {  # written in one transaction, with the feasibility or the failure
            **self._recorded(slot),
            **{key: measured[key] for key in kept if key in measured},
            "compiled_artifact": compiled.artifact,
        }
        if device.flags:
            attrs[ATTR_FLAGS] = device.flags
            self.tracker.set_tags(
                slot.run_id, {f"edgetune.{k}": v for k, v in device.flags.items()}
            )
            if device.fails:  # the model's fault, not the board's: no pause is counted
                self.board_failures.clear()
                broke = QualityFailed("; ".join(device.flags.values()))
                self._fail(slot, "quality", broke, attrs)
                return
        missing = [m for m in self.goals.metrics if m not in measured]
        if missing:
            unmeasured = RuntimeError(f"the stages measured no {missing[0]}")
            self._fail(slot, "evaluate", unmeasured, attrs)
            return
        value = device.metrics[objective.metric]
        broken = self.goals.constrain(trial, measured, attrs)
        values = [float(measured[m]) for m in self.goals.metrics]
        self.study.tell(trial, values if self.goals.multi else value)
        self.board_failures.clear()
        self._end_trial_run(slot.run_id, "COMPLETE", "FINISHED")
        self.logger.info(
            "trial %d: %s %.5f (float %.5f)%s",
            slot.number,
            objective.label,
            value,
            slot.float_metrics.get(objective.float_metric, float("nan")),
            f"; infeasible: {'; '.join(broken)}" if broken else "",
        )
        self.hooks.on_trial_outcome(self, trial)

    def _fail(
        self, slot: Slot, stage: str, exc: BaseException, attrs: dict[str, Any] | None = None
    ) -> None:
        """Tell the trial FAIL; ``attrs`` (what it measured) are written with its reason."""
        why = reason(exc)
        where = slot.stage if stage == "evaluate" else stage
        recorded = attrs if attrs is not None else self._recorded(slot)
        optuna_ops.set_attrs(
            slot.trial, {**recorded, ATTR_FAIL_STAGE: where, ATTR_FAIL_REASON: why}
        )
        self.study.tell(slot.trial, state=TrialState.FAIL)
        self.tracker.set_tags(slot.run_id, {"edgetune.state": "FAIL", "edgetune.fail_reason": why})
        self.tracker.log_text(slot.run_id, "".join(traceback.format_exception(exc)), "error.txt")
        self.tracker.end_run(slot.run_id, "FAILED")
        frozen = optuna_ops.fresh_trial(self.study, slot.trial_id)
        # A board that is down, or refuses its settings, is not the trial's fault: its retry
        # is not charged. A divergence or a collapse is the parameters' (and the seed's): it
        # would repeat.
        repeats = deterministic(exc)
        retries = 0 if repeats else self.config.study.retries
        board = where == "device" and board_down(exc)
        retried = enqueue_retry(self.study, frozen, retries, charge=not board)
        left = "not retried: it would fail the same way again" if repeats else "no retry left"
        self.logger.warning(
            "trial %d failed in %s: %s; %s",
            slot.number,
            where,
            why,
            "its parameters are enqueued again" if retried else left,
        )
        self.hooks.on_trial_outcome(self, slot.trial)
        if where == "device":
            self._board_failed(why, exc)

    def _board_failed(self, why: str, exc: BaseException) -> None:
        """Pause the study at once when the board refuses its settings (every evaluation
        would fail the same way), else after device.max_consecutive_failures in a row."""
        refused = isinstance(exc, DeviceConfigError) or (
            isinstance(exc, StageFailed) and f"{DeviceConfigError.__name__}:" in str(exc)
        )
        if refused:
            raise BoardPaused(
                f"board {self.config.device.name!r} refused its settings ({why}); the study is "
                f"paused at once and its trials are enqueued again, not charged: fix the device "
                f"settings it names, check with 'edgetune device check CONFIG', then run the "
                f"study again"
            )
        self.board_failures.append(why)
        limit = self.config.device.max_consecutive_failures
        if len(self.board_failures) >= limit:
            raise BoardPaused(
                f"board {self.config.device.name!r} failed {limit} evaluations in a row (last: "
                f"{why}); the study is paused and its trials in flight are enqueued again: "
                f"check the board with 'edgetune device check CONFIG', then run the study again"
            )

    def abandon(self, why: str) -> None:
        """Tell every trial still in flight FAIL, and enqueue it again, so none is lost.
        Never raises: what cannot be written (the database is gone, the disk is full) is
        left for the next run to reconcile."""
        running = list(self.slots.values())
        slots = [*running, *self.cut_short, *([self.asking] if self.asking else [])]
        self.slots.clear()
        self.cut_short, self.asking = [], None
        if running:
            try:
                self.stages.cancel([s.number for s in running])
            except Exception as exc:  # the API is gone too: reconciliation cancels them later
                self.logger.warning("could not cancel the stage runs: %s", reason(exc))
        for slot in slots:
            state, status, told = "FAIL", "KILLED", why
            try:
                state, status, told = self._abandon_trial(slot, why)
            except Exception as exc:
                self.logger.warning(
                    "trial %d left for the next run to reconcile: %s", slot.number, reason(exc)
                )
            try:
                if slot.run_id:
                    self._end_trial_run(slot.run_id, state, status, told)
            except Exception as exc:
                self.logger.warning(
                    "the MLflow run of trial %d is left for the next run to end: %s",
                    slot.number,
                    reason(exc),
                )

    def _abandon_trial(self, slot: Slot, why: str) -> tuple[str, str, str]:
        """Tell a trial in flight FAIL as a fault outside it, marked first (so it is never
        counted as an outcome, whatever cannot be written after), and enqueue it again
        without charging it; for a trial ``_fail`` was telling, enqueue the retry it owed.
        Returns how its MLflow run ends: state, status, reason."""
        owed = self.failing.pop(slot.number, None)
        trial = optuna_ops.fresh_trial(self.study, slot.trial_id)
        if trial.state == TrialState.RUNNING:
            marks = {ATTR_INFRA: why, ATTR_FAIL_STAGE: slot.stage, ATTR_FAIL_REASON: why}
            optuna_ops.set_attrs(slot.trial, marks)
            self.study.tell(slot.trial, state=TrialState.FAIL)
            trial = optuna_ops.fresh_trial(self.study, slot.trial_id)
            enqueue_retry(self.study, trial, self.config.study.retries, charge=False)
            return "FAIL", "KILLED", why
        if trial.state != TrialState.FAIL:
            return trial.state.name, "FINISHED", ""  # told before the study stopped
        if owed is not None:
            retries = 0 if deterministic(owed) else self.config.study.retries
            enqueue_retry(self.study, trial, retries, charge=not board_down(owed))
        return "FAIL", "FAILED", str(trial.user_attrs.get(ATTR_FAIL_REASON, why))

    # The end ----------------------------------------------------------------------------------
    def _finish(self, status: str) -> None:
        best = best_trial(self.study)
        # A seed replica (study.replicate) is compared, not registered: see tasks.hpo.confirm.
        if best is not None and status == "FINISHED" and not self.config.study.replicate:
            self._register(best)
        self._records(status)
        self.tracker.end_run(self.parent_run_id, status)

    def _records(self, status: str) -> None:
        """The study's summary and counts in its MLflow run, and its records (the hooks)."""
        best = best_trial(self.study)
        record = summary(self.study)
        self.tracker.log_text(self.parent_run_id, to_json(record), "study/summary.json")
        self.tracker.log_metrics(
            self.parent_run_id, {f"trials_{k.lower()}": v for k, v in record["counts"].items()}
        )
        if best is not None:
            self.tracker.log_metrics(
                self.parent_run_id,
                {f"best_{self.objective.metric}": primary_value(best), "best_trial": best.number},
            )
        self.hooks.on_study_end(self, status)

    def _register(self, best: FrozenTrial) -> None:
        """Register the study's best trial; a variant's best takes the variant's alias."""
        registered = self.workload.register_best(
            self.tracker,
            best.user_attrs[ATTR_RUN_ID],
            best.number,
            primary_value(best),
            own_alias(self.config),
        )
        if registered is not None:
            self._champion(registered, best)

    def _champion(self, registered: Registration, best: FrozenTrial) -> None:
        won = registered.run_id == best.user_attrs[ATTR_RUN_ID]
        trial = best.number if won else None
        note = registered.extra.get("note")
        self.study.set_user_attr(
            "champion",
            {
                "model": registered.model,
                "version": registered.version,
                "alias": registered.alias,
                "trial": trial,
                **({"note": note} if note else {}),
            },
        )
        if trial is None:
            self.logger.info(
                "champion unchanged: %s version %s (run %s) is better than trial %d",
                registered.model,
                registered.version,
                registered.run_id,
                best.number,
            )
            return
        self.logger.info(
            "%s: trial %d registered as %s version %s (@%s)%s",
            "champion" if registered.alias == CHAMPION else f"@{registered.alias}",
            trial,
            registered.model,
            registered.version,
            registered.alias,
            f"; {note}" if note else "",
        )


def run_studies(loops: list[StudyLoop], parallel: int) -> list[dict[str, Any]]:
    """Run studies in turn on ``parallel`` shared GPU slots; return their summaries.

    The next study opens as soon as the open ones have nothing left to train, so its first
    trials train while the last trials of the one before are compiled and measured on the
    board: the GPU does not wait at the seam between studies (a variant run). Stopped by an
    exception, every open study tells its trials in flight FAIL, enqueues them again and
    ends KILLED; on a full disk, it raises ``DiskFull`` (where, and the fix).
    """
    pending, active = list(loops), list[StudyLoop]()
    results: dict[int, dict[str, Any]] = {}
    reserve = SpaceReserve(loop.config.run_path for loop in loops)
    try:
        while pending or active:
            while pending and not any(loop.training() for loop in active):
                loop = pending.pop(0)
                active.append(loop)  # first: a study that fails to open is stopped too
                loop.open()
            _step(active, parallel, results)
    except BaseException as exc:
        full = disk_full_error(exc, loops[0].config)  # measured before the reserve is freed
        _stop(active, exc, full, reserve)
        if full is not None and full is not exc:
            raise full from exc
        raise
    finally:
        reserve.release()
    return [results[id(loop)] for loop in loops]


def _stop(
    active: list[StudyLoop], exc: BaseException, full: DiskFull | None, reserve: SpaceReserve
) -> None:
    """Stop the open studies: their trials in flight told FAIL and enqueued again, the
    trainings stopped, their MLflow runs ended KILLED. On a full disk the reserve is freed
    first, so that this can be written."""
    STOP.set()
    if full is not None:
        reserve.release()
    why = f"study stopped: {full}" if full is not None else f"study interrupted: {reason(exc)}"
    try:
        for loop in active:
            loop.abandon(why)
        for loop in active:
            loop.shutdown()
    finally:
        STOP.clear()
        for loop in active:
            loop.stop("KILLED", why, records=full is None)


def _step(active: list[StudyLoop], parallel: int, results: dict[int, dict[str, Any]]) -> None:
    """One turn: ask into the free GPU slots, close finished studies, advance what returned."""
    free = parallel - sum(loop.in_train for loop in active)
    kicks = [loop.rearm() for loop in active]  # before fill: no start goes unseen
    for loop in active:
        free -= loop.fill(free)
    for loop in [loop for loop in active if loop.done()]:
        loop.shutdown()
        results[id(loop)] = loop.close("FINISHED")
        active.remove(loop)  # after: a study whose end cannot be written is stopped
    futures = {future: loop for loop in active for future in loop.slots}
    if futures:
        finished, _ = wait(
            [*futures, *kicks],  # a queued model's stage began: ask again
            timeout=min(loop.config.study.heartbeat_s for loop in active),
            return_when=FIRST_COMPLETED,
        )
        for future in finished:
            if future in futures:
                futures[future].advance(future)
    for loop in active:
        loop.beat()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted MLflow params (URLs masked; the search space kept whole)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "study.search_space":
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = mask_uri(value) if isinstance(value, str) else value
    return flat


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
