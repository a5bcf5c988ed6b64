"""The trial's generators in torch: initial weights, in-model noise, one per use.

Weights are drawn by the layers' own initialisers (``torch.nn.init``), which read torch's
global CPU generator unless given one. While a model is built, those initialisers are
given the trial's ``init`` generator when they are called from the building thread (a
thread-local choice: other threads keep theirs), so two trials built at once in threads
of one process, or beside code that draws from the global generator, get their own
weights. Dropout and stochastic depth, which
would draw from the global generator at every step, are replaced by modules that draw
from the trial's own ``noise`` generator (they are the identity at evaluation, so the
exported graph is unchanged).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from tasks.seeding import derive

_INIT_LOCK = threading.Lock()
#: The initialisers of ``torch.nn.init`` that draw random numbers (all take ``generator``).
_RANDOM_INITS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)
_building = threading.local()


def generator(seed: int, purpose: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator for one use of the trial seed ``seed``."""
    return torch.Generator(device=device).manual_seed(derive(seed, purpose))


def _given_generator(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init(*args: Any, **kwargs: Any) -> Any:
        trial = getattr(_building, "generator", None)
        if trial is not None and kwargs.get("generator") is None:
            kwargs["generator"] = trial
        return original(*args, **kwargs)

    return init


@contextmanager
def _initialisers_draw_from(g: torch.Generator) -> Iterator[None]:
    """``torch.nn.init``'s random initialisers draw from ``g`` in this thread, meanwhile."""
    originals = {name: getattr(nn.init, name) for name in _RANDOM_INITS}
    for name, original in originals.items():
        setattr(nn.init, name, _given_generator(original))
    _building.generator = g
    try:
        yield
    finally:
        _building.generator = None
        for name, original in originals.items():
            setattr(nn.init, name, original)


def build_model(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()``'s model with weights drawn from the trial's ``init`` seed, its noise owned.

    The lock keeps builds from swapping the initialisers under each other; a draw that
    bypasses ``torch.nn.init`` would still read the global generator, which is set to the
    same seed meanwhile (and restored), so it stays reproducible when nothing else draws.
    """
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive(seed, "init"))
        with _initialisers_draw_from(generator(seed, "init")):
            model = make()
    own_noise(model, seed)
    return model


class _Draws:
    """The trial's noise generators, one per device; shared, not copied, by the model's
    copies (the SWA average, the exported model), so all draw from one sequence."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._by_device: dict[str, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._by_device:
            self._by_device[key] = generator(self.seed, "noise", device)
        return self._by_device[key]

    def __deepcopy__(self, memo: dict[int, Any]) -> _Draws:
        return self


class TrialDropout(nn.Module):
    """Element-wise dropout drawing its mask from the trial's generator."""

    def __init__(self, p: float, draws: _Draws) -> None:
        super().__init__()
        self.p = p
        self.draws = draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty_like(x).bernoulli_(keep, generator=self.draws.on(x.device))
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TrialStochasticDepth(nn.Module):
    """Stochastic depth (per sample or per batch) drawing from the trial's generator."""

    def __init__(self, p: float, mode: str, draws: _Draws) -> None:
        super().__init__()
        self.p = p
        self.mode = mode
        self.draws = draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(shape, dtype=x.dtype, device=x.device)
        noise.bernoulli_(keep, generator=self.draws.on(x.device))
        return x * noise / keep if keep > 0 else x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def _replacement(module: nn.Module, draws: _Draws) -> nn.Module | None:
    if type(module) is nn.Dropout:
        return TrialDropout(module.p, draws)
    if isinstance(module, StochasticDepth):
        return TrialStochasticDepth(module.p, module.mode, draws)
    if isinstance(module, nn.modules.dropout._DropoutNd):
        raise TypeError(
            f"{type(module).__name__} draws from torch's global generator and has no per-trial "
            f"replacement; use nn.Dropout or no dropout in the model"
        )
    return None


def own_noise(model: nn.Module, seed: int) -> nn.Module:
    """Replace ``model``'s dropout and stochastic depth by the trial's own (in place)."""
    draws = _Draws(seed)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = _replacement(child, draws)
            if new is not None:
                setattr(module, name, new)
    return model


def epoch_order(size: int, g: torch.Generator, weights: torch.Tensor | None) -> torch.Tensor:
    """One epoch's image indices, drawn from ``g``: a permutation of ``size`` images
    (``weights`` None), else ``size`` draws with replacement, image ``i`` with probability
    ``weights[i]`` over their sum."""
    if weights is None:
        return torch.randperm(size, generator=g)
    return torch.multinomial(weights, size, replacement=True, generator=g)
