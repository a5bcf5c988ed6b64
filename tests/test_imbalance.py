"""Class imbalance: weighted sampling and a class-weighted loss, searchable like any setting.

On a set of 200/40/10 images, ``train.sampling: weighted`` draws the classes in equal
proportions (or those of ``train.class_weights``) on both sampling paths, from the trial's
generator only; ``uniform`` still draws each image once an epoch, as before. The weighted
loss is the per-class weighted cross-entropy in both SAM passes, and a bad weight is one
line naming the fix.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tasks.config import AugmentConfig, ConfigError, DataConfig, TrainConfig, parse_config
from tasks.config.loading import trial_train_config
from tasks.data import inspect_dataset, load_bundle, make_bundle
from tasks.hpo.study import suggest
from tasks.models import create_model
from tasks.preflight import check_class_weights, check_search_space, preflight
from tasks.training import fmfp, loaders
from tasks.training.batched import BatchedImages
from tasks.training.fmfp import make_sam, sam_step, train_fmfp, weighted_loss
from tasks.training.loaders import Balance, DrawSampler, bundle_tensors, train_batches
from tasks.training.precision import resolve_precision
from tasks.training.rng import build_model, generator

from conftest import tiny_config

#: Training images per class folder (sorted as the dataset lists them).
COUNTS = {"broken": 10, "flashover": 40, "healthy": 200}
CLASSES = tuple(COUNTS)
CPU = torch.device("cpu")
PLAIN = AugmentConfig(rotation=0)
#: Epochs of draws per proportion check: 8 × 250 = 2000 draws.
EPOCHS = 8
#: Draws per batch: 250 images make 5 whole batches, none dropped.
BATCH = 50


def _write_split(root: Path, split: str, counts: dict[str, int], seed: int) -> None:
    """Class folders of 16 px images, each class its own colour with per-pixel noise."""
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(counts.items()):
        folder = root / split / name
        folder.mkdir(parents=True)
        for k in range(count):
            pixels = rng.integers(0, 96, (16, 16, 3))
            pixels[..., index] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}.png")


@pytest.fixture(scope="module")
def insulators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An imbalanced set (200/40/10 train images), 8 val images per class."""
    root = tmp_path_factory.mktemp("imbalanced") / "insulators"
    _write_split(root, "train", COUNTS, seed=1)
    _write_split(root, "val", dict.fromkeys(COUNTS, 8), seed=2)
    info = inspect_dataset(root, verify_images=False)
    bundle = make_bundle(info.files["val"], info.classes, 16, root.parent / "val.npz")
    val_x, val_y = bundle_tensors(load_bundle(bundle))
    return {
        "root": root,
        "info": info,
        "items": info.files["train"],
        "val_x": val_x,
        "val_y": val_y,
    }


def _data(loader: str) -> DataConfig:
    return DataConfig(root="unused", image_size=16, augment=PLAIN, loader=loader)  # type: ignore[arg-type]


def _balance(sampling: str = "weighted", **settings: Any) -> Balance:
    return Balance.of(TrainConfig(sampling=sampling, **settings), CLASSES)  # type: ignore[arg-type]


