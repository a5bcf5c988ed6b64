"""Pipeline benchmark: the real orchestration with synthetic stages of known durations.

Brings up PostgreSQL, the Prefect server and the MLflow server (``infra/services.sh``),
process workers for every pool (``infra/workers.sh``), deploys the synthetic stage flows
of ``bench/synthetic.py`` with the configured durations, and runs the ``tune`` deployment
once per design:

- ``pipelined``: a GPU slot is freed when training ends (edgetune's design);
- ``blocking``: the GPU slot is held through compilation and the board wait.

It prints throughput against the capacity bound
``trials/h <= 60 * min(N_gpu / E[train], C_compile / E[compile], 1 / E[device])`` (minutes),
GPU-slot and board utilisation, and the orchestration seconds per trial (time the parent
saw a stage take, minus the stage's own work, minus waiting for the busy board).

    python -m bench.pipeline --gpus 2 --train 30 --compile 8 --device 6 --trials 8
    python -m bench.pipeline --scenarios gpu,board --trials 20 --repeats 3

``--scenarios`` names preset durations (``SCENARIOS``: GPU-bound and board-bound), run one
after the other on the same cluster; ``--repeats`` runs every design that many times,
alternating the designs, and reports each metric's median over the repeats.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: Preset stage durations (seconds): what limits throughput in each.
SCENARIOS: dict[str, dict[str, float]] = {
    "gpu": {"train": 60.0, "compile": 15.0, "device": 10.0},  # 2 GPUs: 2/60 < 1/15, 1/10
    "board": {"train": 30.0, "compile": 5.0, "device": 20.0},  # 1/20 < 2/30, 1/5
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(
            f"error: {shlex.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return done.stdout


def _exports(text: str) -> dict[str, str]:
    pairs = (
        line.removeprefix("export ").partition("=")
        for line in text.splitlines()
        if line.startswith("export ")
    )
    return {key: shlex.split(value)[0] for key, _, value in pairs if value}


def start_cluster(state: Path, args: argparse.Namespace) -> dict[str, str]:
    env = {
        **os.environ,
        "EDGETUNE_STATE_DIR": str(state),
        "EDGETUNE_PG_PORT": str(_free_port()),
        "EDGETUNE_PREFECT_PORT": str(_free_port()),
        "EDGETUNE_MLFLOW_PORT": str(_free_port()),
        "EDGETUNE_VENV": str(BIN.parent),
        "EDGETUNE_GPU_WORKERS": str(args.gpus),
        "PYTHONPATH": str(ROOT),  # workers import bench.synthetic
        "PREFECT_WORKER_QUERY_SECONDS": str(args.worker_poll),
        # gpu, compile and edge: edgetune's stage worker, serving the synthetic stages (or
        # Prefect's process worker, a new interpreter per run, with --workers process)
        "EDGETUNE_WORKER_KIND": args.workers,
        "EDGETUNE_WORKER_STAGES": ",".join(
            f"bench.synthetic:{name}" for name in ("bench_train", "bench_compile", "bench_device")
        ),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    _run([str(ROOT / "infra" / "services.sh"), "up"], env)
    env.update(_exports(_run([str(ROOT / "infra" / "services.sh"), "env"], env)))
    _run([str(BIN / "edgetune"), "deploy", "--device", "bench-board"], env)
    _run([str(ROOT / "infra" / "workers.sh"), "up"], env)
    return env


def stop_cluster(env: dict[str, str]) -> None:
    for script in ("workers.sh", "services.sh"):
        subprocess.run(
            [str(ROOT / "infra" / script), "down"], env=env, capture_output=True, timeout=180
        )


def deploy_synthetic(args: argparse.Namespace) -> None:
    """The synthetic stages, with their durations as deployment defaults; compile slots set."""
    from prefect.client.orchestration import get_client

    from bench.synthetic import bench_compile, bench_device, bench_train
    from tasks.deploy import ensure_pool

    with get_client(sync_client=True) as client:
        ensure_pool(client, "compile", args.compile_slots)
    for flow, pool, seconds in (
        (bench_train, "gpu", args.train),
        (bench_compile, "compile", args.compile),
        (bench_device, "edge", args.device),
    ):
        from prefect.deployments.runner import EntrypointType

        flow.to_deployment(
            name=pool, parameters={"seconds": seconds}, entrypoint_type=EntrypointType.MODULE_PATH
        ).apply(work_pool_name=pool)


def study_config(
    design: str, data: Path, run_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "data": {"root": str(data), "image_size": 8},
        "compile": {"calibration_samples": 16},
        "device": {"name": "bench-board"},
        "study": {
            "name": f"bench-{design}-{int(time.time())}",
            "n_trials": args.trials,
            "parallel": args.gpus,
            "max_pending": args.gpus,
            "bootstrap": 0,
            "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
        },
        "train": {"epochs": 2, "swa_start": 1},
        "orchestration": {
            "mode": "deployments",
            "train_deployment": "bench-train/gpu",
            "compile_deployment": "bench-compile/compile",
            "device_deployment": "bench-device/edge",
            "pipelined": design == "pipelined",
            "poll_interval_s": args.parent_poll,
        },
    }


def queue_waits(ready: list[float], spans: list[tuple[float, float]], slots: int) -> list[float]:
    """How long each job waited because all ``slots`` of its stage were taken by others
    (in the stage, or queued ahead of it and started before it): none if a slot was free
    when it was ready; else until the last slot released before it started (the jobs
    ahead of it took the earlier ones). The rest of its wait, from that release to its
    start, is the handoff: dispatch."""
    waits = []
    for i, (at, (start, _)) in enumerate(zip(ready, spans, strict=True)):
        others = [
            (r, s, e) for j, (r, (s, e)) in enumerate(zip(ready, spans, strict=True)) if j != i
        ]
        taken = sum(1 for r, s, e in others if s <= at < e or (r <= at < s and s <= start))
        if taken < slots:
            waits.append(0.0)
            continue
        released = max((e for _, _, e in others if at < e <= start), default=at)
        waits.append(released - at)
    return waits


def handoff_gaps(ready: list[float], spans: list[tuple[float, float]]) -> list[float]:
    """The board's idle time between one evaluation and the next, where the next model was
    ready (compiled) before the board came free: what a handoff costs."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    return [
        spans[b][0] - spans[a][1] for a, b in itertools.pairwise(order) if ready[b] <= spans[a][1]
    ]


