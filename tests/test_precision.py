"""Mixed precision, channels-last and torch.compile under SAM and SWA, on a CPU.

CPU autocast runs bf16 and fp16 (the GPU defaults are resolved from the device and checked
with a fake CUDA probe); fp16 goes through a gradient scaler, and a step whose first
gradient overflows is skipped whole."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from tasks.config import AugmentConfig, TrainConfig
from tasks.models import create_model
from tasks.training.fmfp import make_sam, sam_step, train_fmfp
from tasks.training.loaders import train_loader
from tasks.training.precision import Precision, prepare, resolve_precision
from tasks.training.rng import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(digits16: dict[str, Any]) -> dict[str, Any]:
    return digits16


def _train(digits: dict[str, Any], **settings: Any) -> tuple[Any, list[torch.dtype]]:
    """Two epochs (the second averaged by SWA); the dtypes the first conv computed in."""
    model = build_model(3, lambda: create_model("tinycnn", 10))
    seen: list[torch.dtype] = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    loader = train_loader(digits["items"], 16, AugmentConfig(rotation=0), 64, seed=3)
    params = TrainConfig(epochs=2, swa_start=1, batch_size=64, lr=0.05, device="cpu", **settings)
    return train_fmfp(model, loader, digits["val_x"], digits["val_y"], params), seen


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_sam_and_swa_train_under_autocast(digits: dict[str, Any], amp: str, dtype: Any) -> None:
    result, seen = _train(digits, amp=amp)

    assert dtype in seen  # the training passes ran in the asked precision
    assert seen[-1] == torch.float32  # validation and the BN refresh did not
    assert len(result.history) == 2
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert 0 <= result.metrics["augrc"] <= 1 and result.metrics["accuracy"] > 0.5  # chance: 0.1
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    bn = next(m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked > 0 and torch.isfinite(bn.running_var).all()


def test_float32_and_channels_last_reach_the_same_model_within_rounding(
    digits: dict[str, Any],
) -> None:
    plain, seen = _train(digits, amp=False, channels_last=False)
    layout, _ = _train(digits, amp=False, channels_last=True)

    assert set(seen) == {torch.float32}
    for a, b in zip(plain.model.parameters(), layout.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=0.02)  # SAM amplifies rounding; weights ~0.1-0.5
    assert layout.metrics["accuracy"] == pytest.approx(plain.metrics["accuracy"], abs=0.02)


def test_an_fp16_step_whose_gradient_overflows_is_skipped_and_the_scale_lowered() -> None:
    model = build_model(0, lambda: create_model("tinycnn", 10))
    precision = resolve_precision(TrainConfig(amp="fp16", device="cpu"), CPU)
    assert precision.scaler is not None
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # overflows fp16
    optimizer = make_sam(list(model.parameters()), TrainConfig(lr=0.1), "sgd")
    before = [p.detach().clone() for p in model.parameters()]
    inputs, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    loss = sam_step(model, optimizer, inputs, targets, precision)

    assert math.isfinite(float(loss))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert precision.scaler.get_scale() == 2.0**59
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sam_step(model, optimizer, inputs, targets, precision)  # a normal scale steps
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled:UserWarning")
def test_the_defaults_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = TrainConfig()
    assert auto.amp == "auto" and auto.channels_last == "auto" and auto.compile is False
    cpu = resolve_precision(auto, CPU)
    assert (cpu.dtype, cpu.scaler, cpu.channels_last) == (None, None, False)

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    ampere = resolve_precision(auto, cuda)
    assert (ampere.dtype, ampere.scaler, ampere.channels_last) == (torch.bfloat16, None, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    older = resolve_precision(auto, cuda)
    assert older.dtype == torch.float16 and older.scaler is not None
    assert resolve_precision(TrainConfig(amp=False), cuda).dtype is None
    assert resolve_precision(TrainConfig(amp="bf16"), CPU).name == "bf16"


def test_channels_last_changes_the_layout_of_the_model_and_the_batches() -> None:
    model = create_model("tinycnn", 10)
    precision = Precision(CPU, channels_last=True)
    forward = prepare(model, precision, compile=False)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert forward is model
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = precision.inputs(torch.randn(2, 3, 16, 16))
    assert batch.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_a_compiled_training_shares_the_weights_and_matches_the_eager_one(
    digits: dict[str, Any],
) -> None:
    eager, _ = _train(digits, amp=False, compile=False)
    compiled, _ = _train(digits, amp=False, compile=True)

    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=0.02)  # SAM amplifies rounding; weights ~0.1-0.5
