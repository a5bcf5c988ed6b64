"""Sample-efficiency benchmark: how many trials (and how much compute) each search strategy
needs to find a top-1% configuration, on a task whose whole grid is known.

Two phases:

``table``
    Every point of a small discrete search space (``SPACE``) is run once through the
    stages of a real trial, with edgetune's own code: FMFP training
    (``tasks.training.fmfp``) with the per-epoch float validation AUGRC recorded, ONNX
    export with the parity check, the ``onnxruntime-int8`` compiler, and the shipped
    evaluator on the ``local`` device runner, scored with ``tasks.metrics``. The seconds
    spent in each stage are kept with the point. The table is a JSON file, written after
    every point; running the phase again continues where it stopped.

``replay``
    For each strategy (a sampler, optionally with a pruner) and each seed, an in-memory
    Optuna study built with ``tasks.hpo.study.make_sampler``, ``make_pruner`` and ``suggest``
    asks trials one at a time, and each is answered from the table: the per-epoch
    ``val_augrc`` is reported and ``should_prune`` consulted as ``tasks.hpo.study.epoch_reporter``
    does, a pruned trial costs only the epochs it ran, and a finished one costs its
    training, export, compilation and board time and tells the device AUGRC. A run stops at
    its first trial inside the grid's top 1% (or at the trial budget).

    python -m bench.sample_efficiency table --out runs/bench-se/table.json
    python -m bench.sample_efficiency replay --table runs/bench-se/table.json --seeds 50
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from tasks.config import SearchParam

TABLE_VERSION = 1

#: The benchmark's search space: 5 x 4 x 3 x 3 = 180 points, every one a real trial setting.
SPACE: dict[str, SearchParam] = {
    "lr": SearchParam(type="categorical", choices=[0.01, 0.03, 0.1, 0.3, 1.0]),
    "momentum": SearchParam(type="float", low=0.8, high=0.95, step=0.05),
    "weight_decay": SearchParam(type="categorical", choices=[1e-5, 1e-4, 1e-3]),
    "swa_start": SearchParam(type="int", low=3, high=5),
}

OBJECTIVES = ("device_augrc", "float_augrc")
SAMPLERS = ("random", "tpe", "cmaes", "gp", "nsga2")
PRUNERS = ("none", "median", "asha", "hyperband")
DEFAULT_STRATEGIES = "random,tpe,tpe+median,tpe+asha"


class BenchError(ValueError):
    """Bad input or an unusable table; the message names the problem and the fix."""


# The grid ---------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """A parameter value as it is stored in the table: floats to 10 significant digits, so
    ``0.8500000000000001`` from a stepped range and ``0.85`` from the grid are one key."""
    if isinstance(value, bool) or not isinstance(value, float):
        return value
    return float(f"{value:.10g}")


def point_key(params: Mapping[str, Any]) -> str:
    return json.dumps({k: _canonical(params[k]) for k in sorted(params)}, sort_keys=True)


def grid_points(space: Mapping[str, SearchParam]) -> list[dict[str, Any]]:
    """Every combination of the space's values, in a fixed order."""
    from tasks.hpo.study import grid_values

    names = list(space)
    values = [grid_values(space[name]) for name in names]
    return [
        {n: _canonical(v) for n, v in zip(names, combo, strict=True)}
        for combo in itertools.product(*values)
    ]


def space_dump(space: Mapping[str, SearchParam]) -> dict[str, Any]:
    return {name: spec.model_dump(exclude_none=True) for name, spec in space.items()}


def space_load(raw: Mapping[str, Any]) -> dict[str, SearchParam]:
    return {name: SearchParam.model_validate(spec) for name, spec in raw.items()}


