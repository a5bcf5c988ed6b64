"""The device-runner seam: compiled artifact + evaluation bundle → probabilities + latency.

Every runner executes the same shipped program, `edgetune_eval.py`, on its device and
reads back the same two files; the shared checks of those files live here so a local and
a remote runner accept and refuse exactly the same results.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tasks.devices import edgetune_eval

PROBS_FILE = edgetune_eval.PROBS_FILE
RESULT_FILE = edgetune_eval.RESULT_FILE
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


class DeviceError(RuntimeError):
    """The device evaluation failed; the message has the exit code and the stderr tail."""


class DeviceUnreachableError(DeviceError):
    """The device cannot be reached at all (remote runners)."""


class DeviceConfigError(DeviceError):
    """The runner's own settings are wrong (host key not trusted, key refused or missing).

    Bad input rather than a fault of the board: retrying does not help, fixing the
    config or the controller's files does.
    """


class DeviceRunner(ABC):
    """Contract: run the shipped evaluator on one device.

    - `evaluate(artifact, bundle, workdir)` runs ``edgetune_eval.py classify`` on the
      device against the artifact and the bundle and returns a `DeviceResult` whose
      `probs` are per-sample probabilities in bundle order (N = the bundle's label
      count, C = its class count) plus latency. `workdir` is a controller-side scratch
      directory the runner owns. Missing inputs on the controller raise
      FileNotFoundError, a bundle without labels ValueError; any failure on the device (non-zero exit, timeout, missing or
      inconsistent result files) raises `DeviceError`. No process is left running, and
      no result files are left behind by a failed evaluation.
    - `info()` returns the evaluator's ``info`` JSON (runtimes, accelerators, host).
    - A runner does not take the device's concurrency slot; its callers do.
    """

    name: ClassVar[str]

    @abstractmethod
    def evaluate(self, artifact: Path, bundle: Path, workdir: Path) -> DeviceResult:
        """Evaluate `artifact` on every image of `bundle`."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """The evaluator's `info` output on this device."""

    def check_config(self) -> None:
        """Check the runner's local settings without reaching the device.

        Raises `DeviceConfigError`; the default has nothing to check.
        """
        return None


def evaluator_path() -> Path:
    """The device-side evaluator file that runners copy or upload to the device."""
    return Path(edgetune_eval.__file__).resolve()


def evaluator_version() -> str:
    """Version of the shipped evaluator; result.json must carry the same one."""
    return edgetune_eval.__version__


def classify_argv(
    artifact: str,
    bundle: str,
    out_dir: str,
    batch_size: int,
    warmup: int,
    threads: int | None,
) -> list[str]:
    """Arguments of `edgetune_eval.py classify` (paths as seen on the device)."""
    argv = ["classify", "--model", artifact, "--bundle", bundle, "--out", out_dir]
    argv += ["--batch-size", str(batch_size), "--warmup", str(warmup)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


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


def check_inputs(artifact: Path, bundle: Path) -> tuple[int, int | None]:
    """Both inputs exist; returns what a result for the bundle must hold (see above)."""
    for path, what in ((artifact, "compiled artifact"), (bundle, "evaluation bundle")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
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


def remove_results(out_dir: Path) -> None:
    """Delete result files (and half-written temp files) so none is read as this run's."""
    for name in (RESULT_FILE, PROBS_FILE):
        (out_dir / name).unlink(missing_ok=True)
        for partial in out_dir.glob(f".{name}.*"):  # temp files of a killed evaluator or fetch
            partial.unlink(missing_ok=True)


def read_result(out_dir: Path, n_expected: int, classes_expected: int | None) -> DeviceResult:
    """Load probs.npy + result.json written by the evaluator and check they fit the bundle."""
    result_path, probs_path = out_dir / RESULT_FILE, out_dir / PROBS_FILE
    if not result_path.is_file() or not probs_path.is_file():
        raise DeviceError(
            f"the evaluator exited 0 but {out_dir} lacks {RESULT_FILE} or {PROBS_FILE}; "
            "rerun with --debug on the device to see why"
        )
    try:
        info = json.loads(result_path.read_text(encoding="utf-8"))
        probs = np.load(probs_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DeviceError(f"cannot read the evaluator's results in {out_dir}: {exc}") from exc
    _check_result(info, probs, n_expected, classes_expected)
    return DeviceResult(
        probs=probs,
        latency_ms={k: float(v) for k, v in info["latency_ms"].items()},
        throughput_fps=float(info["throughput_fps"]),
        started_at=float(info["started_at"]),
        finished_at=float(info["finished_at"]),
        info=info,
    )


def _check_result(
    info: dict[str, Any], probs: np.ndarray, n_expected: int, classes_expected: int | None
) -> None:
    """Refuse results that do not belong to this bundle or this evaluator."""
    if info.get("evaluator_version") != evaluator_version():
        raise DeviceError(
            f"the device ran evaluator {info.get('evaluator_version')!r} but this controller "
            f"ships {evaluator_version()!r}: reinstall edgetune_eval.py on the device"
        )
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
