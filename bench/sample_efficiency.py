"""Sample-efficiency benchmark: how many trials (and how much compute) each search strategy
needs to find a top-1% configuration, on a task whose whole grid is known.

Three phases:

``table``
    Every point of a small discrete search space (``SPACE``) is run through the stages of
    a real trial with several seeds (replicates 0, 1, 2: ``tasks.seeding.trial_seed(seed,
    params, replicate)``), with edgetune's own code: FMFP training (``tasks.training.fmfp``)
    with the per-epoch float validation AUGRC recorded, ONNX export with the parity check,
    the ``onnxruntime-int8`` compiler, and the shipped evaluator on the ``local`` device
    runner, scored with ``tasks.metrics``. The seconds spent in each stage are kept with
    every run. The table is a small JSON file (``bench/sample_efficiency_table.json``,
    committed), written after every run; running the phase again continues where it
    stopped. ``--workers N`` measures N runs at a time, each process with one torch thread.

``replay``
    For each strategy and seed, an in-memory Optuna study built with
    ``tasks.hpo.study.make_sampler``, ``make_pruner`` and ``suggest`` asks trials one at a
    time, and each is answered from the table as a real study would measure it: replicate
    0 (a study's trial seed depends on the parameters only). The per-epoch ``val_augrc`` is
    reported every epoch and ``should_prune`` asked from the trial's warm-up on, as
    ``tasks.hpo.study.epoch_reporter`` does; a pruned trial costs the epochs it ran, a
    finished one its training, export, compilation and board time. With ``reuse`` a
    parameter set the study already finished is told the earlier result at no cost
    (``study.repeats: reuse``). A run stops at its first finished trial inside the top 1%
    of the grid by the seed mean of the objective (or at the trial budget).

``noise``
    The per-point spread over seeds against the gaps between the best points, and the
    rank correlation of each epoch's ``val_augrc`` with the final seed-mean objective.

    python -m bench.sample_efficiency table --replicates 3 --workers 2
    python -m bench.sample_efficiency replay --seeds 50
    python -m bench.sample_efficiency noise
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from tasks.config import SearchParam

TABLE_VERSION = 2

#: The committed table: ``replay`` and ``noise`` read it unless told another.
DEFAULT_TABLE = Path(__file__).resolve().parent / "sample_efficiency_table.json"

#: The benchmark's search space: 5 x 4 x 3 x 3 = 180 points, every one a real trial setting.
SPACE: dict[str, SearchParam] = {
    "lr": SearchParam(type="categorical", choices=[0.01, 0.03, 0.1, 0.3, 1.0]),
    "momentum": SearchParam(type="float", low=0.8, high=0.95, step=0.05),
    "weight_decay": SearchParam(type="categorical", choices=[1e-5, 1e-4, 1e-3]),
    "swa_start": SearchParam(type="int", low=3, high=5),
}

OBJECTIVES = ("device_augrc", "float_augrc")
STAGES = ("train", "export", "compile", "device")
SAMPLERS = ("random", "tpe", "cmaes", "gp", "nsga2")
PRUNERS = ("none", "median", "asha", "hyperband")
DEFAULT_STRATEGIES = "random,tpe,tpe+median:0,tpe+median,tpe+reuse,tpe+median+reuse"


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


# The table phase --------------------------------------------------------------------------


def _sig(value: float | None, digits: int = 6) -> float | None:
    """A metric as the table keeps it: 6 significant digits (AUGRC differences between the
    best points are ~1e-5 on values ~1e-3), None when not finite."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _ms(seconds: float) -> float:
    return round(float(seconds), 3)


