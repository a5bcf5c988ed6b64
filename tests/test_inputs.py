"""A study's inputs (the board's bundle, the calibration set) travel from MLflow once per
host: every later stage on the host reads the cached file, checked against the hash the
study logged, and the board runner takes that hash instead of reading the file again."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tasks.config import parse_config
from tasks.digest import file_sha256, remember_sha256, sha256_of
from tasks.inputs import (
    DIGEST_TAG,
    STALE_STAGED_S,
    fetch_study_input,
    inputs_dir,
    log_study_input,
    stage_artifact,
    staged_dir,
    staging_key,
    take_staged,
)
from tasks.tracking import Tracker
from tasks.workloads.base import evaluation_inputs
from tasks.workloads.classifier import BUNDLE, CALIBRATION, ClassifierWorkload, prepare_inputs

from conftest import tiny_config


class CountingTracker(Tracker):
    """A real tracker (SQLite and a local artifact folder) that counts its downloads."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.downloads: Counter[tuple[str, str]] = Counter()

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        self.downloads[(run_id, artifact_path)] += 1
        return super().download(run_id, artifact_path, dst)


@pytest.fixture
def tracker(tmp_path: Path) -> CountingTracker:
    return CountingTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGETUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "inputs"


def _study_run(tracker: Tracker, tmp_path: Path) -> str:
    experiment = tracker.experiment_id("inputs", (tmp_path / "artifacts").as_uri())
    return tracker.start_run(experiment, "study")


def _input(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / "made" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_every_stage_of_a_host_after_the_first_reads_the_bundle_from_its_cache(
    tmp_path: Path, digits_root: Path, tracker: CountingTracker, cache: Path
) -> None:
    """The defect: each evaluation stage downloaded the study's whole validation bundle
    from MLflow again (and the next evaluation on the work pools did so while the board
    waited for it)."""
    config = parse_config(tiny_config(digits_root, tmp_path / "run"))
    study = _study_run(tracker, tmp_path)
    prepare_inputs(config, tracker, study)
    trial = tracker.start_run(tracker.experiment_id("inputs"), "trial", parent_id=study)
    compiled = _input(tmp_path, "model.onnx", b"compiled model")
    tracker.log_artifact(trial, compiled, "compiled")

    bundles = []
    for _ in range(3):
        with evaluation_inputs(config, tracker, trial, study, "compiled/model.onnx") as inputs:
            got, bundle, _work = inputs
            assert got.read_bytes() == b"compiled model"
            bundles.append((bundle, bundle.read_bytes()))
    assert tracker.downloads[(study, BUNDLE)] == 1
    assert tracker.downloads[(trial, "compiled/model.onnx")] == 3  # a trial's own: each time
    first, content = bundles[0]
    assert all(path == first and data == content for path, data in bundles)
    assert first.parent.parent == cache
    assert first.parent.name == sha256_of(first)  # keyed by its content
    labels = np.load(first)["labels"]
    assert len(labels) > 0  # the bundle itself, whole
    # the hash is remembered beside it: the board runner does not read it again
    assert file_sha256(first) == first.parent.name
    # the calibration set likewise
    calibration = fetch_study_input(tracker, study, CALIBRATION, tmp_path / "c")
    assert fetch_study_input(tracker, study, CALIBRATION, tmp_path / "d") == calibration
    assert tracker.downloads[(study, CALIBRATION)] == 1


def test_a_model_fetched_ahead_is_taken_by_its_evaluation_instead_of_downloaded(
    tmp_path: Path, digits_root: Path, tracker: CountingTracker, cache: Path
) -> None:
    """What a worker does for the evaluation waiting next (``Workload.prestage``): the
    trial's compiled model comes to this host then; the evaluation takes that file (once:
    the next one downloads again)."""
    config = parse_config(tiny_config(digits_root, tmp_path / "run"))
    study = _study_run(tracker, tmp_path)
    prepare_inputs(config, tracker, study)
    trial = tracker.start_run(tracker.experiment_id("inputs"), "trial", parent_id=study)
    tracker.log_artifact(trial, _input(tmp_path, "model.onnx", b"compiled model"), "compiled")
    model = "compiled/model.onnx"

    # the local board has nothing to send; the model is fetched to this host all the same
    assert ClassifierWorkload(config).prestage(tracker, trial, study, model) is False
    ahead = staged_dir() / staging_key(trial, model) / "model.onnx"
    assert ahead.read_bytes() == b"compiled model"
    assert stage_artifact(tracker, trial, model) == ahead  # there already: kept
    assert tracker.downloads[(trial, model)] == 1

    with evaluation_inputs(config, tracker, trial, study, model) as (got, _bundle, work):
        assert got.read_bytes() == b"compiled model" and got.is_relative_to(work)
    assert tracker.downloads[(trial, model)] == 1  # taken, not downloaded
    assert list(staged_dir().iterdir()) == []
    with evaluation_inputs(config, tracker, trial, study, model) as (got, _bundle, _work):
        assert got.read_bytes() == b"compiled model"
    assert tracker.downloads[(trial, model)] == 2  # nothing ahead: downloaded


def test_a_folder_fetched_ahead_without_its_file_is_no_input(tmp_path: Path, cache: Path) -> None:
    """A folder emptied meanwhile (swept while a stage took it): the stage downloads."""
    folder = staged_dir() / staging_key("run", "compiled/model.onnx")
    folder.mkdir(parents=True)
    assert take_staged("run", "compiled/model.onnx", tmp_path / "dst") is None
    assert list(staged_dir().iterdir()) == []


def test_what_no_evaluation_took_for_an_hour_is_swept(
    tmp_path: Path, tracker: CountingTracker, cache: Path
) -> None:
    study = _study_run(tracker, tmp_path)
    tracker.log_artifact(study, _input(tmp_path, "model.onnx", b"m"), "compiled")
    old, young = staged_dir() / ("0a" * 16), staged_dir() / ("0b" * 16)
    for folder in (old, young):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"m")
    hours_ago = time.time() - STALE_STAGED_S - 60
    os.utime(old, (hours_ago, hours_ago))
    stage_artifact(tracker, study, "compiled/model.onnx")
    key = staging_key(study, "compiled/model.onnx")
    assert sorted(p.name for p in staged_dir().iterdir()) == sorted([young.name, key])


