"""Stage inputs benchmark: what an evaluation stage spends on the study's inputs before it
can take the board, on a real MLflow server with its artifact proxy.

Each evaluation does what ``ClassifierWorkload.evaluate`` does before ``hold_board``:
``evaluation_inputs`` (the trial's compiled model and the study's validation bundle from
MLflow) and the board runner's staging set-up (``tasks.devices.ssh._Session``, which names
the bundle on the board by its SHA-256). On the work pools the edge pool runs one
evaluation per board at a time, so the next evaluation does this after the last one has
ended, while the board waits.

A synthetic bundle of ``--images`` uint8 images of ``--size`` px (as ``make_bundle``
writes it, uncompressed) is logged once to a study run, as ``prepare_inputs`` logs it.
Then, in alternation, this checkout and the one named by ``--vs`` each run
``--evaluations`` evaluations in a new process with an empty host cache, ``--rounds``
times. Figures per checkout, medians over the rounds: the first evaluation on the host,
the later ones, and the whole sequence.

    python -m bench.stage_inputs --vs /path/to/old-checkout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the evaluations' processes import tasks only (of either checkout)
    from bench.dispatch import Processes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STUDY = "inputs-bench"


def child(args: argparse.Namespace) -> int:
    """One host's sequence of evaluations (runs on the checkout first on PYTHONPATH)."""
    import tasks
    from tasks.config import parse_config
    from tasks.devices.ssh import SshRunner, _Session
    from tasks.tracking import Tracker

    try:
        from tasks.workloads.base import evaluation_inputs as device_inputs
    except ImportError:  # a checkout from before the shared helper
        from tasks.workloads.classifier import device_inputs  # type: ignore[attr-defined,no-redef]

    work = Path(args.work)
    config = parse_config({"run_dir": str(work / "run"), "data": {"root": str(work)},
                           "study": {"name": STUDY}})  # fmt: skip
    tracker = Tracker(args.uri)
    runner = SshRunner(host="127.0.0.1", user="edge")
    seconds = []
    for _ in range(args.evaluations):
        started = time.perf_counter()
        with device_inputs(config, tracker, args.trial, args.study, args.artifact) as inputs:
            compiled, bundle, _ = inputs
            _Session(runner, compiled, bundle)
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"tasks": str(Path(tasks.__file__).parents[1]), "seconds": seconds}))
    return 0


def write_bundle(path: Path, images: int, size: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(
        path,
        images=rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8),
        labels=rng.integers(0, 2, images).astype(np.int64),
        mean=np.asarray([0.485, 0.456, 0.406], dtype=np.float32),
        std=np.asarray([0.229, 0.224, 0.225], dtype=np.float32),
        classes=np.asarray(["broken", "healthy"]),
    )
    return path


def start_mlflow(work: Path, port: int, processes: Processes) -> None:
    from bench.dispatch import _wait_healthy

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    processes.start(
        "mlflow",
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'm.db'}",
         "--artifacts-destination", str(work / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--allowed-hosts", "127.0.0.1,127.0.0.1:*,localhost,localhost:*"],
        env,
    )  # fmt: skip
    _wait_healthy(f"http://127.0.0.1:{port}/health", processes)


def log_inputs(uri: str, work: Path, args: argparse.Namespace) -> dict[str, str]:
    """The study run with its bundle (and hash), a trial run with its compiled model."""
    from tasks.inputs import log_study_input
    from tasks.tracking import Tracker

    tracker = Tracker(uri)
    experiment = tracker.experiment_id(STUDY)
    study = tracker.start_run(experiment, "study")
    made = work / "made" / "inputs"
    made.mkdir(parents=True)
    log_study_input(tracker, study, write_bundle(made / "val_bundle.npz", args.images, args.size),
                    "inputs")  # fmt: skip
    trial = tracker.start_run(experiment, "trial", parent_id=study)
    model = made / "model.onnx"
    model.write_bytes(os.urandom(int(args.model_mb * 1e6)))
    tracker.log_artifact(trial, model, "compiled")
    return {"study": study, "trial": trial, "artifact": "compiled/model.onnx"}


