#!/usr/bin/env python3
"""edgetune device-side evaluator: run a compiled classifier or detector on this device.

A standalone single file, copied to the board and run there. It imports only the
standard library and numpy, plus the runtime the artifact needs (onnxruntime for
``.onnx``, HailoRT's ``hailo_platform`` for ``.hef``), so a board needs nothing else.

    python edgetune_eval.py classify --model M --bundle B.npz --out DIR
        → DIR/probs.npy (float32 (N, C) softmax) and DIR/result.json (latency, versions…)
    python edgetune_eval.py detect --model M --bundle B.npz --out DIR [--conf --iou --max-det]
        → DIR/detections.npy (float32 (K, 7): image, x1, y1, x2, y2, score, class after
          NMS, in the bundle's pixel coordinates) and DIR/result.json
    python edgetune_eval.py info
        → JSON: evaluator version, runtimes, accelerators, host

Exit codes: 0 ok, 1 evaluation failed, 2 bad command line, 3 runtime not installed.
Errors are one line on stderr (the full traceback only with ``--debug``). result.json
is written last, after probs.npy, each through a temporary file and os.replace, so a
result.json on disk always belongs to a complete run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

try:
    import numpy as np
except ImportError:  # reported as a missing runtime by main(), exit code 3
    np = None  # type: ignore[assignment]

__version__ = "0.2.0"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_RUNTIME_MISSING = 3

PROBS_FILE = "probs.npy"
DETECTIONS_FILE = "detections.npy"
MAX_NMS_CANDIDATES = 30000  # boxes per image that enter NMS, best scores first
MAX_BOX_SIDE = 7680.0  # class offset for class-aware NMS in one pass (pixels)
RESULT_FILE = "result.json"
RUNTIME_BY_SUFFIX = {".onnx": "onnxruntime", ".hef": "hailort"}

NUMPY_HINT = "numpy is not installed for {python}: pip install numpy on this device"
ONNXRUNTIME_HINT = (
    "onnxruntime is not installed for {python}: pip install onnxruntime "
    "(or onnxruntime-gpu) on this device"
)
HAILORT_HINT = (
    "HailoRT Python bindings (hailo_platform) are not installed for {python}: install "
    "HailoRT and its matching hailort wheel from the Hailo Developer Zone "
    "(Raspberry Pi: sudo apt install hailo-all)"
)


class EvalError(Exception):
    """Evaluation failed; exit code 1."""

    exit_code = EXIT_FAILED


class RuntimeMissingError(EvalError):
    """The runtime the artifact needs cannot be imported; exit code 3."""

    exit_code = EXIT_RUNTIME_MISSING


# --------------------------------------------------------------------------- bundle


class Bundle:
    """The evaluation bundle: uint8 NHWC images plus the float model's normalisation."""

    def __init__(self, path: Path, images: np.ndarray, mean: np.ndarray, std: np.ndarray):
        self.path = path
        self.images = images
        self.mean = mean
        self.std = std


def load_bundle(path: Path) -> Bundle:
    """Read and check the bundle npz (labels are the controller's business)."""
    if not path.is_file():
        raise EvalError(f"bundle {path} does not exist")
    try:
        with np.load(str(path), allow_pickle=False) as data:
            missing = sorted({"images", "mean", "std"} - set(data.files))
            if missing:
                raise EvalError(f"bundle {path} lacks {missing} (has {data.files})")
            images, mean, std = data["images"], data["mean"], data["std"]
            n_labels = len(data["labels"]) if "labels" in data.files else None
    except EvalError:
        raise
    except Exception as exc:
        raise EvalError(f"cannot read bundle {path}: {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise EvalError(
            f"bundle images are {images.dtype} {images.shape}; expected uint8 (N, H, W, 3), N >= 1"
        )
    if n_labels is not None and n_labels != len(images):
        raise EvalError(f"bundle has {len(images)} images but {n_labels} labels")
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise EvalError("bundle mean/std must be 3 values each with std > 0")
    return Bundle(path, images, mean.astype(np.float32), std.astype(np.float32))


