"""Which workload runs a config: the one place that looks at a config's type.

A classifier config names ``data.root``; a detector config names a YOLO ``data.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.compilers import CompilerUnavailableError
from tasks.config import PATH_KEYS, ConfigError, overridden, parse_config, read_yaml
from tasks.config.variants import expand
from tasks.detection.config import is_detector_config, override_detector, parse_detector_study
from tasks.workloads.base import (
    Checked,
    DryRun,
    DryRunError,
    Objective,
    StudyTarget,
    Workload,
)
from tasks.workloads.classifier import ClassifierWorkload
from tasks.workloads.detector import DetectorWorkload

#: Every registered workload by name; the conformance suite runs each of them.
WORKLOADS: dict[str, type[Workload[Any]]] = {
    ClassifierWorkload.name: ClassifierWorkload,
    DetectorWorkload.name: DetectorWorkload,
}
#: Every workload's objective by its metric (a stored study names its objective's metric).
OBJECTIVES: dict[str, Objective] = {
    o.metric: o for w in WORKLOADS.values() for o in (w.objective, *w.other_objectives)
}


def workload_class(config: StudyTarget) -> type[Workload[Any]]:
    for workload in WORKLOADS.values():
        if isinstance(config, workload.config_type):
            return workload
    raise TypeError(
        f"no workload runs a {type(config).__name__}; registered: {', '.join(WORKLOADS)}"
    )


def workload_for(config: StudyTarget) -> Workload[Any]:
    """The workload bound to ``config``."""
    return workload_class(config)(config)


def objective_for(config: StudyTarget) -> Objective:
    return workload_class(config).objective_on(config)


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyTarget:
    """Read a classifier or detector study config (told apart by ``data.yaml``): the file
    is read once, its relative paths anchored at its folder, the overrides applied."""
    raw = read_yaml(path)
    if is_detector_config(raw):
        raw = override_detector(raw, path, overrides or [])
        return parse_detector_study(raw, source=str(path))
    return parse_config(overridden(raw, path, overrides or [], PATH_KEYS), source=str(path))


def parse_study_config(raw: dict[str, Any], *, source: str = "config") -> StudyTarget:
    if is_detector_config(raw):
        return parse_detector_study(raw, source=source)
    return parse_config(raw, source=source)


def preflight(config: StudyTarget) -> Checked:
    """Everything a study needs, checked before anything is created; with variants, also
    what each variant changes (search space, weights, compiler, model)."""
    found = workload_for(config).preflight()
    for index, (spec, variant) in enumerate(expand(config) if config.variants else []):
        try:
            workload_for(variant).preflight_variant(len(found.classes))
        except (ConfigError, CompilerUnavailableError) as exc:
            raise ConfigError(f"variants[{index}] ({spec.name}): {exc}") from None
    return found


def dry_run(config: StudyTarget) -> list[DryRun]:
    """The dry run before a study's first training (``Workload.dry_run``): once for the study,
    or once for each set of settings its variants check (model, export, compiler, board).

    A variant that shares the study's own settings runs as the study; a failure of another
    variant names it, as preflight does.
    """
    studies: list[tuple[str | None, StudyTarget]] = [(None, config)]
    if config.variants:
        studies = [(f"variants[{i}] ({s.name})", v) for i, (s, v) in enumerate(expand(config))]
    own = workload_for(config)
    done: list[DryRun] = []
    seen: list[dict[str, Any]] = []
    for where, study in studies:
        workload = workload_for(study)
        settings = workload.dry_run_settings()
        if settings in seen:
            continue
        seen.append(settings)
        if settings == own.dry_run_settings():
            where, workload = None, own
        try:
            done.append(workload.dry_run())
        except DryRunError as exc:
            if where is None:
                raise
            raise DryRunError(f"{where}: {exc}") from exc
    return done
