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
from tasks.config import EdgetuneConfig, apply_overrides, dump_config, load_config, parse_config
from tasks.preflight import check_shared_services
from tasks.stages import COMPILED_DIR, prepare_inputs
from tasks.study import (
    ATTR_FAIL_REASON,
    ATTR_FAIL_STAGE,
    ATTR_RUN_ID,
    best_trial,
    open_study,
    suggest,
    summary,
)
from tasks.tracking import CHAMPION, Tracker, mask_uri
from tasks.wrappers import compile_task, device_task

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


class LocalStages:
    """Stages in this process: the training subflow and the compile/device tasks."""

    def __init__(self, config: EdgetuneConfig, config_dict: dict[str, Any], parent_run_id: str):
        self.config, self.config_dict, self.parent_run_id = config, config_dict, parent_run_id

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
    parent waits for the child's final state and reads the outcome back.
    """

    def _run(self, deployment: str, stage: str, slot: Slot, **parameters: Any) -> dict[str, Any]:
        from prefect.deployments import run_deployment

        from tasks.stages import load_outcome

        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync in a sync context
            deployment,
            parameters={
                "config": self.config_dict,
                "trial_number": slot.trial.number,
                "run_id": slot.run_id,
                "parent_run_id": self.parent_run_id,
                **parameters,
            },
            timeout=None,
            poll_interval=self.config.orchestration.poll_interval_s,
            tags=[f"study:{self.config.study.name}", f"trial:{slot.trial.number}"],
        )
        state = flow_run.state
        if state is None or not state.is_completed():
            kind = state.type.value if state else "UNKNOWN"
            message = (state.message if state else None) or "no message"
            raise StageFailed(f"{deployment} run {flow_run.name} ended {kind}: {message}")
        return load_outcome(Tracker(self.config.tracking_uri), slot.run_id, stage)

    def train(self, slot: Slot) -> dict[str, Any]:
        deployment = self.config.orchestration.train_deployment
        return self._run(
            deployment, "train", slot, trial_id=slot.trial._trial_id, params=slot.params
        )

    def compile(self, slot: Slot) -> dict[str, Any]:
        return self._run(self.config.orchestration.compile_deployment, "compile", slot)

    def evaluate(self, slot: Slot, artifact: str) -> dict[str, Any]:
        return self._run(
            self.config.orchestration.device_deployment, "device", slot, artifact=artifact
        )


def ensure_device_limit(name: str) -> None:
    """Create (or reset to 1) the board's global concurrency limit on the Prefect server."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)