def normalise_nchw(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 NHWC → (x - mean) / std as float32 NCHW: the float model's input."""
    x = (images.astype(np.float32) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def pad_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Repeat the last image up to `size` (fixed-batch models); outputs get trimmed."""
    if len(images) >= size:
        return images
    return np.concatenate([images, np.repeat(images[-1:], size - len(images), axis=0)])


# --------------------------------------------------------------------------- backends


class Backend:
    """One loaded model on one runtime; `infer` times only the runtime's inference call."""

    runtime = ""
    version = ""
    accelerator = ""

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """uint8 NHWC batch → (logits (B, C) float32, seconds spent in the runtime)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the device."""


class OnnxRuntimeBackend(Backend):
    """onnxruntime session; the bundle's normalisation is applied before the timed call."""

    runtime = "onnxruntime"

    def __init__(
        self,
        model: Path,
        bundle: Bundle,
        batch_size: int,
        threads: int | None,
        providers: list[str] | None,
    ) -> None:
        ort = import_onnxruntime()
        self.version = ort.__version__
        self.mean, self.std = bundle.mean, bundle.std
        wanted = providers or ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in ort.get_available_providers()]
        if missing:
            raise EvalError(
                f"onnxruntime providers {missing} are not available here "
                f"(available: {ort.get_available_providers()})"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model), sess_options=options, providers=wanted)
        except Exception as exc:
            raise EvalError(f"onnxruntime cannot load {model}: {exc}") from exc
        self.accelerator = provider_accelerator(self.session.get_providers()[0])
        self.input_name, self.fixed_batch = self._check_io(model, bundle, batch_size)

    def _check_io(self, model: Path, bundle: Bundle, batch_size: int) -> tuple[str, int | None]:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise EvalError(
                f"{model} has {len(inputs)} inputs and {len(outputs)} outputs; "
                "expected 1 image input and 1 logits output"
            )
        shape = list(inputs[0].shape)
        height, width = bundle.images.shape[1:3]
        expected = [3, height, width]
        if len(shape) != 4 or any(
            isinstance(shape[i + 1], int) and shape[i + 1] != expected[i] for i in range(3)
        ):
            raise EvalError(
                f"model input {inputs[0].name} {shape} does not fit bundle images "
                f"{height}x{width}x3 (NCHW expected); export the model at the bundle's size "
                f"(data.image_size={height}) or rebuild the bundle at the model's input size"
            )
        fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if fixed is not None and fixed != batch_size:
            raise EvalError(f"model has a fixed batch size of {fixed}; pass --batch-size {fixed}")
        return inputs[0].name, fixed

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        count = len(images)
        if self.fixed_batch is not None:
            images = pad_batch(images, self.fixed_batch)
        x = normalise_nchw(images, self.mean, self.std)
        start = time.perf_counter()
        logits = self.session.run(None, {self.input_name: x})[0]
        seconds = time.perf_counter() - start
        return np.asarray(logits, dtype=np.float32)[:count], seconds