def table_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a table's numbers depend on; a resumed table must have been made with the same."""
    return {
        "data": str(Path(args.data)),
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


def _cpu() -> dict[str, Any]:
    """The CPU model and the vector extensions torch and onnxruntime can use."""
    model, flags = platform.processor(), set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx")
    return {
        "model": model,
        "count": os.cpu_count(),
        "flags": sorted(f for f in flags if f.startswith(wanted)),
    }


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    packages = ("torch", "torchvision", "onnxruntime", "optuna", "numpy", "scikit-learn")
    return {
        "machine": platform.machine(),
        "cpu": _cpu(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: version(p) for p in packages},
    }


def table_text(table: Mapping[str, Any]) -> str:
    """The table as JSON with one line per point: small, and a re-measured point is a
    one-line diff."""
    head = {k: v for k, v in table.items() if k != "points"}
    rows = [
        f"  {json.dumps(key)}: {json.dumps(row, separators=(',', ':'))}"
        for key, row in sorted(table["points"].items())
    ]
    body = ",\n".join(rows)
    return json.dumps(head, indent=1)[:-2] + ',\n "points": {\n' + body + "\n }\n}\n"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    _write_text(path, json.dumps(payload, indent=1))


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
        return {
            "version": TABLE_VERSION,
            "settings": settings,
            "machine": machine(),
            "table_runs": [],
            "points": {},
        }
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


def pending(
    table: Mapping[str, Any], points: Sequence[dict[str, Any]], replicates: int
) -> list[tuple[dict[str, Any], int]]:
    """The (point, replicate) runs the table lacks, a point's replicates together, from the
    last grid point back: a table cut short lacks the smallest ``lr`` (the worst points of
    the first, single-seed table), so a smaller grid without it is complete."""
    rows = table["points"]
    return [
        (params, r)
        for params in reversed(points)
        for r in range(replicates)
        if str(r) not in rows.get(point_key(params), {}).get("runs", {})
    ]


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


def _train(inputs: TableInputs, params: dict[str, Any], seed: int, row: dict[str, Any]) -> Any:
    """FMFP training with the trial's seed; records each epoch's val_augrc and seconds."""
    from tasks.config import trial_train_config
    from tasks.models import create_model
    from tasks.training.fmfp import resolve_device, train_fmfp
    from tasks.training.loaders import train_batches
    from tasks.training.rng import build_model

    config = inputs.config
    settings = trial_train_config(config, params)
    started = time.perf_counter()
    loader = train_batches(
        config.data,
        inputs.info.files["train"],
        int(settings.batch_size),  # the benchmark config sets it (never "auto")
        seed=seed,
        device=resolve_device(settings.device),
    )
    model = build_model(seed, lambda: create_model(config.model.arch, len(inputs.info.classes)))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        row["val_augrc"].append(_sig(metrics["val_augrc"]))
        row["epoch_s"].append(_ms(time.perf_counter() - started))

    return train_fmfp(model, loader, inputs.val_x, inputs.val_y, settings, on_epoch=on_epoch)


def measure_point(
    inputs: TableInputs, params: dict[str, Any], work: Path, *, device: bool, replicate: int = 0
) -> dict[str, Any]:
    """Run one grid point as a trial does (train, export, compile, evaluate on the device)
    with the seed of ``replicate``; the row keeps what the replay needs."""
    from tasks.compilers import create_compiler
    from tasks.devices import create_runner
    from tasks.export import export_checked
    from tasks.metrics import classification_metrics
    from tasks.seeding import trial_seed

    config = inputs.config
    row: dict[str, Any] = {"val_augrc": [], "epoch_s": [], "s": {}}
    seconds: dict[str, float] = row["s"]
    stage, started = "train", time.perf_counter()
    try:
        result = _train(inputs, params, trial_seed(config.seed, params, replicate), row)
        seconds["train"] = _ms(time.perf_counter() - started)
        row["float_augrc"] = _sig(result.metrics["augrc"])

        stage, started = "export", time.perf_counter()
        exported = export_checked(
            result.model,
            work / "model.onnx",
            config.data.image_size,
            inputs.val_x[:32].numpy(),
            opset=config.export.opset,
            atol=config.export.parity_atol,
        )
        seconds["export"] = _ms(time.perf_counter() - started)
        if not device:
            return row

        stage, started = "compile", time.perf_counter()
        compiler = create_compiler(config.compile.backend, **config.compile.backend_options())
        artifact = compiler.compile(exported.path, inputs.calibration, work / "compiled")
        seconds["compile"] = _ms(time.perf_counter() - started)

        stage, started = "device", time.perf_counter()
        runner = create_runner(config.device.runner, **config.device.runner_options(), threads=1)
        outcome = runner.evaluate(artifact.path, inputs.bundle, work / "device")
        seconds["device"] = _ms(time.perf_counter() - started)
        device_metrics = classification_metrics(
            outcome.probs, inputs.val_y.numpy(), bootstrap=0, seed=config.seed
        )
        row["device_augrc"] = _sig(device_metrics["augrc"])
    except Exception as exc:  # a trial that fails is told FAIL: keep why and what it cost
        seconds[stage] = _ms(time.perf_counter() - started)
        row["failed"] = {"stage": stage, "reason": f"{type(exc).__name__}: {exc}"[:300]}
    return row


_WORKER: dict[str, Any] = {}


def _start_worker(settings: Mapping[str, Any], root: str) -> None:
    """One measuring process: one torch thread, its own copy of the shared inputs."""
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"  # the evaluator's process too
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="worker-", dir=root))
    _WORKER.update(
        inputs=prepare(study_config(settings, work / "run"), work),
        work=work,
        device=bool(settings["device"]),
    )


def _measure_task(task: tuple[dict[str, Any], int]) -> tuple[dict[str, Any], int, dict[str, Any]]:
    params, replicate = task
    with tempfile.TemporaryDirectory(dir=_WORKER["work"]) as point_dir:
        row = measure_point(
            _WORKER["inputs"],
            params,
            Path(point_dir),
            device=_WORKER["device"],
            replicate=replicate,
        )
    return params, replicate, row


def _measured(
    settings: Mapping[str, Any], todo: Sequence[tuple[dict[str, Any], int]], workers: int, root: str
) -> Iterator[tuple[dict[str, Any], int, dict[str, Any]]]:
    """Each run's row as it finishes, from ``workers`` processes (or this one)."""
    if workers == 1:
        _start_worker(settings, root)
        yield from map(_measure_task, todo)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no torch state forked into a worker
    with context.Pool(workers, _start_worker, (dict(settings), root)) as pool:
        yield from pool.imap_unordered(_measure_task, todo, chunksize=1)


