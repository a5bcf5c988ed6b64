"""Detector flows: train one YOLO detector and hold it to the board (``gpu`` pool).

Composition only: the work is in ``tasks.detection.pipeline``; each stage runs as a
Prefect task so the UI shows where a run is and where it failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.config import apply_overrides
from tasks.detection.config import DetectorConfig, load_detector_config, parse_detector_config
from tasks.detection.pipeline import run_detector


def _as_task(name: str, fn: Any) -> Any:
    """Run one stage as a Prefect task of this flow (visible, with its own state)."""
    stage = task(name=name, cache_policy=NO_CACHE, retries=0)(fn)
    return stage()


def _resolve(config: dict[str, Any] | str, overrides: list[str] | None) -> DetectorConfig:
    if isinstance(config, str):
        return load_detector_config(config, overrides)
    return parse_detector_config(
        apply_overrides(config, overrides or []), source="detect-train parameter 'config'"
    )


def _run_name() -> str:
    config = flow_run.parameters.get("config")
    if isinstance(config, dict):
        return f"detect-{config.get('name', 'detector')}"
    return f"detect-{Path(str(config)).stem}"


@flow(name="detect-train", flow_run_name=_run_name, validate_parameters=False)
def detect_train(
    config: dict[str, Any] | str, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Train, export, compile and evaluate one detector on its board; register the best.

    ``config`` is a resolved detector config (a mapping) or the path of a YAML file
    readable where this flow runs (``configs/detectors/s-ml.yaml``).
    """
    cfg = _resolve(config, overrides)
    return run_detector(cfg, stage=_as_task).as_dict()
