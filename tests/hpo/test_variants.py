"""Several variants in one study run: each searched or trained once, compared, one champion."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from tasks.config import ConfigError, load_config, parse_config, trial_train_config
from tasks.config.variants import expand, settings_text

from conftest import tiny_config

SPACE = {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}}


def _variants(digits_root: Path, run_dir: Path, *variants: dict[str, Any]) -> dict[str, Any]:
    raw = tiny_config(digits_root, run_dir)
    raw["study"]["search_space"] = SPACE
    raw["variants"] = list(variants)
    return raw


# Expansion and validation --------------------------------------------------------------------


def test_each_variant_is_a_study_of_its_own_sharing_storage_tracking_and_model(
    digits_root: Path, tmp_path: Path
) -> None:
    raw = _variants(
        digits_root,
        tmp_path / "v",
        {"name": "tiny", "set": {"train.lr": 0.02}},
        {"name": "r18", "set": {"model.arch": "resnet18", "train.lr": 0.01}, "search": False},
    )
    config = parse_config(raw)
    (tiny_spec, tiny), (r18_spec, r18) = expand(config)
    assert [tiny_spec.name, r18_spec.name] == ["tiny", "r18"]
    assert [tiny.study.name, r18.study.name] == ["v-tiny", "v-r18"]
    assert tiny.study.variant_of == r18.study.variant_of == "v"
    for variant in (tiny, r18):
        assert variant.variants == []
        assert variant.run_path == config.run_path
        assert variant.storage_url == config.storage_url
        assert variant.tracking_uri == config.tracking_uri
        assert variant.experiment_name == "v"
        assert variant.registered_model_name == "v-classifier"
    # searched: the study's space and trial count; the settings over the config's
    assert tiny.model.arch == "tinycnn" and tiny.train.lr == 0.02
    assert list(tiny.study.search_space) == ["lr"] and tiny.study.n_trials == 2
    # trained once: nothing to sample, one trial, nothing stops it early
    assert r18.model.arch == "resnet18" and r18.train.lr == 0.01
    assert r18.study.search_space == {} and r18.study.n_trials == 1
    assert r18.study.pruner == "none" and r18.study.sampler == "random"
    from tasks.hpo.reports import records_root

    assert records_root(r18) == config.run_path / "v-r18"
    assert settings_text(r18_spec.set) == "model.arch=resnet18, train.lr=0.01"


def test_a_variant_may_search_a_space_file_of_its_own(digits_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    (folder / "spaces").mkdir(parents=True)
    (folder / "spaces" / "small.yaml").write_text(
        yaml.safe_dump(
            {
                "params": {"swa_lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
                "constraints": ["swa_lr <= lr"],
            }
        )
    )
    raw = _variants(
        digits_root,
        tmp_path / "sf",
        {"name": "own", "set": {"study.search_space": "spaces/small.yaml", "study.n_trials": 3}},
        {"name": "base"},
    )
    raw["study"]["constraints"] = ["lr >= 0.02"]  # the config's space's, not the file's
    (folder / "study.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(folder / "study.yaml")
    (_, own), (_, base) = expand(config)
    assert list(own.study.search_space) == ["swa_lr"] and own.study.constraints == ["swa_lr <= lr"]
    assert own.study.search_space_file == str((folder / "spaces" / "small.yaml").resolve())
    assert own.study.n_trials == 3
    assert list(base.study.search_space) == ["lr"] and base.study.search_space_file is None
    assert base.study.constraints == ["lr >= 0.02"]


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        (
            [{"name": "a", "set": {"data.root": "elsewhere"}}],
            r"variants\[0\] \(a\): set\.data\.root: variants are compared on the same data; "
            r"remove it from the variant",
        ),
        (
            [{"name": "a", "set": {"study.objectives": ["device_augrc", "device_latency_ms"]}}],
            r"variants\[0\] \(a\): set\.study\.objectives: variants are compared on the same",
        ),
        (
            [{"name": "a", "set": {"tracking.experiment": "x"}}],
            r"set\.tracking\.experiment: the variants share one experiment",
        ),
        (
            [{"name": "a", "set": {"study.n_trials": 3}, "search": False}],
            r"variants\[0\] \(a\): set\.study\.n_trials: a variant with search: false trains "
            r"once and searches nothing",
        ),
        (
            [{"name": "a"}, {"name": "a", "set": {"train.lr": 0.01}}],
            r"variants\[1\] \(a\): name 'a' is listed twice; name each once",
        ),
        (
            [{"name": "champion"}],
            r"variants\.0\.name: 'champion' is a name the model registry keeps for itself",
        ),
        ([{"name": "v3"}], r"variants\.0\.name: 'v3' is a name the model registry keeps"),
        ([{"name": "a b"}], r"variants\.0\.name: String should match pattern"),
        (
            [{"name": "a", "set": {"model.archh": "resnet18"}}],
            r"variants\[0\] \(a\): model\.archh: unknown key \(did you mean 'arch'\?\)",
        ),
        (
            [{"name": "a", "set": {"model.arch": "resnet19"}}],
            r"variants\[0\] \(a\): model\.arch: unknown architecture 'resnet19'",
        ),
        (
            [{"name": "a", "set": {"train.epochs": 1}}],
            r"variants\[0\] \(a\): train\.swa_start: SWA must start before the last epoch",
        ),
        (
            [{"name": "a", "set": {"seed.x": 1}}],
            r"variants\[0\] \(a\): set\.seed\.x: seed is a value, not a section; set seed itself",
        ),
        (
            [{"name": "a", "sets": {}}],
            r"variants\.0\.sets: unknown key \(did you mean 'set'\?\); allowed keys here: name, "
            r"search, set",
        ),
    ],
)
def test_a_bad_variant_is_refused_in_one_line_naming_it(
    digits_root: Path, tmp_path: Path, variants: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config(_variants(digits_root, tmp_path / "bad", *variants))
    assert "\n" not in str(caught.value)


def test_preflight_names_the_variant_whose_weights_are_missing(
    digits_root: Path, tmp_path: Path
) -> None:
    from tasks.workloads.registry import preflight

    raw = _variants(
        digits_root,
        tmp_path / "pf",
        {"name": "scratch"},
        {"name": "tuned", "set": {"model.weights": str(tmp_path / "missing.pt")}},
    )
    with pytest.raises(
        ConfigError, match=r"variants\[1\] \(tuned\): model\.weights: file .*missing\.pt not found"
    ):
        preflight(parse_config(raw))


def test_the_champion_rule_across_studies_breaks_ties_by_the_given_order() -> None:
    from optuna.distributions import FloatDistribution

    from tasks.hpo.study import Goals, choose_champion

    def done(number: int, value: float) -> optuna.trial.FrozenTrial:
        trial = optuna.trial.create_trial(
            value=value, params={"lr": 0.1}, distributions={"lr": FloatDistribution(0.01, 1)}
        )
        trial.number = number
        return trial

    goals = Goals(metrics=("device_augrc",), directions=("minimize",))
    first, second, better = done(3, 0.02), done(0, 0.02), done(5, 0.01)
    assert choose_champion([first, second], goals) is second  # trial numbers: 0 before 3
    assert choose_champion([first, second], goals, order=[0, 1]) is first  # variant order
    assert choose_champion([first, second, better], goals, order=[0, 1, 2]) is better


# Through the flow ----------------------------------------------------------------------------


class _Seam:
    """Holds variant a's board evaluations until variant b trains, and records trainings.

    If the next variant waited for the last one's compile and board, the board would wait
    here for the whole timeout and the test would fail: the overlap is certain, not timed.
    """

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        study: str,
        release: threading.Event | None = None,
        timeout: float = 120,
    ) -> None:
        import tasks.workloads.classifier

        self.next_trains = threading.Event()
        self.release = release or self.next_trains  # what a's board evaluations wait for
        self.trained: list[tuple[str, str, float]] = []  # (study, arch, lr)
        self.held: list[bool] = []
        real_train, real_board = (
            tasks.workloads.classifier.train,
            tasks.workloads.classifier.run_on_device,
        )

        def train(config: Any, params: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            lr = trial_train_config(config, params).lr
            self.trained.append((config.study.name, config.model.arch, lr))
            if config.study.name == f"{study}-b":
                self.next_trains.set()
            return real_train(config, params, *args, **kwargs)

        def board(config: Any, *args: Any, **kwargs: Any) -> Any:
            if config.study.name == f"{study}-a":
                self.held.append(self.release.wait(timeout=timeout))
            return real_board(config, *args, **kwargs)

        monkeypatch.setattr(tasks.workloads.classifier, "train", train)
        monkeypatch.setattr(tasks.workloads.classifier, "run_on_device", board)


@pytest.fixture(scope="module")
def variant_run(
    digits_root: Path, tmp_path_factory: pytest.TempPathFactory, prefect_server: None
) -> dict[str, Any]:
    from flows.tune import tune

    run_dir = tmp_path_factory.mktemp("variants") / "vr"
    raw = _variants(
        digits_root,
        run_dir,
        {"name": "a", "set": {"train.momentum": 0.9}},
        {"name": "b", "set": {"train.lr": 0.03, "train.swa_lr": 0.01}, "search": False},
    )
    config = parse_config(raw)
    with pytest.MonkeyPatch.context() as monkeypatch:
        seam = _Seam(monkeypatch, "vr")
        result = tune(config.model_dump(mode="json"))
    return {"result": result, "config": config, "seam": seam}


def _study(config: Any, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=config.storage_url)


@pytest.mark.integration
@pytest.mark.slow
def test_variants_run_as_their_own_studies_and_the_next_trains_during_the_tail(
    variant_run: dict[str, Any],
) -> None:
    config, seam = variant_run["config"], variant_run["seam"]
    a, b = _study(config, "vr-a"), _study(config, "vr-b")
    assert [t.state.name for t in a.get_trials()] == ["COMPLETE", "COMPLETE"]
    assert [t.state.name for t in b.get_trials()] == ["COMPLETE"]
    assert b.trials[0].params == {}  # trained once: nothing sampled
    # a searched lr with its own settings; b trained once with the lr it set
    studies = [study for study, _, _ in seam.trained]
    assert sorted(studies) == ["vr-a", "vr-a", "vr-b"]
    assert sorted(lr for study, _, lr in seam.trained if study == "vr-a") == sorted(
        t.params["lr"] for t in a.get_trials()
    )
    assert [lr for study, _, lr in seam.trained if study == "vr-b"] == [0.03]
    # a's board evaluations waited for b's training, and none timed out: no seam idles
    assert seam.held == [True, True]
    first_b = b.trials[0].user_attrs["train_started"]
    assert first_b < max(t.user_attrs["device_finished"] for t in a.get_trials())
    for study in (a, b):
        assert study.user_attrs["variant"]["of"] == "vr"
        records = config.run_path / study.study_name
        status = json.loads((records / "hpo" / "status.json").read_text())
        assert status["study"] == study.study_name
        assert yaml.safe_load((records / "config.yaml").read_text())["study"]["variant_of"] == "vr"


@pytest.mark.integration
@pytest.mark.slow
def test_the_best_variant_takes_the_champion_alias(variant_run: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from tasks.hpo.study import best_trial

    result, config = variant_run["result"], variant_run["config"]
    bests = {name: best_trial(_study(config, f"vr-{name}")) for name in ("a", "b")}
    winner = min(bests, key=lambda name: (bests[name].value, name))
    assert result["winner"] == winner
    assert [row["winner"] for row in result["variants"]] == [winner == "a", winner == "b"]
    assert result["best"]["variant"] == winner
    assert result["best"]["device_augrc"] == pytest.approx(bests[winner].value)
    assert result["counts"]["COMPLETE"] == 3

    client = MlflowClient(config.tracking_uri)
    model = config.registered_model_name
    for name, best in bests.items():
        version = client.get_model_version_by_alias(model, name)
        assert version.run_id == best.user_attrs["mlflow_run_id"]
        assert version.tags["variant"] == name
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.run_id == bests[winner].user_attrs["mlflow_run_id"]
    assert result["champion"] == {
        "model": model,
        "version": str(champion.version),
        "alias": "champion",
        "trial": bests[winner].number,
        "variant": winner,
        "note": f"@champion moved to version {champion.version}: the first champion",
    }
    # one MLflow run holds the comparison; each variant's study run is nested in it
    (group,) = client.search_runs(
        [client.get_experiment_by_name("vr").experiment_id], "tags.`edgetune.kind` = 'variants'"
    )
    assert group.info.status == "FINISHED" and group.data.tags["edgetune.winner"] == winner
    assert group.data.metrics[f"device_augrc.{winner}"] == pytest.approx(bests[winner].value)
    for name in ("a", "b"):
        parent = client.get_run(_study(config, f"vr-{name}").user_attrs["mlflow_parent_run_id"])
        assert parent.data.tags["mlflow.parentRunId"] == group.info.run_id
    saved = json.loads((config.run_path / "variants.json").read_text())
    assert saved["winner"] == winner and [r["variant"] for r in saved["variants"]] == ["a", "b"]


@pytest.mark.integration
@pytest.mark.slow
def test_report_compares_the_variants_in_one_table(variant_run: dict[str, Any]) -> None:
    from edgetune.cli import app

    result, config = variant_run["result"], variant_run["config"]
    shown = CliRunner().invoke(app, ["report", str(config.run_path)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert any("variants of vr: device_augrc" in line for line in lines)
    winner = result["winner"]
    (row,) = [line for line in lines if f"*{winner} " in line]
    assert f"{result['best']['device_augrc']:.5f}" in row
    (once,) = [line for line in lines if "once" in line]
    assert "train.lr=0.03" in once
    assert (
        f"champion: variant {winner}, trial {result['best']['trial']} (device AUGRC "
        f"{result['best']['device_augrc']:.5f}) → models:/vr-classifier@champion (version "
        f"{result['champion']['version']})" in shown.output
    )
    as_json = CliRunner().invoke(app, ["report", str(config.run_path), "--json"])
    assert json.loads(as_json.output)["winner"] == winner


def test_a_trial_of_a_space_without_parameters_is_retried(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from tasks.hpo.recovery import enqueue_retry

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="once")
    ran, never = study.ask(), study.ask()
    ran.set_user_attr("mlflow_run_id", "r1")  # it trained: a variant trained once
    for trial in (ran, never):
        study.tell(trial, state=TrialState.FAIL)
    frozen = {t.number: t for t in study.get_trials()}
    assert enqueue_retry(study, frozen[ran.number], retries=1)
    assert not enqueue_retry(study, frozen[never.number], retries=1)  # failed before it drew
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.params == {} and waiting.user_attrs["retry_of"] == ran.number


def test_a_detector_config_runs_variants_of_its_architecture() -> None:
    from tasks.detection.config import parse_detector_study, read_detector_config

    raw = read_detector_config(Path(__file__).parents[2] / "configs/detectors/s-ml.yaml")
    raw["variants"] = [
        {"name": "n11", "set": {"model.arch": "yolo11n.yaml"}},
        {"name": "v8n", "set": {"model.arch": "yolov8n.yaml", "train.lr0": 0.01}, "search": False},
    ]
    config = parse_detector_study(raw)
    (_, n11), (_, v8n) = expand(config)
    assert [n11.study.name, v8n.study.name] == ["s-ml-hpo-n11", "s-ml-hpo-v8n"]
    assert n11.name == v8n.name == "s-ml" and n11.registered_model_name == "s-ml"
    assert v8n.model.arch == "yolov8n.yaml" and v8n.train.lr0 == 0.01
    assert v8n.study.search_space == {} and n11.study.search_space == config.study.search_space
    assert n11.run_path == v8n.run_path == config.run_path
    raw["variants"] = [{"name": "other", "set": {"name": "l-ml"}}]
    with pytest.raises(ConfigError, match=r"set\.name: a detector's variants are runs of the"):
        parse_detector_study(raw)


def test_the_shipped_variants_config_searches_two_and_trains_one_once() -> None:
    config = load_config(Path(__file__).parents[2] / "configs" / "quickstart-variants.yaml")
    runs = [(spec.name, spec.search, v.model.arch, v.study.n_trials) for spec, v in expand(config)]
    assert runs == [
        ("tinycnn", True, "tinycnn", 6),
        ("tinycnn-high-lr", True, "tinycnn", 4),
        ("mobilenet", False, "mobilenet_v3_small", 1),
    ]
