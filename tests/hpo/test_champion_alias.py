"""The champion alias moves only to a better model; a run registered again keeps its version.

Real MLflow (a SQLite tracking file): versions, aliases and tags as the registry keeps them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import parse_config
from tasks.hpo.recovery import derived_config, own_alias
from tasks.tracking import CHAMPION, Tracker

from conftest import tiny_config

MODEL = "alias-classifier"


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _run(tracker: Tracker, tmp_path: Path, name: str) -> str:
    experiment = tracker.experiment_id("alias", (tmp_path / "art").as_uri())
    run_id = tracker.start_run(experiment, name)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    tracker.log_artifact(run_id, tmp_path / "MLmodel", "mlflow_model")
    tracker.end_run(run_id)
    return run_id


def _register(
    tracker: Tracker, run_id: str, value: float, alias: str | None, metric: str = "device_augrc"
) -> tuple[str, str]:
    version = tracker.register(MODEL, run_id, "mlflow_model", alias=alias, tags={metric: value})
    return version, tracker.promote(MODEL, version, metric, value, maximize=False).note


def _champion(tracker: Tracker) -> str:
    return str(tracker.alias_version(MODEL, CHAMPION).version)


def test_only_a_better_model_takes_the_champion_alias(tracker: Tracker, tmp_path: Path) -> None:
    search, reused, better = (_run(tracker, tmp_path, n) for n in ("search", "reused", "better"))
    assert _register(tracker, search, 0.26507, None) == (
        "1",
        "@champion moved to version 1: the first champion",
    )

    # --reuse-best retrains the best trial and measures 0.26758: registered under its own
    # alias, and the champion stays where it is
    version, note = _register(tracker, reused, 0.26758, "retrained")
    assert version == "2" and _champion(tracker) == "1"
    assert str(tracker.alias_version(MODEL, "retrained").version) == "2"
    assert note == (
        "@champion stays version 1: version 1's device_augrc 0.26507 is as good or better "
        "than 0.26758"
    )
    # a tie does not move it either
    assert _register(tracker, reused, 0.26507, "retrained")[0] == "2"
    assert _champion(tracker) == "1"

    # the finished study run again: its best run keeps version 1, nothing new is registered
    assert _register(tracker, search, 0.26507, None)[0] == "1"
    assert len(tracker.client.search_model_versions(f"name = '{MODEL}'")) == 2
    assert _champion(tracker) == "1"

    # a strictly better model takes it, and says so
    version, note = _register(tracker, better, 0.25, "final")
    assert (version, _champion(tracker)) == ("3", "3")
    assert note == "@champion moved to version 3: 0.25000 beats version 1's 0.26507"


def test_a_model_measured_on_another_split_is_not_compared(
    tracker: Tracker, tmp_path: Path
) -> None:
    search, final = _run(tracker, tmp_path, "search"), _run(tracker, tmp_path, "final")
    _register(tracker, search, 0.3, None)
    version, note = _register(tracker, final, 0.01, "final", metric="test_device_augrc")
    assert version == "2" and _champion(tracker) == "1"
    assert str(tracker.alias_version(MODEL, "final").version) == "2"
    assert "has no test_device_augrc to compare with" in note


def test_derived_studies_register_under_their_own_alias(tmp_path: Path) -> None:
    config = parse_config(tiny_config(tmp_path, tmp_path / "run"))
    assert own_alias(config) == CHAMPION
    assert own_alias(derived_config(config, "run-best", 1)) == "retrained"
    assert own_alias(derived_config(config, "run-final", 1)) == "final"


def test_the_summary_names_the_version_and_where_the_champion_stayed() -> None:
    from edgetune.tables import model_ref, retrained_line

    assert model_ref({"model": "m", "version": "2", "alias": ""}) == "models:/m/2"
    assert model_ref({"model": "m", "version": "2", "alias": "final"}) == (
        "models:/m@final (version 2)"
    )
    note = "@champion stays version 1: version 1 has no test_device_augrc to compare with"
    retrained = {
        "from_trial": 3,
        "seed": 1,
        "study": "m-final",
        "data": "train+val",
        "objective": "test_device_augrc",
        "objective_label": "test device AUGRC",
        "best": {"test_device_augrc": 0.0391},
        "champion": {"model": "m", "version": "2", "alias": "final", "trial": 0, "note": note},
    }
    line = retrained_line(retrained, "device AUGRC", "device_augrc")
    assert line.endswith(f"test device AUGRC 0.03910 → models:/m@final (version 2); {note}")
