"""Stand-ins for what the compiler and device tests cannot have here.

- `fake_hailo`: FAKE Hailo Dataflow Compiler and HailoRT modules (see its docstring).
- this module: a tiny untrained classifier exported to ONNX, and synthetic evaluation
  bundles / calibration sets in the project's npz format.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
IMAGE_SIZE = 16
NUM_CLASSES = 3
CLASSES = np.array(["broken", "healthy", "flashover"])


def tiny_classifier(seed: int = 0) -> Any:
    """conv → relu → adaptive avg pool → linear, 3 classes, input 3×16×16, eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    head = nn.Linear(8, NUM_CLASSES)
    with torch.no_grad():  # spread the logits so argmax is not decided by rounding noise
        head.weight.mul_(4.0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        head,
    )
    return model.eval()


def export_onnx(model: Any, path: Path, dynamic_batch: bool = True) -> Path:
    """Single-file ONNX with one input `input` and one output `logits` (opset 17)."""
    import torch

    x = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=axes,
        )
    return path


def synthetic_images(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """uint8 RGB images with per-image colour and gradient (varied, not pure noise)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(20, 235, size=(n, 1, 1, 3))
    ramp = np.linspace(-1.0, 1.0, size)[None, :, None, None] * rng.uniform(-60, 60, (n, 1, 1, 3))
    noise = rng.normal(0, 12, size=(n, size, size, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


def write_bundle(
    path: Path,
    n: int,
    size: int = IMAGE_SIZE,
    seed: int = 0,
    classes: np.ndarray = CLASSES,
) -> Path:
    """An evaluation bundle / calibration set in the project's npz format."""
    rng = np.random.default_rng(seed + 1)
    np.savez(
        path,
        images=synthetic_images(n, size, seed),
        labels=rng.integers(0, len(classes), size=n).astype(np.int64),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        classes=classes,
    )
    return path


def normalise_nchw(images: np.ndarray) -> np.ndarray:
    """The float model's input for uint8 NHWC images (ImageNet normalisation)."""
    x = (images.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def torch_logits(model: Any, images: np.ndarray) -> np.ndarray:
    """Float reference logits of `model` for uint8 NHWC images."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(normalise_nchw(images))).numpy().astype(np.float64)
