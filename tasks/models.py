"""A registry of classifier architectures and one factory, ``create_model``.

Weights come only from a local file (an ImageNet checkpoint or one of the user's own);
nothing is downloaded. The classification head is replaced to fit the dataset's classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelError(ValueError):
    """A model that cannot be built as asked; the message names the fix."""


class TinyCNN(nn.Module):
    """Three conv blocks and a linear head: a fast model for examples, tests and CPU runs."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(3, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@dataclass(frozen=True)
class Architecture:
    build: Callable[[], nn.Module]
    #: dotted attribute path of the final classification layer (a ``nn.Linear``)
    head: str


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        # torchvision loads only for its architectures.
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


ARCHITECTURES: dict[str, Architecture] = {
    "tinycnn": Architecture(TinyCNN, "head"),
    "resnet18": Architecture(_torchvision("resnet18"), "fc"),
    "resnet34": Architecture(_torchvision("resnet34"), "fc"),
    "resnet50": Architecture(_torchvision("resnet50"), "fc"),
    "mobilenet_v2": Architecture(_torchvision("mobilenet_v2"), "classifier.1"),
    "mobilenet_v3_small": Architecture(_torchvision("mobilenet_v3_small"), "classifier.3"),
    "mobilenet_v3_large": Architecture(_torchvision("mobilenet_v3_large"), "classifier.3"),
    "efficientnet_b0": Architecture(_torchvision("efficientnet_b0"), "classifier.1"),
    "efficientnet_b1": Architecture(_torchvision("efficientnet_b1"), "classifier.1"),
    "efficientnet_b2": Architecture(_torchvision("efficientnet_b2"), "classifier.1"),
    "efficientnet_b3": Architecture(_torchvision("efficientnet_b3"), "classifier.1"),
}


SAVE_HINT = "save one with torch.save(model.state_dict(), path)"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file {path} not found; give a local .pt/.pth file or none")
    if path.suffix.lower() == ".onnx":
        raise ModelError(
            f"weights file {path} is an ONNX model, but weights must be a torch state_dict "
            f"(.pt/.pth) of model.arch; {SAVE_HINT}"
        )
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file, over many lines
        raise ModelError(
            f"weights file {path} is not a torch checkpoint of tensors "
            f"({type(exc).__name__}); give a state_dict of model.arch: {SAVE_HINT}"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} holds no state_dict of tensors; {SAVE_HINT}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_backbone(model: nn.Module, head: str, path: Path) -> None:
    """Load everything but a head whose shape differs (an ImageNet head on a 2-class task)."""
    state = _read_state_dict(path)
    own = model.state_dict()
    skipped = [
        k
        for k, v in state.items()
        if k.startswith(f"{head}.") and k in own and v.shape != own[k].shape
    ]
    for key in skipped:
        state.pop(key)
    wrong_shape = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong_shape:
        raise ModelError(
            f"weights file {path} does not fit this architecture: {len(wrong_shape)} tensors "
            f"have another shape (e.g. {wrong_shape[0]}); use weights saved from the same "
            f"model.arch"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(f"{head}.")]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"weights file {path} does not fit this architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]}); "
            f"use weights saved from the same model.arch"
        )


def create_model(
    arch: str,
    num_classes: int,
    *,
    weights: str | Path | None = None,
    finetune: str = "full",
) -> nn.Module:
    """Build ``arch`` with a ``num_classes`` head; ``finetune='head'`` freezes the backbone."""
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}"
        )
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, but got {num_classes}")
    if finetune not in ("full", "head"):
        raise ModelError(f"finetune must be 'full' or 'head', but got {finetune!r}")
    spec = ARCHITECTURES[arch]
    model = spec.build()
    old = model.get_submodule(spec.head)
    if not isinstance(old, nn.Linear):
        raise ModelError(
            f"{arch}: expected a Linear head at {spec.head}, found {type(old).__name__}"
        )
    if old.out_features != num_classes:
        model.set_submodule(spec.head, nn.Linear(old.in_features, num_classes))
    if weights is not None:
        # After the head swap: a checkpoint of this task keeps its head, an ImageNet one does not.
        _load_backbone(model, spec.head, Path(weights))
    if finetune == "head":
        head_params = {id(p) for p in model.get_submodule(spec.head).parameters()}
        for param in model.parameters():
            param.requires_grad = id(param) in head_params
    return model