class HailoBackend(Backend):
    """HailoRT InferModel on a VDevice: uint8 NHWC in (normalisation is in the HEF)."""

    runtime = "hailort"

    def __init__(self, model: Path, bundle: Bundle, batch_size: int, timeout_ms: int) -> None:
        hp = import_hailort()
        self.version = hailort_version(hp)
        self.timeout_ms = timeout_ms
        self._stack = contextlib.ExitStack()
        try:
            self._open(hp, model, bundle, batch_size)
        except Exception as exc:
            self._stack.close()
            if isinstance(exc, EvalError):
                raise
            raise EvalError(f"HailoRT cannot load {model}: {exc}") from exc

    def _open(self, hp: Any, model: Path, bundle: Bundle, batch_size: int) -> None:
        vdevice = self._stack.enter_context(hp.VDevice())
        infer_model = vdevice.create_infer_model(str(model))
        infer_model.set_batch_size(batch_size)
        infer_model.input().set_format_type(hp.FormatType.UINT8)
        infer_model.output().set_format_type(hp.FormatType.FLOAT32)
        expected = tuple(int(d) for d in infer_model.input().shape)
        if expected != tuple(bundle.images.shape[1:]):
            raise EvalError(
                f"HEF input shape {expected} (NHWC) does not fit bundle images "
                f"{bundle.images.shape[1:]}; compile the HEF from an ONNX exported at the "
                f"bundle's size (data.image_size) or rebuild the bundle at the HEF's input size"
            )
        self.output_shape = tuple(int(d) for d in infer_model.output().shape)
        self.nms_output = bool(getattr(infer_model.output(), "is_nms", False))
        self.configured = self._stack.enter_context(infer_model.configure())
        ids: list[str] = getattr(vdevice, "get_physical_devices_ids", list)()
        self.accelerator = "hailo:" + ",".join(str(i) for i in ids) if ids else "hailo"

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        bindings, outputs = [], []
        for image in images:
            binding = self.configured.create_bindings()
            binding.input().set_buffer(np.ascontiguousarray(image))
            out = np.empty(self.output_shape, dtype=np.float32)
            binding.output().set_buffer(out)
            bindings.append(binding)
            outputs.append(out)
        start = time.perf_counter()
        self.configured.run(bindings, self.timeout_ms)
        seconds = time.perf_counter() - start
        return np.stack(outputs), seconds

    def close(self) -> None:
        self._stack.close()


def provider_accelerator(provider: str) -> str:
    """CPUExecutionProvider → cpu, CUDAExecutionProvider → cuda, …"""
    return provider.replace("ExecutionProvider", "").lower() or provider


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeMissingError(ONNXRUNTIME_HINT.format(python=sys.executable)) from exc
    return onnxruntime


def import_hailort() -> Any:
    try:
        import hailo_platform
    except ImportError as exc:
        raise RuntimeMissingError(HAILORT_HINT.format(python=sys.executable)) from exc
    return hailo_platform


