"""The two kinds of study one tune flow runs, and where their stages differ.

- a classifier config (``data.root``): FMFP training, objective device AUGRC (minimised);
- a detector config with a ``study`` section (``data.yaml``): Ultralytics training,
  objective device mAP50-95 (maximised).

The ask/tell loop, the pools, the board's slot, heartbeats, retries and reports are shared;
the stage functions and the objective are chosen here by the config's type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import EdgetuneConfig, load_config, parse_config, read_yaml
from tasks.detection.config import (
    DetectorStudy,
    is_detector_config,
    parse_detector_study,
    read_detector_config,
)
from tasks.study import CLASSIFIER, DETECTOR, Objective
from tasks.tracking import Tracker

#: A config the tune flow can run.
StudyTarget = EdgetuneConfig | DetectorStudy


def objective_for(config: StudyTarget) -> Objective:
    return DETECTOR if isinstance(config, DetectorStudy) else CLASSIFIER


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyTarget:
    """Read a classifier or detector study config (told apart by ``data.yaml``)."""
    if is_detector_config(read_yaml(path)):
        return parse_detector_study(read_detector_config(path, overrides), source=str(path))
    return load_config(path, overrides)


def parse_study_config(raw: dict[str, Any], *, source: str = "config") -> StudyTarget:
    if is_detector_config(raw):
        return parse_detector_study(raw, source=source)
    return parse_config(raw, source=source)


def artifact_location(config: StudyTarget) -> str | None:
    """Where a new experiment keeps artifacts when tracking is a local SQLite file."""
    if isinstance(config, DetectorStudy):
        from tasks.detection.pipeline import local_artifact_location

        return local_artifact_location(config.tracking_uri)
    if config.tracking.uri is None:
        return (config.run_path / "mlartifacts").resolve().as_uri()
    return None


def planned_epochs(config: StudyTarget, params: dict[str, Any]) -> int:
    """The epochs a trial with these parameters trains when it is not pruned."""
    if isinstance(config, DetectorStudy):
        from tasks.detection.config import trial_train_settings

        return trial_train_settings(config.train, params).epochs
    from tasks.config import trial_train_config

    return trial_train_config(config, params).epochs


def run_tags(config: StudyTarget) -> dict[str, str]:
    """Extra tags of every trial run."""
    if isinstance(config, DetectorStudy):
        from tasks.detection.trial import trial_tags

        return trial_tags(config)
    return {}


@dataclass(frozen=True)
class Checked:
    """What preflight found: the dataset's classes and its images per split."""

    classes: tuple[str, ...]
    counts: dict[str, int]


def preflight(config: StudyTarget) -> Checked:
    """Everything a study needs, checked before anything is created; with variants, also
    what each variant changes (search space, weights, compiler, model)."""
    found = _preflight(config)
    if config.variants:
        from tasks.compilers import CompilerUnavailableError
        from tasks.config import ConfigError
        from tasks.variants import expand

        for index, (spec, variant) in enumerate(expand(config)):
            try:
                _preflight_variant(variant, len(found.classes))
            except (ConfigError, CompilerUnavailableError) as exc:
                raise ConfigError(f"variants[{index}] ({spec.name}): {exc}") from None
    return found


def _preflight_variant(config: StudyTarget, num_classes: int) -> None:
    from tasks import preflight as checks

    if isinstance(config, EdgetuneConfig):
        from tasks.compilers import COMPILERS

        checks.check_search_space(config)
        checks.check_weights(config, num_classes)
        COMPILERS[config.compile.backend].check_available()
        return
    from tasks.config import ConfigError
    from tasks.detection.pipeline import check_detector
    from tasks.detection.ultra import DetectorError
    from tasks.devices import DeviceConfigError

    try:
        check_detector(config)
    except (DetectorError, DeviceConfigError) as exc:
        raise ConfigError(str(exc)) from None


def _preflight(config: StudyTarget) -> Checked:
    from tasks import preflight as checks

    if isinstance(config, EdgetuneConfig):
        info = checks.preflight(config)
        return Checked(info.classes, info.counts())
    from tasks.config import ConfigError
    from tasks.detection.dataset import read_data_yaml
    from tasks.detection.pipeline import check_detector
    from tasks.detection.ultra import DetectorError
    from tasks.devices import DeviceConfigError

    try:
        check_detector(config)
    except (DetectorError, DeviceConfigError) as exc:
        raise ConfigError(str(exc)) from None
    checks.check_shared_services(config)
    checks.check_storage(config.storage_url)
    checks.check_tracking(config.tracking_uri)
    dataset = read_data_yaml(Path(config.data.yaml))
    return Checked(dataset.classes, {k: len(v) for k, v in dataset.splits.items()})


def prepare(config: StudyTarget, tracker: Tracker, parent_run_id: str) -> Checked:
    """Once per study: the board's bundle and the calibration set → the parent run."""
    if isinstance(config, DetectorStudy):
        from tasks.detection import trial

        found = trial.prepare(config, tracker, parent_run_id)
        return Checked(tuple(found["classes"]), found["counts"])
    from tasks.stages import prepare_inputs

    inputs = prepare_inputs(config, tracker, parent_run_id)
    return Checked(inputs.classes, inputs.counts)


def train(
    config: StudyTarget,
    params: dict[str, Any],
    tracker: Tracker,
    run_id: str,
    parent_run_id: str,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train and export one trial; return ``{"metrics": float metrics, ...}``."""
    if isinstance(config, DetectorStudy):
        from tasks.detection import trial

        return trial.train(config, params, tracker, run_id, parent_run_id, on_epoch=on_epoch)
    from tasks import stages

    return stages.train(config, params, tracker, run_id, parent_run_id, on_epoch=on_epoch)


def compile_model(
    config: StudyTarget, tracker: Tracker, run_id: str, parent_run_id: str
) -> dict[str, Any]:
    if isinstance(config, DetectorStudy):
        from tasks.detection import trial

        return trial.compile_model(config, tracker, run_id, parent_run_id)
    from tasks import stages

    return stages.compile_model(config, tracker, run_id, parent_run_id)


def evaluate(
    config: StudyTarget, tracker: Tracker, run_id: str, parent_run_id: str, artifact: str
) -> dict[str, Any]:
    """The compiled trial on the board, holding the board's slot while it runs there."""
    if isinstance(config, DetectorStudy):
        from tasks.detection import trial

        return trial.evaluate(config, tracker, run_id, parent_run_id, artifact)
    from tasks import stages
    from tasks.data import load_bundle
    from tasks.wrappers import hold_board

    with stages.device_inputs(config, tracker, run_id, parent_run_id, artifact) as (
        compiled,
        bundle,
        work,
    ):
        labels = load_bundle(bundle)["labels"]
        with hold_board(config):
            result = stages.run_on_device(config, compiled, bundle, work)
    return stages.score_device_result(config, tracker, run_id, result, labels)


def registered_path(config: StudyTarget) -> str:
    """The trial run's artifact folder a registered version points at."""
    if isinstance(config, DetectorStudy):
        return "model"  # best.pt, model.onnx and the compiled artifact, as detect train
    from tasks.stages import COMPILED_DIR

    return COMPILED_DIR