def run_child(checkout: Path, uri: str, runs: dict[str, str], cache: Path, work: Path,
              evaluations: int) -> dict[str, Any]:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(checkout), "EDGETUNE_CACHE_DIR": str(cache)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--uri", uri,
               "--work", str(work), "--evaluations", str(evaluations),
               "--study", runs["study"], "--trial", runs["trial"], "--artifact", runs["artifact"]]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the evaluations on {checkout} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def figures_of(sequence: list[float]) -> dict[str, float]:
    """One host's sequence: its first evaluation, the median of the later ones, the sum."""
    return {"first": sequence[0], "later": statistics.median(sequence[1:]), "total": sum(sequence)}


def summarize(seconds: dict[str, list[list[float]]]) -> dict[str, dict[str, float]]:
    """Medians over the rounds per checkout; ``vs / this`` taken round by round."""
    per_round = {label: [figures_of(s) for s in rounds] for label, rounds in seconds.items()}
    figures = {
        label: {key: statistics.median(f[key] for f in rows) for key in rows[0]}
        for label, rows in per_round.items()
    }
    if "vs" in per_round:
        pairs = list(zip(per_round["vs"], per_round["this"], strict=True))
        figures["vs / this"] = {
            key: statistics.median(vs[key] / this[key] for vs, this in pairs)
            for key in figures["this"]
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child(args)
    checkouts = {"this": ROOT}
    if args.vs:
        checkouts["vs"] = Path(args.vs).resolve()
    seconds: dict[str, list[list[float]]] = {label: [] for label in checkouts}
    imported: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="edgetune-inputs-bench-") as tmp:
        work = Path(tmp)
        from bench.dispatch import Processes, _free_port

        port = _free_port()
        processes = Processes(work)
        try:
            start_mlflow(work, port, processes)
            uri = f"http://127.0.0.1:{port}"
            runs = log_inputs(uri, work, args)
            for index in range(args.rounds):
                order = list(checkouts.items())
                for label, checkout in order if index % 2 == 0 else order[::-1]:
                    cache = work / f"cache-{label}-{index}"
                    got = run_child(checkout, uri, runs, cache, work, args.evaluations)
                    seconds[label].append(got["seconds"])
                    imported[label] = got["tasks"]
                    print(f"round {index + 1} {label} ({got['tasks']}): "
                          + " ".join(f"{s:.3f}" for s in got["seconds"]), flush=True)  # fmt: skip
        finally:
            processes.stop_all()
    report = report_of(args, seconds, imported)
    print(json.dumps(report["figures"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def report_of(
    args: argparse.Namespace, seconds: dict[str, list[list[float]]], imported: dict[str, str]
) -> dict[str, Any]:
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "images": args.images,
        "size": args.size,
        "bundle_mb": args.images * args.size * args.size * 3 / 1e6,
        "model_mb": args.model_mb,
        "evaluations": args.evaluations,
        "rounds": args.rounds,
        "imported": imported,
        "seconds": seconds,
        "figures": summarize(seconds),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000, help="images in the bundle")
    parser.add_argument("--size", type=int, default=224, help="their size in px")
    parser.add_argument("--model-mb", type=float, default=4.0, help="the compiled model's size")
    parser.add_argument("--evaluations", type=int, default=5, help="evaluations per host")
    parser.add_argument("--rounds", type=int, default=3, help="sequences per checkout")
    parser.add_argument("--vs", help="another checkout, run in alternation with this one")
    parser.add_argument("--json", help="write the figures and the times here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--uri", "--work", "--study", "--trial", "--artifact"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.evaluations < 2 or args.rounds < 1 or args.images < 1 or args.size < 1:
        parser.error("--evaluations must be >= 2, --rounds, --images and --size >= 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