# The table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One grid point as the replay needs it."""

    params: dict[str, Any]
    curve: tuple[float, ...]  # float validation AUGRC after each epoch (nan: not finite)
    epoch_s: tuple[float, ...]  # training seconds from the start to the end of each epoch
    values: dict[str, float | None]  # objective name -> final value (None: the trial failed)
    train_s: float  # the whole training (all epochs and the SWA model's copy)
    export_s: float
    compile_s: float
    device_s: float

    @property
    def epochs(self) -> int:
        return len(self.curve)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def table_settings(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """What a table's numbers depend on; a resumed table must have been made with the same."""
    return {
        "data": str(data.resolve()),
        "arch": "tinycnn",
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": not args.no_device,
        "calibration_samples": args.calibration_samples,
        "space": space_dump(SPACE),
    }


def study_config(settings: Mapping[str, Any], run_dir: Path) -> Any:
    """The edgetune config a study over this space would run (validated like any config)."""
    from tasks.config import parse_config

    raw = {
        "seed": settings["seed"],
        "run_dir": str(run_dir),
        "data": {"root": settings["data"], "image_size": settings["image_size"]},
        "model": {"arch": settings["arch"]},
        "train": {
            "epochs": settings["epochs"],
            "batch_size": settings["batch_size"],
            "swa_lr": 0.01,
            "device": "cpu",
        },
        "compile": {
            "backend": "onnxruntime-int8",
            "calibration_samples": settings["calibration_samples"],
        },
        "device": {"name": "local-cpu", "runner": "local", "warmup": 2},
        "study": {
            "name": "sample-efficiency",
            "search_space": settings["space"],
            "bootstrap": 0,
        },
    }
    return parse_config(raw, source="benchmark config")


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: version(p) for p in ("torch", "optuna", "onnxruntime")},
    }


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=1))
    partial.replace(path)


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise BenchError(f"{what} {path} not found; {fix}")
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{what} {path} is not readable JSON ({exc}); {fix}") from None
    if not isinstance(payload, dict):
        raise BenchError(f"{what} {path} is not a JSON object; {fix}")
    return payload


