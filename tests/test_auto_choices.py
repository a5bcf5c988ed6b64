"""``train.optimizer: auto`` and ``train.batch_size: auto``: config, probe, choice, record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.config import (
    AugmentConfig,
    ConfigError,
    DataConfig,
    TrainConfig,
    parse_config,
    trial_train_config,
)
from tasks.models import create_model
from tasks.preflight import check_search_space
from tasks.training import auto, fmfp
from tasks.training.auto import (
    AutoChoiceError,
    choose_batch_size,
    choose_optimizer,
    fits_in_memory,
    largest_fitting,
    resolve_auto,
)
from tasks.training.rng import build_model
from tests.conftest import tiny_config

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: the fakes below never touch a GPU


# Config ---------------------------------------------------------------------------------------


def test_auto_is_accepted_for_optimizer_and_batch_size(tmp_path: Path) -> None:
    space = {
        "batch_size": {"type": "categorical", "choices": ["auto", 32, 64]},
        "optimizer": {"type": "categorical", "choices": ["sgd", "adamw", "auto"]},
        "swa_start": {"type": "int", "low": 0, "high": 1},
    }
    raw = tiny_config(
        tmp_path / "data",
        tmp_path / "run",
        train={"epochs": 2, "swa_start": 1, "batch_size": "auto", "optimizer": "auto"},
        study={"search_space": space},
    )
    config = parse_config(raw)
    assert (config.train.batch_size, config.train.optimizer) == ("auto", "auto")
    assert config.train.optimizer_candidates == ["sgd", "adamw"]
    check_search_space(config)  # every choice, "auto" included, is one train.* accepts

    drawn = trial_train_config(config, {"batch_size": "auto", "optimizer": "auto"})
    assert (drawn.batch_size, drawn.optimizer) == ("auto", "auto")
    cast = trial_train_config(config, {"batch_size": 64.0, "optimizer": "adamw"})
    assert (cast.batch_size, cast.optimizer) == (64, "adamw")
    assert type(cast.batch_size) is int

    raw["study"]["search_space"]["swa_start"] = {"type": "int", "low": 0, "high": 2}
    with pytest.raises(ConfigError, match=r"train\.swa_start: SWA must start before the last"):
        parse_config(raw)  # the SWA check still reads the space with "auto" choices in it


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            {"optimizer_candidates": ["sgd", "adam"]},
            "train.optimizer_candidates: unknown optimizer 'adam' (did you mean 'adamw'?); "
            "list some of sgd, adamw",
        ),
        (
            {"optimizer_candidates": []},
            "train.optimizer_candidates: needs at least one optimizer; list some of sgd, adamw",
        ),
        (
            {"optimizer_candidates": ["sgd", "sgd"]},
            "train.optimizer_candidates: ['sgd', 'sgd'] names an optimizer twice; list each once",
        ),
        (
            {"auto_batch_max": 500},
            "train.auto_batch_max: 500 is not a power of two; use 256 or 512",
        ),
        (
            {"auto_batch_min": 64, "auto_batch_max": 32},
            "train.auto_batch_max: 32 is below auto_batch_min 64; raise auto_batch_max or "
            "lower auto_batch_min",
        ),
        ({"batch_size": -4}, "train.batch_size: Input should be greater than 0, but got -4"),
        (
            {"batch_size": "many"},
            "train.batch_size: Input should be a valid integer or 'auto', but got 'many'",
        ),
        (
            {"optimizer": "adam"},
            "train.optimizer: Input should be 'sgd', 'adamw' or 'auto', but got 'adam'",
        ),
    ],
)
def test_bad_auto_settings_are_one_line_errors_with_the_fix(
    tmp_path: Path, train: dict[str, Any], message: str
) -> None:
    raw = tiny_config(tmp_path / "data", tmp_path / "run", train=train)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert str(caught.value) == f"config: {message}"
    assert "\n" not in str(caught.value)


# The batch-size probe -------------------------------------------------------------------------


def fake_fits_up_to(limit: int, tried: list[int]) -> Any:
    """A fake memory check: batches up to ``limit`` fit; records what was tried."""

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= limit

    return fits


def test_largest_fitting_climbs_powers_of_two_and_stops_at_the_first_misfit() -> None:
    tried: list[int] = []
    assert largest_fitting(fake_fits_up_to(100, tried), 8, 512) == 64
    assert tried == [8, 16, 32, 64, 128]  # nothing above the first misfit is tried

    tried.clear()
    assert largest_fitting(fake_fits_up_to(10**6, tried), 8, 512) == 512
    assert tried == [8, 16, 32, 64, 128, 256, 512]

    tried.clear()
    assert largest_fitting(fake_fits_up_to(10**6, tried), 6, 100) == 64
    assert tried == [8, 16, 32, 64]  # from the power of two at or above the minimum

    tried.clear()
    assert largest_fitting(fake_fits_up_to(4, tried), 8, 512) is None
    assert tried == [8]


def test_an_out_of_memory_step_counts_as_a_misfit() -> None:
    tried: list[int] = []

    def fake_step(size: int) -> None:
        """A fake training step: CUDA runs out of memory above 32 images."""
        tried.append(size)
        if size > 32:
            raise torch.cuda.OutOfMemoryError(f"fake: CUDA out of memory at batch {size}")

    assert largest_fitting(fits_in_memory(fake_step), 8, 512) == 32
    assert tried == [8, 16, 32, 64]

    def broken_step(size: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        fits_in_memory(broken_step)(8)  # only running out of memory is a misfit


def test_batch_size_auto_on_cpu_is_cpu_batch_size_without_probing() -> None:
    def fake_fits_never_called(size: int) -> bool:
        raise AssertionError("a CPU is not probed")

    settings = TrainConfig(batch_size="auto", cpu_batch_size=48)
    assert choose_batch_size(settings, CPU, 10_000, fake_fits_never_called) == (
        48,
        "cpu_batch_size",
    )


def test_batch_size_auto_on_a_gpu_is_capped_by_the_settings_and_the_train_split() -> None:
    settings = TrainConfig(batch_size="auto", auto_batch_min=8, auto_batch_max=512)
    tried: list[int] = []
    assert choose_batch_size(settings, CUDA, 10_000, fake_fits_up_to(200, tried)) == (
        128,
        "probe",
    )
    assert choose_batch_size(settings, CUDA, 10_000, fake_fits_up_to(10**6, [])) == (
        512,
        "probe",
    )
    assert choose_batch_size(settings, CUDA, 100, fake_fits_up_to(10**6, [])) == (64, "probe")
    assert choose_batch_size(settings, CUDA, 5, fake_fits_up_to(10**6, [])) == (4, "probe")
    with pytest.raises(AutoChoiceError) as caught:
        choose_batch_size(settings, CUDA, 10_000, fake_fits_up_to(4, []))
    assert str(caught.value) == (
        "train.batch_size: auto found no batch size that fits in GPU memory (even 8 runs "
        "out); lower train.auto_batch_min or data.image_size, choose a smaller model.arch, "
        "share the GPU between fewer trainings (gpu.slots_per_device), or free the GPU"
    )


# The optimizer choice -------------------------------------------------------------------------


def test_choose_optimizer_keeps_the_lowest_validation_loss() -> None:
    def fake_short_run(losses: dict[str, float]) -> Any:
        """A fake short training run returning fixed validation losses."""
        return lambda name: losses[name]

    assert choose_optimizer(["sgd", "adamw"], fake_short_run({"sgd": 0.9, "adamw": 0.4})) == (
        "adamw",
        {"sgd": 0.9, "adamw": 0.4},
    )
    diverged = choose_optimizer(
        ["sgd", "adamw"], fake_short_run({"sgd": 0.9, "adamw": float("nan")})
    )
    assert diverged[0] == "sgd"  # a diverged run loses
    assert choose_optimizer(["adamw"], fake_short_run({})) == ("adamw", {})  # nothing to run


@pytest.fixture(scope="module")
def digits(digits16: dict[str, Any]) -> dict[str, Any]:
    return digits16


class TrainingSpy:
    """Records every FMFP run: its settings, ``stop_after`` and SAM's base optimizer class."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs: list[dict[str, Any]] = []
        self.bases: list[str] = []
        real_train, real_sam = fmfp.train_fmfp, fmfp.make_sam

        def train_fmfp(*args: Any, **kwargs: Any) -> Any:
            self.runs.append({"settings": args[4], "stop_after": kwargs.get("stop_after")})
            return real_train(*args, **kwargs)

        def make_sam(*args: Any, **kwargs: Any) -> Any:
            sam = real_sam(*args, **kwargs)
            self.bases.append(type(sam.base_optimizer).__name__)
            return sam

        monkeypatch.setattr(fmfp, "train_fmfp", train_fmfp)
        monkeypatch.setattr(auto, "train_fmfp", train_fmfp)
        monkeypatch.setattr(fmfp, "make_sam", make_sam)


