"""Sent-ahead benchmark: what an evaluation does before it can take the board, with and
without its model sent ahead, on a real MLflow server (artifact proxy) and a real SSH
server on loopback standing in for the board.

On the work pools the edge pool admits one evaluation run per board, so each evaluation's
set-up happens while the board waits: its compiled model from MLflow, the SSH connection,
the evaluator and bundle checks, the model's upload. The edge worker now does the model's
part for the run waiting next while the board is busy (``Workload.prestage``:
``stage_artifact``, the bundle from the host's cache, ``SshRunner.prestage``), and the run
takes what was sent (``evaluation_inputs``, ``runner.stage(..., key)``).

Each evaluation here times what ``ClassifierWorkload.evaluate`` does before
``hold_board``: ``evaluation_inputs`` and entering ``runner.stage``. "ahead" runs the
prestage first (timed apart: it happens while another evaluation holds the board);
"plain" stages without a key, as before. The two alternate, evaluation by evaluation, each
on a trial of its own (a random model of ``--model-mb``; nothing is run on the board).

    python -m bench.ahead --evaluations 10 --model-mb 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def one_evaluation(
    runner: Any, config: Any, tracker: Any, runs: dict[str, str], ahead: bool
) -> dict[str, float]:
    """Seconds before the board for one evaluation (and of its prestage, when ``ahead``)."""
    from tasks.inputs import fetch_study_input, stage_artifact, staging_key
    from tasks.workloads.base import BUNDLE, evaluation_inputs, scratch

    trial, study, artifact = runs["trial"], runs["study"], runs["artifact"]
    key = staging_key(trial, artifact)
    record: dict[str, float] = {}
    if ahead:  # Workload.prestage's steps, with this runner
        started = time.perf_counter()
        compiled = stage_artifact(tracker, trial, artifact)
        with scratch(config, "prestage") as work:
            bundle = fetch_study_input(tracker, study, BUNDLE, work)
            assert runner.prestage(compiled, bundle, key)
        record["ahead_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with evaluation_inputs(config, tracker, trial, study, artifact) as inputs:
        compiled, bundle, _ = inputs
        with runner.stage(compiled, bundle, key if ahead else None):
            record["before_board_s"] = time.perf_counter() - started
    return record


def trial_runs(tracker: Any, study: str, work: Path, count: int, model_mb: float) -> list[str]:
    from bench.stage_inputs import STUDY

    experiment = tracker.experiment_id(STUDY)
    runs = []
    for index in range(count):
        model = work / "made" / f"trial-{index}" / "model.onnx"
        model.parent.mkdir(parents=True)
        model.write_bytes(os.urandom(int(model_mb * 1e6)))
        run = tracker.start_run(experiment, f"trial-{index}", parent_id=study)
        tracker.log_artifact(run, model, "compiled")
        runs.append(run)
    return runs


def measure(args: argparse.Namespace, work: Path) -> dict[str, list[dict[str, float]]]:
    from bench.dispatch import Processes

    sys.path.insert(0, str(ROOT / "tests"))
    from board import start_board

    os.environ["EDGETUNE_CACHE_DIR"] = str(work / "cache")
    processes = Processes(work)
    with start_board(work / "board") as board:
        try:
            return _measured(args, work, board, processes)
        finally:
            processes.stop_all()


def _measured(
    args: argparse.Namespace, work: Path, board: Any, processes: Any
) -> dict[str, list[dict[str, float]]]:
    from bench.dispatch import _free_port
    from bench.stage_inputs import STUDY, log_inputs, start_mlflow
    from tasks.config import parse_config
    from tasks.devices import create_runner
    from tasks.tracking import Tracker

    port = _free_port()
    start_mlflow(work, port, processes)
    uri = f"http://127.0.0.1:{port}"
    tracker = Tracker(uri)
    runs = log_inputs(uri, work, args)
    trials = trial_runs(tracker, runs["study"], work, 2 * args.evaluations, args.model_mb)
    config = parse_config({"run_dir": str(work / "run"), "data": {"root": str(work)},
                           "study": {"name": STUDY}})  # fmt: skip
    runner = create_runner("ssh", **board.runner_options(timeout_s=600))
    one_evaluation(runner, config, tracker, runs, ahead=False)  # the host's bundle cache
    results: dict[str, list[dict[str, float]]] = {"ahead": [], "plain": []}
    for index in range(args.evaluations):
        order = ("ahead", "plain") if index % 2 == 0 else ("plain", "ahead")
        for offset, mode in enumerate(order):
            trial = {**runs, "trial": trials[2 * index + offset]}
            results[mode].append(one_evaluation(runner, config, tracker, trial, mode == "ahead"))
    return results


def figures(results: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Medians per mode, and plain / ahead taken evaluation pair by evaluation pair."""
    ratios = [
        p["before_board_s"] / a["before_board_s"]
        for a, p in zip(results["ahead"], results["plain"], strict=True)
    ]
    return {
        "plain_s": statistics.median(r["before_board_s"] for r in results["plain"]),
        "ahead_s": statistics.median(r["before_board_s"] for r in results["ahead"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "prestage_s": statistics.median(r["ahead_s"] for r in results["ahead"]),
    }


def report(found: dict[str, float], args: argparse.Namespace) -> str:
    return "\n".join(
        [
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
            f"loopback MLflow and SSH; model {args.model_mb:g} MB, {args.evaluations} "
            "evaluations per mode",
            f"before the board, plain (median s): {found['plain_s']:.3f}",
            f"before the board, ahead (median s): {found['ahead_s']:.3f}",
            f"plain / ahead, pair by pair: median {found['ratio']:.2f} "
            f"({found['ratio_min']:.2f}-{found['ratio_max']:.2f})",
            f"the prestage, while the board is busy (median s): {found['prestage_s']:.3f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=10)
    parser.add_argument("--model-mb", type=float, default=8.0)
    parser.add_argument("--images", type=int, default=200, help="bundle images")
    parser.add_argument("--size", type=int, default=224, help="bundle image size (px)")
    parser.add_argument("--json", type=Path, help="write the raw records here")
    args = parser.parse_args(argv)
    if args.evaluations < 1 or args.model_mb <= 0:
        parser.error("--evaluations must be >= 1 and --model-mb > 0")
    with tempfile.TemporaryDirectory(prefix="edgetune-ahead-") as tmp:
        results = measure(args, Path(tmp))
    found = figures(results)
    if args.json:
        args.json.write_text(json.dumps({"records": results, "figures": found}, indent=2))
    print(report(found, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