def _epochs(batches: Any, epochs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (inputs, labels) batch of ``epochs`` epochs."""
    return [(x, y) for _ in range(epochs) for x, y in batches]


def _labels(batches: Any, epochs: int = EPOCHS) -> np.ndarray:
    return torch.cat([y for _, y in _epochs(batches, epochs)]).numpy()


# Sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", ["batched", "per_image"])
@pytest.mark.parametrize(
    ("class_weights", "expected"),
    [
        (None, [1 / 3, 1 / 3, 1 / 3]),
        ({"broken": 1, "flashover": 2, "healthy": 1}, [0.25, 0.5, 0.25]),
    ],
)
def test_weighted_sampling_draws_the_classes_in_the_configured_proportions(
    insulators: dict[str, Any], loader: str, class_weights: Any, expected: list[float]
) -> None:
    balance = _balance(class_weights=class_weights)
    batches = train_batches(
        _data(loader), insulators["items"], BATCH, seed=3, device=CPU, balance=balance
    )
    assert isinstance(batches, BatchedImages) == (loader == "batched")
    labels = _labels(batches)
    draws = len(insulators["items"]) * EPOCHS
    assert len(labels) == draws  # as many draws an epoch as the set has images
    shares = np.bincount(labels, minlength=3) / draws
    for share, p in zip(shares, expected, strict=True):
        # three standard errors of a share of ``draws`` independent draws
        assert abs(share - p) < 3 * math.sqrt(p * (1 - p) / draws), (shares, expected)
    # uniform would draw the 200 healthy images 80% of the time
    assert shares[2] < 0.4


@pytest.mark.parametrize("loader", ["batched", "per_image"])
def test_uniform_sampling_draws_each_image_once_an_epoch(
    insulators: dict[str, Any], loader: str
) -> None:
    items = insulators["items"]
    for balance in (None, _balance("uniform"), _balance("uniform", class_weights=dict(COUNTS))):
        batches = train_batches(_data(loader), items, BATCH, seed=3, device=CPU, balance=balance)
        for epoch in range(2):
            labels = torch.cat([y for _, y in batches]).numpy()
            assert np.bincount(labels).tolist() == list(COUNTS.values()), epoch


def test_uniform_order_is_the_permutation_it_always_was() -> None:
    """Bit for bit: the same draws from the trial's ``shuffle`` generator as before."""
    size, images = 250, torch.zeros(250, 3, 4, 4, dtype=torch.uint8)
    by_index = torch.arange(size)
    sampler = DrawSampler(size, generator(7, "shuffle"))
    batched = BatchedImages(images, by_index, PLAIN, size, generator(7, "shuffle"))
    reference = generator(7, "shuffle")
    first = torch.randperm(size, generator=reference)
    assert [index for index, _ in sampler] == first.tolist()
    (_, drawn), *_ = list(batched)
    assert drawn.tolist() == first.tolist()  # each image once
    # each epoch draws its augmentation seeds after its order, as it did
    torch.randint(0, 2**62, (size,), generator=reference)
    assert [index for index, _ in sampler] == torch.randperm(size, generator=reference).tolist()


def test_weighted_draws_come_from_the_trial_generator_only() -> None:
    """Image by image: draws with replacement from ``g``, none from the global generator."""
    labels = [0] * 10 + [1] * 40 + [2] * 200
    weights = _balance().image_weights(labels)
    assert weights is not None
    expected = torch.multinomial(weights, 250, replacement=True, generator=generator(4, "shuffle"))
    torch.manual_seed(0)
    sampler = DrawSampler(250, generator(4, "shuffle"), weights)
    torch.manual_seed(1)  # the global generator moves; the draws do not
    assert [index for index, _ in sampler] == expected.tolist()
    assert len(set(expected.tolist())) < 250  # with replacement: some drawn twice


@pytest.mark.parametrize("loader", ["batched", "per_image"])
def test_the_same_seed_draws_the_same_images_and_another_seed_others(
    insulators: dict[str, Any], loader: str
) -> None:
    def draws(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = train_batches(
            _data(loader), insulators["items"], BATCH, seed=seed, device=CPU, balance=_balance()
        )
        pairs = _epochs(batches, 2)
        return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])

    first, again, other = draws(11), draws(11), draws(12)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(first[0], other[0])


# Loss -----------------------------------------------------------------------------------------


LABELS = [0] * 10 + [1] * 40 + [2] * 200


def test_loss_weights_are_balanced_and_scaled_by_the_class_weights() -> None:
    n, k = 250, 3
    balanced = [n / (k * c) for c in (10, 40, 200)]  # 8.33, 2.08, 0.417
    weights = _balance(class_weighted_loss=True).loss_weights(LABELS)
    assert weights is not None
    assert weights.tolist() == pytest.approx(balanced)
    scaled = [b * s for b, s in zip(balanced, (0.25, 0.5, 0.25), strict=True)]
    mean = sum(scaled) / k
    given = _balance(
        class_weighted_loss=True, class_weights={"broken": 1, "flashover": 2, "healthy": 1}
    ).loss_weights(LABELS)
    assert given is not None
    assert given.tolist() == pytest.approx([s / mean for s in scaled])
    assert float(given.mean()) == pytest.approx(1.0)
    assert _balance().loss_weights(LABELS) is None  # class_weighted_loss: false