def _resolve(digits: dict[str, Any], settings: TrainConfig) -> auto.AutoChoices:
    info = digits["info"]

    def make_model() -> torch.nn.Module:
        return build_model(0, lambda: create_model("tinycnn", len(info.classes)))

    return resolve_auto(
        settings,
        make_model=make_model,
        train_items=info.files["train"],
        val_images=digits["val_x"],
        val_labels=digits["val_y"],
        data=DataConfig(root="unused", image_size=16, augment=AugmentConfig(rotation=0)),
        num_classes=len(info.classes),
        seed=0,
    )


@pytest.mark.parametrize("lr", [0.05, 0.003])
def test_optimizer_auto_tries_each_candidate_and_keeps_the_argmin(
    digits: dict[str, Any], monkeypatch: pytest.MonkeyPatch, lr: float
) -> None:
    spy = TrainingSpy(monkeypatch)
    settings = TrainConfig(
        epochs=3, swa_start=2, lr=lr, swa_lr=0.02, device="cpu", batch_size=128,
        optimizer="auto", auto_epochs=1,
    )  # fmt: skip
    choices = _resolve(digits, settings)

    assert set(choices.val_loss) == {"sgd", "adamw"}  # both were tried, one short run each
    assert [r["settings"].optimizer for r in spy.runs] == ["sgd", "adamw"]
    assert [r["stop_after"] for r in spy.runs] == [1, 1]
    assert spy.bases == ["SGD", "AdamW"]
    assert choices.optimizer == min(choices.val_loss, key=choices.val_loss.__getitem__)
    assert choices.settings.optimizer == choices.optimizer
    assert choices.settings.batch_size == 128 and choices.batch_size is None  # set: not chosen
    if lr == 0.05:  # AdamW at SGD's learning rate is far off after one epoch
        assert choices.optimizer == "sgd"
        assert choices.val_loss["adamw"] > 2 * choices.val_loss["sgd"]
    assert choices.params() == {"optimizer_chosen": choices.optimizer}
    assert choices.metrics() == {f"auto_val_loss_{k}": v for k, v in choices.val_loss.items()}
    assert f"optimizer auto -> {choices.optimizer} (lowest val loss after 1 epoch(s)" in (
        choices.summary()
    )


