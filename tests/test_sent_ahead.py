"""An evaluation's model sent ahead (what the edge pool's worker does for the evaluation
waiting next) and the evaluation itself, through the real pieces: the flow module's
``PRESTAGE`` entry with the run's parameters, MLflow (a local store), the host's staging
folder and a real SSH server on loopback standing in for the board."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tasks.board
from flows.stages import PRESTAGE
from tasks.config import parse_config
from tasks.inputs import log_study_input, staged_dir
from tasks.tracking import Tracker
from tasks.workloads.classifier import ClassifierWorkload

from board import Board, start_board
from conftest import tiny_config
from fakes import export_onnx, tiny_classifier, write_bundle

MODEL = "compiled/model.onnx"


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    with start_board(tmp_path_factory.mktemp("board")) as running:
        yield running


def test_an_evaluation_whose_model_went_ahead_runs_on_what_was_sent(
    tmp_path: Path, board: Board, puts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks.board, "embedded", lambda: True)  # the board's file lock
    remote = tmp_path / "remote"
    ssh = board.runner_options(work_dir=str(remote))
    device = {"name": "ahead-board", "runner": "ssh", "ssh": ssh}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = parse_config(
        tiny_config(tmp_path, tmp_path / "run", device=device, tracking={"uri": uri})
    )
    tracker = Tracker(uri)
    experiment = tracker.experiment_id("ahead", (tmp_path / "artifacts").as_uri())
    study = tracker.start_run(experiment, "study")
    made = tmp_path / "made"
    made.mkdir()
    log_study_input(tracker, study, write_bundle(made / "val_bundle.npz", n=12), "inputs")
    trial = tracker.start_run(experiment, "trial", parent_id=study)
    tracker.log_artifact(trial, export_onnx(tiny_classifier(), made / "model.onnx"), "compiled")

    # what the worker runs for the waiting evaluate-trial run, with the run's parameters
    parameters = {"config": config.model_dump(mode="json"), "trial_number": 3, "run_id": trial,
                  "parent_run_id": study, "artifact": MODEL, "trial_id": 7}  # fmt: skip
    assert PRESTAGE["evaluate_trial"](**parameters) is True
    sent_ahead = [p for p in puts if p.endswith("model.onnx")]
    assert len(sent_ahead) == 1 and "/staged/" in sent_ahead[0]
    assert [p.name for p in (remote / "staged").iterdir()] != []
    assert [p.name for p in staged_dir().iterdir()] != []

    outcome = ClassifierWorkload(config).evaluate(tracker, trial, study, MODEL)

    assert [p for p in puts if p.endswith("model.onnx")] == sent_ahead  # nothing sent again
    assert 0.0 <= outcome.metrics["device_accuracy"] <= 1.0
    assert outcome.metrics["device_latency_ms"] > 0
    assert list((remote / "staged").iterdir()) == [] and list((remote / "runs").iterdir()) == []
    assert list(staged_dir().iterdir()) == []  # taken by the evaluation
