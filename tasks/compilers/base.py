"""The compiler seam: ONNX + calibration data → an artifact a device runtime can load.

Every compiler shares one template (`Compiler.compile`): check the toolchain, read the
ONNX signature, load and check the calibration set, build into a temporary file while
capturing the toolchain's logging into ``compile.log``, then rename. Implementations only
write `Compiler._build`, so the guarantees of the contract hold for all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tasks.failures import DeterministicFailure

LOG_NAME = "compile.log"
LOG_TAIL_LINES = 40

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledArtifact:
    """What a compile produced; `runtime` tells the device evaluator how to load it."""

    path: Path
    runtime: str  # "onnxruntime" | "hailort"
    backend: str  # the compiler's registry name
    log_path: Path | None
    seconds: float
    size_bytes: int
    metadata: dict[str, Any]


class CompilerError(RuntimeError):
    """A compile failed; the message ends with the tail of the compiler log."""


class CompilerUnavailableError(RuntimeError):
    """The toolchain a compiler needs is not installed; the message says what to install."""


class InvalidCalibrationError(CompilerError, ValueError, DeterministicFailure):
    """The calibration set does not fit the model (a ValueError too: it is bad input).

    A DeterministicFailure too: the study's one calibration set is refused the same way on
    every attempt, so the study does not retry the trial.
    """


@dataclass(frozen=True)
class OnnxSignature:
    """The one input and one output the project's exported classifiers have."""

    path: Path
    input_name: str
    input_shape: list[int | str | None]  # NCHW; str/None for symbolic or unknown dims
    output_name: str
    output_node: str  # name of the node producing the output (its tensor name if unnamed)
    opset: int

    @property
    def height_width(self) -> tuple[int, int] | None:
        """Fixed (H, W) of the input, or None when either dim is symbolic."""
        h, w = self.input_shape[2], self.input_shape[3]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration images as shipped (uint8 NHWC RGB) with the normalisation to apply."""

    path: Path
    images: np.ndarray  # uint8 (N, H, W, 3)
    mean: np.ndarray  # float32 (3,), 0..255 pixel scale
    std: np.ndarray  # float32 (3,), 0..255 pixel scale

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def nchw_float32(self) -> np.ndarray:
        """The float model's input: (images - mean) / std as NCHW float32."""
        return normalise_nchw(self.images, self.mean, self.std)


def normalise_nchw(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 NHWC → normalised float32 NCHW, exactly as the device evaluator does it."""
    x = (images.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def read_onnx_signature(onnx_path: Path) -> OnnxSignature:
    """Read input/output names and shapes without loading external weight data."""
    # onnx loads only where a model is read (not at start-up).
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise CompilerError(
            f"{onnx_path} has inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in graph.output]}; compilers expect exactly one NCHW image input "
            "and one logits output: export the classifier with a single input and output"
        )
    shape = _dims(inputs[0])
    channels = shape[1] if len(shape) == 4 else None
    if len(shape) != 4 or (isinstance(channels, int) and channels != 3):
        raise CompilerError(
            f"{onnx_path} input {inputs[0].name!r} has shape {shape}; expected NCHW with 3 "
            "channels (N, 3, H, W): export the classifier with an RGB NCHW input"
        )
    output = graph.output[0].name
    producer = next((n for n in graph.node if output in n.output), None)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxSignature(
        path=onnx_path,
        input_name=inputs[0].name,
        input_shape=shape,
        output_name=output,
        output_node=producer.name if producer is not None and producer.name else output,
        opset=int(opset),
    )


def _dims(value_info: Any) -> list[int | str | None]:
    """ONNX tensor dims as ints, symbolic names, or None."""
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def load_calibration(path: Path, max_samples: int | None = None) -> CalibrationSet:
    """Load and check a calibration npz; keep `max_samples` evenly spaced images if set."""
    path = Path(path)
    if not path.is_file():
        raise InvalidCalibrationError(
            f"calibration set {path} does not exist: build it with the data stage first"
        )
    with np.load(path, allow_pickle=False) as data:
        missing = {"images", "mean", "std"} - set(data.files)
        if missing:
            raise InvalidCalibrationError(
                f"calibration set {path} lacks {sorted(missing)} (has {sorted(data.files)}); "
                "it must hold uint8 `images` (N,H,W,3) and float32 `mean`/`std` (3,)"
            )
        images, mean, std = data["images"], data["mean"], data["std"]
    _check_calibration_arrays(path, images, mean, std)
    if max_samples is not None and len(images) > max_samples:
        keep = np.linspace(0, len(images) - 1, num=max_samples).round().astype(np.int64)
        images = images[keep]
    return CalibrationSet(
        path=path,
        images=np.ascontiguousarray(images),
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
    )


def _check_calibration_arrays(
    path: Path, images: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> None:
    """Refuse calibration data the device evaluator would not accept either."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidCalibrationError(
            f"calibration images in {path} are {images.dtype} {images.shape}; expected uint8 "
            "(N, H, W, 3) RGB: rebuild the calibration set with the data stage"
        )
    if images.shape[0] == 0:
        raise InvalidCalibrationError(f"calibration set {path} holds no images")
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise InvalidCalibrationError(
            f"calibration set {path} has mean {mean.tolist()} and std {std.tolist()}; expected "
            "3 values each in 0..255 pixel scale with std > 0"
        )


