"""The device-runner seam: compiled artifact + evaluation bundle → outputs + latency.

A classifier's bundle comes back as per-sample probabilities (`DeviceRunner.evaluate`),
a detector's as boxes after NMS (`DeviceRunner.detect`).

Every runner executes the same shipped program, `edgetune_eval.py`, on its device and
reads back the same two files; the shared checks of those files live here so a local and
a remote runner accept and refuse exactly the same results.
"""

from __future__ import annotations

import json
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tasks.devices import edgetune_eval

PROBS_FILE = edgetune_eval.PROBS_FILE
DETECTIONS_FILE = edgetune_eval.DETECTIONS_FILE
RESULT_FILE = edgetune_eval.RESULT_FILE
#: Everything the evaluator may leave in its output folder, result.json last.
OUTPUT_FILES = (PROBS_FILE, DETECTIONS_FILE, RESULT_FILE)
OUT_DIR = "device-result"
STDERR_TAIL_LINES = 20
EXIT_HINTS = {
    edgetune_eval.EXIT_RUNTIME_MISSING: "the runtime this artifact needs is missing on the device",
}


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields explicitly
class DeviceResult:
    """Per-sample probabilities in bundle order plus what the device measured."""

    probs: np.ndarray  # float32 (N, C), rows sum to 1
    latency_ms: dict[str, float]  # per batch: mean, p50, p95, min, max
    throughput_fps: float
    started_at: float  # time.time() on the device, before the model was loaded
    finished_at: float  # time.time() on the device, after the device was released
    info: dict[str, Any]  # the whole result.json


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Boxes after NMS for every bundle image plus what the device measured."""

    detections: np.ndarray  # float32 (K, 7): image_index, x1, y1, x2, y2, score, class_id
    n_images: int
    latency_ms: dict[str, float]  # per batch, inference only: mean, p50, p95, min, max
    postprocess_ms: float  # mean per batch: decoding and NMS on the device's CPU
    throughput_fps: float
    started_at: float
    finished_at: float
    info: dict[str, Any]


@dataclass(frozen=True)
class EvalJob:
    """One run of the evaluator: its command and the options beyond paths and batching."""

    command: str  # "classify" | "detect"
    options: tuple[str, ...] = ()


CLASSIFY = EvalJob("classify")


def detect_job(conf: float, iou: float, max_det: int) -> EvalJob:
    """`edgetune_eval.py detect` with its NMS settings (checked again on the device)."""
    if not 0 <= conf < 1 or not 0 < iou <= 1 or max_det < 1:
        raise ValueError(
            f"detect: conf={conf}, iou={iou}, max_det={max_det}; conf must be in [0, 1), "
            "iou in (0, 1], max_det >= 1"
        )
    return EvalJob(
        "detect", ("--conf", f"{conf:g}", "--iou", f"{iou:g}", "--max-det", str(max_det))
    )


class DeviceError(RuntimeError):
    """The device evaluation failed; the message has the exit code and the stderr tail."""


class DeviceUnreachableError(DeviceError):
    """The device cannot be reached at all (remote runners)."""


class DeviceConfigError(DeviceError):
    """The board's settings are wrong: host key not trusted, key refused or missing, a work
    dir the user may not write, no Python or runtime for the evaluator on the board.

    Bad input rather than a fault of the board: retrying does not help, fixing the config,
    the controller's files or the board's setup does. A study pauses at the first one.
    """


#: Runs one evaluator command on staged inputs so that its output files land in `out_dir`.
RunJob = Callable[[EvalJob, Path], None]


@dataclass(frozen=True)
class Placed:
    """What a runner's `_stage` yields: how to run a job on the staged inputs, and where
    they are on the device (the run folder of this staging, removed when it ends)."""

    run: RunJob
    location: str


class Staged:
    """An artifact and a bundle already on the device, with the evaluator: only the run
    itself is left, so a caller holds the board's slot around `evaluate`/`detect` alone."""

    def __init__(self, placed: Placed, bundle: Path) -> None:
        self._run = placed.run
        self.location = placed.location
        self.bundle = bundle

    def evaluate(self, workdir: Path) -> DeviceResult:
        """`edgetune_eval.py classify` on the staged inputs (see `DeviceRunner.evaluate`)."""
        n_expected, classes_expected = bundle_expectations(self.bundle)
        out_dir = fresh_out(Path(workdir))
        try:
            self._run(CLASSIFY, out_dir)
            return read_result(out_dir, n_expected, classes_expected)
        except BaseException:
            remove_results(out_dir)
            raise

    def detect(
        self,
        workdir: Path,
        *,
        conf: float = 0.001,
        iou: float = 0.7,
        max_det: int = 300,
    ) -> DetectionResult:
        """`edgetune_eval.py detect` on the staged inputs (see `DeviceRunner.detect`)."""
        job = detect_job(conf, iou, max_det)
        n_images, n_classes = detection_bundle_expectations(self.bundle)
        out_dir = fresh_out(Path(workdir))
        try:
            self._run(job, out_dir)
            return read_detections(out_dir, n_images, n_classes)
        except BaseException:
            remove_results(out_dir)
            raise


