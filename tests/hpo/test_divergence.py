"""Divergence is a result, not a crash: a trial whose loss explodes ends FAIL at once with
``loss diverged at epoch k``, and failures that would repeat are not retried.

The trainer is the real one on the digits example (CPU, one epoch); the engine is driven
by the fake stages of ``tests/fakes/engine.py``; the work-pool path reads the message of a
real Prefect flow run that failed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from optuna.trial import TrialState
from prefect import flow

from tasks.compilers import InvalidCalibrationError
from tasks.config import AugmentConfig, TrainConfig
from tasks.failures import DeterministicFailure, TrainingDiverged, deterministic_names
from tasks.hpo.launch import Slot, StageFailed
from tasks.hpo.loop import StudyLoop, deterministic
from tasks.models import create_model
from tasks.training import fmfp
from tasks.training.fmfp import DIVERGENCE_FACTOR, DivergenceGuard, train_fmfp
from tasks.training.loaders import train_loader
from tasks.training.precision import resolve_precision
from tasks.training.rng import build_model

from fakes.engine import FakeStages, FakeTracker, fake_config, memory_study

LOG = logging.getLogger("test-divergence")

# The trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(digits16: dict[str, Any]) -> dict[str, Any]:
    return digits16


def _train(digits: dict[str, Any], lr: float, **kwargs: Any) -> Any:
    settings = TrainConfig(epochs=2, batch_size=128, lr=lr, swa_start=1, swa_lr=0.02, device="cpu")
    return train_fmfp(
        build_model(0, lambda: create_model("tinycnn", 10)),
        train_loader(digits["items"], 16, AugmentConfig(rotation=0), 128, seed=0),
        digits["val_x"],
        digits["val_y"],
        settings,
        **kwargs,
    )


SETTINGS = "optimizer=sgd, momentum=0.9, rho=0.05, weight_decay=0.0005, batch_size=128"
FIX = "lower train.lr (or the upper bound of study.search_space.lr)"


def _recorded(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The batch losses the guard is shown, in order."""
    seen: list[float] = []
    check = DivergenceGuard.check

    def recording(self: DivergenceGuard, epoch: int, batch: int, loss: float) -> None:
        seen.append(loss)
        check(self, epoch, batch, loss)

    monkeypatch.setattr(DivergenceGuard, "check", recording)
    return seen