def _in_context(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Submit with a copy of this flow's context, so stages show as its children in Prefect."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class StudyRunner:
    """Runs the ask/tell loop of one study; ``run()`` returns the study summary."""

    def __init__(self, config: EdgetuneConfig) -> None:
        self.config = config
        self.config_dict = config.model_dump(mode="json")
        self.logger = get_run_logger()
        self.study = open_study(config.storage_url, config.study, config.seed)
        self.tracker = Tracker(config.tracking_uri)
        self.parent_run_id = ""
        self.experiment_id = ""
        self.stages: LocalStages | None = None
        self.slots: dict[Future[Any], Slot] = {}
        self.in_train = 0
        self.in_eval = 0

    # Setup --------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        check_shared_services(cfg)
        ensure_device_limit(cfg.device.concurrency_limit)
        artifacts = (
            (cfg.run_path / "mlartifacts").resolve().as_uri() if cfg.tracking.uri is None else None
        )
        self.experiment_id = self.tracker.experiment_id(
            cfg.experiment_name, artifact_location=artifacts
        )
        self.parent_run_id = self.tracker.start_run(
            self.experiment_id,
            f"study-{cfg.study.name}",
            tags={"edgetune.study": cfg.study.name, "edgetune.kind": "study"},
        )
        self.study.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        self.study.set_user_attr("mlflow_tracking_uri", mask_uri(cfg.tracking_uri))
        self.tracker.log_params(self.parent_run_id, _flatten(self.config_dict))
        launcher = DeploymentStages if cfg.orchestration.mode == "deployments" else LocalStages
        self.stages = launcher(cfg, self.config_dict, self.parent_run_id)
        inputs = prepare_inputs(cfg, self.tracker, self.parent_run_id)
        self.logger.info(
            "study %s: %d classes, splits %s; storage %s; tracking %s",
            cfg.study.name,
            len(inputs.classes),
            inputs.counts,
            mask_uri(cfg.storage_url),
            mask_uri(cfg.tracking_uri),
        )

    # The loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.start()
        cfg = self.config.study
        max_pending = cfg.max_pending or cfg.parallel
        done_before = len(self.study.get_trials(deepcopy=False, states=FINISHED))
        to_ask = max(cfg.n_trials - done_before, 0)
        status = "FINISHED"
        train_pool = ThreadPoolExecutor(cfg.parallel, thread_name_prefix="train")
        eval_pool = ThreadPoolExecutor(max_pending, thread_name_prefix="evaluate")
        try:
            while True:
                while to_ask and self.in_train < cfg.parallel and self.in_eval < max_pending:
                    self._ask(train_pool)
                    to_ask -= 1
                if not self.slots:
                    break
                finished, _ = wait(list(self.slots), return_when=FIRST_COMPLETED)
                for future in finished:
                    self._advance(future, eval_pool)
        except BaseException as exc:
            status = "KILLED"
            STOP.set()
            self._abandon(f"study interrupted: {_reason(exc)}")
            raise
        finally:
            train_pool.shutdown(wait=True, cancel_futures=True)
            eval_pool.shutdown(wait=True, cancel_futures=True)
            STOP.clear()
            self._finish(status)
        return summary(self.study)

    def _ask(self, pool: ThreadPoolExecutor) -> None:
        trial = self.study.ask()
        params = suggest(trial, self.config.study.search_space)
        run_id = self.tracker.start_run(
            self.experiment_id,
            f"trial-{trial.number}",
            parent_id=self.parent_run_id,
            tags={"edgetune.study": self.config.study.name, "edgetune.trial": str(trial.number)},
        )
        trial.set_user_attr(ATTR_RUN_ID, run_id)
        self.tracker.log_params(run_id, {**params, "trial": trial.number})
        slot = Slot(trial=trial, params=params, run_id=run_id, times={"asked_at": time.time()})
        assert self.stages is not None
        future = _in_context(pool, self.stages.train, slot)
        self.slots[future] = slot
        self.in_train += 1
        self.logger.info("trial %d: training with %s", trial.number, params)

    def _advance(self, future: Future[Any], eval_pool: ThreadPoolExecutor) -> None:
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
                self._prune(slot, outcome["pruned"])
                return
            slot.float_metrics = outcome["metrics"]
            slot.times.update(
                train_started=outcome["started_at"], train_finished=outcome["finished_at"]
            )
            slot.stage = "evaluate"
            self.slots[_in_context(eval_pool, self._evaluate, slot)] = slot
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
        self._record(slot)
        slot.trial.set_user_attr("device_accuracy", device["device_accuracy"])
        slot.trial.set_user_attr("device_latency_ms", device["device_latency_ms"])
        slot.trial.set_user_attr("compiled_artifact", outcome["compile"]["artifact"])
        for key in ("device_augrc_ci_low", "device_augrc_ci_high", "device_e_augrc"):
            slot.trial.set_user_attr(key, device[key])
        value = device["device_augrc"]
        self.study.tell(slot.trial, value)
        self.tracker.set_tags(slot.run_id, {"edgetune.state": "COMPLETE"})
        self.tracker.end_run(slot.run_id, "FINISHED")
        self.logger.info(
            "trial %d: device AUGRC %.5f (float %.5f), accuracy %.3f",
            slot.trial.number,
            value,
            slot.float_metrics.get("float_augrc", float("nan")),
            device["device_accuracy"],
        )

    def _fail(self, slot: Slot, stage: str, exc: BaseException) -> None:
        reason = _reason(exc)
        self._record(slot)
        slot.trial.set_user_attr(ATTR_FAIL_STAGE, slot.stage if stage == "evaluate" else stage)
        slot.trial.set_user_attr(ATTR_FAIL_REASON, reason)
        self.study.tell(slot.trial, state=TrialState.FAIL)
        self.tracker.set_tags(
            slot.run_id, {"edgetune.state": "FAIL", "edgetune.fail_reason": reason}
        )
        self.tracker.log_text(slot.run_id, "".join(traceback.format_exception(exc)), "error.txt")
        self.tracker.end_run(slot.run_id, "FAILED")
        self.logger.warning("trial %d failed in %s: %s", slot.trial.number, slot.stage, reason)

    def _prune(self, slot: Slot, reason: str) -> None:
        slot.trial.set_user_attr(ATTR_FAIL_REASON, reason)
        self.study.tell(slot.trial, state=TrialState.PRUNED)
        self.tracker.set_tags(slot.run_id, {"edgetune.state": "PRUNED"})
        self.tracker.end_run(slot.run_id, "FINISHED")
        self.logger.info("trial %d: %s", slot.trial.number, reason)

    def _abandon(self, reason: str) -> None:
        """Tell every trial still in flight FAIL so none is left RUNNING."""
        for slot in list(self.slots.values()):
            slot.trial.set_user_attr(ATTR_FAIL_STAGE, slot.stage)
            slot.trial.set_user_attr(ATTR_FAIL_REASON, reason)
            self.study.tell(slot.trial, state=TrialState.FAIL)
            self.tracker.end_run(slot.run_id, "KILLED")
        self.slots.clear()

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
                {"best_device_augrc": float(best.value or 0.0), "best_trial": best.number},
            )
        self.tracker.end_run(self.parent_run_id, status)

    def _register(self, best: optuna.trial.FrozenTrial) -> None:
        cfg = self.config
        run_id = best.user_attrs[ATTR_RUN_ID]
        version = self.tracker.register(
            cfg.registered_model_name,
            run_id,
            COMPILED_DIR,
            tags={
                "study": cfg.study.name,
                "trial": best.number,
                "device_augrc": best.value,
                "compiler": cfg.compile.backend,
                "device": cfg.device.name,
            },
            description=f"Best trial of study {cfg.study.name} by device AUGRC ({cfg.device.name}).",
        )
        self.study.set_user_attr(
            "champion",
            {
                "model": cfg.registered_model_name,
                "version": version,
                "alias": CHAMPION,
                "trial": best.number,
            },
        )
        self.logger.info(
            "champion: trial %d registered as %s version %s (@%s)",
            best.number,
            cfg.registered_model_name,
            version,
            CHAMPION,
        )


def _resolve(config: dict[str, Any] | str, overrides: list[str] | None) -> EdgetuneConfig:
    if isinstance(config, str):
        return load_config(config, overrides)
    return parse_config(apply_overrides(config, overrides or []), source="tune parameter 'config'")


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
            flat[name] = mask_uri(value) if isinstance(value, str) and "://" in value else value
    return flat


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str)


@flow(name="tune", flow_run_name=_run_name, validate_parameters=False)
def tune(config: dict[str, Any] | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or continue) a study until ``study.n_trials`` trials have finished.

    ``config`` is a resolved config (a mapping) or the path of a YAML file readable where
    this flow runs; ``overrides`` are ``section.key=value`` items applied on top.
    """
    cfg = _resolve(config, overrides)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    (cfg.run_path / "config.yaml").write_text(dump_config(cfg))
    started = time.time()
    result = StudyRunner(cfg).run()
    result["seconds"] = time.time() - started
    return result
