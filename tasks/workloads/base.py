"""The workload contract: what a kind of model brings to a study, and what its stages return.

A study's engine (``tasks.hpo``) knows nothing of classifiers or detectors. For each trial
it asks the workload to train (and export), to compile, and to evaluate on the board, and
it reads the typed outcomes below; it registers the best trial through the workload too.
The classifier (``tasks.workloads.classifier``) and the detector
(``tasks.workloads.detector``) are the two implementations; ``tasks.workloads.registry``
picks one for a config, and ``tests/workloads/test_conformance.py`` runs every registered
workload through this contract.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from tasks.config import EdgetuneConfig, StudyConfig
from tasks.detection.config import DetectorStudy
from tasks.host import scratch_folder
from tasks.tracking import Tracker

#: A config the tune flow can run: a classifier config, or a detector config with a study.
StudyTarget = EdgetuneConfig | DetectorStudy

#: Called after each training epoch with the epoch and its metrics; raises to stop.
EpochHook = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class Objective:
    """What a study optimises: the board's metric, its direction, and its float twin.

    ``epoch_metric`` is the float validation metric reported each epoch, on which the
    pruner decides before a trial reaches the compiler or the board.
    """

    metric: str
    direction: Literal["minimize", "maximize"]
    label: str
    float_metric: str
    epoch_metric: str
    #: Device metrics shown in the results table: (key, column title, format).
    columns: tuple[tuple[str, str, str], ...]
    #: Further device metrics kept on each trial as user attributes.
    kept: tuple[str, ...] = ()
    #: Whether the board returns per-sample confidences (risk–coverage curves are drawn).
    confidences: bool = False

    @property
    def trial_attrs(self) -> tuple[str, ...]:
        return (*(key for key, _, _ in self.columns), *self.kept)

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


@dataclass(frozen=True)
class Checked:
    """What preflight or preparation found: the dataset's classes and its images per split."""

    classes: tuple[str, ...]
    counts: dict[str, int]


# Stage outcomes ------------------------------------------------------------------------------
# Each is recorded as JSON in the trial's MLflow run (``record``), so a parent on another
# host reads what a stage on a work pool returned; ``from_record`` reads it back.


@dataclass(frozen=True)
class TrainOutcome:
    """A trained and exported trial: its float metrics and when it trained."""

    metrics: dict[str, float]
    started_at: float
    finished_at: float
    #: Where it trained (``cpu``, ``cuda:0``), when the trainer says.
    device: str | None = None
    #: The choices made for ``auto`` settings (optimizer, batch size), when any were.
    auto: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Pruned:
    """A trial the pruner stopped: what it spent (epochs run) and what it would have."""

    reason: str
    epochs_run: int
    epochs: int
    started_at: float
    finished_at: float

    def record(self) -> dict[str, Any]:
        record = asdict(self)
        return {"pruned": record.pop("reason"), **record}


@dataclass(frozen=True)
class CompileOutcome:
    """A compiled trial: the artifact's path in the trial's run, and the compiler's metrics."""

    artifact: str
    metrics: dict[str, float]
    started_at: float
    finished_at: float
    runtime: str | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class DeviceOutcome:
    """A trial measured on the board: the device metrics, scored on the controller."""

    metrics: dict[str, float]
    started_at: float
    finished_at: float
    #: What looks wrong with the measured model, by name (``collapsed``: the compiled model
    #: lost what the float one had); kept on the trial and shown in the results table.
    flags: dict[str, str] = field(default_factory=dict)
    #: Whether the flags fail the trial (told FAIL, stage ``quality``) or only mark it.
    fails: bool = False

    def record(self) -> dict[str, Any]:
        return asdict(self)


StageOutcome = TrainOutcome | Pruned | CompileOutcome | DeviceOutcome


def outcome_from_record(stage: str, record: dict[str, Any]) -> StageOutcome:
    """The typed outcome of ``stage`` (``train``, ``compile``, ``device``) from its record."""
    if stage == "train":
        if "pruned" in record:
            fields = {k: v for k, v in record.items() if k != "pruned"}
            return Pruned(reason=str(record["pruned"]), **fields)
        return TrainOutcome(**record)
    if stage == "compile":
        return CompileOutcome(**record)
    if stage == "device":
        return DeviceOutcome(**record)
    raise ValueError(f"unknown stage {stage!r}; expected train, compile or device")


@dataclass(frozen=True)
class Registration:
    """A registered model version and the run it came from."""

    model: str
    version: str
    alias: str
    run_id: str
    extra: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C", bound=StudyTarget)