def shortest_span(
    trials: int, gpus: int, compile_slots: int, train: float, compile_s: float, device: float
) -> float:
    """A lower bound on the span of ``trials`` trials under any schedule, with no dispatch
    cost: the run's head and tail that even a perfect orchestrator pays.

    - GPUs: some ``r`` slots train ``m = ceil(trials/gpus)`` times, so ``r`` models are
      trained no earlier than ``m·train``; they still need the compiler (``ceil(r/C)``
      rounds) and the board, or the compiler and ``r`` evaluations on the one board;
    - the compiler: the first model is trained at ``train`` the earliest, then
      ``ceil(trials/C)`` compile rounds and one evaluation;
    - the board: the first model reaches it at ``train + compile`` the earliest, then
      ``trials`` evaluations, one at a time.
    """
    rounds = -(-trials // gpus)
    last = trials - (rounds - 1) * gpus  # slots that train ``rounds`` times
    after_last = max(-(-last // compile_slots) * compile_s + device, compile_s + last * device)
    return max(
        rounds * train + after_last,
        train + -(-trials // compile_slots) * compile_s + device,
        train + compile_s + trials * device,
    )


def measure(study: Any, args: argparse.Namespace) -> dict[str, float]:
    trials = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    a = [t.user_attrs for t in trials]
    start = min(x["asked_at"] for x in a)
    wall = max(x["evaluate_returned_at"] for x in a) - start
    train_work = [x["train_finished"] - x["train_started"] for x in a]
    compile_spans = [(x["compile_started"], x["compile_finished"]) for x in a]
    board = [(x["device_started"], x["device_finished"]) for x in a]
    compiled = [x["compile_finished"] for x in a]
    compile_wait = queue_waits([x["train_finished"] for x in a], compile_spans, args.compile_slots)
    board_wait = queue_waits(compiled, board, 1)
    overhead = []
    for i, x in enumerate(a):
        train_span = x["train_returned_at"] - x["asked_at"]
        eval_span = x["evaluate_returned_at"] - x["train_returned_at"]
        work = train_work[i] + (compile_spans[i][1] - compile_spans[i][0])
        work += board[i][1] - board[i][0]
        overhead.append(train_span + eval_span - work - compile_wait[i] - board_wait[i])
    minutes = {k: getattr(args, k) / 60 for k in ("train", "compile", "device")}
    bound = 60 * min(
        args.gpus / minutes["train"], args.compile_slots / minutes["compile"], 1 / minutes["device"]
    )
    throughput = len(trials) / wall * 3600
    gaps = handoff_gaps(compiled, board)
    best = shortest_span(
        len(trials), args.gpus, args.compile_slots, args.train, args.compile, args.device
    )
    return {
        "trials": len(trials),
        "wall_s": wall,
        "throughput_per_h": throughput,
        "bound_per_h": bound,
        "fraction_of_bound": throughput / bound,
        # the most any schedule reaches over a run of this many trials (its head and tail),
        # and how much of that this run reached
        "best_fraction_of_bound": len(trials) / best * 3600 / bound,
        "span_best_over_measured": best / wall,
        "gpu_utilisation": sum(train_work) / (args.gpus * wall),
        "board_utilisation": sum(e - s for s, e in board) / wall,
        # the same, without the run's head and tail: GPUs while trainings remained, the
        # board from its first evaluation on (what a long study tends to)
        "gpu_utilisation_while_training": sum(train_work)
        / (args.gpus * (max(x["train_finished"] for x in a) - start)),
        "board_utilisation_from_first_evaluation": sum(e - s for s, e in board)
        / (max(e for _, e in board) - min(s for s, _ in board)),
        "orchestration_s_per_trial": statistics.median(overhead),
        "orchestration_share_of_7min_trial": statistics.median(overhead) / 420,
        "queued_at_full_stages_s_per_trial": statistics.median(
            c + b for c, b in zip(compile_wait, board_wait, strict=True)
        ),
        "board_handoff_idle_s": statistics.median(gaps) if gaps else float("nan"),
    }


def run_design(design: str, data: Path, args: argparse.Namespace) -> dict[str, float]:
    import optuna
    from prefect.deployments import run_deployment

    from tasks.storage import open_storage

    config = study_config(design, data, Path(tempfile.mkdtemp(prefix=f"bench-{design}-")), args)
    flow_run: Any = run_deployment("tune/classifier", parameters={"config": config}, timeout=None)
    if not flow_run.state.is_completed():
        sys.exit(
            f"error: the {design} study ended {flow_run.state.type.value}: {flow_run.state.message}"
        )
    study = optuna.load_study(
        study_name=config["study"]["name"], storage=open_storage(os.environ["EDGETUNE_STORAGE"])
    )
    if args.timelines:  # each trial's stage times, for a closer look
        args.timelines.mkdir(parents=True, exist_ok=True)
        times = [
            {"number": t.number, **{k: v for k, v in t.user_attrs.items() if k in TIMES}}
            for t in study.get_trials()
        ]
        (args.timelines / f"{config['study']['name']}.json").write_text(json.dumps(times))
        stages = stage_run_times(config["study"]["name"])
        (args.timelines / f"{config['study']['name']}-stages.json").write_text(json.dumps(stages))
        print(dispatch_report(times, stages), file=sys.stderr)
        print(setup_report(times, stages), file=sys.stderr)
    return measure(study, args)


def stage_run_times(study_name: str) -> list[dict[str, Any]]:
    """Each stage flow run of the study as Prefect saw it: its name, when it was created,
    and when it first entered each state (seconds since the epoch)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    found = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"study:{study_name}"]))
        )
        for run in runs:
            entered: dict[str, float] = {}
            for state in sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp):
                # the first time (a worker proposes PENDING twice: taken, then submitting)
                entered.setdefault(state.type.value, state.timestamp.timestamp())
            entered.pop("SCHEDULED", None)
            found.append({"name": run.name, "created": run.created.timestamp(), **entered})
    return found


def dispatch_report(times: list[dict[str, Any]], stages: list[dict[str, Any]]) -> str:
    """Where a training's dispatch goes, median seconds over trials: the parent (asked to
    the flow run created), the worker's poll (created to PENDING), the process start
    (PENDING to RUNNING), the stage's set-up (RUNNING to its work), and the return (work
    done to the parent reading it)."""
    by_name = {run["name"]: run for run in stages}
    rows: dict[str, list[float]] = {}
    for t in times:
        run = by_name.get(f"train-trial-{t['number']}")
        if run is None or "RUNNING" not in run or "train_started" not in t:
            continue
        parts = {
            "asked -> created": run["created"] - t["asked_at"],
            "created -> pending": run.get("PENDING", run["RUNNING"]) - run["created"],
            "pending -> running": run["RUNNING"] - run.get("PENDING", run["RUNNING"]),
            "running -> work": t["train_started"] - run["RUNNING"],
            "work done -> completed": run.get("COMPLETED", t["train_finished"])
            - t["train_finished"],
            "completed -> returned": t["train_returned_at"]
            - run.get("COMPLETED", t["train_finished"]),
        }
        for key, value in parts.items():
            rows.setdefault(key, []).append(value)
    return "training dispatch, median s (min-max): " + "; ".join(
        f"{k} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in rows.items()
    )


def setup_report(times: list[dict[str, Any]], stages: list[dict[str, Any]]) -> str:
    """The set-up of each compile and evaluation run (RUNNING to its work), median seconds
    over trials: what the stage does before its compiler or its board."""
    by_name = {run["name"]: run for run in stages}
    parts = []
    for stage, prefix, started in (("compile", "compile-trial", "compile_started"),
                                   ("evaluate", "evaluate-trial", "device_started")):  # fmt: skip
        found = [
            t[started] - by_name[f"{prefix}-{t['number']}"]["RUNNING"]
            for t in times
            if started in t and "RUNNING" in by_name.get(f"{prefix}-{t['number']}", {})
        ]
        if found:
            parts.append(
                f"{stage} {statistics.median(found):.2f} ({min(found):.2f}-{max(found):.2f})"
            )
    return "stage set-up (running -> work), median s (min-max): " + "; ".join(parts)


#: The trial attributes that time its stages (as the parent and the stages saw them).
TIMES = (
    "asked_at", "train_started", "train_finished", "train_returned_at", "compile_started",
    "compile_finished", "device_started", "device_finished", "evaluate_returned_at",
)  # fmt: skip


def header(args: argparse.Namespace) -> str:
    from importlib.metadata import version

    packages = ", ".join(f"{p} {version(p)}" for p in ("prefect", "optuna", "mlflow"))
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"Python {platform.python_version()}; {packages}\n"
        f"config: N_gpu={args.gpus}, C_compile={args.compile_slots}, E[train]={args.train}s, "
        f"E[compile]={args.compile}s, E[device]={args.device}s, {args.trials} trials per design, "
        f"{args.workers} workers, worker poll {args.worker_poll}s, parent poll {args.parent_poll}s, "
        f"{args.repeats} repeat(s), medians"
    )


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's median over the repeats of one design."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def run_scenario(args: argparse.Namespace, data: Path) -> dict[str, list[dict[str, float]]]:
    """Every design ``args.repeats`` times, alternating (slow drifts of the machine's load
    fall on every design alike)."""
    deploy_synthetic(args)
    designs = args.designs.split(",")
    runs: dict[str, list[dict[str, float]]] = {design: [] for design in designs}
    for _ in range(args.repeats):
        for design in designs:
            runs[design].append(run_design(design, data, args))
    return runs


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]]) -> str:
    results = {design: medians(values) for design, values in runs.items()}
    keys = list(next(iter(results.values())))
    lines = [
        header(args),
        "| metric | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{r[key]:.3g}" for r in results.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--compile-slots", type=int, default=1)
    parser.add_argument("--train", type=float, default=30.0, help="seconds per training")
    parser.add_argument("--compile", type=float, default=8.0, help="seconds per compile")
    parser.add_argument("--device", type=float, default=6.0, help="seconds per device evaluation")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--designs", default="pipelined,blocking")
    parser.add_argument(
        "--worker-poll", type=float, default=2.0, help="PREFECT_WORKER_QUERY_SECONDS"
    )
    parser.add_argument(
        "--parent-poll", type=float, default=1.0, help="run_deployment poll interval"
    )
    parser.add_argument(
        "--workers", choices=("stage", "process"), default="stage",
        help="the gpu, compile and edge pools' worker: edgetune's stage worker, or Prefect's "
        "process worker",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="runs of each design")
    parser.add_argument(
        "--scenarios", default="", help=f"preset durations, run in turn: {','.join(SCENARIOS)}"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--timelines", type=Path, help="write each study's stage times per trial in this folder"
    )
    args = parser.parse_args(argv)
    scenarios = [name for name in args.scenarios.split(",") if name]
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown or args.repeats < 1:
        parser.error(
            f"--scenarios takes {', '.join(SCENARIOS)} (got {unknown[0]!r})"
            if unknown
            else f"--repeats must be >= 1, but got {args.repeats}"
        )

    from tasks.data import write_digits

    work = Path(tempfile.mkdtemp(prefix="edgetune-bench-"))
    data = work / "digits"
    write_digits(data)
    env = start_cluster(work / "services", args)
    os.environ.update(
        {k: env[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "EDGETUNE_STORAGE")}
    )
    record: dict[str, Any] = {}
    try:
        for name in scenarios or ["custom"]:
            vars(args).update(SCENARIOS.get(name, {}))
            runs = run_scenario(args, data)
            print(f"\n## {name}-bound" if name != "custom" else "", report(args, runs), sep="\n")
            record[name] = {"header": header(args), "runs": runs}
    finally:
        stop_cluster(env)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