class DeviceRunner(ABC):
    """Contract: run the shipped evaluator on one device, its inputs staged beforehand.

    - `stage(artifact, bundle)` is a context manager that puts everything an evaluation
      needs on the device without needing the device to itself: it connects, installs the
      evaluator and the bundle where missing, and puts the artifact in a run folder of its
      own (`Staged.location`). The run folder is removed when the block exits, whatever
      happens (a failed staging, a failed run, an exception of the caller). Missing inputs
      on the controller raise FileNotFoundError before anything is sent.
    - `Staged.evaluate(workdir)` runs ``edgetune_eval.py classify`` on the staged inputs
      and returns a `DeviceResult` whose `probs` are per-sample probabilities in bundle
      order (N = the bundle's label count, C = its class count) plus latency; a bundle
      without labels raises ValueError. `workdir` is a controller-side scratch directory
      the runner owns. Any failure on the device (non-zero exit, timeout, missing or
      inconsistent result files) raises `DeviceError`. No process is left running, and no
      result files are left behind by a failed evaluation.
    - `Staged.detect(workdir, conf=, iou=, max_det=)` runs ``edgetune_eval.py detect`` the
      same way and returns a `DetectionResult`: boxes after NMS in the bundle's
      (letterboxed) pixel coordinates.
    - `evaluate(artifact, bundle, workdir)` and `detect(...)` are stage + run in one call.
    - `info()` returns the evaluator's ``info`` JSON (runtimes, accelerators, host).
    - A runner does not take the device's concurrency slot; its callers do, around the
      run only: stage first, then ``with hold_board(config): staged.evaluate(...)``.
      Several stagings may be on one device at once; only runs need it to themselves.
    - `prestage(artifact, bundle, key)` puts an evaluation's inputs on the device ahead of
      it, from another process, while another evaluation runs there; the `stage` given
      the same `key` takes them over instead of sending them again. A runner whose device
      has nothing to send (``local``) does nothing and returns False.

    Implementations write `_stage` (a context manager yielding `Placed`) and `info`; the
    checks are shared here.
    """

    name: ClassVar[str]

    @abstractmethod
    def _stage(
        self, artifact: Path, bundle: Path, key: str | None = None
    ) -> AbstractContextManager[Placed]:
        """Put the evaluator, `bundle` and `artifact` on the device (taking over what a
        `prestage` with `key` put there); remove the run folder on exit. Inputs exist
        (checked by `stage`)."""

    def prestage(self, artifact: Path, bundle: Path, key: str) -> bool:
        """Put `artifact` and `bundle` on the device for the `stage` given `key`; True when
        something was put there (see the class docstring)."""
        return False

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """The evaluator's `info` output on this device."""

    def check_config(self) -> None:
        """Check the runner's local settings without reaching the device.

        Raises `DeviceConfigError`; the default has nothing to check.
        """
        return None

    @contextmanager
    def stage(self, artifact: Path, bundle: Path, key: str | None = None) -> Iterator[Staged]:
        """`artifact` and `bundle` on the device, ready to run (see the class docstring)."""
        artifact, bundle = Path(artifact), Path(bundle)
        check_files(artifact, bundle)
        with self._stage(artifact, bundle, key) as placed:
            yield Staged(placed, bundle)

    def evaluate(self, artifact: Path, bundle: Path, workdir: Path) -> DeviceResult:
        """Evaluate the classifier `artifact` on every image of `bundle`."""
        check_inputs(Path(artifact), Path(bundle))  # a bundle without labels is never sent
        with self.stage(artifact, bundle) as staged:
            return staged.evaluate(workdir)

    def detect(
        self,
        artifact: Path,
        bundle: Path,
        workdir: Path,
        *,
        conf: float = 0.001,
        iou: float = 0.7,
        max_det: int = 300,
    ) -> DetectionResult:
        """Run the detector `artifact` on every image of `bundle`; boxes after NMS."""
        detect_job(conf, iou, max_det)  # bad settings fail before anything is sent
        check_files(Path(artifact), Path(bundle))
        detection_bundle_expectations(Path(bundle))
        with self.stage(artifact, bundle) as staged:
            return staged.detect(workdir, conf=conf, iou=iou, max_det=max_det)