@pytest.mark.parametrize("lr", [50.0, 1e30])
def test_the_trainer_stops_at_the_batch_its_loss_diverges(
    digits: dict[str, Any], lr: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lr=50: the losses grow (2.3, 29, 232, 122, 217, 1550, 2.6e4 on one CPU, 3.4e4 on
    # another: past the first steps the figures depend on the CPU's rounding) until one is
    # over 1000 x the first; lr=1e30: the first step makes every weight NaN
    losses = _recorded(monkeypatch)
    epochs: list[int] = []
    with pytest.raises(TrainingDiverged) as caught:
        _train(digits, lr, on_epoch=lambda epoch, row: epochs.append(epoch))
    first, last = losses[0], losses[-1]
    assert first == pytest.approx(2.28, abs=0.01)
    healthy = losses[:-1]
    assert all(math.isfinite(x) and x <= DIVERGENCE_FACTOR * first for x in healthy)
    if lr == 50.0:
        assert len(losses) > 2 and last > DIVERGENCE_FACTOR * first
        why = (
            f"{last:.3g} is over {DIVERGENCE_FACTOR * first:.3g} (1000 × the first batch's "
            f"{first:.3g}, and at least 1000)"
        )
    else:
        assert len(losses) == 2 and math.isnan(last)
        why = "nan is not finite"
    assert str(caught.value) == (
        f"loss diverged at epoch 0 (batch {len(losses)} of 8) with lr={lr:g}, {SETTINGS}: "
        f"the training loss {why}; {FIX}"
    )
    assert epochs == []  # stopped inside epoch 0: no validation, no further epoch
    assert caught.value.epoch == 0
    assert isinstance(caught.value, DeterministicFailure)
    assert caught.value.loss == last if lr == 50.0 else math.isnan(caught.value.loss)


def test_reading_the_losses_in_groups_still_names_the_first_bad_batch(
    digits: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU reads the losses ``GUARD_EVERY`` batches at a time (each read waits for the
    GPU): the epoch trains on to the end of the group, and the guard names the batch."""
    steps: list[int] = []
    step = fmfp.sam_step

    def counted(*args: Any) -> Any:
        steps.append(len(steps))
        return step(*args)

    monkeypatch.setattr(fmfp, "sam_step", counted)
    settings = TrainConfig(batch_size=128, lr=1e30, swa_start=1, swa_lr=0.02, device="cpu")
    model = build_model(0, lambda: create_model("tinycnn", 10))
    precision = resolve_precision(settings, torch.device("cpu"))
    loader = train_loader(digits["items"], 16, AugmentConfig(rotation=0), 128, seed=0)
    optimizer = fmfp.make_sam(list(model.parameters()), settings, "sgd")
    guard = DivergenceGuard(settings, batches=len(loader))
    with pytest.raises(TrainingDiverged, match=r"epoch 0 \(batch 2 of 8\) .* loss nan is not"):
        fmfp._train_epoch(model, loader, optimizer, precision, guard, 0, every=5)
    assert len(steps) == 5  # read after the fifth step, not the second
    assert fmfp.GUARD_EVERY > 1


def test_a_short_run_that_diverges_is_a_comparison_it_loses(digits: dict[str, Any]) -> None:
    """``stop_after`` (optimizer: auto's short runs): the run ends at the divergence with a
    validation loss of inf, which ``choose_optimizer`` ranks last; it does not raise."""
    result = _train(digits, 1e30, stop_after=2)
    assert len(result.history) == 1
    row = result.history[0]
    assert row["epoch"] == 0.0 and row["val_loss"] == math.inf and math.isnan(row["train_loss"])
    assert result.metrics == {"loss": math.inf}


def test_the_guard_takes_noise_and_a_falling_loss_but_not_an_explosion() -> None:
    settings = TrainConfig(lr=0.1, batch_size=32)
    guard = DivergenceGuard(settings, batches=10)
    # a noisy but healthy run, with spikes up to 400 x the first loss
    for batch, loss in enumerate([2.3, 9.0, 0.4, 120.0, 0.01, 920.0, 1e-6]):
        guard.check(0, batch, loss)
    assert guard.limit == DIVERGENCE_FACTOR * 2.3
    with pytest.raises(TrainingDiverged, match=r"epoch 3 \(batch 5 of 10\) .* loss 2\.3e\+03 is"):
        guard.check(3, 4, 2301.0)
    # a tiny first loss (a pre-trained head): the bound is never under 1000
    low = DivergenceGuard(settings, batches=10)
    low.check(0, 0, 0.05)
    low.check(0, 1, 999.0)
    assert low.limit == DIVERGENCE_FACTOR
    with pytest.raises(TrainingDiverged, match=r"training loss inf is not finite"):
        low.check(1, 0, math.inf)


# The engine ----------------------------------------------------------------------------------

DIVERGED = (
    f"loss diverged at epoch 3 (batch 2 of 8) with lr=50, {SETTINGS}: the training loss nan "
    f"is not finite; {FIX}"
)


def _loop(tmp_path: Path, fail: Any, **study: Any) -> tuple[StudyLoop, FakeTracker]:
    config = fake_config(tmp_path, **study)
    tracker = FakeTracker()
    loop = StudyLoop(
        config,
        memory_study(config),
        stages=FakeStages(config, fail=fail),
        logger=LOG,
        tracker=tracker,  # type: ignore[arg-type]
    )
    return loop, tracker


def _first_fails(stage: str, error: BaseException) -> Any:
    """``fail`` for FakeStages: trial 0 fails in ``stage`` with ``error``."""

    def fail(at: str, slot: Slot) -> BaseException | None:
        return error if at == stage and slot.number == 0 else None

    return fail


@pytest.mark.parametrize(
    ("stage", "error", "reason"),
    [
        ("train", TrainingDiverged(DIVERGED, 3, math.nan), f"TrainingDiverged: {DIVERGED}"),
        (
            "compile",
            InvalidCalibrationError("calibration images are 16x16 but the model expects 32x32"),
            "InvalidCalibrationError: calibration images are 16x16 but the model expects 32x32",
        ),
    ],
)
def test_a_deterministic_failure_is_told_fail_and_not_retried(
    tmp_path: Path, stage: str, error: BaseException, reason: str
) -> None:
    loop, tracker = _loop(tmp_path, _first_fails(stage, error), n_trials=3, parallel=1, retries=2)
    result = loop.run()

    trials = loop.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].user_attrs["fail_stage"] == stage
    assert trials[0].user_attrs["fail_reason"] == reason
    assert trials[0].value is None
    assert not any("retry_of" in t.user_attrs for t in trials)  # retries: 2 notwithstanding
    assert result["counts"]["COMPLETE"] == 2 and result["counts"]["FAIL"] == 1
    run = tracker.named("trial-0")
    assert run.status == "FAILED" and run.tags["edgetune.fail_reason"] == reason


def test_an_infrastructure_fault_is_still_retried(tmp_path: Path) -> None:
    lost = RuntimeError("the worker's connection to the database was lost")
    loop, _ = _loop(tmp_path, _first_fails("train", lost), n_trials=2, parallel=1, retries=1)
    loop.run()

    trials = loop.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params


# A stage run on a work pool: the exception arrives by name ------------------------------------


@flow(name="diverging-stage")
def _diverging_stage() -> None:
    raise TrainingDiverged(DIVERGED, 3, math.nan)


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_server")
def test_a_divergence_on_a_work_pool_is_not_retried(tmp_path: Path) -> None:
    """The parent sees only the stage run's final state: ``StageFailed`` with the message
    Prefect wrote, as ``DeploymentStages`` raises it. (Called in this process, as the
    embedded stages call their subflow, the flow raises the exception itself.)"""
    with pytest.raises(TrainingDiverged) as caught:
        _diverging_stage()
    assert str(caught.value) == DIVERGED and caught.value.epoch == 3
    state = _diverging_stage(return_state=True)
    assert state.is_failed()
    remote = StageFailed(
        f"train-trial/gpu run clever-fox ended {state.type.value}: {state.message}"
    )
    assert str(remote) == (
        "train-trial/gpu run clever-fox ended FAILED: Flow run encountered an exception: "
        f"TrainingDiverged: {DIVERGED}"
    )
    assert deterministic(remote)
    assert not deterministic(StageFailed("train-trial/gpu run x ended CRASHED: worker gone"))

    loop, _ = _loop(tmp_path, _first_fails("train", remote), n_trials=2, parallel=1, retries=1)
    loop.run()

    trials = loop.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["fail_reason"] == (
        "StageFailed: train-trial/gpu run clever-fox ended FAILED: Flow run encountered an "
        f"exception: TrainingDiverged: {DIVERGED}"
    )
    assert not any("retry_of" in t.user_attrs for t in trials)


def test_every_deterministic_failure_is_known_by_name() -> None:
    assert deterministic_names() == [
        "DeterministicFailure",
        "InvalidCalibrationError",
        "TrainingDiverged",
    ]
    for name in ("TrainingDiverged", "InvalidCalibrationError"):
        assert deterministic(StageFailed(f"compile-trial run x ended FAILED: {name}: why"))
