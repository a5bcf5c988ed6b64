"""Exports and views: hpo/status.json, hpo/trial_<n>.json, the plots, edgetune dashboard."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from edgetune.cli import app
from tasks.config import parse_config
from tasks.hpo import reports
from tasks.hpo.study import best_trial, open_study
from tasks.tracking import Tracker
from tasks.workloads.classifier import CLASSIFIER

from conftest import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Log:
    """Collects what a hook logs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(("info", msg % args))

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(("warning", msg % args))

    def said(self, level: str, text: str) -> bool:
        return any(lv == level and text in line for lv, line in self.lines)


@pytest.fixture(scope="module")
def finished(
    digits_root: Path, tmp_path_factory: pytest.TempPathFactory, prefect_server: None
) -> tuple[Any, optuna.Study]:
    """One tiny 3-trial study, shared by this module's tests."""
    from flows.tune import tune

    raw = tiny_config(digits_root, tmp_path_factory.mktemp("reports") / "hpo-views")
    raw["study"]["n_trials"] = 3
    config = parse_config(raw)
    tune(config.model_dump(mode="json"))
    return config, open_study(config.storage_url, config.study, config.seed, create=False)


@pytest.mark.integration
@pytest.mark.slow
def test_status_json_describes_the_finished_study(finished: tuple[Any, optuna.Study]) -> None:
    config, study = finished
    status = json.loads((config.run_path / "hpo" / "status.json").read_text())
    best = best_trial(study)
    assert best is not None
    assert status["state"] == "FINISHED"
    assert status["best"]["number"] == best.number
    assert status["best"]["value"] == pytest.approx(best.value)
    assert status["algorithm"]["sampler"] == "tpe"
    assert status["algorithm"]["sampler_class"] == "TPESampler"
    assert status["algorithm"]["pruner"] == "none"
    assert status["search_space"]["lr"] == {
        "type": "float",
        "low": 0.01,
        "high": 0.1,
        "log": True,
    }
    assert set(status["search_space"]) == {"lr", "momentum"}
    assert status["objective"]["metric"] == "device_augrc"
    assert status["objective"]["direction"] == "minimize"
    assert status["budget"]["n_trials"] == 3 and status["budget"]["trials"] == 3
    assert {"time_budget", "hpo_time_ratio", "patience"} <= set(status["budget"])
    assert status["counts"]["COMPLETE"] == 3 and status["counts"]["FAIL"] == 0
    trials = {t.number: t for t in study.get_trials()}
    assert [row["number"] for row in status["trials"]] == sorted(trials)
    for row in status["trials"]:
        trial = trials[row["number"]]
        assert row["state"] == "COMPLETE"
        assert row["params"] == trial.params
        assert row["value"] == pytest.approx(trial.value)
        assert row["float_value"] == pytest.approx(trial.user_attrs["float_augrc"])
        assert row["device_metrics"]["device_accuracy"] == pytest.approx(
            trial.user_attrs["device_accuracy"]
        )
        assert row["reason"] is None
        times = row["times"]
        assert times["train_s"] > 0 and times["compile_s"] > 0 and times["device_s"] > 0
        assert times["total_s"] >= times["train_s"] + times["compile_s"] + times["device_s"]


@pytest.mark.integration
@pytest.mark.slow
def test_one_record_per_trial(finished: tuple[Any, optuna.Study]) -> None:
    config, study = finished
    folder = config.run_path / "hpo"
    trials = study.get_trials()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["status.json", *(f"trial_{t.number}.json" for t in trials)]
    )  # one file per trial, and no temporary file left behind
    for trial in trials:
        record = json.loads((folder / f"trial_{trial.number}.json").read_text())
        assert record["number"] == trial.number
        assert record["state"] == trial.state.name == "COMPLETE"
        assert record["params"] == trial.params
        assert record["values"] == [pytest.approx(trial.value)]
        assert record["mlflow_run_id"] == trial.user_attrs["mlflow_run_id"]
        assert record["distributions"]["lr"]["attributes"]["log"] is True
        assert sorted(record["intermediate_values"]) == ["0", "1"]
        assert record["user_attrs"]["device_augrc_ci_low"] == pytest.approx(
            trial.user_attrs["device_augrc_ci_low"]
        )