def hailort_version(hp: Any) -> str:
    version = getattr(hp, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("hailort")
    except Exception:
        return "unknown"


def runtime_for(model: Path) -> str:
    """The artifact's suffix decides the runtime."""
    runtime = RUNTIME_BY_SUFFIX.get(model.suffix.lower())
    if runtime is None:
        raise EvalError(
            f"cannot tell the runtime of {model.name}: expected one of {sorted(RUNTIME_BY_SUFFIX)}"
        )
    return runtime


def open_backend(model: Path, bundle: Bundle, args: argparse.Namespace) -> Backend:
    if runtime_for(model) == "hailort":
        return HailoBackend(model, bundle, args.batch_size, args.timeout_ms)
    providers = [p for p in (args.providers or "").split(",") if p] or None
    return OnnxRuntimeBackend(model, bundle, args.batch_size, args.threads, providers)


# --------------------------------------------------------------------------- classify


def run_batches(
    backend: Backend, images: np.ndarray, batch_size: int, warmup: int
) -> tuple[np.ndarray, list[float]]:
    """Warm up on the first batch, then every image once; returns logits and batch latencies."""
    for _ in range(warmup):
        backend.infer(images[:batch_size])
    parts, seconds = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        logits, elapsed = backend.infer(chunk)
        logits = logits.reshape(len(logits), -1)
        if len(logits) != len(chunk):
            raise EvalError(f"runtime returned {len(logits)} rows for {len(chunk)} images")
        parts.append(logits)
        seconds.append(elapsed)
    return np.concatenate(parts), seconds


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64, stored as float32."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def latency_stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "min": float(ms.min()),
        "max": float(ms.max()),
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, str(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_record(
    args: argparse.Namespace,
    backend: Backend,
    model: Path,
    bundle_path: Path,
    n: int,
    seconds: list[float],
) -> dict[str, Any]:
    """What every result.json holds: runtime, batching, latency, checksums, host."""
    return {
        "evaluator_version": __version__,
        "task": args.command,
        "runtime": backend.runtime,
        "runtime_version": backend.version,
        "accelerator": backend.accelerator,
        "n": n,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "latency_ms": latency_stats(seconds),
        "throughput_fps": float(n / max(sum(seconds), 1e-12)),
        "model": model.name,
        "model_sha256": sha256_file(model),
        "bundle_sha256": sha256_file(bundle_path),
        "hostname": socket.gethostname(),
    }


def prepare_run(args: argparse.Namespace) -> tuple[Path, Path, Path, Bundle]:
    """Check the common options, clear stale outputs, check the runtime, load the bundle."""
    if args.batch_size < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise EvalError(
            f"--batch-size {args.batch_size}, --warmup {args.warmup}, --threads {args.threads}: "
            "batch size and threads must be >= 1, warmup >= 0"
        )
    model, bundle_path, out = Path(args.model), Path(args.bundle), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / RESULT_FILE, out / PROBS_FILE, out / DETECTIONS_FILE):
        if stale.exists():
            stale.unlink()
    if not model.is_file():
        raise EvalError(f"model {model} does not exist")
    if runtime_for(model) == "hailort":  # a missing runtime exits 3 before any work
        import_hailort()
    else:
        import_onnxruntime()
    return model, bundle_path, out, load_bundle(bundle_path)


def classify(args: argparse.Namespace) -> int:
    """Evaluate every bundle image; write probs.npy then result.json."""
    model, bundle_path, out, bundle = prepare_run(args)
    started_at = time.time()
    backend = open_backend(model, bundle, args)
    try:
        logits, seconds = run_batches(backend, bundle.images, args.batch_size, args.warmup)
    finally:
        backend.close()
    finished_at = time.time()
    if not np.all(np.isfinite(logits)):
        raise EvalError("the model produced non-finite logits")
    probs = softmax(logits)
    result = run_record(args, backend, model, bundle_path, len(probs), seconds)
    result.update(num_classes=int(probs.shape[1]), started_at=started_at, finished_at=finished_at)
    atomic_write(out / PROBS_FILE, lambda f: np.save(f, probs))
    atomic_write(out / RESULT_FILE, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(
        "edgetune_eval: {} samples on {} {} ({}), mean batch latency {:.3f} ms -> {}".format(
            result["n"],
            backend.runtime,
            backend.version,
            backend.accelerator,
            result["latency_ms"]["mean"],
            out,
        )
    )
    return EXIT_OK


# --------------------------------------------------------------------------- detect


def bundle_class_count(path: Path) -> int:
    """A detection bundle lists its class names; the decoder needs their number."""
    with np.load(str(path), allow_pickle=False) as data:
        if "classes" not in data.files:
            raise EvalError(f"bundle {path} has no `classes`; it is not a detection bundle")
        return len(data["classes"])


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Centre, width, height → corners."""
    half = boxes[:, 2:4] / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
        boxes[:, 3] - boxes[:, 1], 0, None
    )
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        union = areas[best] + areas[rest] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def select(rows: np.ndarray, conf: float, iou: float, max_det: int) -> np.ndarray:
    """(n, 6) x1 y1 x2 y2 score class → the boxes kept by class-aware NMS, at most max_det."""
    rows = rows[rows[:, 4] > conf]
    if len(rows) > MAX_NMS_CANDIDATES:
        rows = rows[np.argsort(-rows[:, 4], kind="stable")[:MAX_NMS_CANDIDATES]]
    if not len(rows):
        return np.zeros((0, 6), dtype=np.float32)
    shifted = rows[:, :4] + rows[:, 5:6] * MAX_BOX_SIDE  # boxes of two classes never overlap
    kept = nms(shifted, rows[:, 4], iou)[:max_det]
    return rows[kept].astype(np.float32)


def decode_yolo(output: np.ndarray, n_classes: int) -> np.ndarray:
    """One image's raw output → (n, 6) x1 y1 x2 y2 score class before NMS.

    Understands the two layouts Ultralytics exports: (4 + C, anchors) with centre boxes
    and per-class scores, and an end-to-end (max_det, 6) table of corner boxes.
    """
    if output.ndim == 2 and output.shape[0] == 4 + n_classes:
        pred = output.T.astype(np.float32)
        scores = pred[:, 4:]
        classes = scores.argmax(axis=1)
        best = scores[np.arange(len(scores)), classes]
        return np.concatenate(
            [xywh_to_xyxy(pred[:, :4]), best[:, None], classes[:, None].astype(np.float32)], axis=1
        )
    if output.ndim == 2 and output.shape[1] == 6:
        return output.astype(np.float32)
    raise EvalError(
        f"detector output of shape {output.shape} per image is neither (4 + {n_classes} "
        f"classes, anchors) nor (boxes, 6): export the detector with Ultralytics' ONNX "
        "exporter for the bundle's class list"
    )


def decode_hailo_nms(output: np.ndarray, n_classes: int, height: int, width: int) -> np.ndarray:
    """HailoRT's NMS-by-class FLOAT32 buffer → (n, 6) x1 y1 x2 y2 score class in pixels.

    Per class: a box count, then room for the same number of boxes in every class, each
    (y_min, x_min, y_max, x_max, score) normalised to the input size.
    """
    flat = output.reshape(-1).astype(np.float32)
    per_class = len(flat) // n_classes if n_classes else 0
    if not n_classes or per_class * n_classes != len(flat) or (per_class - 1) % 5:
        raise EvalError(
            f"HEF NMS output of {len(flat)} values does not fit {n_classes} classes; compile "
            "the detector with the bundle's class list"
        )
    rows = []
    for c in range(n_classes):
        block = flat[c * per_class : (c + 1) * per_class]
        count = min(int(block[0]), (per_class - 1) // 5)
        boxes = block[1 : 1 + 5 * count].reshape(count, 5)
        for y1, x1, y2, x2, score in boxes:
            rows.append([x1 * width, y1 * height, x2 * width, y2 * height, score, c])
    return np.asarray(rows, dtype=np.float32).reshape(-1, 6)


def detect(args: argparse.Namespace) -> int:
    """Detect on every bundle image; write detections.npy then result.json."""
    if not 0 <= args.conf < 1 or not 0 < args.iou <= 1 or args.max_det < 1:
        raise EvalError(
            f"--conf {args.conf}, --iou {args.iou}, --max-det {args.max_det}: conf must be in "
            "[0, 1), iou in (0, 1], max-det >= 1"
        )
    model, bundle_path, out, bundle = prepare_run(args)
    n_classes = bundle_class_count(bundle_path)
    height, width = bundle.images.shape[1:3]
    started_at = time.time()
    backend = open_backend(model, bundle, args)
    hailo_nms = bool(getattr(backend, "nms_output", False))
    images = bundle.images
    rows, seconds, post_seconds = [], [], []
    try:
        for _ in range(args.warmup):
            backend.infer(images[: args.batch_size])
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            raw, elapsed = backend.infer(chunk)
            seconds.append(elapsed)
            began = time.perf_counter()
            if len(raw) != len(chunk):
                raise EvalError(f"runtime returned {len(raw)} outputs for {len(chunk)} images")
            for offset, output in enumerate(raw):
                candidates = (
                    decode_hailo_nms(output, n_classes, height, width)
                    if hailo_nms
                    else decode_yolo(np.squeeze(output), n_classes)
                )
                kept = select(candidates, args.conf, args.iou, args.max_det)
                index = np.full((len(kept), 1), start + offset, dtype=np.float32)
                rows.append(np.concatenate([index, kept], axis=1))
            post_seconds.append(time.perf_counter() - began)
    finally:
        backend.close()
    finished_at = time.time()
    detections = np.concatenate(rows) if rows else np.zeros((0, 7), dtype=np.float32)
    if not np.all(np.isfinite(detections)):
        raise EvalError("the model produced non-finite boxes or scores")
    result = run_record(args, backend, model, bundle_path, len(images), seconds)
    result.update(
        num_classes=n_classes,
        n_detections=len(detections),
        conf=args.conf,
        iou=args.iou,
        max_det=args.max_det,
        postprocess_ms=float(np.mean(post_seconds) * 1000.0),
        started_at=started_at,
        finished_at=finished_at,
    )
    atomic_write(out / DETECTIONS_FILE, lambda f: np.save(f, detections.astype(np.float32)))
    atomic_write(out / RESULT_FILE, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(
        "edgetune_eval: {} detections on {} images with {} {} ({}), mean batch latency "
        "{:.3f} ms -> {}".format(
            len(detections),
            len(images),
            backend.runtime,
            backend.version,
            backend.accelerator,
            result["latency_ms"]["mean"],
            out,
        )
    )
    return EXIT_OK


# --------------------------------------------------------------------------- info


def runtime_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"onnxruntime": None, "hailort": None}
    with contextlib.suppress(RuntimeMissingError):
        versions["onnxruntime"] = import_onnxruntime().__version__
    with contextlib.suppress(RuntimeMissingError):
        versions["hailort"] = hailort_version(import_hailort())
    return versions


def hailo_devices() -> list[dict[str, Any]]:
    """Hailo devices HailoRT can see, with their architecture when it can be read."""
    try:
        hp = import_hailort()
    except RuntimeMissingError:
        return []
    try:
        ids = hp.Device.scan()
    except Exception as exc:
        return [{"type": "hailo", "error": str(exc)}]
    devices = []
    for device_id in ids:
        entry: dict[str, Any] = {"type": "hailo", "id": str(device_id)}
        try:
            device = hp.Device(device_id)
            try:
                entry["arch"] = str(device.control.identify().device_architecture)
            finally:
                getattr(device, "release", lambda: None)()
        except Exception:
            entry["arch"] = None
        devices.append(entry)
    return devices


def info(args: argparse.Namespace) -> int:
    versions = runtime_versions()
    providers: list[str] = []
    if versions["onnxruntime"] is not None:
        providers = list(import_onnxruntime().get_available_providers())
    report = {
        "evaluator_version": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "runtimes": versions,
        "onnxruntime_providers": providers,
        "accelerators": hailo_devices(),
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }
    print(json.dumps(report, indent=2))
    return EXIT_OK


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print full tracebacks")
    running = argparse.ArgumentParser(add_help=False)  # model, bundle, batching, runtime
    running.add_argument("--model", required=True, help="compiled artifact (.onnx or .hef)")
    running.add_argument("--bundle", required=True, help="evaluation bundle (.npz)")
    running.add_argument("--out", required=True, help="output directory")
    running.add_argument("--batch-size", type=int, default=1)
    running.add_argument("--warmup", type=int, default=5, help="untimed batches before timing")
    running.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    running.add_argument("--providers", default=None, help="onnxruntime providers, comma-separated")
    running.add_argument("--timeout-ms", type=int, default=10000, help="HailoRT per-batch timeout")
    parser = argparse.ArgumentParser(prog="edgetune_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("classify", parents=[common, running], help="evaluate a classifier")
    run.set_defaults(func=classify)
    find = sub.add_parser(
        "detect", parents=[common, running], help="evaluate a detector (boxes after NMS)"
    )
    find.add_argument("--conf", type=float, default=0.001, help="minimum box score")
    find.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    find.add_argument("--max-det", type=int, default=300, help="boxes kept per image")
    find.set_defaults(func=detect)
    show = sub.add_parser("info", parents=[common], help="describe this device as JSON")
    show.set_defaults(func=info)
    return parser


def fail(exc: BaseException, debug: bool) -> None:
    """One line on stderr; the traceback first when --debug."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"edgetune_eval: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if np is None:
        print(f"edgetune_eval: error: {NUMPY_HINT.format(python=sys.executable)}", file=sys.stderr)
        return EXIT_RUNTIME_MISSING
    try:
        return int(args.func(args))
    except EvalError as exc:
        fail(exc, args.debug)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgetune_eval: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        fail(exc, args.debug)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