def open_table(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The table at ``path`` to continue, or a new one; refuse one made with other settings."""
    if not path.exists():
        return {"version": TABLE_VERSION, "settings": settings, "machine": machine(), "points": {}}
    table = _read_json(path, "table", "delete it or choose another --out")
    if table.get("version") != TABLE_VERSION or not isinstance(table.get("points"), dict):
        raise BenchError(
            f"table {path} is not a version-{TABLE_VERSION} benchmark table; choose another --out"
        )
    differ = sorted(
        key
        for key in set(settings) | set(table.get("settings", {}))
        if settings.get(key) != table["settings"].get(key)
    )
    if differ:
        raise BenchError(
            f"table {path} was made with other settings ({', '.join(differ)} differ); "
            f"continue it with the same options or choose another --out"
        )
    return table


@dataclass
class TableInputs:
    """What every point shares: the dataset, the evaluation bundle, the calibration set."""

    config: Any
    info: Any
    bundle: Path
    calibration: Path
    val_x: Any
    val_y: Any


def prepare(config: Any, work: Path) -> TableInputs:
    from tasks.data import calibration_items, inspect_dataset, load_bundle, make_bundle
    from tasks.training.loaders import bundle_tensors

    info = inspect_dataset(config.data.root)
    size = config.data.image_size
    bundle = make_bundle(info.files["val"], info.classes, size, work / "val_bundle.npz")
    items = calibration_items(info.files["train"], config.compile.calibration_samples, config.seed)
    calibration = make_bundle(items, info.classes, size, work / "calibration.npz")
    val_x, val_y = bundle_tensors(load_bundle(bundle))
    return TableInputs(config, info, bundle, calibration, val_x, val_y)


def measure_point(
    inputs: TableInputs, params: dict[str, Any], work: Path, *, device: bool
) -> dict[str, Any]:
    """Run one grid point as a trial does (train, export, compile, evaluate on the device)."""
    from tasks.compilers import create_compiler
    from tasks.config import trial_train_config
    from tasks.devices import create_runner
    from tasks.export import export_checked
    from tasks.metrics import classification_metrics
    from tasks.models import create_model
    from tasks.seeding import trial_seed
    from tasks.training.fmfp import train_fmfp
    from tasks.training.loaders import train_loader
    from tasks.training.rng import build_model

    config = inputs.config
    settings = trial_train_config(config, params)
    row: dict[str, Any] = {"params": params, "history": [], "seconds": {}}
    history: list[dict[str, Any]] = row["history"]
    seconds: dict[str, float] = row["seconds"]
    stage = "train"
    started = time.perf_counter()
    seed = trial_seed(config.seed, params)
    try:
        loader = train_loader(
            inputs.info.files["train"],
            config.data.image_size,
            config.data.augment,
            settings.batch_size,
            seed=seed,
            num_workers=config.data.num_workers,
        )
        model = build_model(seed, lambda: create_model(config.model.arch, len(inputs.info.classes)))

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            history.append(
                {
                    "epoch": epoch,
                    "val_augrc": _finite_or_none(metrics["val_augrc"]),
                    "val_accuracy": _finite_or_none(metrics["val_accuracy"]),
                    "seconds": time.perf_counter() - started,
                }
            )

        result = train_fmfp(
            model,
            loader,
            inputs.val_x,
            inputs.val_y,
            settings,
            on_epoch=on_epoch,
        )
        seconds["train"] = time.perf_counter() - started
        row["float_augrc"] = _finite_or_none(result.metrics["augrc"])
        row["float_accuracy"] = _finite_or_none(result.metrics["accuracy"])

        stage, started = "export", time.perf_counter()
        exported = export_checked(
            result.model,
            work / "model.onnx",
            config.data.image_size,
            inputs.val_x[:32].numpy(),
            opset=config.export.opset,
            atol=config.export.parity_atol,
        )
        seconds["export"] = time.perf_counter() - started
        if not device:
            return row

        stage, started = "compile", time.perf_counter()
        compiler = create_compiler(config.compile.backend, **config.compile.backend_options())
        artifact = compiler.compile(exported.path, inputs.calibration, work / "compiled")
        seconds["compile"] = time.perf_counter() - started

        stage, started = "device", time.perf_counter()
        runner = create_runner(config.device.runner, **config.device.runner_options(), threads=1)
        outcome = runner.evaluate(artifact.path, inputs.bundle, work / "device")
        seconds["device"] = time.perf_counter() - started
        device_metrics = classification_metrics(
            outcome.probs, inputs.val_y.numpy(), bootstrap=0, seed=config.seed
        )
        row["device_augrc"] = _finite_or_none(device_metrics["augrc"])
        row["device_accuracy"] = _finite_or_none(device_metrics["accuracy"])
        row["device_latency_ms"] = outcome.latency_ms["mean"]
    except Exception as exc:  # a trial that fails is told FAIL: keep why and what it cost
        seconds[stage] = time.perf_counter() - started
        row["failed"] = {"stage": stage, "reason": f"{type(exc).__name__}: {exc}"[:300]}
    return row


def run_table(args: argparse.Namespace) -> int:
    import torch

    from tasks.data import write_digits

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the evaluator's process too
    torch.set_num_threads(1)
    data = Path(args.data)
    if not data.exists() or not any(data.iterdir()):
        write_digits(data)
    settings = table_settings(args, data)
    out = Path(args.out)
    table = open_table(out, settings)
    points = grid_points(SPACE)
    todo = [p for p in points if point_key(p) not in table["points"]]
    if args.limit is not None:
        todo = todo[: args.limit]
    done = len(table["points"])
    print(
        f"table {out}: {len(table['points'])} of {len(points)} points done, {len(todo)} to run",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-se-") as tmp:
        work = Path(tmp)
        config = study_config(settings, work / "run")
        inputs = prepare(config, work)
        for index, params in enumerate(todo, start=1):
            with tempfile.TemporaryDirectory(dir=work) as point_dir:
                row = measure_point(inputs, params, Path(point_dir), device=settings["device"])
            table["points"][point_key(params)] = row
            _write_json(out, table)
            shown = " ".join(f"{k}={v:g}" for k, v in params.items())
            result = (
                f"FAILED in {row['failed']['stage']}: {row['failed']['reason'][:80]}"
                if "failed" in row
                else f"float {row['float_augrc']:.5f} device {row.get('device_augrc') or 0:.5f}"
            )
            spent = " ".join(f"{k} {v:.2f}s" for k, v in row["seconds"].items())
            print(f"[{done + index}/{len(points)}] {shown}: {result} ({spent})", flush=True)
    return 0


def load_table(path: Path, objective: str) -> tuple[dict[str, SearchParam], dict[str, Point]]:
    """The space and the points of a complete table (an incomplete one is refused)."""
    fix = "make it with `python -m bench.sample_efficiency table --out PATH`"
    table = _read_json(path, "table", fix)
    try:
        space = space_load(table["settings"]["space"])
        rows = table["points"]
        has_device = bool(table["settings"]["device"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"table {path} lacks {exc}; {fix}") from None
    if objective == "device_augrc" and not has_device:
        raise BenchError(
            f"table {path} was made with --no-device, so it has no device AUGRC; "
            f"replay it with --objective float_augrc"
        )
    missing = [p for p in grid_points(space) if point_key(p) not in rows]
    if missing:
        raise BenchError(
            f"table {path} has {len(rows)} of {len(rows) + len(missing)} points; run the table "
            f"phase again with the same options to finish it"
        )
    return space, {key: _point(row) for key, row in rows.items()}


def _point(row: Mapping[str, Any]) -> Point:
    history = row["history"]
    seconds = row["seconds"]
    failed = "failed" in row
    values = {
        name: (None if failed or row.get(name) is None else float(row[name])) for name in OBJECTIVES
    }
    return Point(
        params=dict(row["params"]),
        curve=tuple(math.nan if h["val_augrc"] is None else h["val_augrc"] for h in history),
        epoch_s=tuple(float(h["seconds"]) for h in history),
        values=values,
        train_s=float(seconds.get("train", 0.0)),
        export_s=float(seconds.get("export", 0.0)),
        compile_s=float(seconds.get("compile", 0.0)),
        device_s=float(seconds.get("device", 0.0)),
    )


# Replay -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    sampler: str
    pruner: str = "none"

    @property
    def label(self) -> str:
        return self.sampler if self.pruner == "none" else f"{self.sampler}+{self.pruner}"


def parse_strategies(text: str) -> list[Strategy]:
    strategies: list[Strategy] = []
    for item in (part.strip() for part in text.split(",")):
        sampler, _, pruner = item.partition("+")
        if sampler not in SAMPLERS or (pruner and pruner not in PRUNERS):
            raise BenchError(
                f"--strategies: {item!r} is not SAMPLER or SAMPLER+PRUNER; samplers: "
                f"{', '.join(SAMPLERS)}; pruners: {', '.join(PRUNERS)} (e.g. {DEFAULT_STRATEGIES})"
            )
        strategies.append(Strategy(sampler, pruner or "none"))
    return strategies


def top_keys(points: Mapping[str, Point], objective: str, fraction: float) -> set[str]:
    """The grid's top ``fraction`` by the objective (lower is better): the best
    ``ceil(fraction * N)`` points, and any point tied with the last of them."""
    scored = sorted(
        (value, key)
        for key, point in points.items()
        if (value := point.values[objective]) is not None
    )
    if not scored:
        raise BenchError(f"no point of the table has a {objective}; every trial failed")
    count = max(1, math.ceil(fraction * len(points)))
    threshold = scored[min(count, len(scored)) - 1][0]
    return {key for value, key in scored if value <= threshold}


@dataclass
class Run:
    """One replay: what was spent until the first top trial (or the budget)."""

    strategy: str
    seed: int
    trials: int | None = None  # trials until the first top-1% trial, inclusive; None: not reached
    asked: int = 0
    pruned: int = 0
    failed: int = 0
    epochs: int = 0
    board_evaluations: int = 0
    best: float | None = None  # the best value told when the run ended
    seconds: dict[str, float] = field(
        default_factory=lambda: {"train": 0.0, "export": 0.0, "compile": 0.0, "device": 0.0}
    )
    sequence: list[str] = field(default_factory=list)  # point keys in the order asked
    outcomes: list[str] = field(default_factory=list)  # COMPLETE, PRUNED or FAIL, in order

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def repeats(self) -> int:
        """Asks of a point this run had asked before (trained again, to the same result)."""
        return len(self.sequence) - len(set(self.sequence))


def replay(
    points: Mapping[str, Point],
    space: Mapping[str, SearchParam],
    strategy: Strategy,
    seed: int,
    *,
    objective: str,
    top: set[str],
    budget: int,
    stop_at_hit: bool = True,
) -> Run:
    """Run one study over the table, as the tune flow would with one training slot."""
    import optuna
    from optuna.trial import TrialState

    from tasks.hpo.study import make_pruner, make_sampler, suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize",
        sampler=make_sampler(strategy.sampler, seed, space),
        pruner=make_pruner(strategy.pruner),
    )
    run = Run(strategy.label, seed)
    for number in range(1, budget + 1):
        trial = study.ask()
        key = point_key(suggest(trial, space))
        point = points[key]
        run.asked = number
        run.sequence.append(key)
        pruned_after = None
        for epoch, value in enumerate(point.curve):
            if not math.isfinite(value):  # epoch_reporter reports finite values only
                continue
            trial.report(value, epoch)
            if trial.should_prune():
                pruned_after = epoch + 1
                break
        result = point.values[objective]
        if pruned_after is not None:
            run.pruned += 1
            run.epochs += pruned_after
            run.seconds["train"] += point.epoch_s[pruned_after - 1]
            run.outcomes.append(TrialState.PRUNED.name)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        run.epochs += point.epochs
        run.seconds["train"] += point.train_s
        run.seconds["export"] += point.export_s
        if objective == "device_augrc":  # a study of the float metric never compiles
            run.seconds["compile"] += point.compile_s
            run.seconds["device"] += point.device_s
        if result is None:
            run.failed += 1
            run.outcomes.append(TrialState.FAIL.name)
            study.tell(trial, state=TrialState.FAIL)
            continue
        if objective == "device_augrc":
            run.board_evaluations += 1
        run.outcomes.append(TrialState.COMPLETE.name)
        study.tell(trial, result)
        run.best = result if run.best is None else min(run.best, result)
        if key in top and run.trials is None:
            run.trials = number
            if stop_at_hit:
                break
    return run


def quantiles(values: Sequence[float], qs: Iterable[float] = (0.25, 0.5, 0.75)) -> list[float]:
    """Quantiles with linear interpolation between order statistics (numpy's default), where
    ``inf`` stands for a run that never got there: a quantile that touches one is ``inf``."""
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("quantiles of no values")
    out = []
    for q in qs:
        position = (len(data) - 1) * q
        low, high = data[math.floor(position)], data[math.ceil(position)]
        if math.isinf(low) or math.isinf(high):
            out.append(math.inf)
        else:
            out.append(low + (high - low) * (position - math.floor(position)))
    return out


def summarise(runs: Sequence[Run], ranking: Sequence[float] = ()) -> dict[str, Any]:
    """Quartiles over seeds of what each run spent until it reached the top; a run that
    never did counts as infinite. ``ranking`` (the grid's values, sorted) gives the grid rank
    of the best trial of the runs that did not reach the top (1 = the optimum)."""
    reached = [r for r in runs if r.trials is not None]

    def until_hit(metric: Any) -> list[float]:
        return quantiles([metric(r) if r.trials is not None else math.inf for r in runs])

    missed = [
        bisect.bisect_left(ranking, r.best) + 1
        for r in runs
        if r.trials is None and r.best is not None
    ]
    return {
        "runs": len(runs),
        "reached": len(reached) / len(runs),
        "trials": until_hit(lambda r: r.trials),
        "epochs": until_hit(lambda r: r.epochs),
        "board_evaluations": until_hit(lambda r: r.board_evaluations),
        "compute_s": until_hit(lambda r: r.total_s),
        "stage_s": {
            stage: until_hit(lambda r, stage=stage: r.seconds[stage])
            for stage in ("train", "export", "compile", "device")
        },
        "pruned_share": sum(r.pruned for r in runs) / max(1, sum(r.asked for r in runs)),
        "repeat_share": sum(r.repeats for r in runs) / max(1, sum(r.asked for r in runs)),
        "missed_best_rank": quantiles(missed) if missed else None,
    }


def expected_random_trials(top: int, size: int) -> float:
    """Median trials until a hit when every trial is an independent uniform draw."""
    p = top / size
    return 1.0 if p >= 1 else math.ceil(math.log(0.5) / math.log(1 - p))


def _fmt(value: float, digits: str = ".0f") -> str:
    return "not reached" if math.isinf(value) else format(value, digits)


def _spread(values: Sequence[float], digits: str = ".0f") -> str:
    q1, median, q3 = values
    return f"{_fmt(median, digits)} [{_fmt(q1, digits)}, {_fmt(q3, digits)}]"


def markdown(
    summaries: Mapping[str, Mapping[str, Any]], objective: str, fraction: float = 0.01
) -> str:
    target = f"top {fraction:.0%}" if fraction >= 0.01 else f"top {fraction:g}"
    board = " | board evaluations" if objective == "device_augrc" else ""
    lines = [
        f"| strategy | reached {target} | trials to {target} | train epochs{board} | "
        "compute s | pruned | repeated asks | best rank of runs that missed |",
        "|---|---|---|---|" + ("---|" if board else "") + "---|---|---|---|",
    ]
    for label, s in summaries.items():
        board_cell = f" | {_spread(s['board_evaluations'])}" if board else ""
        missed = s["missed_best_rank"]
        lines.append(
            f"| {label} | {s['reached']:.0%} | {_spread(s['trials'])} | {_spread(s['epochs'])}"
            f"{board_cell} | {_spread(s['compute_s'])} | {s['pruned_share']:.0%} | "
            f"{s['repeat_share']:.0%} | {_spread(missed) if missed else '-'} |"
        )
    return "\n".join(lines)


def with_stage_seconds(
    points: Mapping[str, Point], *, compile_s: float | None, device_s: float | None
) -> dict[str, Point]:
    """The table with every trial's compile or board seconds set to a given cost (a slower
    compiler or board than the measured ones); None keeps the measured seconds."""
    return {
        key: replace(
            point,
            compile_s=point.compile_s if compile_s is None else compile_s,
            device_s=point.device_s if device_s is None else device_s,
        )
        for key, point in points.items()
    }


def run_replay(args: argparse.Namespace) -> int:
    strategies = parse_strategies(args.strategies)
    space, points = load_table(Path(args.table), args.objective)
    points = with_stage_seconds(points, compile_s=args.compile_s, device_s=args.device_s)
    top = top_keys(points, args.objective, args.top)
    budget = args.budget or len(points)
    all_runs: dict[str, list[Run]] = {}
    started = time.perf_counter()
    for strategy in strategies:
        all_runs[strategy.label] = [
            replay(
                points,
                space,
                strategy,
                seed,
                objective=args.objective,
                top=top,
                budget=budget,
            )
            for seed in range(args.first_seed, args.first_seed + args.seeds)
        ]
        print(f"{strategy.label}: {args.seeds} runs replayed", file=sys.stderr, flush=True)
    ranking = sorted(v for p in points.values() if (v := p.values[args.objective]) is not None)
    summaries = {label: summarise(runs, ranking) for label, runs in all_runs.items()}
    best = min(v for p in points.values() if (v := p.values[args.objective]) is not None)
    header = (
        f"table {args.table}: {len(points)} points, objective {args.objective}, best {best:.5f}, "
        f"top {args.top:g} = {len(top)} points (value <= "
        f"{max(points[k].values[args.objective] or 0.0 for k in top):.5f}); "
        f"{args.seeds} seeds per strategy, budget {budget} trials; a uniform draw needs "
        f"{expected_random_trials(len(top), len(points)):.0f} trials in the median; compile "
        f"{'measured' if args.compile_s is None else f'{args.compile_s:g} s per trial'}, board "
        f"{'measured' if args.device_s is None else f'{args.device_s:g} s per trial'}"
    )
    print(header)
    print(markdown(summaries, args.objective, args.top))
    if args.json:
        _write_json(
            Path(args.json),
            {
                "header": header,
                "objective": args.objective,
                "top": sorted(top),
                "budget": budget,
                "replay_seconds": time.perf_counter() - started,
                "summaries": summaries,
                "runs": {
                    label: [
                        {k: v for k, v in asdict(r).items() if k not in ("sequence", "outcomes")}
                        | {"repeats": r.repeats}
                        for r in runs
                    ]
                    for label, runs in all_runs.items()
                },
            },
        )
    return 0


# Command line -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line naming the problem and where to look, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `python -m bench.sample_efficiency --help`\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} must be between 0 and 1, e.g. 0.01")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{value:g} must be a finite number of seconds >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m bench.sample_efficiency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    phases = parser.add_subparsers(dest="phase", required=True, parser_class=_Parser)
    table = phases.add_parser("table", help="evaluate every grid point and save the table")
    table.add_argument("--out", required=True, help="the table's JSON file (continued if present)")
    table.add_argument(
        "--data", default="data/digits", help="dataset folder; written as digits if absent"
    )
    table.add_argument("--epochs", type=_positive, default=6)
    table.add_argument("--image-size", type=_positive, default=16)
    table.add_argument("--batch-size", type=_positive, default=64)
    table.add_argument("--calibration-samples", type=_positive, default=128)
    table.add_argument("--seed", type=int, default=0)
    table.add_argument(
        "--no-device", action="store_true", help="stop after export (float AUGRC only)"
    )
    table.add_argument("--limit", type=_positive, help="run at most this many new points")

    replay_ = phases.add_parser("replay", help="replay strategies over a finished table")
    replay_.add_argument("--table", required=True, help="a finished table (the table phase)")
    replay_.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        help="SAMPLER or SAMPLER+PRUNER, comma-separated",
    )
    replay_.add_argument("--seeds", type=_positive, default=50, help="runs per strategy")
    replay_.add_argument("--first-seed", type=int, default=0, help="the first run's seed")
    replay_.add_argument("--budget", type=_positive, help="trials per run (default: grid size)")
    replay_.add_argument("--top", type=_fraction, default=0.01, help="the target: best fraction")
    replay_.add_argument(
        "--objective", choices=OBJECTIVES, default="device_augrc", help="the value told"
    )
    replay_.add_argument(
        "--compile-s", type=_seconds, help="charge this per compile instead of the measured time"
    )
    replay_.add_argument(
        "--device-s", type=_seconds, help="charge this per board run instead of the measured time"
    )
    replay_.add_argument("--json", help="also write the results here")
    return parser


def check_table_args(args: argparse.Namespace) -> None:
    swa_max = SPACE["swa_start"].upper or 0
    if args.epochs <= swa_max:
        raise BenchError(
            f"--epochs {args.epochs}: the space's swa_start goes up to {swa_max:g} and SWA must "
            f"start before the last epoch; use --epochs {swa_max + 1:g} or more"
        )
    data = Path(args.data)
    if data.exists() and not data.is_dir():
        raise BenchError(f"--data {data} is a file; give a dataset folder or a new path")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.phase == "table":
            check_table_args(args)
            return run_table(args)
        return run_replay(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a dataset or config the project refuses, with its own fix
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
