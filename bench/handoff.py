"""Board handoff benchmark: how long the board idles while evaluations wait for it.

Several evaluations (``--waiters`` threads, ``--evaluations`` each) want one board at
once, so work is always waiting. Each evaluation does what the workloads do: before,
``with hold_board(config): runner.evaluate(...)`` (connect, upload and run under the
slot); now, ``with runner.stage(...) as staged, hold_board(config): staged.evaluate(...)``
(everything but the run before the slot). The same script runs against another checkout
(``--vs DIR``, on ``PYTHONPATH``) and picks the sequence that checkout offers.

Figures, from the evaluator's own clock on the board (``started_at``: before the model
is loaded; ``finished_at``: after the device is released):

- ``board idle``: from one evaluation's end to the next one's start;
- ``busy share``: time evaluating / (last end - first start), while work waits;
- ``slot handoff``: from one holder's release of the slot to the next holder taking it;
- ``slot held``: how long each evaluation held the slot.

``--runner ssh`` evaluates on an SSH server on 127.0.0.1 (the tests' board, tests/board.py);
``--slot prefect`` takes the slot from a temporary Prefect server instead of the file lock.

    python -m bench.handoff --runner ssh --vs /path/to/old-checkout
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("board idle", "slot handoff", "slot held")


# ---------------------------------------------------------------- inputs


def write_inputs(folder: Path, images: int) -> tuple[Path, Path]:
    """A tiny float classifier (3×16×16 → 3 classes) and a bundle of `images` images."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    onnx = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 16, 16),),
            str(onnx),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    rng = np.random.default_rng(0)
    bundle = folder / "bundle.npz"
    np.savez(
        bundle,
        images=rng.integers(0, 255, size=(images, 16, 16, 3), dtype=np.uint8),
        labels=rng.integers(0, 3, size=images).astype(np.int64),
        mean=np.array([0.485, 0.456, 0.406], dtype=np.float32),
        std=np.array([0.229, 0.224, 0.225], dtype=np.float32),
        classes=np.array(["a", "b", "c"]),
    )
    return onnx, bundle


# ---------------------------------------------------------------- one side (a subprocess)


def evaluate_once(
    runner: Any, config: Any, artifact: Path, bundle: Path, work: Path
) -> dict[str, float]:
    """One evaluation the way this checkout's workloads do it; its times."""
    from tasks.board import hold_board

    marks: dict[str, float] = {}
    with ExitStack() as stack:
        if hasattr(runner, "stage"):  # stage first, then hold the board for the run only
            staged = stack.enter_context(runner.stage(artifact, bundle))
            with hold_board(config):
                marks["acquired"] = time.time()
                result = staged.evaluate(work)
                marks["released"] = time.time()
        else:
            with hold_board(config):
                marks["acquired"] = time.time()
                result = runner.evaluate(artifact, bundle, work)
                marks["released"] = time.time()
    return {**marks, "started": result.started_at, "finished": result.finished_at}