def check_calibration_fits(signature: OnnxSignature, calibration: CalibrationSet) -> None:
    """The calibration images must already have the model's input size."""
    expected = signature.height_width
    got = tuple(calibration.images.shape[1:3])
    if expected is not None and got != expected:
        raise InvalidCalibrationError(
            f"calibration images in {calibration.path} are {got[0]}x{got[1]} but "
            f"{signature.path.name} input {signature.input_name!r} {signature.input_shape} "
            f"expects {expected[0]}x{expected[1]}: rebuild the calibration set at the model "
            "input size (data.image_size)"
        )


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """Last lines of a log file, for error messages."""
    if path is None or not path.is_file():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


@contextlib.contextmanager
def capture_logging(log_path: Path) -> Iterator[logging.Logger]:
    """Send this compile's logging, and the toolchain's, to `log_path` while compiling.

    Our own records go to a private logger that does not reach the console. The toolchain
    logs through its own loggers, so a root handler collects them too, filtered to the
    compiling thread: two compiles in one process never mix their logs.
    """
    handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    log = logging.getLogger(f"{__name__}.{log_path.parent.name}.{thread}")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield log
    finally:
        root.removeHandler(handler)
        log.removeHandler(handler)
        handler.close()
        logging.Logger.manager.loggerDict.pop(log.name, None)


class Compiler(ABC):
    """Contract: turn an exported ONNX classifier into an artifact for one runtime.

    - `check_available()` raises `CompilerUnavailableError` (what to install, where) when
      the toolchain is missing; `compile` calls it first.
    - `compile(onnx_path, calibration, out_dir)` writes ``<stem><artifact_suffix>`` and
      ``compile.log`` into `out_dir` and returns a `CompiledArtifact`. The artifact is
      written under a temporary name and renamed at the end: a failed compile leaves no
      artifact. Bad calibration data raises `InvalidCalibrationError` (a `CompilerError`
      and a `ValueError`); a toolchain failure raises `CompilerError` with the log tail.
    - The artifact takes the evaluation bundle's input contract on the device: ONNX
      artifacts take normalised NCHW float32, HEFs take uint8 NHWC (normalisation inside).
    """

    name: ClassVar[str]
    artifact_suffix: ClassVar[str]
    runtime: ClassVar[str]
    max_calibration_samples: int | None = None

    @classmethod
    @abstractmethod
    def check_available(cls) -> None:
        """Raise CompilerUnavailableError when the toolchain cannot be imported."""

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """The settings of this compiler, recorded in the log and the artifact metadata."""

    @abstractmethod
    def _build(
        self,
        signature: OnnxSignature,
        calibration: CalibrationSet,
        output: Path,
        log: logging.Logger,
    ) -> dict[str, Any]:
        """Write the artifact to `output` (a temporary path); return backend metadata."""

    def compile(self, onnx_path: Path, calibration: Path, out_dir: Path) -> CompiledArtifact:
        """Compile `onnx_path` with the calibration npz into `out_dir` (see the contract)."""
        self.check_available()
        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model {onnx_path} does not exist: export it first")
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / f"{onnx_path.name.removesuffix('.onnx')}{self.artifact_suffix}"
        partial = out_dir / f".{final.name}.partial-{os.getpid()}"
        log_path = out_dir / LOG_NAME
        started = time.perf_counter()
        try:
            with capture_logging(log_path) as log:
                metadata = self._build_logged(onnx_path, Path(calibration), partial, log)
            os.replace(partial, final)
        except CompilerError:
            raise
        except Exception as exc:
            raise CompilerError(
                f"compiler {self.name!r} failed on {onnx_path}: {type(exc).__name__}: {exc}\n"
                f"--- last lines of {log_path} ---\n{log_tail(log_path)}"
            ) from exc
        finally:
            partial.unlink(missing_ok=True)
        return CompiledArtifact(
            path=final,
            runtime=self.runtime,
            backend=self.name,
            log_path=log_path,
            seconds=time.perf_counter() - started,
            size_bytes=final.stat().st_size,
            metadata=metadata,
        )

    def _build_logged(
        self, onnx_path: Path, calibration_path: Path, output: Path, log: logging.Logger
    ) -> dict[str, Any]:
        """Common checks and bookkeeping around `_build`, all written to the log."""
        log.info("compiler %s options %s", self.name, self.options())
        try:
            signature = read_onnx_signature(onnx_path)
            log.info(
                "model %s: input %r %s, output %r (node %r), opset %d",
                onnx_path,
                signature.input_name,
                signature.input_shape,
                signature.output_name,
                signature.output_node,
                signature.opset,
            )
            calib = load_calibration(calibration_path, self.max_calibration_samples)
            check_calibration_fits(signature, calib)
            log.info(
                "calibration %s: %d images %s", calibration_path, len(calib), calib.images.shape
            )
            backend_metadata = self._build(signature, calib, output, log)
        except Exception:
            log.exception("compile failed")
            raise
        log.info("artifact built: %d bytes", output.stat().st_size)
        return {
            "input_name": signature.input_name,
            "input_shape": signature.input_shape,
            "output_name": signature.output_name,
            "opset": signature.opset,
            "calibration_samples": len(calib),
            "options": self.options(),
            **backend_metadata,
        }