class _Counted(nn.Module):
    """A criterion that counts its calls (one per SAM pass)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(logits, targets)


def _step(criterion: nn.Module | None) -> tuple[float, float, float]:
    """One SAM step on a fixed batch: its loss, and the plain and weighted cross-entropy
    of the model before it, computed by hand."""
    settings = TrainConfig(device="cpu", amp=False, lr=0.1)
    model = build_model(0, lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
    g = torch.Generator().manual_seed(5)
    inputs, targets = torch.randn(32, 3, 2, 2, generator=g), torch.tensor([0, 1] * 4 + [2] * 24)
    before = copy.deepcopy(model)(inputs).detach()
    weights = _balance(class_weighted_loss=True).loss_weights(LABELS)
    sam = make_sam(list(model.parameters()), settings, "sgd")
    loss = sam_step(model, sam, inputs, targets, resolve_precision(settings, CPU), criterion)
    weighted = F.cross_entropy(before, targets, weight=weights)
    return float(loss), float(F.cross_entropy(before, targets)), float(weighted)


def test_sam_step_trains_both_passes_on_the_criterion_it_is_given() -> None:
    weights = _balance(class_weighted_loss=True).loss_weights(LABELS)
    counted = _Counted(weighted_loss(weights, CPU))
    loss, plain, weighted = _step(counted)
    assert loss == pytest.approx(weighted, rel=1e-6)
    assert abs(weighted - plain) > 1e-3  # the weights change the loss on this batch
    assert counted.calls == 2  # the ascent pass and the update pass
    default, plain, _ = _step(None)
    assert default == pytest.approx(plain, rel=1e-6)  # unweighted by default, as before


def test_a_weighted_loss_without_its_weights_is_refused(insulators: dict[str, Any]) -> None:
    settings = TrainConfig(epochs=2, swa_start=1, batch_size=50, device="cpu")
    weighted = settings.model_copy(update={"class_weighted_loss": True})
    model = build_model(0, lambda: create_model("tinycnn", 3))
    loader = train_batches(_data("batched"), insulators["items"], 50, seed=0, device=CPU)
    with pytest.raises(ValueError, match="needs loss_weights with class_weighted_loss"):
        train_fmfp(model, loader, insulators["val_x"], insulators["val_y"], weighted)


# Config ---------------------------------------------------------------------------------------


IMBALANCE_SPACE = {
    "lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
    "sampling": {"type": "categorical", "choices": ["uniform", "weighted"]},
    "class_weighted_loss": {"type": "categorical", "choices": [True, False]},
}


def test_the_search_can_draw_sampling_and_the_weighted_loss(
    insulators: dict[str, Any], tmp_path: Path
) -> None:
    raw = tiny_config(insulators["root"], tmp_path / "run", study={"search_space": IMBALANCE_SPACE})
    config = parse_config(raw)
    check_search_space(config)  # every choice is a value train.<name> accepts
    drawn = trial_train_config(config, {"sampling": "weighted", "class_weighted_loss": True})
    assert (drawn.sampling, drawn.class_weighted_loss) == ("weighted", True)
    assert config.train.sampling == "uniform" and config.train.class_weighted_loss is False
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        params = suggest(study.ask(), config.study.search_space)
        settings = trial_train_config(config, params)
        seen.add((settings.sampling, settings.class_weighted_loss))
        assert (settings.sampling, settings.class_weighted_loss) == (
            params["sampling"],
            params["class_weighted_loss"],
        )
    assert seen == {(s, w) for s in ("uniform", "weighted") for w in (True, False)}


def test_a_choice_the_setting_refuses_is_one_line_with_the_fix(
    insulators: dict[str, Any], tmp_path: Path
) -> None:
    space = {"sampling": {"type": "categorical", "choices": ["uniform", "balanced"]}}
    config = parse_config(
        tiny_config(insulators["root"], tmp_path / "run", study={"search_space": space})
    )
    with pytest.raises(ConfigError) as caught:
        check_search_space(config)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("study.search_space.sampling: a trial could draw 'balanced'")
    assert "train.sampling refuses" in message and "'uniform' or 'weighted'" in message


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (
            {"brokn": 1, "flashover": 1, "healthy": 1},
            "train.class_weights: 'brokn' is not a class folder of the dataset (did you mean "
            "'broken'?); key the weights by class folder name (broken, flashover, healthy)",
        ),
        (
            {"broken": 4, "healthy": 1},
            "train.class_weights: no weight for class 'flashover'; give every class a weight, "
            "e.g. {broken: 1.0, flashover: 1.0, healthy: 1.0}, or set class_weights: null for "
            "equal proportions",
        ),
    ],
)
def test_class_weights_that_do_not_fit_the_dataset_are_refused_before_the_study(
    insulators: dict[str, Any], tmp_path: Path, weights: dict[str, float], expected: str
) -> None:
    train = {"epochs": 2, "swa_start": 1, "class_weights": weights, "sampling": "weighted"}
    config = parse_config(tiny_config(insulators["root"], tmp_path / "run", train=train))
    with pytest.raises(ConfigError) as caught:
        preflight(config)
    assert str(caught.value) == expected
    with pytest.raises(ConfigError) as again:  # and where a trial starts training
        Balance.of(config.train, insulators["info"].classes)
    assert str(again.value) == expected
    check_class_weights(config.model_copy(update={"train": TrainConfig()}), CLASSES)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"broken": 0, "flashover": 1, "healthy": 1}, "class 'broken' has weight 0"),
        ({"broken": -2.5, "flashover": 1, "healthy": 1}, "class 'broken' has weight -2.5"),
        ({}, "names no class"),
    ],
)
def test_a_weight_that_is_not_positive_is_refused_when_the_config_is_read(
    insulators: dict[str, Any], tmp_path: Path, weights: dict[str, float], expected: str
) -> None:
    raw = tiny_config(insulators["root"], tmp_path / "run", train={"class_weights": weights})
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    message = str(caught.value)
    assert "\n" not in message
    assert f"train.class_weights: {expected}" in message
    assert "give every class" in message


# End to end -----------------------------------------------------------------------------------


def test_a_trial_trains_with_weighted_sampling_and_loss(
    insulators: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train stage (MLflow in a local file), with ``optimizer: auto``'s short runs:
    every training draws and weighs as the trial says, and the metrics are finite."""
    from tasks.tracking import Tracker
    from tasks.training import auto
    from tasks.workloads import classifier as stages

    weights = {"broken": 2, "flashover": 1, "healthy": 1}
    train = {
        "epochs": 2, "swa_start": 1, "device": "cpu", "batch_size": 50, "optimizer": "auto",
        "auto_epochs": 1, "class_weights": weights,
    }  # fmt: skip
    raw = tiny_config(insulators["root"], tmp_path / "run", train=train)
    raw["data"]["loader"] = "batched"
    config = parse_config(raw)
    tracker = Tracker(config.tracking_uri)
    experiment = tracker.experiment_id("imbalance")
    parent = tracker.start_run(experiment, "study")
    stages.prepare_inputs(config, tracker, parent)
    run = tracker.start_run(experiment, "trial-0", parent_id=parent)
    trainings: list[Any] = []
    drawn: list[Any] = []
    real_train, real_batches = fmfp.train_fmfp, loaders.train_batches

    def spy_train(*args: Any, **kwargs: Any) -> Any:
        trainings.append(kwargs.get("loss_weights"))
        return real_train(*args, **kwargs)

    def spy_batches(*args: Any, **kwargs: Any) -> Any:
        drawn.append(kwargs.get("balance"))
        return real_batches(*args, **kwargs)

    for module in (fmfp, auto):
        monkeypatch.setattr(module, "train_fmfp", spy_train)
    for module in (loaders, auto):
        monkeypatch.setattr(module, "train_batches", spy_batches)

    outcome = stages.train(
        config, {"sampling": "weighted", "class_weighted_loss": True}, tracker, run, parent
    )

    expected = _balance(class_weighted_loss=True, class_weights=weights)
    assert drawn == [expected] * 3  # two short runs (sgd, adamw), then the trial
    loss_weights = expected.loss_weights(LABELS)
    assert loss_weights is not None
    assert len(trainings) == 3
    assert all(torch.equal(w, loss_weights) for w in trainings)
    for name in ("float_augrc", "float_accuracy", "float_loss"):
        assert math.isfinite(outcome.metrics[name]), name
    assert 0 <= outcome.metrics["float_accuracy"] <= 1
    logged = tracker.client.get_run(run).data
    assert logged.metrics["float_loss"] == pytest.approx(outcome.metrics["float_loss"])