def fresh_out(workdir: Path) -> Path:
    """`workdir`/device-result, created, without results of an earlier run."""
    out_dir = workdir / OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_results(out_dir)
    return out_dir


def evaluator_path() -> Path:
    """The device-side evaluator file that runners copy or upload to the device."""
    return Path(edgetune_eval.__file__).resolve()


def evaluator_version() -> str:
    """Version of the shipped evaluator; result.json must carry the same one."""
    return edgetune_eval.__version__


def job_argv(
    job: EvalJob,
    artifact: str,
    bundle: str,
    out_dir: str,
    batch_size: int,
    warmup: int,
    threads: int | None,
) -> list[str]:
    """Arguments of `edgetune_eval.py <command>` (paths as seen on the device)."""
    argv = [job.command, "--model", artifact, "--bundle", bundle, "--out", out_dir]
    argv += ["--batch-size", str(batch_size), "--warmup", str(warmup)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv + list(job.options)


def bundle_expectations(bundle: Path) -> tuple[int, int | None]:
    """(label count, class count or None) that a result for this bundle must have."""
    with np.load(bundle, allow_pickle=False) as data:
        if "labels" not in data.files:
            raise ValueError(
                f"evaluation bundle {bundle} has no `labels` (has {sorted(data.files)}); "
                "rebuild it with the data stage"
            )
        n = len(data["labels"])
        classes = len(data["classes"]) if "classes" in data.files else None
    return n, classes


def check_files(artifact: Path, bundle: Path) -> None:
    """Both inputs exist on the controller (FileNotFoundError naming the missing one)."""
    for path, what in ((artifact, "compiled artifact"), (bundle, "evaluation bundle")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")


def check_inputs(artifact: Path, bundle: Path) -> tuple[int, int | None]:
    """Both inputs exist; returns what a result for the bundle must hold (see above)."""
    check_files(artifact, bundle)
    return bundle_expectations(bundle)


def failure_message(what: str, returncode: int, stderr: str) -> str:
    """`what` failed with the exit code, its meaning where known, and the stderr tail.

    The first line ends with the last line of stderr (the evaluator's one-line error), so
    a one-line summary of the failure (a trial's fail reason) still says why.
    """
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    hint = EXIT_HINTS.get(returncode)
    meaning = f" ({hint})" if hint else ""
    first = f"{what} failed with exit code {returncode}{meaning}: "
    first += " ".join(lines[-1].split()) if lines else "(no stderr)"
    if len(lines) <= 1:
        return first
    return first + "\n" + "\n".join(lines[-STDERR_TAIL_LINES:])


def evaluator_failure(what: str, returncode: int, stderr: str) -> DeviceError:
    """The error of an evaluator that exited ``returncode``: a runtime missing on the board is
    its setup (``DeviceConfigError``), anything else a failed evaluation."""
    message = failure_message(what, returncode, stderr)
    if returncode == edgetune_eval.EXIT_RUNTIME_MISSING:
        return DeviceConfigError(message)
    return DeviceError(message)


def detection_bundle_expectations(bundle: Path) -> tuple[int, int]:
    """(image count, class count) of a detection bundle (images + classes + boxes)."""
    with np.load(bundle, allow_pickle=False) as data:
        missing = sorted({"images", "classes", "boxes"} - set(data.files))
        if missing:
            raise ValueError(
                f"detection bundle {bundle} lacks {missing} (has {sorted(data.files)}); "
                "rebuild it with `edgetune detect train` or tasks.detection.dataset"
            )
        return _rows(data, "images"), len(data["classes"])


def _rows(data: Any, key: str) -> int:
    """The first dimension of array `key` of an open npz, read from its header only: a
    detection bundle's images can be large, and this runs while the board is held."""
    try:
        with data.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape = np.lib.format.read_array_header_1_0(member)[0]
            else:
                shape = np.lib.format.read_array_header_2_0(member)[0]
        return int(shape[0])
    except (AttributeError, KeyError, ValueError, zipfile.BadZipFile):
        return int(data[key].shape[0])


def remove_results(out_dir: Path) -> None:
    """Delete result files (and half-written temp files) so none is read as this run's."""
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
        for partial in out_dir.glob(f".{name}.*"):  # temp files of a killed evaluator or fetch
            partial.unlink(missing_ok=True)


def read_result(out_dir: Path, n_expected: int, classes_expected: int | None) -> DeviceResult:
    """Load probs.npy + result.json written by the evaluator and check they fit the bundle."""
    info, probs = _load_outputs(out_dir, PROBS_FILE)
    _check_result(info, probs, n_expected, classes_expected)
    return DeviceResult(
        probs=probs,
        latency_ms={k: float(v) for k, v in info["latency_ms"].items()},
        throughput_fps=float(info["throughput_fps"]),
        started_at=float(info["started_at"]),
        finished_at=float(info["finished_at"]),
        info=info,
    )


def _load_outputs(out_dir: Path, array_file: str) -> tuple[dict[str, Any], np.ndarray]:
    """result.json and the evaluator's output array, both required."""
    result_path, array_path = out_dir / RESULT_FILE, out_dir / array_file
    if not result_path.is_file() or not array_path.is_file():
        raise DeviceError(
            f"the evaluator exited 0 but {out_dir} lacks {RESULT_FILE} or {array_file}; "
            "rerun with --debug on the device to see why"
        )
    try:
        info = json.loads(result_path.read_text(encoding="utf-8"))
        array = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DeviceError(f"cannot read the evaluator's results in {out_dir}: {exc}") from exc
    return info, array


def _check_version(info: dict[str, Any]) -> None:
    if info.get("evaluator_version") != evaluator_version():
        raise DeviceError(
            f"the device ran evaluator {info.get('evaluator_version')!r} but this controller "
            f"ships {evaluator_version()!r}: reinstall edgetune_eval.py on the device"
        )


def read_detections(out_dir: Path, n_images: int, n_classes: int) -> DetectionResult:
    """Load detections.npy + result.json written by `edgetune_eval.py detect` and check them."""
    info, detections = _load_outputs(out_dir, DETECTIONS_FILE)
    _check_version(info)
    if int(info.get("n", -1)) != n_images:
        raise DeviceError(
            f"the device evaluated {info.get('n')} images but the bundle has {n_images}: the "
            "bundle on the device differs from the controller's; re-send it"
        )
    if detections.ndim != 2 or detections.shape[1] != 7 or not np.all(np.isfinite(detections)):
        raise DeviceError(
            f"the device returned detections of shape {detections.shape}; expected finite "
            "(K, 7) rows image_index, x1, y1, x2, y2, score, class_id"
        )
    if len(detections) and (
        detections[:, 0].min() < 0
        or detections[:, 0].max() >= n_images
        or detections[:, 6].min() < 0
        or detections[:, 6].max() >= n_classes
    ):
        raise DeviceError(
            f"the device returned detections outside the bundle's {n_images} images or "
            f"{n_classes} classes: the artifact was trained for another class set"
        )
    return DetectionResult(
        detections=detections.astype(np.float32),
        n_images=n_images,
        latency_ms={k: float(v) for k, v in info["latency_ms"].items()},
        postprocess_ms=float(info.get("postprocess_ms", 0.0)),
        throughput_fps=float(info["throughput_fps"]),
        started_at=float(info["started_at"]),
        finished_at=float(info["finished_at"]),
        info=info,
    )


def _check_result(
    info: dict[str, Any], probs: np.ndarray, n_expected: int, classes_expected: int | None
) -> None:
    """Refuse results that do not belong to this bundle or this evaluator."""
    _check_version(info)
    if probs.ndim != 2 or probs.shape[0] != n_expected or int(info.get("n", -1)) != n_expected:
        raise DeviceError(
            f"the device returned probabilities of shape {probs.shape} (n={info.get('n')}) "
            f"but the bundle has {n_expected} labelled images: the bundle on the device "
            "differs from the controller's; re-send it"
        )
    if classes_expected is not None and probs.shape[1] != classes_expected:
        raise DeviceError(
            f"the model outputs {probs.shape[1]} classes but the bundle lists "
            f"{classes_expected}: the artifact was trained for another class set"
        )
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise DeviceError(
            "the device returned probabilities that are not finite or do not sum to 1"
        )
