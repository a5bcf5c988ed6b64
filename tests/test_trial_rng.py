"""A trial's randomness is its own: seeds from the study seed and the parameters, weights
and noise that do not depend on what other threads draw, loaders that ignore worker count."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from tasks.config import AugmentConfig, TrainConfig
from tasks.data import inspect_dataset, load_bundle, make_bundle
from tasks.models import ARCHITECTURES, create_model
from tasks.seeding import derive, trial_seed
from tasks.training.fmfp import train_fmfp
from tasks.training.loaders import bundle_tensors, train_loader
from tasks.training.rng import TrialDropout, _initialisers_draw_from, build_model, generator

AUGMENT = AugmentConfig(rotation=20, perspective=0.3, color_jitter=0.3, hflip=True)


def test_the_trial_seed_follows_the_study_seed_and_the_parameters() -> None:
    seed = trial_seed(0, {"lr": 0.01, "momentum": 0.9})
    assert seed == trial_seed(0, {"momentum": 0.9, "lr": 0.01})  # order of keys is no part
    others = {
        trial_seed(1, {"lr": 0.01, "momentum": 0.9}),
        trial_seed(0, {"lr": 0.011, "momentum": 0.9}),
        trial_seed(0, {"lr": 0.01, "momentum": 0.9}, replicate=1),
    }
    assert seed not in others and len(others) == 3
    assert 0 <= seed < 2**63
    assert derive(seed, "init") != derive(seed, "shuffle")


def test_building_a_model_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(7, lambda: create_model("tinycnn", 10))
    assert torch.equal(torch.rand(3), expected)
    second = build_model(7, lambda: create_model("tinycnn", 10))
    other = build_model(8, lambda: create_model("tinycnn", 10))
    assert torch.equal(first.head.weight, second.head.weight)
    assert not torch.equal(first.head.weight, other.head.weight)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_no_architecture_draws_from_the_global_generator(arch: str) -> None:
    with torch.random.fork_rng(devices=[]):
        before = torch.default_generator.get_state()
        with _initialisers_draw_from(generator(0, "init")):
            create_model(arch, 3)
        assert torch.equal(torch.default_generator.get_state(), before)  # weights: trial's
    model = build_model(0, lambda: create_model(arch, 3))
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, nn.modules.dropout._DropoutNd) for k in kinds)
    assert StochasticDepth not in kinds


def test_a_dropout_the_trial_cannot_own_is_refused() -> None:
    with pytest.raises(TypeError, match="Dropout2d draws from torch's global generator"):
        build_model(0, lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout2d(0.1)))


@pytest.fixture(scope="module")
def task(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    info = inspect_dataset(digits_root, verify_images=False)
    bundle = make_bundle(info.files["val"], info.classes, 32, tmp_path_factory.mktemp("b") / "v")
    val_x, val_y = bundle_tensors(load_bundle(bundle))
    return {"items": info.files["train"][::4], "val_x": val_x[:90], "val_y": val_y[:90]}


def test_batches_do_not_depend_on_the_worker_count(task: dict[str, Any]) -> None:
    def batches(workers: int, seed: int = 5) -> list[torch.Tensor]:
        loader = train_loader(task["items"], 32, AUGMENT, 64, seed=seed, num_workers=workers)
        return [x for _ in range(2) for x, _ in loader]  # two epochs: each its own draw

    alone = batches(0)
    assert len(alone) == 2 * (len(task["items"]) // 64)
    assert not torch.equal(alone[0], alone[len(alone) // 2])  # the next epoch draws anew
    assert all(torch.equal(a, b) for a, b in zip(alone, batches(2), strict=True))
    assert not torch.equal(alone[0], batches(0, seed=6)[0])


def _train(task: dict[str, Any], seed: int) -> nn.Module:
    """A model with dropout, trained on augmented images: every source of noise is used."""
    model = build_model(seed, lambda: create_model("mobilenet_v3_small", 10))
    assert any(isinstance(m, TrialDropout) for m in model.modules())
    loader = train_loader(task["items"], 32, AUGMENT, 64, seed=seed)
    settings = TrainConfig(epochs=2, batch_size=64, swa_start=1, lr=0.05, device="cpu")
    return train_fmfp(model, loader, task["val_x"], task["val_y"], settings).model


def test_trials_in_threads_train_as_they_do_alone(task: dict[str, Any]) -> None:
    alone = {seed: _train(task, seed) for seed in (1, 2)}
    beside: dict[int, nn.Module] = {}
    threads = [
        threading.Thread(target=lambda s=seed: beside.__setitem__(s, _train(task, s)))
        for seed in (1, 2)
    ]
    for thread in threads:
        thread.start()
    # The global generator is drawn from while the trials train: they must not notice.
    while any(t.is_alive() for t in threads):
        torch.rand(1000)
        torch.nn.functional.dropout(torch.ones(100), 0.5)
    for thread in threads:
        thread.join()
    for seed in (1, 2):
        for a, b in zip(
            alone[seed].state_dict().values(), beside[seed].state_dict().values(), strict=True
        ):
            assert torch.equal(a, b)
    assert not torch.equal(
        alone[1].state_dict()["classifier.3.weight"], alone[2].state_dict()["classifier.3.weight"]
    )
