"""`onnxruntime-int8`: static QDQ INT8 quantization that runs on any CPU.

It stands in for an accelerator's INT8 compile where no accelerator toolchain exists:
not faster on these CPUs, but it shrinks confidences the way a device compile does, which
is what a device-measured selection metric has to see.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tasks.compilers.base import (
    CalibrationSet,
    Compiler,
    CompilerError,
    CompilerUnavailableError,
    OnnxSignature,
    normalise_nchw,
)

CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("quint8", "qint8", "quint16", "qint16")
DYNAMIC_BATCH = 16
#: ``redirect_stdout`` swaps the process-wide ``sys.stdout``: two compilations in two
#: threads (the study compiles trials in parallel) would restore each other's buffer and
#: leave stdout pointing at one of them, so the redirections take turns.
_STDOUT_SWAP = threading.Lock()

_INSTALL_HINT = (
    "compiler 'onnxruntime-int8' needs onnxruntime and onnx: "
    "pip install 'onnxruntime>=1.32,<1.33' 'onnx>=1.23,<1.24' (both are edgetune dependencies; "
    "reinstall edgetune into this environment)"
)


class OnnxRuntimeInt8Compiler(Compiler):
    """Per-channel static INT8 (QDQ) with onnxruntime.quantization; signed INT8 weights."""

    name: ClassVar[str] = "onnxruntime-int8"
    artifact_suffix: ClassVar[str] = ".int8.onnx"
    runtime: ClassVar[str] = "onnxruntime"

    def __init__(
        self,
        per_channel: bool = True,
        calibrate_method: str = "minmax",
        activation_type: str = "quint8",
        max_calibration_samples: int | None = None,
        float_tail: bool = False,
    ) -> None:
        self.per_channel = bool(per_channel)
        self.float_tail = bool(float_tail)
        self.calibrate_method = _choice("calibrate_method", calibrate_method, CALIBRATE_METHODS)
        self.activation_type = _choice("activation_type", activation_type, ACTIVATION_TYPES)
        if max_calibration_samples is not None and max_calibration_samples < 1:
            raise ValueError(
                f"max_calibration_samples={max_calibration_samples}; use a positive number "
                "or None for all calibration images"
            )
        self.max_calibration_samples = max_calibration_samples

    @classmethod
    def check_available(cls) -> None:
        """onnx and onnxruntime.quantization must import."""
        try:
            # onnx and ONNX Runtime load only where a model is compiled.
            import onnx  # noqa: F401
            import onnxruntime.quantization  # noqa: F401
        except ImportError as exc:
            raise CompilerUnavailableError(f"{_INSTALL_HINT} ({exc})") from exc

    def options(self) -> dict[str, Any]:
        return {
            "per_channel": self.per_channel,
            "calibrate_method": self.calibrate_method,
            "activation_type": self.activation_type,
            "weight_type": "qint8",
            "max_calibration_samples": self.max_calibration_samples,
            "float_tail": self.float_tail,
        }

    def _build(
        self,
        signature: OnnxSignature,
        calibration: CalibrationSet,
        output: Path,
        log: logging.Logger,
    ) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=".ort-quant-", dir=output.parent) as tmp:
            model = _preprocess(signature.path, Path(tmp) / "preprocessed.onnx", log)
            batch, fixed = _calibration_batch(signature)
            log.info(
                "quantize_static: QDQ, per_channel=%s, calibrate=%s, activations=%s, "
                "weights=qint8, calibration batch %d",
                self.per_channel,
                self.calibrate_method,
                self.activation_type,
                batch,
            )
            reader = NpzCalibrationReader(signature.input_name, calibration, batch, fixed)
            excluded = tail_nodes(model) if self.float_tail else []
            if excluded:
                log.info(
                    "kept in float (after the last Conv): %d nodes %s", len(excluded), excluded
                )
            printed = io.StringIO()  # the Entropy/Percentile calibrators print() progress
            with _STDOUT_SWAP, contextlib.redirect_stdout(printed):
                self._quantize(model, output, reader, excluded)
            if printed.getvalue().strip():
                log.info("onnxruntime printed:\n%s", printed.getvalue().rstrip())
        counts = _check_quantized(output)
        log.info("onnx.checker passed; QDQ nodes %s", counts)
        return {
            "quantize_linear_nodes": counts["QuantizeLinear"],
            "dequantize_linear_nodes": counts["DequantizeLinear"],
        }

    def _quantize(
        self, model: Path, output: Path, reader: NpzCalibrationReader, excluded: list[str]
    ) -> None:
        """Static QDQ quantization with signed INT8 weights; `excluded` nodes stay float."""
        # onnx and ONNX Runtime load only where a model is compiled.
        from onnxruntime.quantization import QuantFormat, quantize_static

        quantize_static(
            model_input=str(model),
            model_output=str(output),
            calibration_data_reader=reader,
            quant_format=QuantFormat.QDQ,
            per_channel=self.per_channel,
            activation_type=_quant_type(self.activation_type),
            weight_type=_quant_type("qint8"),
            calibrate_method=_calibration_method(self.calibrate_method),
            nodes_to_exclude=excluded or None,
        )


def tail_nodes(model: Path) -> list[str]:
    """Names of the nodes downstream of the last convolutions that feed no convolution.

    In a detector these decode boxes and class scores and join them into one output:
    quantizing that join to 8 bits with a single scale (box pixels in the hundreds beside
    scores in 0..1) rounds every score to zero, so they stay in float.
    """
    # onnx and ONNX Runtime load only where a model is compiled.
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_conv: dict[int, bool] = {}

    def reaches_conv(node: Any) -> bool:
        key = id(node)
        if key not in feeds_conv:
            feeds_conv[key] = False  # cycles cannot occur in ONNX; this guards recursion
            feeds_conv[key] = any(
                nxt.op_type == "Conv" or reaches_conv(nxt)
                for out in node.output
                for nxt in consumers.get(out, [])
            )
        return feeds_conv[key]

    return [
        node.name
        for node in graph.node
        if node.name and node.op_type != "Conv" and not reaches_conv(node)
    ]


class NpzCalibrationReader:
    """onnxruntime CalibrationDataReader over a calibration set, normalised like the device.

    onnxruntime's CalibrationDataReader recognises any class with `get_next` as a subclass
    (its __subclasshook__), so this module imports without onnxruntime installed.
    """

    def __init__(
        self,
        input_name: str,
        calibration: CalibrationSet,
        batch_size: int,
        fixed_batch: bool = False,
    ) -> None:
        self.input_name = input_name
        self.calibration = calibration
        self.batch_size = batch_size
        self.fixed_batch = fixed_batch
        self._batches = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        images = self.calibration.images
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            if self.fixed_batch and len(chunk) < self.batch_size:
                chunk = _pad(chunk, self.batch_size)
            cal = self.calibration
            yield {self.input_name: normalise_nchw(chunk, cal.mean, cal.std)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._iterate()


def _pad(chunk: np.ndarray, size: int) -> np.ndarray:
    """Repeat the last image so a fixed-batch model gets a full batch."""
    extra = np.repeat(chunk[-1:], size - len(chunk), axis=0)
    return np.concatenate([chunk, extra], axis=0)


def _calibration_batch(signature: OnnxSignature) -> tuple[int, bool]:
    """(batch size, fixed?): a fixed batch dim must be honoured, a dynamic one gets 16."""
    batch = signature.input_shape[0]
    if isinstance(batch, int) and batch > 0:
        return batch, True
    return DYNAMIC_BATCH, False


def _preprocess(model: Path, out: Path, log: logging.Logger) -> Path:
    """Shape inference + graph cleanup recommended before quantization; optional."""
    # onnx and ONNX Runtime load only where a model is compiled.
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(model), str(out))
    except Exception as exc:  # a failed pre-process only costs quantization quality
        log.warning(
            "quant_pre_process failed (%s: %s); quantizing the original model",
            type(exc).__name__,
            exc,
        )
        return model
    log.info("quant_pre_process: shape inference and optimisation done")
    return out


def _check_quantized(path: Path) -> dict[str, int]:
    """onnx.checker must accept the result and it must contain QDQ pairs."""
    # onnx and ONNX Runtime load only where a model is compiled.
    import onnx

    onnx.checker.check_model(str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    counts = {op: ops.count(op) for op in ("QuantizeLinear", "DequantizeLinear")}
    if counts["QuantizeLinear"] == 0:
        raise CompilerError(
            f"quantized model {path} has no QuantizeLinear nodes: onnxruntime found nothing "
            "to quantize; check that the model uses Conv/Gemm/MatMul operators"
        )
    return counts


def _quant_type(name: str) -> Any:
    # onnx and ONNX Runtime load only where a model is compiled.
    from onnxruntime.quantization import QuantType

    return {
        "quint8": QuantType.QUInt8,
        "qint8": QuantType.QInt8,
        "quint16": QuantType.QUInt16,
        "qint16": QuantType.QInt16,
    }[name]


def _calibration_method(name: str) -> Any:
    # onnx and ONNX Runtime load only where a model is compiled.
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    """Case-insensitive option check with the allowed values in the error."""
    normalised = str(value).lower()
    if normalised not in allowed:
        raise ValueError(
            f"onnxruntime-int8 {option}={value!r} is not supported; use one of {list(allowed)}"
        )
    return normalised