class Workload(ABC, Generic[C]):
    """One kind of model a study tunes, bound to its validated config.

    The contract, stage by stage (every stage reads its inputs from MLflow by run id and
    logs its outputs there, so each may run on another host):

    - ``preflight``: everything the study needs, checked before anything is created; raises
      ``ConfigError`` (or the workload's own one-line error) naming the setting to fix.
    - ``prepare``: once per study, the board's evaluation bundle and the calibration set
      logged to the study's parent run.
    - ``train``: trains the trial with ``params`` over the config's settings and exports it
      to ONNX; calls ``on_epoch`` after each epoch with the float metrics (the pruner raises
      ``optuna.TrialPruned`` from it); returns a ``TrainOutcome``. (The classifier numbers
      epochs from 0, the detector from 1, as each trainer reports them.)
    - ``compile``: the trial's ONNX and the calibration set to a compiled artifact.
    - ``evaluate``: the compiled artifact on the board, holding the board's slot only while
      it runs there; the metrics are computed here, on the controller.
    - ``planned_epochs``: the epochs a trial with ``params`` trains when not pruned.
    - ``register_best``: registers a study's best trial (or keeps a better champion); the
      engine calls it after the study's trial runs have ended.
    - ``crown``: after several variants, gives the winner's registration the champion alias.
    """

    #: The workload's name in the registry (``classifier``, ``detector``).
    name: ClassVar[str]
    #: What its studies optimise.
    objective: ClassVar[Objective]
    #: Other objectives a study of it may have (the final model measured on the test split
    #: reports under ``test_*`` names); a stored study names its objective's metric.
    other_objectives: ClassVar[tuple[Objective, ...]] = ()
    #: The validated config type it runs.
    config_type: ClassVar[type[StudyTarget]]

    def __init__(self, config: C) -> None:
        self.config = config

    @classmethod
    def objective_on(cls, config: StudyTarget) -> Objective:
        """The objective of a study of ``config`` (by default the workload's own)."""
        return cls.objective

    @property
    def study_objective(self) -> Objective:
        return self.objective_on(self.config)

    @abstractmethod
    def preflight(self) -> Checked: ...

    @abstractmethod
    def preflight_variant(self, num_classes: int) -> None:
        """What a variant changes (space, weights, compiler, model), checked alone."""

    @abstractmethod
    def prepare(self, tracker: Tracker, parent_run_id: str) -> Checked: ...

    @abstractmethod
    def train(
        self,
        params: dict[str, Any],
        tracker: Tracker,
        run_id: str,
        parent_run_id: str,
        *,
        on_epoch: EpochHook | None = None,
    ) -> TrainOutcome: ...

    @abstractmethod
    def compile(self, tracker: Tracker, run_id: str, parent_run_id: str) -> CompileOutcome: ...

    @abstractmethod
    def evaluate(
        self, tracker: Tracker, run_id: str, parent_run_id: str, artifact: str
    ) -> DeviceOutcome: ...

    @abstractmethod
    def planned_epochs(self, params: dict[str, Any]) -> int: ...

    @abstractmethod
    def trial_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every setting a trial with ``params`` trains, compiles and is measured with, as
        nested sections (logged flat on its run, so trials of different variants compare in
        the MLflow UI without their parent): the config less the study-level sections,
        with the trial's own training settings."""

    def pruning_warmup(self, params: dict[str, Any]) -> int:
        """The first epoch the pruner may judge a trial with ``params`` at
        (``study.pruner_warmup``; by default 0)."""
        warmup = self.config.study.pruner_warmup
        return 0 if warmup is None else warmup

    @abstractmethod
    def register_best(
        self, tracker: Tracker, run_id: str, trial: int, value: float, alias: str
    ) -> Registration | None:
        """Register trial ``trial`` (run ``run_id``, objective ``value``) under ``alias``.

        Returns the registration that holds the alias now: the trial's, or a better run's
        (a detector keeps its best run of all as champion); None if nothing is registered.
        """

    @abstractmethod
    def crown(self, tracker: Tracker, winner: dict[str, Any] | None) -> Registration | None:
        """Give the champion alias after a variant run. ``winner`` is the winning variant's
        row of the comparison (its ``champion`` registration and its ``best`` trial), or
        None when no variant completed; returns the registration that holds the alias."""

    def run_tags(self) -> dict[str, str]:
        """Extra tags of every trial run."""
        return {}

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts (None: the tracking server decides)."""
        return None


class _HasStudy(Protocol):
    @property
    def study(self) -> StudyConfig: ...


@contextmanager
def scratch(config: _HasStudy, label: str) -> Iterator[Path]:
    """A private working folder on this host, removed when the stage ends.

    Stages may run on hosts that do not have the study's run directory: they keep
    nothing locally and pass everything through MLflow. A killed stage's folder is removed
    by the next stage on the host (``tasks.host.scratch_folder``).
    """
    folder = scratch_folder(f"{config.study.name}-{label}")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


#: Sections that belong to the study, not to one trial (logged on the study's run).
STUDY_SECTIONS = ("study", "tracking", "orchestration", "variants")


def study_free(data: dict[str, Any]) -> dict[str, Any]:
    """A dumped config without its study-level sections."""
    return {key: value for key, value in data.items() if key not in STUDY_SECTIONS}


def stage_outcome_path(stage: str) -> str:
    return f"stages/{stage}.json"


def save_outcome(tracker: Tracker, run_id: str, stage: str, outcome: StageOutcome) -> None:
    """Record what a stage returned in its trial's run: a parent on another host reads it."""
    text = json.dumps(outcome.record(), default=float)
    tracker.log_text(run_id, text, stage_outcome_path(stage))


def load_outcome(tracker: Tracker, run_id: str, stage: str) -> StageOutcome:
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.download(run_id, stage_outcome_path(stage), Path(tmp))
        return outcome_from_record(stage, dict(json.loads(path.read_text())))
