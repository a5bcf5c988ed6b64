"""Thin Prefect task wrappers over the stage functions (``tasks.stages``)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from tasks import stages
from tasks.config import EdgetuneConfig
from tasks.data import load_bundle
from tasks.tracking import Tracker


@task(name="compile", task_run_name="compile-trial-{trial_number}", cache_policy=NO_CACHE)
def compile_task(
    config: EdgetuneConfig, trial_number: int, run_id: str, parent_run_id: str
) -> dict[str, Any]:
    return stages.compile_model(config, Tracker(config.tracking_uri), run_id, parent_run_id)


@task(name="evaluate-on-device", task_run_name="device-trial-{trial_number}", cache_policy=NO_CACHE)
def device_task(
    config: EdgetuneConfig, trial_number: int, run_id: str, parent_run_id: str, artifact: str
) -> dict[str, Any]:
    """Evaluate on the board while holding its slot (limit 1, strict: a typo cannot unlock it)."""
    tracker = Tracker(config.tracking_uri)
    with stages.device_inputs(config, tracker, run_id, parent_run_id, artifact) as (
        compiled,
        bundle,
        work,
    ):
        labels = load_bundle(bundle)["labels"]
        with concurrency(
            config.device.concurrency_limit,
            occupy=1,
            strict=True,
            lease_duration=max(60.0, config.device.timeout_s),
        ):
            result = stages.run_on_device(config, compiled, bundle, work)
    return stages.score_device_result(config, tracker, run_id, result, labels)
