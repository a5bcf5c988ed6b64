"""How a trial's training passes run: precision, memory layout and compilation.

``train.amp``: ``auto`` (the default) is bf16 autocast on a CUDA GPU that has it, fp16
with a gradient scaler on one that does not, and float32 on a CPU; ``bf16``/``fp16`` ask
for that precision on any device (a CPU too); ``false`` is float32 everywhere.
``train.channels_last``: ``auto`` is channels-last on CUDA (its convolutions are faster
there), not on a CPU. ``train.compile``: ``torch.compile`` of the training passes (off by
default: the first epoch pays the compilation).

fp16 gradients can overflow, so an fp16 step scales the loss (``torch.amp.GradScaler``).
SAM's ascent direction ``g / ||g||`` does not change with the scale, but an overflowed
first gradient would move the weights by NaN: such a step is skipped whole and the scale
lowered, as the scaler does for a plain optimizer (``tasks.training.fmfp.sam_step``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.config import TrainConfig


@dataclass
class Precision:
    """The autocast dtype (None: float32), its scaler (fp16 only) and the memory layout."""

    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False

    def autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last and batch.dim() == 4:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_precision(params: TrainConfig, device: torch.device) -> Precision:
    """``train.amp`` and ``train.channels_last`` on ``device`` (see the module docstring)."""
    dtype = _dtype(params.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    layout = params.channels_last
    channels_last = device.type == "cuda" if layout == "auto" else bool(layout)
    return Precision(device, dtype, scaler, channels_last)


def _dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    if amp is False:
        return None
    if amp in (True, "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def prepare(model: nn.Module, precision: Precision, compile: bool) -> nn.Module:
    """``model`` in the trial's layout, and the module its training passes go through:
    ``torch.compile`` of it (sharing its weights) when asked, else the model itself."""
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(model)  # type: ignore[return-value]
    return model
