"""`hailo`: the Hailo Dataflow Compiler (ONNX → HEF) for Hailo-8/8L/10/15 accelerators.

The DFC (`hailo_sdk_client`) is not on PyPI; it comes with Hailo's AI Software Suite and
is imported only when this compiler is used. The HEF carries the bundle's normalisation,
so on the device it takes the evaluation bundle's uint8 NHWC images unchanged.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tasks.compilers.base import (
    CalibrationSet,
    Compiler,
    CompilerError,
    CompilerUnavailableError,
    OnnxSignature,
)

SDK_MODULE = "hailo_sdk_client"
OPTIMIZATION_LEVELS = range(5)  # DFC model_optimization_flavor: 0..4
COMPRESSION_LEVELS = range(6)  # DFC model_optimization_flavor: 0..5

UNAVAILABLE_MESSAGE = (
    "compiler 'hailo' needs the Hailo Dataflow Compiler (hailo_sdk_client), which is not on "
    "PyPI: install the Hailo AI Software Suite (DFC 3.x for Hailo-8/8L, 5.x for Hailo-10/15) "
    "from the Hailo Developer Zone into this environment, or choose "
    "compile.backend: onnxruntime-int8"
)


class HailoCompiler(Compiler):
    """ClientRunner: translate → model script → optimize (INT8 calibration) → compile."""

    name: ClassVar[str] = "hailo"
    artifact_suffix: ClassVar[str] = ".hef"
    runtime: ClassVar[str] = "hailort"

    def __init__(
        self,
        hw_arch: str = "hailo8",
        optimization_level: int = 2,
        compression_level: int = 0,
        calibration_batch_size: int = 8,
        extra_model_script: str = "",
        max_calibration_samples: int | None = None,
    ) -> None:
        if not str(hw_arch).startswith("hailo"):
            raise ValueError(
                f"hailo hw_arch={hw_arch!r} is not a Hailo architecture; use e.g. hailo8, "
                "hailo8l, hailo10h or hailo15h"
            )
        _check_range("optimization_level", optimization_level, OPTIMIZATION_LEVELS)
        _check_range("compression_level", compression_level, COMPRESSION_LEVELS)
        if calibration_batch_size < 1:
            raise ValueError(
                f"hailo calibration_batch_size={calibration_batch_size}; use 1 or more"
            )
        if max_calibration_samples is not None and max_calibration_samples < 1:
            raise ValueError(
                f"hailo max_calibration_samples={max_calibration_samples}; use a positive "
                "number or None for all calibration images"
            )
        self.hw_arch = str(hw_arch)
        self.optimization_level = int(optimization_level)
        self.compression_level = int(compression_level)
        self.calibration_batch_size = int(calibration_batch_size)
        self.extra_model_script = extra_model_script
        self.max_calibration_samples = max_calibration_samples

    @classmethod
    def check_available(cls) -> None:
        """The DFC must import; the message says where to get it."""
        try:
            importlib.import_module(SDK_MODULE)
        except ImportError as exc:
            raise CompilerUnavailableError(UNAVAILABLE_MESSAGE) from exc

    def options(self) -> dict[str, Any]:
        return {
            "hw_arch": self.hw_arch,
            "optimization_level": self.optimization_level,
            "compression_level": self.compression_level,
            "calibration_batch_size": self.calibration_batch_size,
            "extra_model_script": self.extra_model_script,
            "max_calibration_samples": self.max_calibration_samples,
        }

    def model_script(self, calibration: CalibrationSet) -> str:
        """Normalisation inside the HEF (uint8 in) + optimisation flavour + user lines."""
        lines = [
            f"normalization1 = normalization({_floats(calibration.mean)}, "
            f"{_floats(calibration.std)})",
            f"model_optimization_flavor(optimization_level={self.optimization_level}, "
            f"compression_level={self.compression_level}, "
            f"batch_size={self.calibration_batch_size})",
        ]
        extra = self.extra_model_script.strip()
        return "\n".join([*lines, extra] if extra else lines) + "\n"

    def _build(
        self,
        signature: OnnxSignature,
        calibration: CalibrationSet,
        output: Path,
        log: logging.Logger,
    ) -> dict[str, Any]:
        sdk = importlib.import_module(SDK_MODULE)
        hw = signature.height_width
        if hw is None:
            raise CompilerError(
                f"{signature.path.name} input {signature.input_name!r} has shape "
                f"{signature.input_shape}; the Hailo compiler needs a fixed H and W: export "
                "the classifier with a fixed image size (only the batch dim may be dynamic)"
            )
        net_name = _net_name(signature.path)
        script = self.model_script(calibration)
        calib = calibration.images.astype(np.float32)  # NHWC 0..255; normalisation in HEF
        runner = sdk.ClientRunner(hw_arch=self.hw_arch)
        log.info("translate_onnx_model %s as %r", signature.path, net_name)
        runner.translate_onnx_model(
            str(signature.path),
            net_name,
            start_node_names=[signature.input_name],
            end_node_names=[signature.output_node],
            net_input_shapes={signature.input_name: [1, 3, hw[0], hw[1]]},
        )
        log.info("model script:\n%s", script)
        runner.load_model_script(script)
        runner.optimize_full_precision()
        log.info("optimize with calibration %s %s", calib.shape, calib.dtype)
        runner.optimize(calib)
        log.info("compile for %s", self.hw_arch)
        hef = runner.compile()
        if not isinstance(hef, bytes | bytearray) or not hef:
            raise CompilerError(
                f"ClientRunner.compile() returned {type(hef).__name__} instead of HEF bytes; "
                "check the Dataflow Compiler version (DFC 3.x / 5.x)"
            )
        output.write_bytes(bytes(hef))
        return {
            "hw_arch": self.hw_arch,
            "net_name": net_name,
            "end_node": signature.output_node,
            "model_script": script,
            "normalization": {
                "mean": calibration.mean.tolist(),
                "std": calibration.std.tolist(),
            },
            "input_format": "uint8 NHWC",
            "sdk_version": getattr(sdk, "__version__", None),
        }


def _floats(values: np.ndarray) -> str:
    """`[123.675, 116.28, 103.53]`: the shortest decimals that round-trip each float32."""
    return "[" + ", ".join(np.format_float_positional(v, trim="0") for v in values) + "]"


def _net_name(onnx_path: Path) -> str:
    """DFC network names must be identifiers."""
    stem = onnx_path.name.removesuffix(".onnx")
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem)
    return name if name and not name[0].isdigit() else f"net_{name}"


def _check_range(option: str, value: int, allowed: range) -> None:
    if value not in allowed:
        raise ValueError(
            f"hailo {option}={value} is out of range; use {allowed.start}..{allowed.stop - 1}"
        )
