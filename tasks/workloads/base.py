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
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from tasks.board import BoardBusyError, embedded, ensure_device_limit, hold_board
from tasks.compilers import CompiledArtifact, CompilerError
from tasks.config import ConfigError, EdgetuneConfig, StudyConfig
from tasks.detection.config import DetectorStudy
from tasks.devices import DeviceError, DeviceUnreachableError, create_runner
from tasks.host import scratch_folder
from tasks.inputs import fetch_study_input, stage_artifact, staging_key, take_staged
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


# The dry run -------------------------------------------------------------------------------
# Before a study's first training (``tasks.hpo.campaign.dry_run``) and in ``edgetune validate
# --deep``: what would fail every trial after its training fails here, in seconds, instead.

#: Images of the evaluation split the dry run sends to the board (one run of the evaluator).
DRY_RUN_IMAGES = 8
#: What every dry-run failure ends with.
NOTHING_TRAINED = "dry run: nothing was trained"


class DryRunError(ConfigError):
    """The dry run refused a setting (export, compile, the board's): one line naming it."""


@dataclass(frozen=True)
class DryRun:
    """What a dry run did: an untrained model exported, compiled, run once on the board."""

    model: str
    compiler: str
    calibration_images: int
    board: str
    board_images: int
    size_mb: float
    latency_ms: float
    #: Seconds of each step: export, compile, device.
    seconds: dict[str, float]

    def summary(self) -> str:
        took = self.seconds
        return (
            f"untrained {self.model} exported in {took['export']:.1f} s, compiled by "
            f"{self.compiler} on {self.calibration_images} calibration images in "
            f"{took['compile']:.1f} s ({self.size_mb:.3f} MB), run on board {self.board}: "
            f"{self.board_images} images, {self.latency_ms:.3f} ms a batch, in "
            f"{took['device']:.1f} s"
        )


class DryRunSteps:
    """Times the dry run's steps and turns a step's failure into one ``DryRunError`` line
    naming the settings of that step. A board that is down or busy is raised as it is: it
    may come back, and the caller says so."""

    def __init__(self, config: StudyTarget, size_setting: str) -> None:
        self.config = config
        self.size_setting = size_setting  # e.g. data.image_size=16
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: Literal["export", "compile", "device"]) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except (DeviceUnreachableError, BoardBusyError):
            raise
        except Exception as exc:
            raise DryRunError(self._refused(name, exc)) from exc
        self.seconds[name] = time.monotonic() - started

    def done(self, artifact: CompiledArtifact, latency_ms: float, board_images: int) -> DryRun:
        return DryRun(
            model=self.config.model.arch,
            compiler=self.config.compile.backend,
            calibration_images=int(artifact.metadata.get("calibration_samples", 0)),
            board=self.config.device.name,
            board_images=board_images,
            size_mb=artifact.size_bytes / 1e6,
            latency_ms=latency_ms,
            seconds=dict(self.seconds),
        )

    def _refused(self, name: str, exc: Exception) -> str:
        arch = self.config.model.arch
        if name == "export":
            return (
                f"model.arch: an untrained {arch} did not export to ONNX at "
                f"{self.size_setting} with export.opset={self.config.export.opset} "
                f"({_one_line(exc)}); choose another model.arch or export.opset "
                f"({NOTHING_TRAINED})"
            )
        if name == "compile":
            key, settings = compile_settings(self.config)
            cause = exc.__cause__ if isinstance(exc, CompilerError) else None
            return (
                f"{key}: the {self.config.compile.backend} compiler refused an untrained {arch} "
                f"({settings}): {_one_line(cause or exc)}; change these settings and run "
                f"again ({NOTHING_TRAINED})"
            )
        text = _first_line(exc) if isinstance(exc, DeviceError) else _one_line(exc)
        return f"device {self.config.device.name}: {text} ({NOTHING_TRAINED})"