def _progress(row: Mapping[str, Any]) -> str:
    if "failed" in row:
        return f"FAILED in {row['failed']['stage']}: {row['failed']['reason'][:80]}"
    spent = " ".join(f"{k} {v:.2f}s" for k, v in row["s"].items())
    return f"float {row['float_augrc']:.5f} device {row.get('device_augrc') or 0:.5f} ({spent})"


def run_table(args: argparse.Namespace) -> int:
    from tasks.data import write_digits

    data = Path(args.data)
    if not data.exists() or not any(data.iterdir()):
        write_digits(data)
    settings = table_settings(args)
    out = Path(args.out)
    table = open_table(out, settings)
    todo = pending(table, grid_points(SPACE), args.replicates)
    if args.limit is not None:
        todo = todo[: args.limit]
    print(f"table {out}: {len(todo)} runs to measure with {args.workers} worker(s)", flush=True)
    table_run = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "workers": args.workers,
        "runs": 0,
        "wall_s": 0.0,
    }
    table.setdefault("table_runs", []).append(table_run)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-se-") as root:
        for index, (params, replicate, row) in enumerate(
            _measured(settings, todo, args.workers, root), start=1
        ):
            point = table["points"].setdefault(point_key(params), {"params": params, "runs": {}})
            point["runs"][str(replicate)] = row
            table_run.update(runs=index, wall_s=round(time.perf_counter() - started, 1))
            _write_text(out, table_text(table))
            shown = " ".join(f"{k}={v:g}" for k, v in params.items())
            print(f"[{index}/{len(todo)}] {shown} seed {replicate}: {_progress(row)}", flush=True)
    return 0


# Loading a table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One grid point as the replay needs it: what a study measures (replicate 0, the
    trial seed a study gives these parameters) and the seed mean that defines the top."""

    params: dict[str, Any]
    curve: tuple[float, ...]  # replicate 0's float val AUGRC after each epoch (nan: not finite)
    epoch_s: tuple[float, ...]  # its training seconds from the start to the end of each epoch
    values: dict[str, float | None]  # objective -> replicate 0's value (None: the trial failed)
    train_s: float  # replicate 0's whole training (all epochs and the SWA model's copy)
    export_s: float
    compile_s: float
    device_s: float
    mean: dict[str, float | None] = field(default_factory=dict)  # over replicates; None: one failed
    std: dict[str, float | None] = field(default_factory=dict)  # sample std over replicates
    curves: tuple[tuple[float, ...], ...] = ()  # every replicate's curve
    finals: tuple[dict[str, float | None], ...] = ()  # every replicate's objective values

    @property
    def epochs(self) -> int:
        return len(self.curve)


def _value(run: Mapping[str, Any], name: str) -> float | None:
    value = run.get(name)
    return None if "failed" in run or value is None else float(value)


def _point(row: Mapping[str, Any]) -> Point:
    runs = [row["runs"][r] for r in sorted(row["runs"], key=int)]
    first = runs[0]
    curves = tuple(
        tuple(math.nan if v is None else float(v) for v in run["val_augrc"]) for run in runs
    )
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for name in OBJECTIVES:
        values = [_value(run, name) for run in runs]
        known = [v for v in values if v is not None]
        complete = len(known) == len(values)
        mean[name] = statistics.fmean(known) if complete else None
        std[name] = statistics.stdev(known) if complete and len(known) > 1 else None
    return Point(
        params=dict(row["params"]),
        curve=curves[0],
        epoch_s=tuple(float(s) for s in first["epoch_s"]),
        values={name: _value(first, name) for name in OBJECTIVES},
        train_s=float(first["s"].get("train", 0.0)),
        export_s=float(first["s"].get("export", 0.0)),
        compile_s=float(first["s"].get("compile", 0.0)),
        device_s=float(first["s"].get("device", 0.0)),
        mean=mean,
        std=std,
        curves=curves,
        finals=tuple({name: _value(run, name) for name in OBJECTIVES} for run in runs),
    )


def load_table(
    path: Path, objective: str = "device_augrc"
) -> tuple[dict[str, SearchParam], dict[str, Point]]:
    """The space and the points of a complete table: every grid point with the same
    replicates, replicate 0 among them (an incomplete table is refused)."""
    fix = "make it with `python -m bench.sample_efficiency table --out PATH`"
    table = _read_json(path, "table", fix)
    if table.get("version") != TABLE_VERSION:
        raise BenchError(f"table {path} is not a version-{TABLE_VERSION} benchmark table; {fix}")
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
    grid = grid_points(space)
    seeds = [set(rows[k]["runs"]) if (k := point_key(p)) in rows else set() for p in grid]
    wanted = set.union(*seeds) | {"0"}
    short = sum(1 for s in seeds if s != wanted)
    if short:
        raise BenchError(
            f"table {path} lacks runs of {short} of {len(grid)} points (every point needs "
            f"replicates {', '.join(sorted(wanted, key=int))}); run the table phase again with "
            f"the same options to finish it"
        )
    return space, {point_key(p): _point(rows[point_key(p)]) for p in grid}


# Statistics -------------------------------------------------------------------------------


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            out[i] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 pairs or a constant side)."""
    if len(xs) != len(ys):
        raise ValueError("spearman of sequences of different lengths")
    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


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


