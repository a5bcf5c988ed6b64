"""Settings a trial leaves to its training host: the batch size and SAM's base optimizer.

- ``train.batch_size: auto``: on a GPU, the largest power of two whose training step (two
  SAM steps of the real model at the data's image size, with SWA's copy of the weights)
  fits in the training's share of the GPU (its memory over the GPU slots sharing it, less
  the decoded set the batched path puts there: ``tasks.training.gpus``), probed upwards
  from ``auto_batch_min`` until the step's peak leaves that share or CUDA runs out of
  memory, ``auto_batch_max`` or the size of the train split; on a CPU,
  ``cpu_batch_size`` without probing.
- ``train.optimizer: auto``: each of ``optimizer_candidates`` trains the first
  ``auto_epochs`` epochs of the trial's own schedule (same seed, data and settings, the
  batch size above, the trial's sampling and loss: ``Balance``); the one with the lowest
  validation cross-entropy is kept.

The trial then trains from scratch with what was chosen; ``AutoChoices`` says what that
was and why, for the trial's MLflow run, its outcome and its log line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from tasks.config import AUTO, DataConfig, TrainConfig
from tasks.training.fmfp import make_sam, resolve_device, sam_step, train_fmfp
from tasks.training.gpus import device_budget
from tasks.training.loaders import Balance, on_device_bytes, train_batches
from tasks.training.precision import prepare, resolve_precision


class AutoChoiceError(RuntimeError):
    """An automatic choice that cannot be made; the message names the fix."""


@dataclass(frozen=True)
class AutoChoices:
    """The trial's settings with every ``auto`` replaced, and how each was chosen."""

    settings: TrainConfig
    optimizer: str | None = None  # chosen by short runs (None: set by the config or space)
    val_loss: dict[str, float] = field(default_factory=dict)  # per candidate optimizer
    auto_epochs: int = 0
    batch_size: int | None = None  # chosen for this host (None: set by the config or space)
    batch_size_by: str = ""  # "probe" (GPU memory) or "cpu_batch_size"

    @property
    def chosen(self) -> bool:
        return self.optimizer is not None or self.batch_size is not None

    def params(self) -> dict[str, Any]:
        """MLflow params of the trial run."""
        params: dict[str, Any] = {}
        if self.optimizer is not None:
            params["optimizer_chosen"] = self.optimizer
        if self.batch_size is not None:
            params["batch_size_chosen"] = self.batch_size
            params["batch_size_chosen_by"] = self.batch_size_by
        return params

    def metrics(self) -> dict[str, float]:
        """``auto_val_loss_<optimizer>`` of each short run."""
        return {f"auto_val_loss_{name}": loss for name, loss in self.val_loss.items()}

    def summary(self) -> str:
        parts = []
        if self.optimizer is not None:
            losses = ", ".join(f"{name} {loss:.4g}" for name, loss in self.val_loss.items())
            how = (
                f"lowest val loss after {self.auto_epochs} epoch(s): {losses}"
                if losses
                else "the only candidate"
            )
            parts.append(f"optimizer auto -> {self.optimizer} ({how})")
        if self.batch_size is not None:
            how = "largest that fits in GPU memory" if self.batch_size_by == "probe" else "CPU"
            parts.append(f"batch_size auto -> {self.batch_size} ({how})")
        return "; ".join(parts)

    def record(self) -> dict[str, Any]:
        """What the train stage returns about its choices (JSON-ready)."""
        return {
            **self.params(),
            "val_loss": dict(self.val_loss),
            "auto_epochs": self.auto_epochs,
            "summary": self.summary(),
        }


# Batch size ---------------------------------------------------------------------------------


def largest_fitting(try_batch: Callable[[int], bool], minimum: int, maximum: int) -> int | None:
    """The largest power of two in [minimum, maximum] for which ``try_batch`` holds.

    Sizes are tried upwards from the smallest power of two >= ``minimum``, stopping at the
    first that does not fit; None when even that one does not.
    """
    size = 1
    while size < minimum:
        size *= 2
    best = None
    while size <= maximum and try_batch(size):
        best = size
        size *= 2
    return best


def fits_in_memory(
    step: Callable[[int], int | None], budget: int | None = None
) -> Callable[[int], bool]:
    """``try_batch`` for ``largest_fitting``: whether ``step(size)`` runs without CUDA OOM
    and, with a ``budget``, its peak bytes (what ``step`` returns) stay within it."""

    def try_batch(size: int) -> bool:
        try:
            peak = step(size)
            fitted = budget is None or peak is None or peak <= budget
        except torch.cuda.OutOfMemoryError:
            fitted = False  # the failed step's tensors are freed with the exception
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return fitted

    return try_batch


