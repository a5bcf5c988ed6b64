"""Compilers: exported ONNX classifier + calibration set → device artifact.

`create_compiler(name, **options)` is the factory the compile stage uses; `COMPILERS` maps
the config's `compile.backend` names to implementations.
"""

from __future__ import annotations

from typing import Any

from tasks.compilers.base import (
    CompiledArtifact,
    Compiler,
    CompilerError,
    CompilerUnavailableError,
    InvalidCalibrationError,
)
from tasks.compilers.hailo import HailoCompiler
from tasks.compilers.onnxruntime_int8 import OnnxRuntimeInt8Compiler

COMPILERS: dict[str, type[Compiler]] = {
    OnnxRuntimeInt8Compiler.name: OnnxRuntimeInt8Compiler,
    HailoCompiler.name: HailoCompiler,
}


def create_compiler(name: str, **options: Any) -> Compiler:
    """Build the compiler registered as `name` with its options."""
    try:
        cls = COMPILERS[name]
    except KeyError:
        raise ValueError(
            f"unknown compiler {name!r}; known compilers: {sorted(COMPILERS)} "
            "(set compile.backend to one of them)"
        ) from None
    return cls(**options)


def available_compilers() -> list[str]:
    """Names of the compilers whose toolchain is installed in this environment."""
    available = []
    for name, cls in sorted(COMPILERS.items()):
        try:
            cls.check_available()
        except CompilerUnavailableError:
            continue
        available.append(name)
    return available


__all__ = [
    "COMPILERS",
    "CompiledArtifact",
    "Compiler",
    "CompilerError",
    "CompilerUnavailableError",
    "HailoCompiler",
    "InvalidCalibrationError",
    "OnnxRuntimeInt8Compiler",
    "available_compilers",
    "create_compiler",
]
