"""FMFP training (flat minima for failure prediction, ECCV 2022).

SAM around SGD with cross-entropy (per class weighted with ``train.class_weighted_loss``,
the weights given by the caller: ``tasks.training.loaders.Balance``); cosine annealing
from ``lr`` to ``eta_min`` over the first ``swa_start`` epochs; then stochastic weight
averaging with SWALR(``swa_lr``) and a BatchNorm refresh. The averaged model is the result.

After every epoch the float validation metrics (AUGRC first) of the model that *would*
be the result are passed to ``on_epoch``, which may raise to stop the run (pruning).
A loss that becomes non-finite or explodes ends the run at that batch with
``TrainingDiverged`` (``DivergenceGuard``): a result of the trial's settings, not a crash.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from tasks.config import TrainConfig
from tasks.failures import TrainingDiverged
from tasks.metrics import classification_metrics
from tasks.training.gpus import pinned_gpu
from tasks.training.precision import Precision, prepare, resolve_precision
from tasks.training.sam import SAM

EpochCallback = Callable[[int, dict[str, float]], None]

#: A training loss over this many times the first batch's loss (and at least this much) has
#: exploded. Cross-entropy starts near ln(classes), about 0.7 to 7, and a healthy run's
#: batch losses rarely rise far above it even at their noisiest; a thousand times more
#: means the weights are running away (``train.lr`` too high for the model).
DIVERGENCE_FACTOR = 1e3


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    #: The epoch early stopping ended the run after (None: it trained every epoch).
    stopped_early_at: int | None = None


@dataclass
class EarlyStop:
    """After ``swa_start``: stop when the validation AUGRC of the averaged model has not
    improved for ``patience`` epochs (the later HI4Lines recipe; ``None``: never)."""

    swa_start: int
    patience: int | None
    best: float = float("inf")
    since: int = 0

    def done(self, epoch: int, augrc: float) -> bool:
        if self.patience is None or epoch < self.swa_start:
            return False
        if augrc < self.best:  # nan never improves
            self.best, self.since = augrc, 0
        else:
            self.since += 1
        return self.since >= self.patience


#: Batches a GPU trains between two reads of their losses (each read waits for the GPU).
GUARD_EVERY = 16


@dataclass
class DivergenceGuard:
    """Ends a training at the batch whose loss is not finite or is over ``limit``.

    Training on would only spend the GPU: the model would fail later and less clearly (the
    export's parity check, or metrics refusing NaN probabilities). ``batches`` per epoch
    (None: unknown) and the settings only make the message say what diverged.
    """

    params: TrainConfig
    batches: int | None = None
    first: float | None = None

    @property
    def limit(self) -> float:
        """``DIVERGENCE_FACTOR`` × the first batch's loss, and at least ``DIVERGENCE_FACTOR``."""
        return DIVERGENCE_FACTOR * max(1.0 if self.first is None else self.first, 1.0)

    def check(self, epoch: int, batch: int, loss: float) -> None:
        if self.first is None and math.isfinite(loss):
            self.first = loss
        if math.isfinite(loss) and loss <= self.limit:
            return
        of = f" of {self.batches}" if self.batches is not None else ""
        why = (
            f"is over {self.limit:.3g} ({DIVERGENCE_FACTOR:g} × the first batch's "
            f"{self.first:.3g}, and at least {DIVERGENCE_FACTOR:g})"
            if math.isfinite(loss)
            else "is not finite"
        )
        raise TrainingDiverged(
            f"loss diverged at epoch {epoch} (batch {batch + 1}{of}) with {self.settings()}: "
            f"the training loss {loss:.3g} {why}; lower train.lr (or the upper bound of "
            f"study.search_space.lr)",
            epoch,
            loss,
        )

    def settings(self) -> str:
        p = self.params
        momentum = f", momentum={p.momentum:g}" if p.optimizer == "sgd" else ""
        return (
            f"lr={p.lr:g}, optimizer={p.optimizer}{momentum}, rho={p.rho:g}, "
            f"weight_decay={p.weight_decay:g}, batch_size={p.batch_size}"
        )


def loader_batch(loader: Iterable[Any], params: TrainConfig) -> int:
    """The loader's batch size (``train.batch_size`` when it does not say)."""
    size = getattr(loader, "batch_size", None)
    return size if isinstance(size, int) else int(params.batch_size)


def _batches(loader: Iterable[Any]) -> int | None:
    """Batches per epoch, or None for a loader without a length (an iterable dataset)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", pinned_gpu())  # this training's GPU slot (tasks.training.gpus)


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    model.eval()
    chunks = [
        torch.softmax(model(images[i : i + batch_size].to(device)).float(), dim=1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).double().numpy()


def _validate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> dict[str, float]:
    probs = predict_proba(model, images, device, batch_size)
    y = labels.numpy()
    metrics = classification_metrics(probs, y, bootstrap=0)
    metrics["loss"] = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return {k: v for k, v in metrics.items() if not k.startswith("augrc_ci")}


def make_sam(trainable: list[nn.Parameter], params: TrainConfig, optimizer: str) -> SAM:
    """SAM around ``optimizer`` (sgd or adamw) with the trial's settings."""
    base: dict[str, Any] = (
        {"base_optimizer": torch.optim.SGD, "momentum": params.momentum}
        if optimizer == "sgd"
        else {"base_optimizer": torch.optim.AdamW}
    )
    return SAM(
        trainable,
        base.pop("base_optimizer"),
        rho=params.rho,
        lr=params.lr,
        weight_decay=params.weight_decay,
        **base,
    )


def sam_step(
    model: nn.Module,
    optimizer: SAM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    precision: Precision,
    criterion: nn.Module | None = None,
) -> torch.Tensor:
    """One SAM step on one batch (two forward/backward passes); the first pass's loss.

    ``criterion``: the loss of both passes (None: plain cross-entropy). With an fp16
    scaler, a step whose first gradient overflowed is skipped whole (the weights stay, the
    scale is lowered); the second pass's overflow is the scaler's own skip.
    """
    if criterion is None:
        criterion = nn.CrossEntropyLoss()
    scaler = precision.scaler
    with precision.autocast():
        loss = criterion(model(inputs), targets)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler is not None and not _finite_grads(optimizer):
        optimizer.zero_grad(set_to_none=True)
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        return loss.detach()
    optimizer.first_step()  # the ascent g/||g|| is the same for a scaled gradient
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        second = criterion(model(inputs), targets)
    if scaler is None:
        second.backward()
        optimizer.second_step()
    else:
        scaler.scale(second).backward()
        optimizer.second_step(lambda: scaler.step(optimizer.base_optimizer))
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _finite_grads(optimizer: SAM) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all())