def compile_settings(config: StudyTarget) -> tuple[str, str]:
    """The compile setting to name first (the first the config changed from its default)
    and every setting the compiler ran with, as ``compile.onnxruntime: k=v, …``."""
    section = "hailo" if config.compile.backend == "hailo" else "onnxruntime"
    options = getattr(config.compile, section)
    values = options.model_dump()
    fields = type(options).model_fields
    changed = [k for k, v in values.items() if v != fields[k].default]
    ordered = [*changed, *(k for k in values if k not in changed)]
    shown = ", ".join(f"{k}={_shown(values[k])}" for k in ordered)
    key = f"compile.{section}" + (f".{changed[0]}" if changed else "")
    samples = config.compile.calibration_samples
    return key, f"compile.{section}: {shown}; compile.calibration_samples={samples}"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else "''"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(exc).__name__


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception."""
    return f"{type(exc).__name__}: {_first_line(exc)}"


@contextmanager
def holding_board(config: StudyTarget) -> Iterator[None]:
    """The board's slot; with a Prefect server, its limit is made first (a dry run from
    ``edgetune validate --deep`` may be the first to take it)."""
    if not embedded():
        ensure_device_limit(config.device.concurrency_limit)
    with hold_board(config):
        yield


@dataclass(frozen=True)
class Registration:
    """A registered model version and the run it came from."""

    model: str
    version: str
    alias: str
    run_id: str
    extra: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C", bound=StudyTarget)

#: The study's evaluation bundle, an input of its run (``tasks.inputs``).
BUNDLE = "inputs/val_bundle.npz"


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
      it runs there; the metrics are computed here, on the controller. It takes the
      artifact from ``evaluation_inputs``, which finds what ``prestage`` fetched ahead.
    - ``prestage`` (shared): the compiled artifact fetched to this host and sent to the
      board with the bundle, ahead of its evaluation, while another evaluation holds the
      board (the edge pool's worker calls it for the evaluation waiting next).
    - ``dry_run``: before the first training, an untrained model through the study's export,
      compiler and board once; raises ``DryRunError`` naming the setting that fails.
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

    def prestage(self, tracker: Tracker, run_id: str, parent_run_id: str, artifact: str) -> bool:
        """Fetch the trial's compiled ``artifact`` to this host and send it with the study's
        bundle to the board, for the evaluation that waits for the board; True when the board
        took something ahead (a ``local`` board has nothing to send)."""
        config = self.config
        compiled = stage_artifact(tracker, run_id, artifact)
        with scratch(config, "prestage") as work:
            bundle = fetch_study_input(tracker, parent_run_id, BUNDLE, work)
            runner = create_runner(config.device.runner, **config.device.runner_options())
            return runner.prestage(compiled, bundle, staging_key(run_id, artifact))

    @abstractmethod
    def dry_run(self) -> DryRun:
        """Export an untrained model of the configured architecture, compile it with the
        configured compiler and settings on the study's calibration set (the same images as
        the real compile: a refusal may depend on their count), and run it once on the board
        (``DRY_RUN_IMAGES`` images, holding its slot). Nothing is trained and nothing goes
        to MLflow or the run folder. Raises ``DryRunError`` naming the setting that failed;
        a board that is down or busy raises as in a trial (``DeviceUnreachableError``,
        ``BoardBusyError``)."""

    def dry_run_settings(self) -> dict[str, Any]:
        """The settings a dry run depends on: configs (variants) that share them share one."""
        dumped = self.config.model_dump(mode="json")
        return {key: dumped.get(key) for key in ("data", "model", "export", "compile", "device")}

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


@contextmanager
def evaluation_inputs(
    config: _HasStudy, tracker: Tracker, run_id: str, parent_run_id: str, artifact: str
) -> Iterator[tuple[Path, Path, Path]]:
    """The compiled ``artifact`` (taken from what ``Workload.prestage`` fetched ahead, else
    downloaded), the study's bundle and a scratch folder, before the board is taken."""
    with scratch(config, "device") as work:
        compiled = take_staged(run_id, artifact, work / "in")
        if compiled is None:
            compiled = tracker.download(run_id, artifact, work / "in")
        bundle = fetch_study_input(tracker, parent_run_id, BUNDLE, work / "in")
        yield compiled, bundle, work
