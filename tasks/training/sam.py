"""Sharpness-Aware Minimisation (Foret et al., ICLR 2021) around any base optimizer.

Each step takes two forward/backward passes: one at the weights, one at the worst-case
neighbour ``w + rho * g / ||g||``; the base optimizer then steps with the second gradient
from the original weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class SAM(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if rho <= 0:
            raise ValueError(f"rho must be > 0, but got {rho}")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        # Share the groups so schedulers that change lr on SAM reach the base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self) -> None:
        """Move to the worst-case neighbour and remember the way back."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def second_step(self, step: Callable[[], Any] | None = None) -> None:
        """Return to the weights and step with the neighbour's gradient (through ``step``
        when given: a gradient scaler's step of the base optimizer)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or "e_w" not in self.state[p]:
                    continue
                p.sub_(self.state[p].pop("e_w"))
        if step is None:
            self.base_optimizer.step()
        else:
            step()

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is None:
            raise RuntimeError(
                "SAM.step needs a closure that recomputes the loss; or call first_step/second_step"
            )
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()

    def _grad_norm(self) -> torch.Tensor:
        device = self.param_groups[0]["params"][0].device
        norms = [
            p.grad.norm(p=2).to(device)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            return torch.zeros((), device=device)
        return torch.norm(torch.stack(norms), p=2)