def _train_epoch(
    forward: nn.Module,
    loader: Iterable[Any],
    optimizer: SAM,
    precision: Precision,
    guard: DivergenceGuard,
    epoch: int,
    every: int = 1,
    criterion: nn.Module | None = None,
) -> float:
    """One epoch of SAM steps; the mean training loss. The losses are read ``every``
    batches at a time (the guard still names the first bad batch)."""
    forward.train()
    total, count = 0.0, 0
    device = precision.device
    losses: list[tuple[torch.Tensor, int]] = []

    def check(first_batch: int) -> None:
        nonlocal total, count
        values = torch.stack([loss for loss, _ in losses]).float().tolist()
        for offset, (value, (_, size)) in enumerate(zip(values, losses, strict=True)):
            guard.check(epoch, first_batch + offset, value)
            total += value * size
            count += size
        losses.clear()

    for batch, (inputs, targets) in enumerate(loader):
        inputs, targets = (
            precision.inputs(inputs.to(device, non_blocking=True)),
            targets.to(device, non_blocking=True),
        )
        loss = sam_step(forward, optimizer, inputs, targets, precision, criterion)
        losses.append((loss, len(targets)))
        if len(losses) == every:
            check(batch + 1 - every)
    if losses:
        check(batch + 1 - len(losses))
    return total / max(count, 1)


def _check_settings(params: TrainConfig, loss_weights: torch.Tensor | None) -> None:
    if not 0 <= params.swa_start < params.epochs:
        raise ValueError(
            f"swa_start must be in [0, epochs), but got swa_start={params.swa_start}, "
            f"epochs={params.epochs}"
        )
    if params.optimizer == "auto":
        raise ValueError(
            "train_fmfp needs a chosen optimizer, but got optimizer='auto'; "
            "resolve it first with tasks.training.auto.resolve_auto"
        )
    if params.class_weighted_loss and loss_weights is None:
        raise ValueError(
            "train_fmfp needs loss_weights with class_weighted_loss: true; compute them with "
            "tasks.training.loaders.Balance.loss_weights"
        )


