"""The seed check: the top trials trained again with other seeds; the best mean is crowned."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from edgetune.progress import confirmation_line
from tasks.config import ConfigError, parse_config
from tasks.hpo.campaign import Campaign
from tasks.hpo.confirm import compare
from tasks.hpo.launch import Slot
from tasks.hpo.study import open_study
from tasks.seeding import trial_seed
from tasks.workloads.base import DeviceOutcome

from conftest import tiny_config
from fakes.engine import FakeStages, fake_config


def measured(lr: float, replicate: int) -> float:
    """The search's own seed favours lr near 0.03, the other seeds lr near 0.06."""
    return 0.01 + abs(lr - (0.03 if replicate == 0 else 0.06))


@dataclass
class SeededStages(FakeStages):
    """A board whose value depends on the study's seed replicate; records what trained."""

    trained: list[tuple[int, float]] | None = None

    def train(self, slot: Slot) -> Any:
        assert self.trained is not None
        self.trained.append((self.config.study.replicate, float(slot.params["lr"])))
        return super().train(slot)

    def evaluate(self, slot: Slot, artifact: str) -> DeviceOutcome:
        outcome = super().evaluate(slot, artifact)
        value = measured(float(slot.params["lr"]), self.config.study.replicate)
        return DeviceOutcome({**outcome.metrics, "device_augrc": value}, 0.0, 0.0)


class NoHooks:
    def on_trial_outcome(self, run: Any, trial: Any) -> None: ...

    def on_study_end(self, run: Any, state: str) -> None: ...


def test_the_champion_is_the_best_mean_over_seeds(tmp_path: Path) -> None:
    config = fake_config(tmp_path, n_trials=6, parallel=2, sampler="random", confirm_seeds=2)
    trained: list[tuple[int, float]] = []
    campaign = Campaign(
        make_stages=lambda cfg, study: SeededStages(cfg, trained=trained),
        logger=logging.getLogger("test-confirm"),
        hooks=NoHooks(),  # type: ignore[arg-type]
    )
    result = campaign.run(config, restart=False, reuse_best=False)

    record = result["confirmation"]
    search = open_study(config.storage_url, config.study, config.seed, create=False)
    ranked = sorted(search.trials, key=lambda t: (t.value, t.number))
    top = ranked[:3]
    assert [row["trial"] for row in sorted(record["rows"], key=lambda r: r["values"][0])] == [
        t.number for t in top
    ]
    # each top trial trained once more per extra seed, as replicate 1 and 2, nothing else
    assert sorted(trained[6:]) == sorted((r, t.params["lr"]) for r in (1, 2) for t in top)
    for row in record["rows"]:
        lr = search.trials[row["trial"]].params["lr"]
        expected = [measured(lr, 0), measured(lr, 1), measured(lr, 2)]
        assert row["values"] == pytest.approx(expected)
        assert row["mean"] == pytest.approx(statistics.fmean(expected))
        assert row["std"] == pytest.approx(statistics.stdev(expected))
    winner = min(record["rows"], key=lambda r: (r["mean"], r["trial"]))["trial"]
    assert record["winner"] == winner and result["champion"]["trial"] == winner
    # the registry's champion is the winner's run, tagged with its mean and spread
    client = MlflowClient(config.tracking_uri)
    version = client.get_model_version_by_alias(config.registered_model_name, "champion")
    assert version.run_id == search.trials[winner].user_attrs["mlflow_run_id"]
    assert float(version.tags["device_augrc_mean"]) == pytest.approx(record["rows"][0]["mean"])
    # replicas are compared, never registered: every version is a search trial's run
    search_runs = {t.user_attrs["mlflow_run_id"] for t in search.trials}
    versions = client.search_model_versions(f"name = '{config.registered_model_name}'")
    assert {v.run_id for v in versions} <= search_runs
    # the replicas' trial seeds differ from the search's for the same parameters
    lr = {"lr": top[0].params["lr"], "momentum": top[0].params["momentum"]}
    assert len({trial_seed(config.seed, lr, replicate=r) for r in (0, 1, 2)}) == 3


def test_separation_is_judged_against_the_noise() -> None:
    class T:
        def __init__(self, number: int, value: float) -> None:
            self.number, self.values, self.params = number, [value], {}

    far = compare([T(0, 0.10), T(1, 0.20)], [], maximize=False)  # type: ignore[list-item]
    assert far["winner"] == 0 and far["noise"] == 0.0 and far["separated"] is True
    rows = [
        {"trial": 0, "mean": 0.100, "std": 0.02, "runs": 3, "values": []},
        {"trial": 1, "mean": 0.105, "std": 0.02, "runs": 3, "values": []},
    ]
    close = {"rows": rows, "winner": 0, "runner_up": 1, "difference": 0.005}
    close.update(noise=2 * (2 * 0.02**2 / 3) ** 0.5, separated=False)
    assert "is NOT separated from" in confirmation_line(close, "device AUGRC")


def test_the_seed_check_refuses_what_it_cannot_rank(tmp_path: Path) -> None:
    raw = tiny_config(
        tmp_path,
        tmp_path / "r",
        study={"confirm_seeds": 2, "objectives": ["device_augrc", "device_latency_ms"]},
    )
    with pytest.raises(ConfigError, match="confirm_seeds: the seed check ranks trials"):
        parse_config(raw)
