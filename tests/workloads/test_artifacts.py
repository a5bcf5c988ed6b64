"""Artifacts land where every host reads them: beside a SQLite tracking file, or through a
tracking server's artifact proxy, never in a worker's working folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import parse_config
from tasks.tracking import local_artifact_location
from tasks.workloads.classifier import ClassifierWorkload

from conftest import tiny_config


def test_a_tracking_server_from_the_environment_keeps_the_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(tiny_config(tmp_path, tmp_path / "run"))
    # embedded: beside the run directory's tracking file
    assert ClassifierWorkload(config).artifact_location() == (
        (tmp_path / "run" / "mlartifacts").resolve().as_uri()
    )
    # a server named by $MLFLOW_TRACKING_URI (as the workers get it): the server decides
    # (its --serve-artifacts proxy), not a folder of the process that made the experiment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert ClassifierWorkload(config).artifact_location() is None
    # a tracking file elsewhere: its artifacts beside it
    elsewhere = parse_config(
        tiny_config(tmp_path, tmp_path / "run", tracking={"uri": f"sqlite:///{tmp_path}/t/m.db"})
    )
    assert ClassifierWorkload(elsewhere).artifact_location() == (
        (tmp_path / "t" / "mlartifacts").resolve().as_uri()
    )


def test_only_a_tracking_file_has_a_local_artifact_folder(tmp_path: Path) -> None:
    assert local_artifact_location(f"sqlite:///{tmp_path}/m.db") == (
        (tmp_path / "mlartifacts").resolve().as_uri()
    )
    assert local_artifact_location("https://mlflow.example.org") is None
    assert local_artifact_location("postgresql://u@127.0.0.1/mlflow") is None