def weighted_loss(weights: torch.Tensor | None, device: torch.device) -> nn.Module:
    """The training loss: cross-entropy, its classes weighted by ``weights`` (None: equal)."""
    return nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))


def _schedule(
    epoch: int,
    params: TrainConfig,
    model: nn.Module,
    swa_model: AveragedModel,
    swa_scheduler: SWALR,
    cosine: Any,
    loader: Iterable[Any],
    device: torch.device,
) -> nn.Module:
    """The end of an epoch's schedule: from ``swa_start`` the weights join the average
    (BatchNorm refreshed over ``loader``), before it the cosine steps. Returns the model
    that would be the result now."""
    if epoch >= params.swa_start:
        swa_model.update_parameters(model)
        swa_scheduler.step()
        update_bn(loader, swa_model, device=device)
        return swa_model
    cosine.step()
    return model


def _diverged_row(diverged: TrainingDiverged, optimizer: SAM) -> dict[str, float]:
    """The last row of a short run that diverged: a validation loss every candidate beats."""
    return {
        "epoch": float(diverged.epoch),
        "train_loss": diverged.loss,
        "lr": optimizer.param_groups[0]["lr"],
        "val_loss": math.inf,
    }


def train_fmfp(
    model: nn.Module,
    loader: Iterable[Any],
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    params: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    stop_after: int | None = None,
    loss_weights: torch.Tensor | None = None,
) -> TrainResult:
    """Train with FMFP and return the SWA model (BatchNorm refreshed) on the CPU.

    Nothing here draws from a global generator: the model's initial weights and noise,
    and the loader's order and augmentation, come from the trial's seed (``rng``,
    ``loaders``); SAM and SWA are deterministic.

    A loss that is not finite or explodes (``DivergenceGuard``) raises ``TrainingDiverged``
    at that batch. ``stop_after`` ends the run after that many epochs of the full schedule
    (a short run that compares settings; its model is not the result of a trial): there a
    divergence ends the run with a validation loss of inf instead, a comparison it loses.
    ``loss_weights``: per class, for the training loss (validation stays unweighted).
    """
    _check_settings(params, loss_weights)
    device = resolve_device(params.device)
    criterion = weighted_loss(loss_weights, device)
    model = model.to(device)
    precision = resolve_precision(params, device)
    forward = prepare(model, precision, params.compile)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_sam(trainable, params, params.optimizer)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer.base_optimizer, T_max=max(params.swa_start, 1), eta_min=params.eta_min
    )
    swa_model = AveragedModel(model)
    swa_scheduler = SWALR(optimizer.base_optimizer, swa_lr=params.swa_lr, anneal_epochs=1)
    started = time.perf_counter()
    history: list[dict[str, float]] = []
    epochs = params.epochs if stop_after is None else min(stop_after, params.epochs)
    early = EarlyStop(params.swa_start, params.early_stop_patience)
    stopped_early_at: int | None = None
    guard = DivergenceGuard(params, _batches(loader))
    every = 1 if device.type == "cpu" else GUARD_EVERY  # each read of a loss waits for a GPU
    for epoch in range(epochs):
        try:
            train_loss = _train_epoch(
                forward, loader, optimizer, precision, guard, epoch, every, criterion
            )
        except TrainingDiverged as diverged:
            if stop_after is None:
                raise
            history.append(_diverged_row(diverged, optimizer))
            break
        current = _schedule(epoch, params, model, swa_model, swa_scheduler, cosine, loader, device)
        # in training-sized batches: they fit, and a CPU's caches favour them over larger ones
        metrics = _validate(current, val_images, val_labels, device, loader_batch(loader, params))
        row = {
            "epoch": float(epoch),
            "train_loss": train_loss,
            "lr": optimizer.param_groups[0]["lr"],
        }
        row.update({f"val_{k}": v for k, v in metrics.items()})
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if early.done(epoch, row["val_augrc"]):
            stopped_early_at = epoch
            break
    result_model = copy.deepcopy(swa_model.module).cpu().eval()
    return TrainResult(
        model=result_model,
        history=history,
        metrics={k.removeprefix("val_"): v for k, v in history[-1].items() if k.startswith("val_")},
        seconds=time.perf_counter() - started,
        device=str(device),
        stopped_early_at=stopped_early_at,
    )
