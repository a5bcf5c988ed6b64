"""A study asked by several processes continues its search instead of repeating it.

Each process opens the study with its own storage connection and its own sampler, as
``edgetune tune`` does; a real SQLite file is the shared storage. No training: the
trials are told a cheap function of their parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from tasks.config import SearchParam, StudyConfig
from tasks.hpo import optuna_ops
from tasks.hpo.study import make_sampler, open_study, suggest

SPACE = {
    "lr": SearchParam(type="float", low=1e-3, high=1e-1, log=True),
    "swa_start": SearchParam(type="int", low=5, high=7),
    "momentum": SearchParam(type="float", low=0.8, high=0.9, step=0.05),
    "batch_size": SearchParam(type="categorical", choices=[32, 64]),
}
#: The grid sampler needs a step on every range: 3 x 3 x 3 x 2 = 54 points.
GRID_SPACE = SPACE | {"lr": SearchParam(type="float", low=0.01, high=0.03, step=0.01)}
SAMPLERS = ["random", "tpe", "nsga2", "cmaes", "gp", "grid"]
SEED = 7


def _config(sampler: str) -> StudyConfig:
    space = GRID_SPACE if sampler == "grid" else SPACE
    return StudyConfig(name="resume", sampler=sampler, search_space=space, n_trials=4)


def _value(params: dict[str, Any]) -> float:
    return (math.log10(params["lr"]) + 2) ** 2 + (params["swa_start"] - 6) ** 2


def _process(url: str, config: StudyConfig, n: int) -> list[tuple[Any, ...]]:
    """One process of the study: it opens the storage and asks and tells ``n`` trials."""
    study = open_study(url, config, SEED)
    asked = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, config.search_space)
        study.tell(trial, _value(params))
        asked.append(tuple(sorted(params.items())))
    return asked


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_resumed_study_asks_new_trials_after_the_first_run(tmp_path: Path, sampler: str) -> None:
    """``n_trials: 2``, then again with ``n_trials: 4`` on the same storage."""
    config = _config(sampler)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = _process(url, config, 2)
    resumed = _process(url, config, 2)
    fresh = _process(f"sqlite:///{tmp_path / 'fresh.db'}", config, 4)

    assert len(set(first + resumed)) == 4, (first, resumed)  # no trial repeated
    assert first == fresh[:2]  # the first run is what a fresh run asks
    stored = open_study(url, config, SEED).get_trials()
    assert [t.number for t in stored] == [0, 1, 2, 3]
    assert len({t.value for t in stored}) == 4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_two_processes_asking_at_once_get_distinct_trials(tmp_path: Path, sampler: str) -> None:
    """Two samplers on one storage: each asks while the other's trial still runs."""
    config = _config(sampler)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    one, two = open_study(url, config, SEED), open_study(url, config, SEED)
    asked: list[tuple[Any, ...]] = []
    for _ in range(3):
        a, b = one.ask(), two.ask()
        pa, pb = suggest(a, config.search_space), suggest(b, config.search_space)
        one.tell(a, _value(pa))
        two.tell(b, _value(pb))
        asked += [tuple(sorted(pa.items())), tuple(sorted(pb.items()))]
    assert len(set(asked)) == 6, asked
    numbers = [t.number for t in one.get_trials()]
    assert numbers == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("sampler", ["random", "tpe", "nsga2", "cmaes", "gp"])
def test_one_process_on_a_fresh_study_asks_what_the_seed_always_asked(
    tmp_path: Path, sampler: str
) -> None:
    """The seed's trials are those of Optuna's own sampler seeded with it (what a study
    asked before samplers continued across processes): results stay reproducible."""
    config = _config(sampler)
    ours = _process(f"sqlite:///{tmp_path / 'optuna.db'}", config, 6)
    plain = {
        "random": lambda: optuna.samplers.RandomSampler(seed=SEED),
        "tpe": lambda: optuna.samplers.TPESampler(seed=SEED),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=SEED),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=SEED, warn_independent_sampling=False),
        "gp": lambda: optuna.samplers.GPSampler(seed=SEED),
    }[sampler]()
    study = optuna.create_study(sampler=plain)
    theirs = []
    for _ in range(6):
        trial = study.ask()
        params = suggest(trial, config.search_space)
        study.tell(trial, _value(params))
        theirs.append(tuple(sorted(params.items())))
    assert ours == theirs
    assert type(make_sampler(sampler, SEED, SPACE)).__name__ == type(plain).__name__


def test_a_sampler_whose_random_state_moved_is_refused_in_one_line() -> None:
    """What an Optuna release that renames a sampler's random state would show."""
    sampler = optuna.samplers.RandomSampler(seed=SEED)
    del sampler._rng
    with pytest.raises(RuntimeError) as refused:
        optuna_ops.reseed(sampler, 1)
    assert str(refused.value) == (
        f"RandomSampler keeps no random state that can be seeded per trial (Optuna "
        f"{optuna.__version__} moved it); install the Optuna version pyproject.toml pins, or "
        f"find its random state in tasks/hpo/optuna_ops.py: reseed"
    )


@pytest.mark.integration
@pytest.mark.slow
def test_a_resumed_edgetune_tune_asks_new_trials(digits_root: Path, tmp_path: Path) -> None:
    """The command as a user runs it: 2 trials, then the same study resumed to 4, in two
    processes; before, trials 2 and 3 asked (and scored) what trials 0 and 1 had."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import tiny_config

    raw = tiny_config(digits_root, tmp_path / "runs" / "resume", study={"parallel": 1})
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    for n_trials in (2, 4):
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "edgetune"),
                "tune",
                "resume.yaml",
                f"study.n_trials={n_trials}",
                "--json",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    storage = f"sqlite:///{tmp_path / 'runs' / 'resume' / 'optuna.db'}"
    trials = optuna.load_study(study_name="resume", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({t.params["lr"] for t in trials}) == 4, [t.params for t in trials]