def seed_mean_order(points: Mapping[str, Point], objective: str) -> list[str]:
    """The points that never failed, best seed mean first (lower is better)."""
    scored = [(v, k) for k, p in points.items() if (v := p.mean.get(objective)) is not None]
    return [k for _, k in sorted(scored)]


def top_keys(points: Mapping[str, Point], objective: str, fraction: float) -> set[str]:
    """The grid's top ``fraction`` by the seed mean of the objective (lower is better): the
    best ``ceil(fraction * N)`` points, and any point tied with the last of them."""
    order = seed_mean_order(points, objective)
    if not order:
        raise BenchError(f"no point of the table has a {objective}; every trial failed")
    count = max(1, math.ceil(fraction * len(points)))
    threshold = points[order[min(count, len(order)) - 1]].mean[objective]
    return {k for k in order if (points[k].mean[objective] or 0.0) <= (threshold or 0.0)}


# Replay -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """A sampler, optionally a pruner judging from ``warmup`` (an epoch, or ``swa``: the
    trial's ``swa_start``, the classifier's default), optionally answering repeats."""

    sampler: str
    pruner: str = "none"
    warmup: str = "swa"
    reuse: bool = False

    @property
    def label(self) -> str:
        label = self.sampler
        if self.pruner != "none":
            label += f"+{self.pruner}" + ("" if self.warmup == "swa" else f":{self.warmup}")
        return label + ("+reuse" if self.reuse else "")

    def warmup_of(self, params: Mapping[str, Any]) -> int:
        """The first epoch (0-based) the pruner may judge, as ``epoch_reporter(warmup=)``."""
        return int(params.get("swa_start", 0)) if self.warmup == "swa" else int(self.warmup)


def parse_strategy(item: str) -> Strategy:
    parts = item.strip().split("+")
    reuse = parts[-1] == "reuse" and len(parts) > 1
    parts = parts[:-1] if reuse else parts
    pruner, _, warmup = (parts[1] if len(parts) == 2 else "none").partition(":")
    if (
        len(parts) > 2
        or parts[0] not in SAMPLERS
        or pruner not in PRUNERS
        or (warmup and not (warmup == "swa" or warmup.isdigit()))
    ):
        raise BenchError(
            f"--strategies: {item.strip()!r} is not SAMPLER[+PRUNER[:WARMUP]][+reuse]; samplers: "
            f"{', '.join(SAMPLERS)}; pruners: {', '.join(PRUNERS)}; WARMUP: swa or an epoch "
            f"(e.g. {DEFAULT_STRATEGIES})"
        )
    return Strategy(parts[0], pruner, warmup or "swa", reuse)


def parse_strategies(text: str) -> list[Strategy]:
    return [parse_strategy(item) for item in text.split(",")]


@dataclass
class Run:
    """One replay: what was spent until the first top trial (or the budget)."""

    strategy: str
    seed: int
    trials: int | None = None  # trials until the first top-1% trial, inclusive; None: not reached
    asked: int = 0
    pruned: int = 0
    failed: int = 0
    reused: int = 0  # trials answered from an earlier trial (no cost)
    epochs: int = 0
    board_evaluations: int = 0
    top_asked: int = 0  # asks of a top point that were trained (not reused)
    top_pruned: int = 0  # ... and pruned
    top_pruned_after: list[int] = field(default_factory=list)  # ... after this many epochs
    best: float | None = None  # the best value told when the run ended
    best_key: str | None = None  # its point
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    sequence: list[str] = field(default_factory=list)  # point keys in the order asked
    outcomes: list[str] = field(default_factory=list)  # COMPLETE, PRUNED or FAIL, in order
    trained: list[int] = field(default_factory=list)  # epochs each trial trained (0: reused)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def repeats(self) -> int:
        """Asks of a point this run had asked before."""
        return len(self.sequence) - len(set(self.sequence))


def _judge(trial: Any, point: Point, warmup: int) -> int | None:
    """Report every epoch's value, ask the pruner from ``warmup`` on (``epoch_reporter``);
    the epochs run when pruned, None when the trial trains to the end."""
    for epoch, value in enumerate(point.curve):
        if not math.isfinite(value):  # epoch_reporter reports finite values only
            continue
        trial.report(value, epoch)
        if epoch >= warmup and trial.should_prune():
            return epoch + 1
    return None


def _answer_repeat(study: Any, trial: Any, point: Point, earlier: int | None, value: Any) -> str:
    """Tell a repeat what the earlier trial measured (``tasks.hpo.repeats.answer``)."""
    from optuna.trial import TrialState

    if earlier is None:
        study.tell(trial, value)
        return TrialState.COMPLETE.name
    for epoch, reported in enumerate(point.curve[:earlier]):
        if math.isfinite(reported):
            trial.report(reported, epoch)
    study.tell(trial, state=TrialState.PRUNED)
    return TrialState.PRUNED.name


def _charge_finished(run: Run, point: Point, objective: str) -> None:
    run.epochs += point.epochs
    run.seconds["train"] += point.train_s
    run.seconds["export"] += point.export_s
    if objective == "device_augrc":  # a study of the float metric never compiles
        run.seconds["compile"] += point.compile_s
        run.seconds["device"] += point.device_s


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
    """Run one study over the table, as the tune flow would with one training slot: each
    trial is told replicate 0's result; a hit is a finished trial of a ``top`` point."""
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
    finished: dict[str, int | None] = {}  # point -> epochs run when pruned, None: complete
    for number in range(1, budget + 1):
        trial = study.ask()
        key = point_key(suggest(trial, space))
        point, result = points[key], points[key].values[objective]
        run.asked = number
        run.sequence.append(key)
        if strategy.reuse and key in finished:
            run.reused += 1
            run.trained.append(0)
            run.outcomes.append(_answer_repeat(study, trial, point, finished[key], result))
            continue
        run.top_asked += key in top
        pruned_after = _judge(trial, point, strategy.warmup_of(point.params))
        if pruned_after is not None:
            run.pruned += 1
            if key in top:
                run.top_pruned += 1
                run.top_pruned_after.append(pruned_after)
            run.epochs += pruned_after
            run.trained.append(pruned_after)
            run.seconds["train"] += point.epoch_s[pruned_after - 1]
            run.outcomes.append(TrialState.PRUNED.name)
            study.tell(trial, state=TrialState.PRUNED)
            finished[key] = pruned_after
            continue
        _charge_finished(run, point, objective)
        run.trained.append(point.epochs)
        if result is None:
            run.failed += 1
            run.outcomes.append(TrialState.FAIL.name)
            study.tell(trial, state=TrialState.FAIL)
            continue
        run.board_evaluations += objective == "device_augrc"
        run.outcomes.append(TrialState.COMPLETE.name)
        study.tell(trial, result)
        finished[key] = None
        if run.best is None or result < run.best:
            run.best, run.best_key = result, key
        if key in top and run.trials is None:
            run.trials = number
            if stop_at_hit:
                break
    return run


