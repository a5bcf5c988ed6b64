"""The parent flow: resolve the config, choose where the stages run, run the study.

``ask → train (subflow, GPU slot) → compile (task) → evaluate on device (task, board slot) → tell``

Composition only: the ask/tell loop, recovery, variants and retraining are the engine in
``tasks.hpo``; the stages are ``flows.stages.LocalStages`` in this process, or
``tasks.hpo.launch.DeploymentStages`` on the gpu, compile and edge pools. Each study's
progress shows in the flow run as a progress artifact (``ProgressHooks``).
"""

from __future__ import annotations

import contextvars
import re
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import optuna
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from flows.stages import LocalStages
from tasks.board import ensure_device_limit
from tasks.config import apply_overrides
from tasks.hpo import reports
from tasks.hpo.campaign import Campaign, dry_run
from tasks.hpo.launch import DeploymentStages, Stages
from tasks.hpo.loop import BoardPaused, SampleRejected
from tasks.hpo.optuna_ops import storage_of
from tasks.preflight import check_shared_services
from tasks.workloads.base import DryRun, StudyTarget
from tasks.workloads.registry import load_study_config, parse_study_config

__all__ = ["BoardPaused", "SampleRejected", "tune"]


def resolve(config: StudyTarget | dict[str, Any] | str, overrides: list[str] | None) -> StudyTarget:
    """The typed config: as given (already parsed in this process), or parsed once from a
    file path or from the mapping a deployment run passes."""
    if isinstance(config, str):
        return load_study_config(config, overrides)
    if isinstance(config, dict):
        raw = apply_overrides(config, overrides or [])
        return parse_study_config(raw, source="tune parameter 'config'")
    if overrides:
        data = apply_overrides(config.model_dump(mode="json"), overrides)
        return parse_study_config(data, source="tune parameter 'config'")
    return config


def make_stages(config: StudyTarget, study: optuna.Study) -> Stages:
    """The stages of the study's trials: on work pools, or in this process."""
    if config.orchestration.mode == "deployments":
        return DeploymentStages(config, storage_of(study))
    return LocalStages(config)


class ProgressHooks:
    """The study's records (``tasks.hpo.reports``) and, in the flow run, a progress
    artifact per study: the share of its trials with an outcome and the best so far,
    updated as each trial gets its outcome (the Prefect UI shows it as a progress bar).

    The artifact goes to the Prefect API from a thread of its own, in order, so the loop
    asks its next trial (or draws the study's plots) without waiting for the server; the
    study's end waits for what is still on its way."""

    def __init__(self) -> None:
        self.artifacts: dict[str, UUID] = {}
        self.sender = ThreadPoolExecutor(1, thread_name_prefix="progress-artifact")
        self.sent: list[Future[None]] = []

    def on_trial_outcome(self, run: Any, trial: Any) -> None:
        reports.on_trial_outcome(run, trial)
        self._show(run)

    def on_study_end(self, run: Any, state: str) -> None:
        self._show(run, state)
        reports.on_study_end(run, state)
        self.flush()

    def flush(self) -> None:
        """Wait until the artifact updates sent so far have reached the API."""
        wait(self.sent)
        self.sent.clear()

    def _show(self, run: Any, state: str | None = None) -> None:
        name = run.study.study_name
        try:
            percent, text = reports.study_progress(run.config, run.study)
        except Exception as exc:  # a progress bar never fails the study
            run.logger.warning("progress artifact of study %s not updated: %s", name, exc)
            return
        if state is not None:
            text += f"; {state.lower()}" + (f": {run.stopped_by}" if run.stopped_by else "")
        # In the flow run's context: the artifact belongs to it.
        send = contextvars.copy_context().run
        self.sent.append(self.sender.submit(send, self._send, run, name, percent, text))

    def _send(self, run: Any, name: str, percent: float, text: str) -> None:
        try:
            if name in self.artifacts:
                update_progress_artifact(self.artifacts[name], percent, description=text)
            else:
                key = f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}-progress"
                made = create_progress_artifact(percent, key, text)  # sync here: a UUID
                self.artifacts[name] = cast(UUID, made)
        except Exception as exc:  # a progress bar never fails the study
            run.logger.warning("progress artifact of study %s not updated: %s", name, exc)


def _run_name() -> str:
    config = flow_run.parameters.get("config")
    if isinstance(config, dict):
        return f"tune-{config.get('study', {}).get('name', 'study')}"
    name = getattr(getattr(config, "study", None), "name", None)
    return f"tune-{name}" if name else f"tune-{Path(str(config)).stem}"


@flow(name="tune", flow_run_name=_run_name, validate_parameters=False)
def tune(
    config: StudyTarget | dict[str, Any] | str,
    overrides: list[str] | None = None,
    restart: bool = False,
    reuse_best: bool = False,
    dry_run_done: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run (or continue) a study until ``study.n_trials`` trials have an outcome.

    ``config`` is a validated config, a resolved config (a mapping) or the path of a YAML
    file readable where this flow runs; ``overrides`` are ``section.key=value`` items
    applied on top. Running the same study again continues it; ``restart`` deletes it
    first; ``reuse_best`` skips the search and retrains the best parameters found as a
    one-trial study ``<name>-best``. Before any of it, the dry run (``study.dry_run``),
    unless the caller ran it (``dry_run_done``: what it did, as ``DryRun`` fields).
    """
    cfg = resolve(config, overrides)
    check_shared_services(cfg)
    ensure_device_limit(cfg.device.concurrency_limit)
    logger = get_run_logger()
    done = None if dry_run_done is None else [DryRun(**each) for each in dry_run_done]
    dry_run(cfg, logger, done)  # before anything is created or trained
    campaign = Campaign(make_stages=make_stages, logger=logger, hooks=ProgressHooks())
    return campaign.run(cfg, restart=restart, reuse_best=reuse_best)