def worker(spec: dict[str, Any]) -> list[dict[str, float]]:
    """`waiters` threads of `evaluations` evaluations each, all on one board."""
    from tasks.config import DeviceConfig
    from tasks.devices import create_runner

    class Target:  # what hold_board needs of a config: its device section
        device = DeviceConfig(name=spec["board"], wait_timeout_s=600)

    runner = create_runner(spec["runner"], **spec["options"])
    records: list[dict[str, float]] = []
    lock = threading.Lock()

    def one_waiter(index: int) -> None:
        for n in range(spec["evaluations"]):
            work = Path(spec["work"]) / f"w{index}-{n}"
            record = evaluate_once(
                runner, Target, Path(spec["artifact"]), Path(spec["bundle"]), work
            )
            with lock:
                records.append(record)
            time.sleep(spec["after_s"])  # scoring and logging: the board passes to another

    threads = [threading.Thread(target=one_waiter, args=(i,)) for i in range(spec["waiters"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(records) != spec["waiters"] * spec["evaluations"]:
        raise RuntimeError(f"only {len(records)} evaluations finished")
    return records


def run_side(spec: dict[str, Any], checkout: Path, env: dict[str, str]) -> list[dict[str, float]]:
    """This script as a worker with `checkout` first on PYTHONPATH; its records."""
    env = {**env, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker on {checkout} failed:\n{done.stderr[-3000:]}")
    records: list[dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return records


# ---------------------------------------------------------------- figures


def figures(records: list[dict[str, float]]) -> dict[str, Any]:
    """Gaps between consecutive evaluations (in the order they held the board)."""
    ordered = sorted(records, key=lambda r: r["acquired"])
    pairs = list(itertools.pairwise(ordered))
    busy = sum(r["finished"] - r["started"] for r in ordered)
    span = max(r["finished"] for r in ordered) - min(r["started"] for r in ordered)
    return {
        "board idle": [b["started"] - a["finished"] for a, b in pairs],
        "slot handoff": [b["acquired"] - a["released"] for a, b in pairs],
        "slot held": [r["released"] - r["acquired"] for r in ordered],
        "busy share": busy / span,
        "span": span,
    }


def _ms(values: list[float]) -> str:
    return (
        f"{statistics.median(values) * 1e3:7.1f} ({min(values) * 1e3:.1f}–{max(values) * 1e3:.1f})"
    )


def report(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = [f"{'':<14}" + "".join(f"{name:>30}" for name in names)]
    for key in FIGURES:
        lines.append(f"{key + ' ms':<14}" + "".join(f"{_ms(results[n][key]):>30}" for n in names))
    lines.append(
        f"{'busy share':<14}" + "".join(f"{results[n]['busy share']:>30.3f}" for n in names)
    )
    lines.append(f"{'span s':<14}" + "".join(f"{results[n]['span']:>30.2f}" for n in names))
    return "\n".join(lines)


def header(args: argparse.Namespace, loads: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    from importlib.metadata import version

    from bench.dispatch import _loads

    packages = ", ".join(
        f"{p} {version(p)}" for p in ("prefect", "asyncssh", "onnxruntime", "numpy")
    )
    slot = (
        "file lock (embedded)" if args.slot == "embedded" else "Prefect server (SQLite, loopback)"
    )
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"load average (1, 5, 15 min) at start {_loads(loads[0])}, at end {_loads(loads[1])}\n"
        f"Python {platform.python_version()}; {packages}\n"
        f"board: {args.runner} runner, slot: {slot}; {args.waiters} waiters x "
        f"{args.evaluations} evaluations per side, {args.images} images of 16 px, tiny CNN, "
        f"warm-up 5, {args.after_s:g} s of work after each; ms, median (min–max) over "
        f"consecutive pairs"
    )


# ---------------------------------------------------------------- command line


@contextmanager
def board_options(runner: str, root: Path) -> Iterator[dict[str, Any]]:
    """The runner's options; for ssh, an SSH server on loopback for the benchmark's life."""
    if runner == "local":
        yield {"warmup": 5, "timeout_s": 600}
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from board import start_board

    with start_board(root / "board") as board:
        yield board.runner_options(warmup=5, timeout_s=600)


@contextmanager
def slot_environment(slot: str, board: str) -> Iterator[dict[str, str]]:
    """The workers' environment: no Prefect server (embedded), or a temporary one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    if slot == "embedded":
        yield env
        return
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from tasks.board import ensure_device_limit
    from tasks.config import DeviceConfig

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        ensure_device_limit(DeviceConfig(name=board).concurrency_limit)
        yield {**env, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runner", choices=("local", "ssh"), default="local")
    parser.add_argument("--slot", choices=("embedded", "prefect"), default="embedded")
    parser.add_argument("--waiters", type=int, default=3)
    parser.add_argument("--evaluations", type=int, default=4, help="per waiter")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument(
        "--after-s", type=float, default=0.3, help="work after each evaluation, off the board"
    )
    parser.add_argument("--vs", type=Path, help="another edgetune checkout to compare with")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    sides = {"this checkout": ROOT}
    if args.vs is not None:
        sides = {f"--vs {args.vs.name}": args.vs.resolve(), **sides}
    start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-handoff-") as tmp:
        artifact, bundle = write_inputs(Path(tmp), args.images)
        results: dict[str, dict[str, Any]] = {}
        with board_options(args.runner, Path(tmp)) as options:
            for name, checkout in sides.items():
                board = f"bench-handoff-{uuid.uuid4().hex[:8]}"
                spec = {
                    "runner": args.runner,
                    "options": options,
                    "board": board,
                    "waiters": args.waiters,
                    "evaluations": args.evaluations,
                    "after_s": args.after_s,
                    "artifact": str(artifact),
                    "bundle": str(bundle),
                    "work": str(Path(tmp) / board),
                }
                with slot_environment(args.slot, board) as env:
                    results[name] = figures(run_side(spec, checkout, env))
    print(header(args, (start, os.getloadavg())))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
