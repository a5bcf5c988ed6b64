"""Workload conformance: every registered workload, run once through the whole contract.

``tasks.workloads.base.Workload`` is what the study engine relies on; this suite holds each
implementation in ``tasks.workloads.registry.WORKLOADS`` to it on a tiny config of its
kind (classifier: digits at 16 px; detector: synthetic shapes at 64 px, CPU). For each
workload one module-scoped run binds the config, preflights, prepares the study's inputs,
trains one trial (epoch hook recorded), compiles it, evaluates it on the ``local`` runner
and registers it; the tests then assert what each stage returned and what it left in
MLflow, that the outcomes round-trip through MLflow, and that an epoch hook that prunes
stops the training. The dry run (an untrained model exported, compiled and run once on the
board before a study's first training) runs on the same config, and a compiler that refuses
it is named in one line. A workload registered without a set-up here fails the suite.

No Prefect server: the board's slot is a file lock when ``PREFECT_API_URL`` is unset.
Tiny CPU runs reach mAP ≈ 0 and a poor AUGRC, so values are checked for presence, type,
finiteness and consistency, not for quality.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from tasks.board import embedded, ensure_device_limit
from tasks.config import SearchParam
from tasks.tracking import CHAMPION, Tracker
from tasks.workloads.base import (
    DRY_RUN_IMAGES,
    Checked,
    CompileOutcome,
    DeviceOutcome,
    DryRun,
    DryRunError,
    Pruned,
    Registration,
    StudyTarget,
    TrainOutcome,
    Workload,
    load_outcome,
    save_outcome,
)
from tasks.workloads.registry import WORKLOADS, parse_study_config, workload_for
from tests.conftest import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

#: Builds a tiny validated config of one workload's kind in a temporary folder.
Setup = Callable[[Path, pytest.FixtureRequest], StudyTarget]


def classifier_setup(tmp: Path, request: pytest.FixtureRequest) -> StudyTarget:
    """Digits at 16 px, a tinycnn trained for 1 epoch (SWA from the first)."""
    digits: Path = request.getfixturevalue("digits_root")
    raw = tiny_config(
        digits,
        tmp / "runs" / "conformance-classifier",
        train={"epochs": 1, "swa_start": 0},
        study={"parallel": 1},
        device={"name": "test-conformance-classifier"},
    )
    return parse_study_config(raw, source="conformance classifier")


def detector_setup(tmp: Path, request: pytest.FixtureRequest) -> StudyTarget:
    """S-ML on synthetic shapes at 64 px, 1 epoch on the CPU (the trial's ``epochs``)."""
    from tasks.detection.synthetic import write_shapes_dataset

    data_yaml = write_shapes_dataset(tmp / "data" / "shapes", train=16, val=8)
    raw = yaml.safe_load((ROOT / "configs" / "detectors" / "s-ml.yaml").read_text())
    raw["data"] = {"yaml": str(data_yaml)}
    raw["model"] = {"arch": "yolo11n.yaml"}
    raw["train"].update(
        {
            "imgsz": 64,
            "epochs": 2,  # the search space's only choice (1) is what trains
            "batch": 8,
            "cache": False,
            "workers": 0,
            "plots": False,
            "device": "cpu",
        }
    )
    raw["compile"] = {"backend": "onnxruntime-int8", "calibration_samples": 8}
    raw["device"] = {"name": "test-conformance-detector", "runner": "local", "warmup": 1}
    raw["run_dir"] = str(tmp / "runs" / "s-ml")
    raw["tracking"] = {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    raw["study"] = {
        "name": "conformance-s-ml",
        "n_trials": 1,
        "sampler": "random",
        "search_space": {
            "lr0": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "mosaic": {"type": "float", "low": 0.0, "high": 1.0},
            "epochs": {"type": "categorical", "choices": [1]},
        },
    }
    return parse_study_config(raw, source="conformance detector")


#: A set-up for every registered workload (``test_every_registered_workload_has_a_setup``).
SETUPS: dict[str, Setup] = {"classifier": classifier_setup, "detector": detector_setup}


def fixed_params(space: dict[str, SearchParam]) -> dict[str, Any]:
    """One fixed point inside the search space: each range's middle, each first choice."""
    params: dict[str, Any] = {}
    for name, param in space.items():
        if param.type == "categorical":
            assert param.choices, name
            params[name] = param.choices[0]
            continue
        assert isinstance(param.low, float | int) and isinstance(param.high, float | int), name
        low, high = float(param.low), float(param.high)
        middle = math.sqrt(low * high) if param.log else (low + high) / 2
        params[name] = round(middle) if param.type == "int" else middle
    return params


def artifacts(tracker: Tracker, run_id: str, path: str = "") -> set[str]:
    found: set[str] = set()
    for item in tracker.client.list_artifacts(run_id, path):
        found |= artifacts(tracker, run_id, item.path) if item.is_dir else {item.path}
    return found


@dataclass
class Ran:
    """One workload through the whole contract, and what each stage returned."""

    name: str
    tmp: Path
    config: StudyTarget
    workload: Workload[Any]
    tracker: Tracker
    experiment: str
    parent: str
    run: str
    params: dict[str, Any]
    preflight: Checked
    prepared: Checked
    epochs: list[tuple[int, dict[str, float]]]
    trained: TrainOutcome
    after_train: set[str]
    compiled: CompileOutcome
    downloaded: Path
    evaluated: DeviceOutcome
    registered: Registration | None


@pytest.fixture(scope="module", params=sorted(WORKLOADS))
def ran(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    """Each registered workload through every stage once (training is the costly part)."""
    name = str(request.param)
    if name not in SETUPS:
        pytest.fail(f"workload {name!r} is registered but has no set-up in SETUPS")
    tmp = tmp_path_factory.mktemp(f"workload-{name}")
    cwd = tmp / "cwd"  # nothing may land in the working folder: keep the repository clean
    cwd.mkdir()
    patch = pytest.MonkeyPatch()
    patch.chdir(cwd)
    try:
        config = SETUPS[name](tmp, request)
        if not embedded():  # a Prefect server runs in this session: the board's limit on it
            ensure_device_limit(config.device.concurrency_limit)
        workload = workload_for(config)
        found = workload.preflight()
        tracker = Tracker(config.tracking_uri)
        experiment = tracker.experiment_id(
            config.experiment_name, artifact_location=workload.artifact_location()
        )
        parent = tracker.start_run(experiment, "study", tags={"edgetune.study": config.study.name})
        prepared = workload.prepare(tracker, parent)
        run = tracker.start_run(
            experiment,
            "trial-0",
            parent_id=parent,
            tags={
                "edgetune.study": config.study.name,
                "edgetune.trial": "0",
                **workload.run_tags(),
            },
        )
        params = fixed_params(config.study.search_space)
        tracker.log_params(run, {**params, "trial": 0})
        epochs: list[tuple[int, dict[str, float]]] = []
        trained = workload.train(
            params, tracker, run, parent, on_epoch=lambda e, row: epochs.append((e, dict(row)))
        )
        after_train = artifacts(tracker, run)
        compiled = workload.compile(tracker, run, parent)
        downloaded = tracker.download(run, compiled.artifact, tmp / "downloaded")
        evaluated = workload.evaluate(tracker, run, parent, compiled.artifact)
        tracker.end_run(run, "FINISHED")  # as the engine does before it registers the best
        value = float(evaluated.metrics[workload.objective.metric])
        registered = workload.register_best(tracker, run, 0, value, CHAMPION)
        tracker.end_run(parent, "FINISHED")
    finally:
        patch.undo()
    yield Ran(
        name=name,
        tmp=tmp,
        config=config,
        workload=workload,
        tracker=tracker,
        experiment=experiment,
        parent=parent,
        run=run,
        params=params,
        preflight=found,
        prepared=prepared,
        epochs=epochs,
        trained=trained,
        after_train=after_train,
        compiled=compiled,
        downloaded=downloaded,
        evaluated=evaluated,
        registered=registered,
    )


def test_every_registered_workload_has_a_setup() -> None:
    assert set(SETUPS) == set(WORKLOADS), (
        "add a set-up to SETUPS in tests/workloads/test_conformance.py for each new workload "
        f"(registered: {sorted(WORKLOADS)}, set up: {sorted(SETUPS)})"
    )


def test_the_registry_binds_the_config_to_its_workload(ran: Ran) -> None:
    cls = WORKLOADS[ran.name]
    assert isinstance(ran.workload, cls)
    assert isinstance(ran.workload, Workload)
    assert type(ran.workload).name == ran.name
    assert isinstance(ran.config, cls.config_type)
    assert ran.workload.config is ran.config
    objective = cls.objective
    assert objective.direction in ("minimize", "maximize")
    assert objective.metric.startswith("device_")
    assert "device_latency_ms" in {key for key, _, _ in objective.columns}


def test_preflight_and_prepare_find_the_same_dataset(ran: Ran) -> None:
    assert isinstance(ran.preflight, Checked)
    assert isinstance(ran.prepared, Checked)
    assert len(ran.preflight.classes) > 0
    assert all(isinstance(c, str) and c for c in ran.preflight.classes)
    assert ran.prepared.classes == ran.preflight.classes
    assert ran.prepared.counts == ran.preflight.counts
    assert ran.preflight.counts["train"] > 0 and ran.preflight.counts["val"] > 0
    # The study's inputs are in its parent run, where a stage on another host finds them.
    assert artifacts(ran.tracker, ran.parent)


def test_train_reports_every_epoch_and_returns_float_metrics(ran: Ran) -> None:
    objective = ran.workload.objective
    trained = ran.trained
    assert isinstance(trained, TrainOutcome)
    value = trained.metrics[objective.float_metric]
    assert isinstance(value, float) and math.isfinite(value)
    assert trained.started_at <= trained.finished_at
    planned = ran.workload.planned_epochs(ran.params)
    assert len(ran.epochs) == planned
    numbers = [epoch for epoch, _ in ran.epochs]
    # Consecutive epochs. The base differs today (classifier 0, detector 1: Ultralytics'
    # epoch + 1), while the engine counts epochs_run = epoch + 1; pin it once they agree.
    assert numbers[0] in (0, 1)
    assert numbers == list(range(numbers[0], numbers[0] + planned))
    for _, row in ran.epochs:
        assert math.isfinite(row[objective.epoch_metric])
    # Exported to ONNX and logged to the trial's run; the float metric too.
    assert any(path.endswith(".onnx") for path in ran.after_train), ran.after_train
    logged = ran.tracker.client.get_run(ran.run).data.metrics
    assert logged[objective.float_metric] == pytest.approx(value)


def test_planned_epochs_are_the_configured_ones(ran: Ran) -> None:
    expected = int(ran.params.get("epochs", ran.config.train.epochs))
    assert ran.workload.planned_epochs(ran.params) == expected
    assert ran.workload.planned_epochs({}) == ran.config.train.epochs


def test_compile_logs_the_artifact_in_the_trial_run(ran: Ran) -> None:
    compiled = ran.compiled
    assert isinstance(compiled, CompileOutcome)
    assert compiled.artifact in artifacts(ran.tracker, ran.run)
    assert compiled.artifact not in ran.after_train
    assert ran.downloaded.is_file()
    size_mb = compiled.metrics["compiled_size_mb"]
    assert size_mb > 0
    assert ran.downloaded.stat().st_size / 1e6 == pytest.approx(size_mb)
    assert compiled.started_at <= compiled.finished_at


def test_evaluate_measures_the_objective_on_the_board(ran: Ran) -> None:
    objective = ran.workload.objective
    evaluated = ran.evaluated
    assert isinstance(evaluated, DeviceOutcome)
    value = evaluated.metrics[objective.metric]
    assert isinstance(value, float) and math.isfinite(value)
    assert evaluated.metrics["device_latency_ms"] > 0
    assert evaluated.started_at <= evaluated.finished_at
    # What the engine reads back for the results table is logged in the trial's run.
    logged = ran.tracker.client.get_run(ran.run).data.metrics
    assert logged[objective.metric] == pytest.approx(value)
    for key, _, _ in objective.columns:
        assert key in evaluated.metrics, key


def test_register_best_makes_a_version_the_registry_knows(ran: Ran) -> None:
    registered = ran.registered
    assert isinstance(registered, Registration)
    assert registered.alias == CHAMPION
    assert registered.model == ran.config.registered_model_name
    assert registered.run_id == ran.run  # the only measured run of a fresh experiment
    client = ran.tracker.client
    version = client.get_model_version(registered.model, registered.version)
    assert version.run_id == ran.run
    assert isinstance(registered.version, str)
    champion = client.get_model_version_by_alias(registered.model, CHAMPION)
    assert str(champion.version) == registered.version


def test_every_outcome_round_trips_through_mlflow(ran: Ran) -> None:
    tracker = ran.tracker
    run = tracker.start_run(ran.experiment, "outcomes", parent_id=ran.parent)
    stages = {"train": ran.trained, "compile": ran.compiled, "device": ran.evaluated}
    for stage, outcome in stages.items():
        save_outcome(tracker, run, stage, outcome)
    for stage, outcome in stages.items():
        loaded = load_outcome(tracker, run, stage)
        assert type(loaded) is type(outcome), stage
        assert loaded == outcome, stage
    pruned = Pruned(
        reason="pruned at epoch 1",
        epochs_run=1,
        epochs=ran.workload.planned_epochs(ran.params),
        started_at=ran.trained.started_at,
        finished_at=ran.trained.finished_at,
    )
    other = tracker.start_run(ran.experiment, "outcomes-pruned", parent_id=ran.parent)
    save_outcome(tracker, other, "train", pruned)
    assert load_outcome(tracker, other, "train") == pruned
    tracker.end_run(run, "FINISHED")
    tracker.end_run(other, "FINISHED")


def test_a_pruning_epoch_hook_stops_the_training(ran: Ran) -> None:
    tracker, workload = ran.tracker, ran.workload
    run = tracker.start_run(
        ran.experiment,
        "trial-1",
        parent_id=ran.parent,
        tags={
            "edgetune.study": ran.config.study.name,
            "edgetune.trial": "1",
            **workload.run_tags(),
        },
    )
    seen: list[int] = []

    def prune(epoch: int, row: dict[str, float]) -> None:
        seen.append(epoch)
        raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    patch = pytest.MonkeyPatch()
    patch.chdir(ran.tmp / "cwd")
    try:
        with pytest.raises(optuna.TrialPruned, match="pruned at epoch"):
            workload.train(ran.params, tracker, run, ran.parent, on_epoch=prune)
    finally:
        patch.undo()
        tracker.end_run(run, "FINISHED")  # the engine ends a pruned trial's run FINISHED
    assert seen == [ran.epochs[0][0]]  # stopped at its first epoch
    assert not [p for p in artifacts(tracker, run) if p.endswith(".onnx")]  # nothing exported


def test_a_compile_failure_raises_and_keeps_the_compilers_log(
    ran: Ran, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiler's log goes to the trial's run even when it fails: it says why."""
    from tasks.compilers import COMPILERS, CompilerError

    class BrokenCompiler:  # a stand-in compiler that writes its log, then fails
        name = "broken"

        def __init__(self, **options: Any) -> None:
            pass

        def compile(self, onnx_path: Path, calibration: Path, out: Path) -> Any:
            out.mkdir(parents=True, exist_ok=True)
            (out / "compile.log").write_text("parsing model.onnx\nunsupported layer: Foo\n")
            raise CompilerError("unsupported layer: Foo")

    monkeypatch.setitem(COMPILERS, ran.config.compile.backend, BrokenCompiler)
    tracker = ran.tracker
    run = tracker.start_run(ran.experiment, "trial-broken", parent_id=ran.parent)
    for artifact in artifacts(tracker, ran.run):  # the trained trial's model, as training left it
        if artifact.startswith("model/") and artifact.endswith(".onnx"):
            onnx = tracker.download(ran.run, artifact, ran.tmp / "broken")
            tracker.log_artifact(run, onnx, "model")
    try:
        with pytest.raises(CompilerError, match="unsupported layer: Foo"):
            ran.workload.compile(tracker, run, ran.parent)
    finally:
        tracker.end_run(run, "FAILED")
    log = tracker.download(run, "compile/compile.log", ran.tmp / "broken-log")
    assert "unsupported layer: Foo" in log.read_text()


def _run_names(ran: Ran) -> list[str]:
    runs = ran.tracker.client.search_runs([ran.experiment])
    return sorted(str(run.info.run_name) for run in runs)


def test_the_dry_run_runs_an_untrained_model_once_through_export_compile_and_board(
    ran: Ran,
) -> None:
    """Before a study's first training: the configured architecture, untrained, through the
    configured compiler on the study's calibration set, once on the board; nothing logged."""
    runs, cwd = _run_names(ran), ran.tmp / "cwd"
    files = sorted(cwd.rglob("*"))
    patch = pytest.MonkeyPatch()
    patch.chdir(cwd)
    try:
        done = ran.workload.dry_run()
    finally:
        patch.undo()
    assert isinstance(done, DryRun)
    assert done.model == ran.config.model.arch
    assert done.compiler == ran.config.compile.backend
    assert done.board == ran.config.device.name
    train_images = ran.preflight.counts["train"]
    assert done.calibration_images == min(ran.config.compile.calibration_samples, train_images)
    assert done.board_images == min(DRY_RUN_IMAGES, ran.preflight.counts["val"])
    assert done.size_mb > 0 and math.isfinite(done.latency_ms) and done.latency_ms > 0
    assert set(done.seconds) == {"export", "compile", "device"}
    assert all(seconds > 0 for seconds in done.seconds.values())
    assert done.summary().startswith(f"untrained {done.model} exported in ")
    # nothing trained, nothing in MLflow, nothing left in the working folder
    assert _run_names(ran) == runs
    assert sorted(cwd.rglob("*")) == files


def test_a_dry_run_the_compiler_refuses_names_the_compile_settings(
    ran: Ran, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.compilers import COMPILERS, CompilerError

    class RefusingCompiler:  # a stand-in compiler that refuses every model
        name = "refusing"

        def __init__(self, **options: Any) -> None:
            pass

        def compile(self, onnx_path: Path, calibration: Path, out: Path) -> Any:
            assert onnx_path.is_file() and calibration.is_file()  # the export came first
            raise CompilerError("unsupported layer: Foo\n--- last lines of compile.log ---")

    monkeypatch.setitem(COMPILERS, ran.config.compile.backend, RefusingCompiler)
    monkeypatch.chdir(ran.tmp / "cwd")

    with pytest.raises(DryRunError) as caught:
        ran.workload.dry_run()
    message = str(caught.value)
    samples = ran.config.compile.calibration_samples
    assert message.startswith(
        f"compile.onnxruntime: the {ran.config.compile.backend} compiler refused an untrained "
        f"{ran.config.model.arch} (compile.onnxruntime: "
    ), message
    assert (
        f"; compile.calibration_samples={samples}): CompilerError: unsupported layer: " in message
    )
    assert message.endswith("change these settings and run again (dry run: nothing was trained)")
    assert "\n" not in message


def test_evaluate_waits_for_the_boards_slot(ran: Ran) -> None:
    """While another holder has the board, evaluation waits (up to device.wait_timeout_s)
    and then fails clearly: the board runs one evaluation at a time, whatever the workload."""
    from tasks.board import BoardBusyError, hold_board

    device = ran.config.device.model_copy(update={"wait_timeout_s": 0.5})
    config = ran.config.model_copy(update={"device": device})
    workload = type(ran.workload)(config)
    started = time.monotonic()
    with hold_board(config), pytest.raises(BoardBusyError, match=r"stayed busy for 0\.5 s"):
        workload.evaluate(ran.tracker, ran.run, ran.parent, ran.compiled.artifact)
    assert time.monotonic() - started >= 0.5