def training_step(
    make_model: Callable[[], nn.Module],
    settings: TrainConfig,
    optimizer: str,
    image_size: int,
    num_classes: int,
    device: torch.device,
) -> Callable[[int], int | None]:
    """What one batch of training holds in memory: model, SWA copy, SAM and its state. The
    step returns its peak of GPU memory in bytes (None on a CPU)."""

    def step(size: int) -> int | None:
        gpu = device.type == "cuda"
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        model = make_model().to(device).train()
        precision = resolve_precision(settings, device)
        prepare(model, precision, compile=False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        sam = make_sam(trainable, settings, optimizer)
        average = AveragedModel(model)
        inputs = precision.inputs(torch.randn(size, 3, image_size, image_size, device=device))
        targets = torch.randint(0, num_classes, (size,), device=device)
        for _ in range(2):  # the second step also holds the base optimizer's state
            sam_step(model, sam, inputs, targets, precision)
        average.update_parameters(model)
        if not gpu:
            return None
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)

    return step


def choose_batch_size(
    settings: TrainConfig,
    device: torch.device,
    train_size: int,
    fits: Callable[[int], bool],
) -> tuple[int, str]:
    """The batch size for ``batch_size: auto`` on ``device``, and how it was found."""
    if device.type != "cuda":
        return settings.cpu_batch_size, "cpu_batch_size"
    maximum = min(settings.auto_batch_max, max(train_size, 1))
    minimum = min(settings.auto_batch_min, 1 << (maximum.bit_length() - 1))
    best = largest_fitting(fits, minimum, maximum)
    if best is None:
        raise AutoChoiceError(
            f"train.batch_size: auto found no batch size that fits in GPU memory (even "
            f"{minimum} runs out); lower train.auto_batch_min or data.image_size, choose a "
            f"smaller model.arch, share the GPU between fewer trainings "
            f"(gpu.slots_per_device), or free the GPU"
        )
    return best, "probe"


# Optimizer ----------------------------------------------------------------------------------


def choose_optimizer(
    candidates: Sequence[str], short_run: Callable[[str], float]
) -> tuple[str, dict[str, float]]:
    """The candidate whose short run ends with the lowest validation loss, and every loss.

    A run whose loss is not finite (it diverged) loses; ties go to the earlier candidate.
    """
    if len(candidates) == 1:
        return candidates[0], {}
    losses = {name: float(short_run(name)) for name in candidates}

    def rank(name: str) -> float:
        return losses[name] if math.isfinite(losses[name]) else math.inf

    return min(candidates, key=rank), losses


# Both ---------------------------------------------------------------------------------------


def needs_choices(settings: TrainConfig) -> bool:
    return settings.optimizer == AUTO or settings.batch_size == AUTO


def resolve_auto(
    settings: TrainConfig,
    *,
    make_model: Callable[[], nn.Module],
    train_items: Sequence[tuple[Path, int]],
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    data: DataConfig,
    num_classes: int,
    seed: int,
    fits: Callable[[int], bool] | None = None,
    balance: Balance | None = None,
) -> AutoChoices:
    """``settings`` with ``auto`` replaced by what suits this host, data and model.

    ``make_model`` builds the trial's initial model (seeded); short runs train on
    ``train_items`` (read as ``data`` says, drawn and weighted as ``balance`` says) and are
    scored on ``val_images``. ``fits`` replaces the GPU memory probe (tests).
    """
    if not needs_choices(settings):
        return AutoChoices(settings=settings)
    device = resolve_device(settings.device)
    batch_size: int | None = None
    batch_size_by = ""
    if settings.batch_size == AUTO:
        names = settings.optimizer_candidates
        heaviest: str = settings.optimizer
        if heaviest == AUTO:  # AdamW keeps two buffers per weight, SGD one
            heaviest = "adamw" if "adamw" in names else names[0]
        # this training's share of the GPU (its slots), less the decoded set put there later
        budget = device_budget(device) - on_device_bytes(data, train_items, device)
        probe = fits or fits_in_memory(
            training_step(make_model, settings, heaviest, data.image_size, num_classes, device),
            budget,
        )
        batch_size, batch_size_by = choose_batch_size(settings, device, len(train_items), probe)
        settings = settings.model_copy(update={"batch_size": batch_size})
    optimizer: str | None = None
    losses: dict[str, float] = {}
    epochs = min(settings.auto_epochs, settings.epochs)
    if settings.optimizer == AUTO:
        assert isinstance(settings.batch_size, int)
        size = settings.batch_size
        balance = balance or Balance()
        loss_weights = balance.loss_weights([label for _, label in train_items])

        def short_run(name: str) -> float:
            loader = train_batches(
                data, train_items, size, seed=seed, device=device, balance=balance
            )
            candidate = settings.model_copy(update={"optimizer": name})
            result = train_fmfp(
                make_model(),
                loader,
                val_images,
                val_labels,
                candidate,
                stop_after=epochs,
                loss_weights=loss_weights,
            )
            return result.history[-1]["val_loss"]

        optimizer, losses = choose_optimizer(settings.optimizer_candidates, short_run)
        settings = settings.model_copy(update={"optimizer": optimizer})
    return AutoChoices(
        settings=settings,
        optimizer=optimizer,
        val_loss=losses,
        auto_epochs=epochs if losses else 0,
        batch_size=batch_size,
        batch_size_by=batch_size_by,
    )