def test_stages_starting_together_fetch_an_input_once(
    tmp_path: Path, tracker: CountingTracker, cache: Path
) -> None:
    study = _study_run(tracker, tmp_path)
    log_study_input(tracker, study, _input(tmp_path, "b.npz", b"x" * 3_000_000), "inputs")
    got: list[Path] = []

    def stage(index: int) -> None:
        got.append(fetch_study_input(tracker, study, "inputs/b.npz", tmp_path / f"s{index}"))

    threads = [threading.Thread(target=stage, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4 and len(set(got)) == 1
    assert got[0].read_bytes() == b"x" * 3_000_000
    assert tracker.downloads[(study, "inputs/b.npz")] == 1
    # nothing half-written is left beside the entries
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []


def test_a_study_logged_without_the_hash_is_downloaded_for_each_stage_as_before(
    tmp_path: Path, tracker: CountingTracker, cache: Path
) -> None:
    study = _study_run(tracker, tmp_path)
    tracker.log_artifact(study, _input(tmp_path, "b.npz", b"older study"), "inputs")
    first = fetch_study_input(tracker, study, "inputs/b.npz", tmp_path / "one")
    second = fetch_study_input(tracker, study, "inputs/b.npz", tmp_path / "two")
    assert first == tmp_path / "one" / "b.npz" and first.read_bytes() == b"older study"
    assert second == tmp_path / "two" / "b.npz"
    assert tracker.downloads[(study, "inputs/b.npz")] == 2
    assert not cache.exists()


def test_an_input_logged_again_with_other_content_is_used_once_and_not_cached(
    tmp_path: Path, tracker: CountingTracker, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = _study_run(tracker, tmp_path)
    log_study_input(tracker, study, _input(tmp_path, "b.npz", b"first"), "inputs")
    # logged again under the same path without its tag (a half-done re-log)
    tracker.log_artifact(study, _input(tmp_path / "again", "b.npz", b"second"), "inputs")
    with caplog.at_level(logging.WARNING, logger="tasks.inputs"):
        got = fetch_study_input(tracker, study, "inputs/b.npz", tmp_path / "stage")
    assert got == tmp_path / "stage" / "b.npz" and got.read_bytes() == b"second"
    assert "logged again since" in caplog.text and "not cached" in caplog.text
    tag = tracker.client.get_run(study).data.tags[f"{DIGEST_TAG}inputs/b.npz"]
    assert not (cache / tag).exists()
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_an_unwritable_cache_costs_the_cache_not_the_stage(
    tmp_path: Path,
    tracker: CountingTracker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("EDGETUNE_CACHE_DIR", str(blocker))
    study = _study_run(tracker, tmp_path)
    log_study_input(tracker, study, _input(tmp_path, "b.npz", b"content"), "inputs")
    with caplog.at_level(logging.WARNING, logger="tasks.inputs"):
        got = fetch_study_input(tracker, study, "inputs/b.npz", tmp_path / "stage")
    assert got == tmp_path / "stage" / "b.npz" and got.read_bytes() == b"content"
    assert "cannot be written" in caplog.text and "EDGETUNE_CACHE_DIR" in caplog.text


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGETUNE_CACHE_DIR", "/srv/cache")
    assert inputs_dir() == Path("/srv/cache/inputs")
    monkeypatch.delenv("EDGETUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/xdg")
    assert inputs_dir() == Path("/srv/xdg/edgetune/inputs")


def test_a_remembered_hash_is_used_only_while_the_file_is_unchanged(tmp_path: Path) -> None:
    path = _input(tmp_path, "f.bin", b"abc")
    real = sha256_of(path)
    assert file_sha256(path) == real  # nothing remembered: read
    remember_sha256(path, "0" * 64)  # what is remembered is what is returned: not read
    assert file_sha256(path) == "0" * 64
    path.write_bytes(b"abcd")  # changed since: read again
    assert file_sha256(path) == sha256_of(path) != real
    assert [p.name for p in path.parent.iterdir()] == sorted(["f.bin", ".f.bin.sha256"])


def test_the_board_runner_names_the_bundle_by_the_remembered_hash(tmp_path: Path) -> None:
    from tasks.devices.ssh import SshRunner, _Session

    bundle = _input(tmp_path, "b.npz", b"bundle")
    artifact = _input(tmp_path, "m.onnx", b"model")
    runner = SshRunner(host="127.0.0.1", user="edge")
    assert _Session(runner, artifact, bundle).bundle_sha == sha256_of(bundle)
    remember_sha256(bundle, "f" * 64)  # remembered: taken as is, the file is not read
    assert _Session(runner, artifact, bundle).bundle_sha == "f" * 64
