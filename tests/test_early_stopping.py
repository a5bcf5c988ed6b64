"""Early stopping after swa_start, and pruners that judge no FMFP trial before SWA starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from tasks.config import AugmentConfig, TrainConfig, parse_config
from tasks.data import inspect_dataset, load_bundle, make_bundle
from tasks.hpo.study import epoch_reporter, open_study
from tasks.models import create_model
from tasks.training import fmfp
from tasks.training.fmfp import EarlyStop, train_fmfp
from tasks.training.loaders import bundle_tensors, train_loader
from tasks.training.rng import build_model
from tasks.workloads.classifier import ClassifierWorkload

from conftest import tiny_config


def test_early_stop_counts_only_after_swa_start() -> None:
    stop = EarlyStop(swa_start=2, patience=2)
    # before SWA a worse AUGRC never counts; then 0.1 is the best, two epochs without better
    verdicts = [stop.done(e, v) for e, v in enumerate([0.3, 0.4, 0.1, 0.1, 0.12])]
    assert verdicts == [False, False, False, False, True]
    never = EarlyStop(swa_start=0, patience=None)
    assert not any(never.done(e, 0.5) for e in range(50))
    nan = EarlyStop(swa_start=0, patience=1)
    assert [nan.done(0, 0.2), nan.done(1, float("nan"))] == [False, True]


@pytest.fixture(scope="module")
def task(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    info = inspect_dataset(digits_root, verify_images=False)
    bundle = make_bundle(info.files["val"], info.classes, 16, tmp_path_factory.mktemp("b") / "v")
    val_x, val_y = bundle_tensors(load_bundle(bundle))
    return {"items": info.files["train"][::3], "val_x": val_x, "val_y": val_y}


def test_training_stops_when_the_averaged_model_stops_improving(
    task: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted = iter([0.30, 0.20, 0.10, 0.11, 0.12, 0.05, 0.04, 0.03])
    real = fmfp._validate

    def validate(*args: Any) -> dict[str, float]:
        return {**real(*args), "augrc": next(scripted)}

    monkeypatch.setattr(fmfp, "_validate", validate)
    seen: list[int] = []
    settings = TrainConfig(
        epochs=8, batch_size=128, swa_start=2, lr=0.05, device="cpu", early_stop_patience=2
    )
    result = train_fmfp(
        build_model(0, lambda: create_model("tinycnn", 10)),
        train_loader(task["items"], 16, AugmentConfig(rotation=0), 128, seed=0),
        task["val_x"],
        task["val_y"],
        settings,
        on_epoch=lambda epoch, row: seen.append(epoch),
    )
    assert result.stopped_early_at == 4 and seen == [0, 1, 2, 3, 4]
    assert [row["val_augrc"] for row in result.history] == [0.30, 0.20, 0.10, 0.11, 0.12]
    assert result.metrics["augrc"] == 0.12  # the averaged model where it stopped
    assert isinstance(result.model, torch.nn.Module)


def test_the_pruner_judges_no_epoch_before_the_warmup(tmp_path: Path) -> None:
    config = parse_config(
        tiny_config(tmp_path, tmp_path / "w", study={"pruner": "median", "n_trials": 10})
    )
    study = open_study(config.storage_url, config.study, config.seed)
    for _ in range(4):  # the median pruner's start-up trials: good at every epoch
        trial = study.ask()
        for epoch in range(6):
            trial.report(0.05, epoch)
        study.tell(trial, 0.05)

    def first_pruned(warmup: int) -> int | None:
        trial = study.ask()
        report = epoch_reporter(config.storage_url, config.study, trial._trial_id, warmup=warmup)
        for epoch in range(6):
            try:
                report(epoch, {"val_augrc": 0.4})  # far worse than the others every epoch
            except optuna.TrialPruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return epoch
        return None

    assert first_pruned(warmup=0) == 1  # the median pruner's own warm-up: one step
    assert first_pruned(warmup=4) == 4


def test_a_classifier_trial_is_not_judged_before_its_swa_start(tmp_path: Path) -> None:
    config = parse_config(tiny_config(tmp_path, tmp_path / "c", train={"epochs": 8}))
    workload = ClassifierWorkload(config)
    assert workload.pruning_warmup({"swa_start": 5}) == 5
    assert workload.pruning_warmup({}) == config.train.swa_start
    set_by_user = parse_config(tiny_config(tmp_path, tmp_path / "c", study={"pruner_warmup": 0}))
    assert ClassifierWorkload(set_by_user).pruning_warmup({"swa_start": 5}) == 0
