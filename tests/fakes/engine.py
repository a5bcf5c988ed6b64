"""Fakes that drive the study engine (``tasks.hpo.loop``) without Prefect or training.

- ``FakeStages``: stands in for training, compilation and the board. Each stage sleeps for
  its configured time and records when it started and ended; what it returns (or raises)
  is decided by functions of the trial's parameters and attempt. Its board evaluation can
  hold the real board lock (``tasks.board.hold_board``) like a workload does.
- ``FakeTracker``: an in-memory MLflow stand-in with the calls the engine makes.
- ``memory_study``: the study in Optuna's in-memory storage, created as ``open_study`` does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna

from tasks.board import hold_board
from tasks.config import parse_config
from tasks.hpo.launch import Slot
from tasks.hpo.loop import StudyLoop
from tasks.hpo.study import open_study
from tasks.hpo.trial_stages import STOP
from tasks.tracking import CHAMPION, Promotion
from tasks.workloads.base import (
    Checked,
    CompileOutcome,
    DeviceOutcome,
    Pruned,
    StudyTarget,
    TrainOutcome,
)
from tasks.workloads.classifier import CLASSIFIER

from conftest import tiny_config


@dataclass
class Window:
    """When one stage of one trial ran (seconds on the monotonic clock)."""

    trial: int
    stage: str
    start: float
    end: float = float("inf")


def _value(params: dict[str, Any]) -> float:
    """A device AUGRC that is lowest at lr = 0.03: a sampler can make progress on it."""
    return 0.01 + abs(float(params.get("lr", 0.03)) - 0.03)


@dataclass
class FakeStages:
    """Training, compilation and the board, faked: sleeps and recorded windows.

    ``value(params)`` is the device metric; ``fail(stage, slot)`` returns an exception to
    raise in that stage (or None); ``prune(slot)`` returns a reason to prune it after one
    epoch (or None). ``board`` holds the real board lock around each evaluation.
    """

    config: StudyTarget
    train_s: float = 0.0
    compile_s: float = 0.0
    device_s: float = 0.0
    value: Callable[[dict[str, Any]], float] = _value
    fail: Callable[[str, Slot], BaseException | None] = lambda stage, slot: None
    prune: Callable[[Slot], str | None] = lambda slot: None
    board: bool = False
    windows: list[Window] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _open(self, slot: Slot, stage: str) -> Window:
        window = Window(slot.number, stage, time.monotonic())
        with self.lock:
            self.windows.append(window)
        return window

    def _work(self, slot: Slot, stage: str, seconds: float) -> Window:
        window = self._open(slot, stage)
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if stage == "train" and STOP.is_set():
                    raise RuntimeError("stopped: the study was interrupted")
                time.sleep(min(0.002, seconds))
            error = self.fail(stage, slot)
            if error is not None:
                raise error
        finally:
            window.end = time.monotonic()
        return window

    def prepare(self, parent_run_id: str) -> Checked:
        self.prepared.append(parent_run_id)
        return Checked(("broken", "healthy"), {"train": 64, "val": 32})

    def train(self, slot: Slot) -> TrainOutcome | Pruned:
        started = time.time()
        self._work(slot, "train", self.train_s)
        why = self.prune(slot)
        if why is not None:
            return Pruned(why, epochs_run=1, epochs=4, started_at=started, finished_at=time.time())
        metrics = {"float_augrc": self.value(slot.params) * 0.9, "train_seconds": self.train_s}
        return TrainOutcome(metrics=metrics, started_at=started, finished_at=time.time())

    def compile(self, slot: Slot) -> CompileOutcome:
        slot.started()  # as LocalStages: compiled at once
        started = time.time()
        self._work(slot, "compile", self.compile_s)
        return CompileOutcome(
            artifact="compiled/model.int8.onnx",
            metrics={"compiled_size_mb": 0.5, "compile_seconds": self.compile_s},
            started_at=started,
            finished_at=time.time(),
        )

    def evaluate(self, slot: Slot, artifact: str) -> DeviceOutcome:
        started = time.time()
        if self.board:
            with hold_board(self.config):
                self._work(slot, "device", self.device_s)
        else:
            slot.started()  # no board to wait for
            self._work(slot, "device", self.device_s)
        metrics = {
            "device_augrc": self.value(slot.params),
            "device_accuracy": 0.9,
            "device_latency_ms": 0.2,
        }
        return DeviceOutcome(metrics=metrics, started_at=started, finished_at=time.time())

    def cancel(self, trial_numbers: list[int]) -> int:
        self.cancelled.extend(trial_numbers)
        return len(trial_numbers)

    def of(self, stage: str) -> list[Window]:
        return sorted((w for w in self.windows if w.stage == stage), key=lambda w: w.start)


@dataclass
class FakeRun:
    name: str
    parent: str | None
    tags: dict[str, str]
    status: str = "RUNNING"
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    @property
    def info(self) -> SimpleNamespace:
        return SimpleNamespace(status=self.status)


class FakeTracker:
    """MLflow, faked in memory: runs with their tags, params, metrics, texts and status."""

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.registered: list[dict[str, Any]] = []
        self.aliases: dict[tuple[str, str], str] = {}
        self.lock = threading.Lock()

    @property
    def client(self) -> FakeTracker:
        return self

    def get_run(self, run_id: str) -> FakeRun:
        return self.runs[run_id]

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        return f"experiment-{name}"

    def start_run(
        self, experiment_id: str, name: str, parent_id: str | None = None, tags: Any = None
    ) -> str:
        with self.lock:
            run_id = f"run-{len(self.runs)}"
            self.runs[run_id] = FakeRun(name, parent_id, dict(tags or {}))
        return run_id

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.runs[run_id].tags.update(tags)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.runs[run_id].status = status

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self.runs[run_id].params.update(params)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        self.runs[run_id].metrics.update(metrics)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.runs[run_id].texts[path] = text

    def register(self, name: str, run_id: str, path: str, **kwargs: Any) -> str:
        self.registered.append({"name": name, "run_id": run_id, "path": path, **kwargs})
        version = str(len(self.registered))
        if kwargs.get("alias"):
            self.aliases[(name, str(kwargs["alias"]))] = version
        return version

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[(name, alias)] = version

    def promote(
        self, name: str, version: str, metric: str, value: float, *, maximize: bool
    ) -> Promotion:
        """The champion alias to the first version, then only to a better one."""
        current = self.aliases.get((name, CHAMPION))
        if current is None:
            self.aliases[(name, CHAMPION)] = version
            return Promotion(True, version, value, "the first champion")
        held = float(self.registered[int(current) - 1]["tags"][metric])
        if value > held if maximize else value < held:
            self.aliases[(name, CHAMPION)] = version
            return Promotion(True, version, value, f"{value:.5f} beats version {current}")
        return Promotion(False, current, held, f"version {current} is as good or better")

    def named(self, name: str) -> FakeRun:
        [run] = [r for r in self.runs.values() if r.name == name]
        return run


def fake_config(
    tmp_path: Path, sections: dict[str, dict[str, Any]] | None = None, **study: Any
) -> StudyTarget:
    """A valid classifier config for the engine (its data is never read by fake stages);
    ``study`` items and other ``sections`` go over the tiny test config."""
    raw = tiny_config(tmp_path, tmp_path / "run")
    raw["study"].update({"heartbeat_s": 0.02, "stale_after_s": 5.0, **study})
    raw["device"]["name"] = f"fake-{tmp_path.name}"
    for section, values in (sections or {}).items():
        raw.setdefault(section, {}).update(values)
    return parse_config(raw)


def memory_study(config: StudyTarget) -> optuna.Study:
    """The config's study in Optuna's in-memory storage (a fresh study for each test)."""
    storage = optuna.storages.InMemoryStorage()
    return open_study("", config.study, config.seed, objective=CLASSIFIER, storage=storage)


def fake_loop(config: StudyTarget, study: optuna.Study, **stages: Any) -> StudyLoop:
    """edgetune's loop on ``study`` with fake stages (``stages``: FakeStages' options) and a
    fake tracker."""
    return StudyLoop(
        config,
        study,
        stages=FakeStages(config, **stages),
        logger=logging.getLogger("fake-loop"),
        tracker=FakeTracker(),  # type: ignore[arg-type]
    )