def test_a_trial_trains_with_what_auto_chose_and_records_it(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train stage end to end (MLflow in a local file): choices, final run, records."""
    from tasks.tracking import Tracker
    from tasks.workloads import classifier as stages

    raw = tiny_config(
        digits_root,
        tmp_path / "run",
        train={
            "epochs": 2, "swa_start": 1, "device": "cpu", "optimizer": "auto",
            "batch_size": 256, "auto_epochs": 1, "cpu_batch_size": 64,
        },
    )  # fmt: skip
    config = parse_config(raw)
    tracker = Tracker(config.tracking_uri)
    experiment = tracker.experiment_id("auto")
    parent = tracker.start_run(experiment, "study")
    stages.prepare_inputs(config, tracker, parent)
    run = tracker.start_run(experiment, "trial-0", parent_id=parent)
    spy = TrainingSpy(monkeypatch)
    epochs: list[dict[str, float]] = []

    outcome = stages.train(
        config,
        {"batch_size": "auto", "lr": 0.05},
        tracker,
        run,
        parent,
        on_epoch=lambda _, row: epochs.append(row),
    )

    assert outcome.auto is not None
    chosen = outcome.auto
    losses = chosen["val_loss"]
    assert set(losses) == {"sgd", "adamw"}
    best = min(losses, key=losses.__getitem__)
    assert chosen["optimizer_chosen"] == best
    assert (chosen["batch_size_chosen"], chosen["batch_size_chosen_by"]) == (64, "cpu_batch_size")
    # Two short runs, then the trial itself with the chosen optimizer and batch size.
    assert [(r["settings"].optimizer, r["stop_after"]) for r in spy.runs] == [
        ("sgd", 1),
        ("adamw", 1),
        (best, None),
    ]
    assert spy.bases == ["SGD", "AdamW", {"sgd": "SGD", "adamw": "AdamW"}[best]]
    assert {r["settings"].batch_size for r in spy.runs} == {64}
    # Only the trial's own epochs reach the pruner, each with its validation loss.
    assert len(epochs) == 2 and all(row["val_loss"] > 0 for row in epochs)
    assert outcome.metrics["auto_val_loss_sgd"] == pytest.approx(losses["sgd"])
    assert f"optimizer auto -> {best}" in chosen["summary"]
    assert "batch_size auto -> 64 (CPU)" in chosen["summary"]

    logged = tracker.client.get_run(run).data
    assert logged.params["optimizer_chosen"] == best
    assert logged.params["batch_size_chosen"] == "64"
    assert logged.metrics["auto_val_loss_adamw"] == pytest.approx(losses["adamw"])
    assert logged.metrics["val_loss"] == pytest.approx(epochs[-1]["val_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (probe faked above)")
def test_batch_size_auto_probes_the_gpu(digits: dict[str, Any]) -> None:
    settings = TrainConfig(
        epochs=2, swa_start=1, batch_size="auto", device="cuda", auto_batch_max=256
    )
    choices = _resolve(digits, settings)
    assert choices.batch_size_by == "probe"
    assert choices.batch_size == 256  # a 16 px TinyCNN fits far more than that
