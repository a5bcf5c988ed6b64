"""Checkpoint → one ONNX file, checked by the ONNX checker and against PyTorch.

The exported graph takes NCHW float32 at the config's input size (dynamic batch) and
returns logits; the device-side evaluator applies the softmax.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


#: torch.onnx.export keeps process-global state: trials exporting from parallel threads
#: (the embedded mode) must take turns.
_EXPORT_LOCK = threading.Lock()


class ExportError(RuntimeError):
    """The exported model is invalid or disagrees with PyTorch."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    opset: int


def export_onnx(
    model: nn.Module,
    out_path: Path,
    image_size: int,
    *,
    opset: int = 17,
) -> Path:
    """Write a single-file ONNX model (no external data) and run the ONNX checker on it."""
    # onnx and ONNX Runtime load only where a model is exported.
    import onnx

    model = model.cpu().eval()
    example = torch.zeros(1, 3, image_size, image_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_suffix(".partial.onnx")
    with _EXPORT_LOCK, warnings.catch_warnings():
        # The TorchScript exporter writes one file at any opset; it warns that it is legacy.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(partial),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    try:
        onnx.checker.check_model(str(partial), full_check=True)
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise ExportError(f"exported ONNX model fails the ONNX checker: {exc}") from None
    partial.replace(out_path)
    return out_path


def onnx_parity(model: nn.Module, onnx_path: Path, batch: np.ndarray) -> float:
    """Largest |ONNX Runtime − PyTorch| logit difference on ``batch`` (NCHW float32)."""
    # onnx and ONNX Runtime load only where a model is exported.
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0].shape
    if len(declared) != 4 or any(
        isinstance(d, int) and d != s for d, s in zip(declared[1:], batch.shape[1:], strict=True)
    ):
        raise ExportError(
            f"{onnx_path} expects input shape {declared}, but the data is {list(batch.shape)}; "
            f"export with data.image_size={batch.shape[-1]}"
        )
    (onnx_out,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.astype(np.float32)})
    with torch.no_grad():
        torch_out = model.cpu().eval()(torch.from_numpy(batch.astype(np.float32))).numpy()
    return float(np.max(np.abs(onnx_out - torch_out)))


def export_checked(
    model: nn.Module,
    out_path: Path,
    image_size: int,
    batch: np.ndarray,
    *,
    opset: int = 17,
    atol: float = 1e-3,
) -> ExportResult:
    """Export, then refuse the file unless ONNX Runtime reproduces PyTorch within ``atol``."""
    path = export_onnx(model, out_path, image_size, opset=opset)
    diff = onnx_parity(model, path, batch)
    if not diff <= atol:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree by {diff:.3g} (> export.parity_atol={atol}); "
            f"the model has an op the exporter handles differently"
        )
    return ExportResult(path=path, max_abs_diff=diff, opset=opset)