def summarise(runs: Sequence[Run], rank: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Quartiles over seeds of what each run spent until it reached the top; a run that
    never did counts as infinite. ``rank`` (point -> seed-mean rank, 1 = the best) gives the
    rank of the best trial (by the told value) of the runs that did not reach the top."""
    reached = [r for r in runs if r.trials is not None]
    asked = max(1, sum(r.asked for r in runs))

    def until_hit(metric: Any) -> list[float]:
        return quantiles([metric(r) if r.trials is not None else math.inf for r in runs])

    missed = [
        float(rank[r.best_key])
        for r in runs
        if r.trials is None and r.best_key is not None and rank is not None
    ]
    return {
        "runs": len(runs),
        "reached": len(reached) / len(runs),
        "reached_95": list(wilson(len(reached), len(runs))),
        "trials": until_hit(lambda r: r.trials),
        "epochs": until_hit(lambda r: r.epochs),
        "board_evaluations": until_hit(lambda r: r.board_evaluations),
        "compute_s": until_hit(lambda r: r.total_s),
        "stage_s": {stage: until_hit(lambda r, stage=stage: r.seconds[stage]) for stage in STAGES},
        "pruned_share": sum(r.pruned for r in runs) / asked,
        "repeat_share": sum(r.repeats for r in runs) / asked,
        "reused_share": sum(r.reused for r in runs) / asked,
        "top_asked": sum(r.top_asked for r in runs),
        "top_pruned": sum(r.top_pruned for r in runs),
        "top_pruned_after": dict(
            sorted(Counter(e for r in runs for e in r.top_pruned_after).items())
        ),
        "missed_best_rank": quantiles(missed) if missed else None,
    }


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a share of ``successes`` in ``n``."""
    if n == 0:
        return (0.0, 1.0)
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def expected_random_trials(top: int, size: int) -> float:
    """Median trials until a hit when every trial is an independent uniform draw."""
    p = top / size
    return 1.0 if p >= 1 else math.ceil(math.log(0.5) / math.log(1 - p))


def _fmt(value: float, digits: str = ".0f") -> str:
    return "not reached" if math.isinf(value) else format(value, digits)


def _spread(values: Sequence[float], digits: str = ".0f") -> str:
    q1, median, q3 = values
    return f"{_fmt(median, digits)} [{_fmt(q1, digits)}, {_fmt(q3, digits)}]"


def _share(summary: Mapping[str, Any]) -> str:
    low, high = summary.get("reached_95") or (summary["reached"], summary["reached"])
    return f"{summary['reached']:.0%} [{low:.0%}, {high:.0%}]"


def _top_pruned(summary: Mapping[str, Any]) -> str:
    after = summary.get("top_pruned_after") or {}
    shown = ", ".join(f"{n} after {e}" for e, n in after.items())
    return f"{summary['top_pruned']} of {summary['top_asked']}" + (f" ({shown})" if shown else "")


def markdown(
    summaries: Mapping[str, Mapping[str, Any]], objective: str, fraction: float = 0.01
) -> str:
    target = f"top {fraction:.0%}" if fraction >= 0.01 else f"top {fraction:g}"
    board = " | board evaluations" if objective == "device_augrc" else ""
    lines = [
        f"| strategy | reached {target} | trials to {target} | train epochs{board} | "
        "compute s | pruned | repeated asks | reused | top asks pruned | "
        "best rank of runs that missed |",
        "|---|---|---|---|" + ("---|" if board else "") + "---|---|---|---|---|---|",
    ]
    for label, s in summaries.items():
        board_cell = f" | {_spread(s['board_evaluations'])}" if board else ""
        missed = s["missed_best_rank"]
        lines.append(
            f"| {label} | {_share(s)} | {_spread(s['trials'])} | {_spread(s['epochs'])}"
            f"{board_cell} | {_spread(s['compute_s'])} | {s['pruned_share']:.0%} | "
            f"{s['repeat_share']:.0%} | {s['reused_share']:.0%} | "
            f"{_top_pruned(s)} | {_spread(missed) if missed else '-'} |"
        )
    return "\n".join(lines)


def _seconds_text(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:.0f} s"


def goal_lines(summaries: Mapping[str, Mapping[str, Any]], goal: float = 0.9) -> list[str]:
    """For every pruned strategy: does it reach the top in ``goal`` of the runs with no more
    median compute than TPE without pruning?"""
    base = summaries.get("tpe")
    if base is None:
        return []
    lines = []
    for label, s in summaries.items():
        if "+" not in label or not any(f"+{p}" in label for p in PRUNERS[1:]):
            continue
        compute, base_compute = s["compute_s"][1], base["compute_s"][1]
        holds = s["reached"] >= goal and compute <= base_compute
        lines.append(
            f"goal {label}: reached {s['reached']:.0%} (>= {goal:.0%}: "
            f"{'yes' if s['reached'] >= goal else 'no'}), median compute {_seconds_text(compute)}"
            f" against tpe's {_seconds_text(base_compute)} "
            f"({'no more' if compute <= base_compute else 'more'}): "
            f"{'holds' if holds else 'does not hold'}"
        )
    return lines


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


def replay_all(
    points: Mapping[str, Point],
    space: Mapping[str, SearchParam],
    strategies: Sequence[Strategy],
    seeds: Iterable[int],
    *,
    objective: str,
    top: set[str],
    budget: int,
) -> dict[str, list[Run]]:
    seeds = list(seeds)
    out: dict[str, list[Run]] = {}
    for strategy in strategies:
        out[strategy.label] = [
            replay(points, space, strategy, s, objective=objective, top=top, budget=budget)
            for s in seeds
        ]
        print(f"{strategy.label}: {len(seeds)} runs replayed", file=sys.stderr, flush=True)
    return out


def run_replay(args: argparse.Namespace) -> int:
    strategies = parse_strategies(args.strategies)
    space, points = load_table(Path(args.table), args.objective)
    points = with_stage_seconds(points, compile_s=args.compile_s, device_s=args.device_s)
    top = top_keys(points, args.objective, args.top)
    budget = args.budget or len(points)
    started = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    all_runs = replay_all(
        points, space, strategies, seeds, objective=args.objective, top=top, budget=budget
    )
    order = seed_mean_order(points, args.objective)
    rank = {key: i + 1 for i, key in enumerate(order)}
    summaries = {label: summarise(runs, rank) for label, runs in all_runs.items()}
    worst_top = max(points[k].mean[args.objective] or 0.0 for k in top)
    header = (
        f"table {args.table}: {len(points)} points x {len(points[order[0]].curves)} seeds, "
        f"objective {args.objective} (told: seed 0; top by the seed mean), best seed mean "
        f"{points[order[0]].mean[args.objective]:.5f}, top {args.top:g} = {len(top)} points "
        f"(seed mean <= {worst_top:.5f}); {args.seeds} seeds per strategy, budget {budget} "
        f"trials; a uniform draw needs {expected_random_trials(len(top), len(points)):.0f} "
        f"trials in the median; compile "
        f"{'measured' if args.compile_s is None else f'{args.compile_s:g} s per trial'}, board "
        f"{'measured' if args.device_s is None else f'{args.device_s:g} s per trial'}"
    )
    print(header)
    print(markdown(summaries, args.objective, args.top))
    for line in goal_lines(summaries):
        print(line)
    elapsed = time.perf_counter() - started
    print(f"replayed in {elapsed:.1f} s", file=sys.stderr)
    if args.json:
        _write_json(
            Path(args.json),
            {
                "header": header,
                "objective": args.objective,
                "top": sorted(top),
                "budget": budget,
                "replay_seconds": elapsed,
                "summaries": summaries,
                "runs": {
                    label: [
                        {
                            k: v
                            for k, v in asdict(r).items()
                            if k not in ("sequence", "outcomes", "trained")
                        }
                        | {"repeats": r.repeats}
                        for r in runs
                    ]
                    for label, runs in all_runs.items()
                },
            },
        )
    return 0


# Noise ------------------------------------------------------------------------------------


def _corr(pairs: Iterable[tuple[float | None, float | None]]) -> float | None:
    kept = [(x, y) for x, y in pairs if x is not None and y is not None and math.isfinite(x + y)]
    return spearman([x for x, _ in kept], [y for _, y in kept])


def epoch_correlations(
    points: Mapping[str, Point], objective: str, subsets: Mapping[str, Callable[[Point], bool]]
) -> dict[str, list[float | None]]:
    """Per subset of points, Spearman's rank correlation between replicate 0's val_augrc
    after each epoch (what the pruner sees) and the final seed-mean objective."""
    scored = [p for p in points.values() if p.mean.get(objective) is not None]
    epochs = max((p.epochs for p in scored), default=0)
    return {
        name: [
            _corr((p.curve[e], p.mean[objective]) for p in scored if keep(p) and e < p.epochs)
            for e in range(epochs)
        ]
        for name, keep in subsets.items()
    }


def _swa_start_is(start: int) -> Callable[[Point], bool]:
    return lambda p: int(p.params.get("swa_start", 0)) == start


def _subsets(points: Mapping[str, Point], order: Sequence[str]) -> dict[str, Any]:
    best_half = set(order[: len(order) // 2])
    subsets: dict[str, Callable[[Point], bool]] = {
        "all points": lambda p: True,
        "lr >= 0.3": lambda p: float(p.params.get("lr", 0.0)) >= 0.3,
        "best half by seed mean": lambda p: point_key(p.params) in best_half,
    }
    for s in sorted({int(p.params.get("swa_start", 0)) for p in points.values()}):
        subsets[f"swa_start = {s}"] = _swa_start_is(s)
    return subsets


def seed_correlations(
    points: Mapping[str, Point], objective: str, keys: Sequence[str]
) -> dict[str, float | None]:
    """Spearman between the objective measured with two seeds, over ``keys``."""
    seeds = min(len(points[k].finals) for k in keys)
    return {
        f"{a}-{b}": _corr(
            (points[k].finals[a][objective], points[k].finals[b][objective]) for k in keys
        )
        for a, b in itertools.combinations(range(seeds), 2)
    }


def within_noise(points: Mapping[str, Point], objective: str, order: Sequence[str]) -> int:
    """Points whose seed mean is less than two standard errors of the difference above the
    best seed mean (the best point included): the optimum is not separated from them."""
    best = points[order[0]]
    seeds = len(best.finals)
    if seeds < 2:
        return 1
    count = 0
    for key in order:
        point = points[key]
        error = math.sqrt(
            ((point.std[objective] or 0.0) ** 2 + (best.std[objective] or 0.0) ** 2) / seeds
        )
        count += (point.mean[objective] or 0.0) - (best.mean[objective] or 0.0) <= 2 * error
    return count


def noise_report(points: Mapping[str, Point], objective: str) -> dict[str, Any]:
    """The seed noise of each point against the gaps between the best seed means, and how
    well replicate 0 and the early epochs rank the points."""
    order = seed_mean_order(points, objective)
    mean = {k: points[k].mean[objective] or 0.0 for k in order}
    std = {k: points[k].std.get(objective) for k in order}
    told = sorted(((v, k) for k, p in points.items() if (v := p.values[objective]) is not None))
    told_rank = {k: i + 1 for i, (_, k) in enumerate(told)}
    top10 = order[: max(1, math.ceil(len(order) / 10))]
    return {
        "objective": objective,
        "points": len(points),
        "seeds": len(points[order[0]].finals),
        "best": [
            {
                "rank": i + 1,
                "params": points[k].params,
                "mean": mean[k],
                "std": std[k],
                "seeds": [f[objective] for f in points[k].finals],
                "told_rank": told_rank.get(k),
            }
            for i, k in enumerate(order[:10])
        ],
        "seed_mean_range": [mean[order[0]], statistics.median(mean.values()), mean[order[-1]]],
        "median_std_all": statistics.median([s for s in std.values() if s is not None]),
        "median_std_top10pct": statistics.median([std[k] or 0.0 for k in top10]),
        "gaps_from_best": [mean[k] - mean[order[0]] for k in order[1:10]],
        "within_noise_of_best": within_noise(points, objective, order),
        "told_best": {
            "params": points[told[0][1]].params,
            "told": told[0][0],
            "mean": mean.get(told[0][1]),
            "seed_mean_rank": order.index(told[0][1]) + 1 if told[0][1] in mean else None,
        },
        "told_vs_mean": _corr((points[k].values[objective], mean[k]) for k in order),
        "seed_vs_seed_all": seed_correlations(points, objective, order),
        "seed_vs_seed_top10pct": seed_correlations(points, objective, top10),
        "float_vs_device_mean": _corr(
            (points[k].mean.get("float_augrc"), points[k].mean.get("device_augrc")) for k in order
        ),
        "epoch_vs_mean": epoch_correlations(points, objective, _subsets(points, order)),
    }


def _num(value: float | None, digits: str = ".2f") -> str:
    return "-" if value is None else format(value, digits)


def noise_markdown(report: Mapping[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [
        f"{report['points']} points x {seeds} seeds, objective {report['objective']}; seed "
        "mean best, median, worst: " + ", ".join(f"{v:.5f}" for v in report["seed_mean_range"]),
        f"per-point std over seeds: median {_num(report['median_std_all'], '.5f')} (all), "
        f"{_num(report['median_std_top10pct'], '.5f')} (best 10% by seed mean)",
        "seed-mean gap from the best to ranks 2..10: "
        + ", ".join(_num(g, ".5f") for g in report["gaps_from_best"]),
        f"points within two standard errors of the best seed mean (the best included): "
        f"{report['within_noise_of_best']}",
        f"told (seed 0) best: {report['told_best']['params']} told "
        f"{report['told_best']['told']:.5f}, seed mean {_num(report['told_best']['mean'], '.5f')}"
        f" (seed-mean rank {report['told_best']['seed_mean_rank']})",
        f"Spearman told vs seed mean {_num(report['told_vs_mean'])}; seed vs seed: all "
        + ", ".join(f"{k} {_num(v)}" for k, v in report["seed_vs_seed_all"].items())
        + "; best 10%: "
        + ", ".join(f"{k} {_num(v)}" for k, v in report["seed_vs_seed_top10pct"].items())
        + f"; float vs device seed means {_num(report['float_vs_device_mean'], '.3f')}",
        "",
        "| seed-mean rank | params | seed mean | std | "
        + " | ".join(f"seed {r}" for r in range(seeds))
        + " | told rank |",
        "|---|---|---|---|" + "---|" * seeds + "---|",
    ]
    for b in report["best"]:
        shown = ", ".join(f"{k} {v:g}" for k, v in b["params"].items())
        lines.append(
            f"| {b['rank']} | {shown} | {b['mean']:.5f} | {_num(b['std'], '.5f')} | "
            + " | ".join(_num(v, ".5f") for v in b["seeds"])
            + f" | {b['told_rank']} |"
        )
    curves = report["epoch_vs_mean"]
    epochs = max((len(v) for v in curves.values()), default=0)
    lines += [
        "",
        "| val_augrc of seed 0 after epoch | "
        + " | ".join(str(e + 1) for e in range(epochs))
        + " |",
        "|---|" + "---|" * epochs,
    ]
    lines += [
        f"| {name} | " + " | ".join(_num(v) for v in values) + " |"
        for name, values in curves.items()
    ]
    return "\n".join(lines)


def table_stats(table: Mapping[str, Any]) -> dict[str, Any]:
    """What measuring the table took: runs, wall time, and each stage's seconds per run."""
    runs = [run for row in table["points"].values() for run in row["runs"].values()]
    stages: dict[str, Any] = {}
    for stage in STAGES:
        spent = [run["s"][stage] for run in runs if stage in run["s"]]
        if spent:
            stages[stage] = {
                "median": statistics.median(spent),
                "min": min(spent),
                "max": max(spent),
                "total": sum(spent),
            }
    return {
        "runs": len(runs),
        "failed": sum("failed" in run for run in runs),
        "wall_s": sum(table_run.get("wall_s", 0.0) for table_run in table.get("table_runs", [])),
        "workers": sorted({table_run.get("workers") for table_run in table.get("table_runs", [])}),
        "stage_s": stages,
    }


def run_noise(args: argparse.Namespace) -> int:
    path = Path(args.table)
    _, points = load_table(path, args.objective)
    report = noise_report(points, args.objective)
    report["table"] = stats = table_stats(json.loads(path.read_text()))
    print(
        f"table {path}: {stats['runs']} runs ({stats['failed']} failed) in "
        f"{stats['wall_s']:.0f} s of wall time with {stats['workers']} worker(s); per run "
        + ", ".join(
            f"{stage} {v['median']:.2f} s [{v['min']:.2f}, {v['max']:.2f}] (total {v['total']:.0f} s)"
            for stage, v in stats["stage_s"].items()
        )
    )
    print(noise_markdown(report))
    if args.json:
        _write_json(Path(args.json), report)
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


def _table_parser(phases: Any) -> None:
    table = phases.add_parser("table", help="measure every grid point and save the table")
    table.add_argument(
        "--out", default=str(DEFAULT_TABLE), help="the table's JSON file (continued if present)"
    )
    table.add_argument(
        "--data", default="data/digits", help="dataset folder; written as digits if absent"
    )
    table.add_argument("--epochs", type=_positive, default=6)
    table.add_argument("--image-size", type=_positive, default=16)
    table.add_argument("--batch-size", type=_positive, default=64)
    table.add_argument("--calibration-samples", type=_positive, default=128)
    table.add_argument("--seed", type=int, default=0, help="the study seed")
    table.add_argument(
        "--replicates", type=_positive, default=3, help="seeds per point (replicates 0..N-1)"
    )
    table.add_argument(
        "--workers", type=_positive, default=1, help="runs measured at a time (1 thread each)"
    )
    table.add_argument(
        "--no-device", action="store_true", help="stop after export (float AUGRC only)"
    )
    table.add_argument("--limit", type=_positive, help="measure at most this many new runs")


def _replay_parser(phases: Any) -> None:
    replay_ = phases.add_parser("replay", help="replay strategies over a finished table")
    replay_.add_argument("--table", default=str(DEFAULT_TABLE), help="a finished table")
    replay_.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        help="SAMPLER[+PRUNER[:WARMUP]][+reuse], comma-separated; WARMUP: swa (default) or N",
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m bench.sample_efficiency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    phases = parser.add_subparsers(dest="phase", required=True, parser_class=_Parser)
    _table_parser(phases)
    _replay_parser(phases)
    noise = phases.add_parser("noise", help="seed noise and early-epoch rank correlations")
    noise.add_argument("--table", default=str(DEFAULT_TABLE), help="a finished table")
    noise.add_argument(
        "--objective", choices=OBJECTIVES, default="device_augrc", help="the final value"
    )
    noise.add_argument("--json", help="also write the numbers here")
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
        if args.phase == "noise":
            return run_noise(args)
        return run_replay(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a dataset or config the project refuses, with its own fix
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
