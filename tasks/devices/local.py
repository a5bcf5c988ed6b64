"""`local`: run the device evaluator as a subprocess on this host.

The embedded mode's device (with the `onnxruntime-int8` compiler), and a board's own
runner when the controller runs on the board. Staging makes a run folder of its own in
the system's temporary folder, copies the evaluator there (exactly as a remote runner
installs it on a board, so it cannot import anything from this project by accident) and
links or copies the artifact beside it; the folder is removed when the staging ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from tasks.devices.base import (
    DeviceConfigError,
    DeviceError,
    DeviceRunner,
    EvalJob,
    Placed,
    evaluator_failure,
    evaluator_path,
    job_argv,
)

EVALUATOR_DIR = "evaluator"
RUN_PREFIX = "edgetune-run-"  # the run folders of stagings, in the system's temp folder


class LocalRunner(DeviceRunner):
    """Evaluator in a child process (own process group, killed on timeout or error)."""

    name: ClassVar[str] = "local"

    def __init__(
        self,
        python: str = sys.executable,
        timeout_s: float = 600,
        batch_size: int = 1,
        warmup: int = 5,
        threads: int | None = None,
    ) -> None:
        if timeout_s <= 0 or batch_size < 1 or warmup < 0 or (threads is not None and threads < 1):
            raise ValueError(
                f"local runner: timeout_s={timeout_s}, batch_size={batch_size}, warmup={warmup}, "
                f"threads={threads}; timeout_s must be > 0, batch_size and threads >= 1, "
                "warmup >= 0"
            )
        self.python = python
        self.timeout_s = float(timeout_s)
        self.batch_size = batch_size
        self.warmup = warmup
        self.threads = threads

    @contextmanager
    def _stage(self, artifact: Path, bundle: Path, key: str | None = None) -> Iterator[Placed]:
        run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX))
        try:
            script = _install_evaluator(run_dir / EVALUATOR_DIR)
            staged = _place(artifact, run_dir / artifact.name)
            bundle = bundle.resolve()

            def run(job: EvalJob, out_dir: Path) -> None:
                argv = job_argv(
                    job,
                    str(staged),
                    str(bundle),
                    str(out_dir.resolve()),
                    self.batch_size,
                    self.warmup,
                    self.threads,
                )
                self._run([self.python, str(script), *argv], f"{job.command} {artifact.name}")

            yield Placed(run, str(run_dir))
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="edgetune-eval-") as tmp:
            script = _install_evaluator(Path(tmp))
            stdout = self._run([self.python, str(script), "info"], "evaluator info")
        try:
            report: dict[str, Any] = json.loads(stdout)
        except json.JSONDecodeError as exc:
            raise DeviceError(f"evaluator info printed no JSON ({exc}): {stdout[-500:]!r}") from exc
        return report

    def _run(self, argv: list[str], what: str) -> str:
        """Run the evaluator; return stdout; DeviceError on non-zero exit or timeout."""
        try:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its own process group, so a kill takes it all
            )
        except OSError as exc:
            raise DeviceConfigError(
                f"cannot start the evaluator with {self.python!r} ({exc}); the local runner's "
                "python option must name a Python with numpy and onnxruntime (by default, the "
                "one running edgetune)"
            ) from exc
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise DeviceError(
                f"device evaluation timed out after {self.timeout_s:g}s ({what}); raise "
                "device.timeout_s, or evaluate fewer images or with a larger batch size"
            ) from None
        except BaseException:
            _kill(proc)
            raise
        if proc.returncode != 0:
            raise evaluator_failure(f"device evaluator ({what})", proc.returncode, stderr)
        return stdout


def _install_evaluator(directory: Path) -> Path:
    """Copy the shipped evaluator into `directory` (as a remote runner uploads it)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / evaluator_path().name
    shutil.copyfile(evaluator_path(), target)
    return target


def _place(artifact: Path, target: Path) -> Path:
    """The artifact in the run folder: a hard link where the filesystem allows, else a copy."""
    try:
        os.link(artifact, target)
    except OSError:
        shutil.copyfile(artifact, target)
    return target


def _kill(proc: subprocess.Popen[str]) -> None:
    """Kill the evaluator's whole process group and reap it."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover - not POSIX
            proc.kill()
    except ProcessLookupError:
        pass
    proc.communicate()