@pytest.mark.integration
@pytest.mark.slow
def test_the_parent_run_holds_the_records_and_the_plots(
    finished: tuple[Any, optuna.Study], tmp_path: Path
) -> None:
    config, study = finished
    client = MlflowClient(config.tracking_uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    hpo = {a.path for a in client.list_artifacts(parent, "hpo")}
    assert hpo == {"hpo/status.json", *(f"hpo/trial_{t.number}.json" for t in study.trials)}
    plots = {a.path: a.file_size for a in client.list_artifacts(parent, "plots")}
    # One objective: no Pareto front; a classifier: risk-coverage curves.
    # each PNG has its interactive (plotly) twin beside it
    names = ("optimization_history", "param_importances", "risk_coverage")
    assert set(plots) == {f"plots/{n}.{kind}" for n in names for kind in ("png", "html")}
    tracker = Tracker(config.tracking_uri)
    for name in names:
        page = tracker.download(parent, f"plots/{name}.html", tmp_path).read_text()
        _offline_plotly(page)
    for path in (p for p in plots if p.endswith(".png")):
        data = tracker.download(parent, path, tmp_path).read_bytes()
        assert data.startswith(PNG_MAGIC), path
        assert len(data) > 10_000, f"{path}: {len(data)} bytes"
    logged = json.loads(tracker.download(parent, "hpo/status.json", tmp_path).read_text())
    assert logged["state"] == "FINISHED" and logged["counts"]["COMPLETE"] == 3


@pytest.mark.integration
@pytest.mark.slow
def test_risk_coverage_curves_give_back_each_trials_device_augrc(
    finished: tuple[Any, optuna.Study], tmp_path: Path
) -> None:
    config, study = finished
    tracker = Tracker(config.tracking_uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    drawn = reports.plot_risk_coverage(study, tracker, parent, tmp_path / "rc.png", k=2)
    assert drawn is not None
    best_two = sorted(study.trials, key=lambda t: (t.value, t.number))[:2]
    assert list(drawn) == [t.number for t in best_two]
    for trial in best_two:
        # The curve's area, from the logged outputs and labels, is the value told the study.
        assert drawn[trial.number] == pytest.approx(trial.value, abs=1e-6)
    assert (tmp_path / "rc.png").read_bytes().startswith(PNG_MAGIC)


def _brute_front(points: dict[int, tuple[float, float]]) -> set[int]:
    """Non-dominated points for (minimise, maximise), checked pair by pair."""
    front = set()
    for i, (a, b) in points.items():
        beaten = any(
            c <= a and d >= b and (c < a or d > b) for j, (c, d) in points.items() if j != i
        )
        if not beaten:
            front.add(i)
    return front


def test_pareto_front_draws_only_non_dominated_trials(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["minimize", "maximize"])
    rng = np.random.default_rng(3)
    values = [(float(a), float(b)) for a, b in rng.uniform(0, 1, size=(40, 2))]
    values += [values[5], (0.0, 0.0), (1.0, 1.0)]  # a twin point, two extremes
    dist = {"x": FloatDistribution(0.0, 1.0)}
    for a, b in values:
        study.add_trial(create_trial(values=[a, b], params={"x": a}, distributions=dist))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=dist))
    front = reports.plot_pareto_front(study, tmp_path / "pareto.png", names=["error", "speed"])
    assert front is not None
    points = {t.number: (t.values[0], t.values[1]) for t in study.trials if t.values}
    assert set(front) == _brute_front(points)
    assert 0 < len(front) < len(points)
    assert {5, 40} <= set(front) or not ({5, 40} & set(front))  # twins share their fate
    assert len(values) not in front  # the failed trial is never on the front
    data = (tmp_path / "pareto.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000

    single = optuna.create_study()
    single.add_trial(create_trial(value=0.1, params={"x": 0.1}, distributions=dist))
    assert reports.plot_pareto_front(single, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def _study(values: list[float], xs: list[float]) -> optuna.Study:
    study = optuna.create_study()
    dist = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(0.0, 1.0)}
    for value, x in zip(values, xs, strict=True):
        study.add_trial(create_trial(value=value, params={"x": x, "y": 0.5}, distributions=dist))
    return study


def _offline_plotly(page: str) -> list[dict[str, Any]]:
    """The traces of a self-contained plotly page: plotly.js inside, nothing fetched."""
    assert not re.findall(r"<script[^>]*\bsrc=", page)
    assert len(page) > 1_000_000  # plotly.js itself
    call = page[page.rindex("Plotly.newPlot(") :]
    start = call.index("[")
    traces, _ = json.JSONDecoder().raw_decode(call[start:])
    return list(traces)


def test_history_follows_the_best_so_far(tmp_path: Path) -> None:
    study = _study([0.3, 0.4, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4])
    rows = reports.plot_history(study, CLASSIFIER, tmp_path / "h.png")
    assert rows == [(0, 0.3, 0.3), (1, 0.4, 0.3), (2, 0.1, 0.1), (3, 0.2, 0.1)]
    assert (tmp_path / "h.png").read_bytes().startswith(PNG_MAGIC)
    # the interactive twin holds the same points: each trial, and the best so far as steps
    trial, best = _offline_plotly((tmp_path / "h.html").read_text())
    assert (trial["name"], trial["mode"]) == ("trial", "markers")
    assert (trial["x"], trial["y"]) == ([0, 1, 2, 3], [0.3, 0.4, 0.1, 0.2])
    assert (best["name"], best["line"]["shape"], best["y"]) == (
        "best so far",
        "hv",
        [0.3, 0.3, 0.1, 0.1],
    )


def test_importances_are_not_computed_or_imported_when_skipped(tmp_path: Path) -> None:
    """fANOVA imports scikit-learn (about a second): a one-trial study's end never pays it."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import optuna\n"
        "from optuna.distributions import FloatDistribution\n"
        "from optuna.trial import create_trial\n"
        "from tasks.hpo import reports\n"
        "study = optuna.create_study()\n"
        "dist = {'x': FloatDistribution(0.0, 1.0)}\n"
        "study.add_trial(create_trial(value=0.1, params={'x': 0.5}, distributions=dist))\n"
        f"print(reports.plot_importances(study, Path({str(tmp_path / 'i.png')!r})))\n"
        "print('sklearn' in sys.modules, 'optuna.importance' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "False", "False"]


def test_importances_cover_dependent_and_conditional_parameters(tmp_path: Path) -> None:
    """swa_start's range depends on epochs and `cond` is drawn only for some trials: fANOVA
    runs over the parameters every trial has, each with one range holding all values."""
    study = optuna.create_study()
    rng = np.random.default_rng(0)
    for _ in range(12):
        epochs = int(rng.integers(4, 11))
        swa = int(rng.integers(1, epochs))
        lr = float(rng.uniform(0.001, 0.1))
        params: dict[str, Any] = {"epochs": epochs, "swa_start": swa, "lr": lr}
        dist: dict[str, Any] = {
            "epochs": IntDistribution(4, 10),
            "swa_start": IntDistribution(1, epochs - 1),
            "lr": FloatDistribution(0.001, 0.1),
        }
        if swa > 3:
            params["cond"], dist["cond"] = 0.5, FloatDistribution(0.0, 1.0)
        value = lr + 0.01 * swa
        study.add_trial(create_trial(value=value, params=params, distributions=dist))
    importances = reports.plot_importances(study, tmp_path / "i.png")
    assert importances is not None and set(importances) == {"epochs", "swa_start", "lr"}
    assert sum(importances.values()) == pytest.approx(1.0)
    assert max(importances, key=importances.__getitem__) == "lr"
    (bars,) = _offline_plotly((tmp_path / "i.html").read_text())
    assert bars["orientation"] == "h"
    assert dict(zip(bars["y"], bars["x"], strict=True)) == pytest.approx(importances)


def test_importances_are_skipped_without_enough_trials_or_variation(tmp_path: Path) -> None:
    one = _study([0.3], [0.1])
    assert reports.plot_importances(one, tmp_path / "one.png") is None
    fixed = _study([0.3, 0.2, 0.1], [0.5, 0.5, 0.5])  # neither x nor y varies
    assert reports.varying_params(fixed) == []
    assert reports.plot_importances(fixed, tmp_path / "fixed.png") is None
    varied = _study([0.3, 0.2, 0.1, 0.25], [0.1, 0.4, 0.9, 0.2])
    importances = reports.plot_importances(varied, tmp_path / "varied.png")
    assert importances is not None and set(importances) == {"x"}  # y never varies
    assert importances["x"] == pytest.approx(1.0)
    assert not (tmp_path / "one.png").exists() and not (tmp_path / "fixed.png").exists()


class BrokenTracker:
    """MLflow gone: every call fails."""

    def download(self, *args: Any, **kwargs: Any) -> Path:
        raise ConnectionError("tracking server unreachable")

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("tracking server unreachable")


def _fake_run(digits_root: Path, tmp_path: Path, study: optuna.Study) -> Any:
    config = parse_config(tiny_config(digits_root, tmp_path / "fake"))
    return SimpleNamespace(
        config=config,
        study=study,
        tracker=BrokenTracker(),
        parent_run_id="p",
        logger=Log(),
        stopped_by="time budget 1h reached after 3600 s",
    )


def test_reports_never_fail_the_study(digits_root: Path, tmp_path: Path) -> None:
    study = _study([0.3, 0.2, 0.1], [0.1, 0.4, 0.9])
    run = _fake_run(digits_root, tmp_path, study)
    reports.on_trial_outcome(run, study.trials[1])  # logging to MLflow fails: a warning
    assert run.logger.said("warning", "hpo records of trial 1 not saved")
    status = json.loads((run.config.run_path / "hpo" / "status.json").read_text())
    assert status["state"] == "RUNNING" and status["best"]["number"] == 2
    assert (run.config.run_path / "hpo" / "trial_1.json").is_file()
    assert not (run.config.run_path / "hpo" / "trial_0.json").exists()

    made = reports.make_plots(run)  # the curves need MLflow: skipped, the rest drawn
    assert [p.name for p in made] == [
        "optimization_history.png",
        "optimization_history.html",
        "param_importances.png",
        "param_importances.html",
    ]
    assert run.logger.said("warning", "plot risk-coverage curves failed, skipped")
    assert run.logger.said("info", "plot Pareto front skipped: the study has one objective")
    (run.config.run_path / "hpo" / "trial_7.json").write_text("{}")  # of a deleted study
    reports.on_study_end(run, "KILLED")
    status = json.loads((run.config.run_path / "hpo" / "status.json").read_text())
    assert status["state"] == "KILLED"
    assert status["stopped_by"] == "time budget 1h reached after 3600 s"
    assert sorted(p.name for p in (run.config.run_path / "hpo").iterdir()) == [
        "status.json",
        "trial_0.json",
        "trial_1.json",
        "trial_2.json",
    ]


def test_pruned_and_failed_trials_keep_their_reason(digits_root: Path, tmp_path: Path) -> None:
    study = _study([0.3], [0.1])
    dist = {"x": FloatDistribution(0.0, 1.0)}
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"x": 0.2},
            distributions=dist,
            user_attrs={"fail_reason": "pruned at epoch 1 with float AUGRC 0.2"},
            intermediate_values={0: 0.3, 1: 0.2},
        )
    )
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"x": 0.3},
            distributions=dist,
            user_attrs={"fail_reason": "RuntimeError: boom", "fail_stage": "compile"},
        )
    )
    run = _fake_run(digits_root, tmp_path, study)
    reports.write_records(run.config, study, "RUNNING")
    status = json.loads((run.config.run_path / "hpo" / "status.json").read_text())
    assert status["counts"]["PRUNED"] == 1 and status["counts"]["FAIL"] == 1
    pruned, failed = status["trials"][1], status["trials"][2]
    assert pruned["state"] == "PRUNED" and pruned["value"] is None
    assert pruned["reason"] == "pruned at epoch 1 with float AUGRC 0.2"
    assert failed["fail_stage"] == "compile" and failed["reason"] == "RuntimeError: boom"
    record = json.loads((run.config.run_path / "hpo" / "trial_1.json").read_text())
    assert record["intermediate_values"] == {"0": 0.3, "1": 0.2}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
@pytest.mark.slow
def test_dashboard_serves_the_study(finished: tuple[Any, optuna.Study]) -> None:
    config, study = finished
    port = _free_port()
    command = [sys.executable, "-m", "edgetune.cli", "dashboard", str(config.run_path)]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with opener.open(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    body = answer.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert server.poll() is None, server.communicate()[0].decode()
        names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
        assert names == [study.study_name]
        with opener.open(f"http://127.0.0.1:{port}/dashboard", timeout=5) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode is not None


def test_dashboard_without_a_study_fails_in_one_line(digits_root: Path, tmp_path: Path) -> None:
    import yaml

    runner = CliRunner()
    result = runner.invoke(app, ["dashboard", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'} not found; pass a study's run directory or its config"
    ]
    config = tmp_path / "never-run.yaml"  # a valid config whose study was never run
    config.write_text(yaml.safe_dump(tiny_config(digits_root, tmp_path / "never-run")))
    result = runner.invoke(app, ["dashboard", str(config)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no study named 'never-run'")
    assert "run 'edgetune tune" in lines[0]
    assert not (tmp_path / "never-run" / "optuna.db").exists()  # nothing created
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["dashboard", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "has no config.yaml" in result.output
