"""Training throughput: edgetune's FMFP trainer against a minimal SAM loop, in images/s.

Two sides train the same model (same architecture, same initial weights from the same
``build_model`` seed) on the same training images with the same batch size for the same
number of epochs, alternating, ``--repeats`` times each:

``edgetune``
    What a trial's training stage does: ``tasks.training.fmfp.train_fmfp`` on the loader a
    trial builds (``tasks.training.loaders.train_batches`` from the config's ``data``
    section: augmentation, decode cache, loader path), with the per-epoch validation on the
    evaluation split, SWA and its BatchNorm refresh. Images/s is epochs × training images
    over ``TrainResult.seconds``, the trainer's own timer. The first epoch is also timed on
    its own: it pays the decode when the images are not cached yet.

``minimal``
    A hand-written loop: the training images decoded once, before the timer, into one
    normalised float tensor on the training device; per epoch a ``torch.randperm``; per
    batch two forward/backward passes with SAM around SGD (momentum). No augmentation, no
    validation, no SWA. Images/s is epochs × training images over its seconds.

Both sides drop the last partial batch, as the trainer's loader does. The ratio
edgetune / minimal is taken pair by pair (a repeat of each side, back to back) and its
median reported, so a slow drift of the machine's speed cancels out.

The reference workload (FMFP's: ResNet-18 at 32×32, 50,000 training images, 200 epochs)
is projected from a short run of edgetune's SAM step (``tasks.training.fmfp.sam_step``) on
``create_model("resnet18", 10)`` with synthetic images: 50,000 × 200 / (images/s). It
counts the SAM steps only (no loading, no validation, no BatchNorm refresh).

By default the decode cache lives in a folder of the benchmark's own (a cold cache on the
first repeat, as for a study's first trial on a new host; warm after that).

``--slots N`` also times N of edgetune's trainings at once on each device, each in its own
GPU slot (``gpu.slots_per_device: N``, threads as in a study's own process), against one
alone: trials per hour together / alone.

    python -m bench.train_throughput
    python -m bench.train_throughput --repeats 5 --device all --json throughput.json
    python -m bench.train_throughput --loader per_image --no-cache
    python -m bench.train_throughput --device cuda --slots 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.config import EdgetuneConfig, TrainConfig, load_config, trial_train_config
from tasks.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    inspect_dataset,
    load_bundle,
    load_rgb,
    make_bundle,
    normalise,
    split_items,
)
from tasks.models import create_model
from tasks.seeding import trial_seed
from tasks.training import loaders
from tasks.training.fmfp import make_sam, resolve_device, sam_step, train_fmfp
from tasks.training.gpus import gpu_slot
from tasks.training.precision import prepare as prepare_model
from tasks.training.precision import resolve_precision
from tasks.training.rng import build_model
from tasks.training.sam import SAM

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
#: FMFP's reference workload: ResNet-18 at 32×32 (CIFAR-10), 50,000 images, 200 epochs.
REFERENCE_IMAGES = 50_000
REFERENCE_EPOCHS = 200
REFERENCE_SIZE = 32
#: The acceptance figure: edgetune's trainer at this share of the minimal loop's images/s.
GOAL_RATIO = 0.9
#: Where the decode cache lives (``tasks.training.cache``).
CACHE_VARIABLE = "EDGETUNE_CACHE_DIR"


@dataclass(frozen=True)
class Workload:
    """What both sides train on: the config, its training settings, images and classes."""

    config: EdgetuneConfig
    settings: TrainConfig
    seed: int
    items: list[tuple[Path, int]]
    classes: int
    val_x: torch.Tensor
    val_y: torch.Tensor

    def make_model(self) -> nn.Module:
        """The trial's model: same architecture and initial weights on every call."""
        model = self.config.model
        return build_model(
            self.seed,
            lambda: create_model(model.arch, self.classes, weights=None, finetune=model.finetune),
        )

    @property
    def batch_size(self) -> int:
        assert isinstance(self.settings.batch_size, int), "the bench takes a fixed batch size"
        return self.settings.batch_size


# The workload -----------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> EdgetuneConfig:
    """The config file, its data root overridden by ``--data``, its loader by the flags."""
    overrides = [f"data.root={args.data}"] if args.data is not None else []
    config = load_config(args.config, overrides)
    update: dict[str, Any] = {}
    if args.loader is not None:
        update["loader"] = args.loader
    if args.no_cache:
        update["cache"] = False
    return config.model_copy(update={"data": config.data.model_copy(update=update)})


def _settings(config: EdgetuneConfig, epochs: int | None) -> TrainConfig:
    """The config's training settings; ``epochs`` shortens them (SWA still starts in time)."""
    settings = trial_train_config(config, {})
    if epochs is None:
        return settings
    swa_start = min(settings.swa_start, epochs - 1)
    return settings.model_copy(update={"epochs": epochs, "swa_start": swa_start})


def _subset(items: list[tuple[Path, int]], limit: int | None) -> list[tuple[Path, int]]:
    """``limit`` of the items, a seeded sample in their order (all when None)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(0).sample(range(len(items)), limit))]


def prepare(args: argparse.Namespace, work: Path) -> Workload:
    """The config's training images, settings and validation tensors, as a trial has them."""
    config = _config(args)
    info = inspect_dataset(config.data.root, verify_images=False)
    evaluated = split_items(info, config.data.eval_split, config.data.root)
    bundle = make_bundle(evaluated, info.classes, config.data.image_size, work / "val.npz")
    val_x, val_y = loaders.bundle_tensors(load_bundle(bundle))
    items = info.items(config.data.train_splits)
    return Workload(
        config=config,
        settings=_settings(config, args.epochs),
        seed=trial_seed(config.seed, {}),
        items=_subset(items, args.limit),
        classes=len(info.classes),
        val_x=val_x,
        val_y=val_y,
    )


# The two sides ----------------------------------------------------------------------------


def edgetune_loader(work: Workload, device: torch.device) -> Any:
    """The trial's training batches, on the path its ``data`` section picks."""
    return loaders.train_batches(
        work.config.data, work.items, work.batch_size, seed=work.seed, device=device
    )


def loader_path(work: Workload, built: str) -> str:
    """Which loader the trainer read: the config's choice and what it built."""
    data = work.config.data
    return f"train_batches(loader={data.loader}, cache={data.cache}) → {built}"


def run_edgetune(work: Workload, device: torch.device) -> dict[str, Any]:
    """One trial's training; images/s by the trainer's own timer, the first epoch's time and
    the loader's type."""
    settings = work.settings.model_copy(update={"device": device.type})
    model = work.make_model()
    ends: list[float] = []
    started = time.perf_counter()
    loader = edgetune_loader(work, device)
    result = train_fmfp(
        model,
        loader,
        work.val_x,
        work.val_y,
        settings,
        on_epoch=lambda epoch, row: ends.append(time.perf_counter()),
    )
    images = settings.epochs * len(work.items)
    return {
        "images_per_s": images / result.seconds,
        "seconds": result.seconds,
        "first_epoch_s": ends[0] - started,  # with the loader's set-up and the validation
        "loader": type(loader).__name__,
    }


def decode(items: list[tuple[Path, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image decoded and normalised as the trainer's loaders do: float NCHW, labels."""
    images = np.stack([np.asarray(load_rgb(path, size), dtype=np.uint8) for path, _ in items])
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    x = torch.from_numpy(normalise(images, mean, std))
    return x, torch.tensor([label for _, label in items], dtype=torch.int64)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minimal_loop(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainConfig,
    device: torch.device,
    epochs: int,
) -> float:
    """Seconds of ``epochs`` epochs of plain SAM+SGD over the decoded tensor (on ``device``),
    in the trainer's precision and layout (``train.amp``, ``train.channels_last``; fp16's
    loss scaling left out: a throughput figure needs no overflow guard)."""
    precision = resolve_precision(settings, device)
    model = prepare_model(model.to(device).train(), precision, compile=False)
    x, y = precision.inputs(x.to(device)), y.to(device)
    p = settings
    optimizer = SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=p.rho,
        lr=p.lr,
        momentum=p.momentum,
        weight_decay=p.weight_decay,
    )
    criterion = nn.CrossEntropyLoss()
    batch = int(p.batch_size)
    steps = len(x) // batch if len(x) > batch else 1  # the last partial batch dropped
    g = torch.Generator().manual_seed(0)
    _synchronise(device)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            inputs, targets = x[index], y[index]
            with precision.autocast():
                criterion(model(inputs), targets).backward()
            optimizer.first_step()
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                criterion(model(inputs), targets).backward()
            optimizer.second_step()
            optimizer.zero_grad(set_to_none=True)
    _synchronise(device)
    return time.perf_counter() - started


def run_minimal(
    work: Workload, decoded: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> dict[str, float]:
    epochs = work.settings.epochs
    seconds = minimal_loop(work.make_model(), *decoded, work.settings, device, epochs)
    return {"images_per_s": epochs * len(work.items) / seconds, "seconds": seconds}


# The reference workload ---------------------------------------------------------------------


def projection(
    device: torch.device, settings: TrainConfig, batch: int, steps: int
) -> dict[str, float]:
    """Images/s of edgetune's SAM step on ResNet-18 at 32×32 (synthetic images, one step of
    warm-up), and the reference workload's time at that rate."""
    model = build_model(0, lambda: create_model("resnet18", 10, weights=None)).to(device)
    model.train()
    optimizer = make_sam([p for p in model.parameters() if p.requires_grad], settings, "sgd")
    precision = resolve_precision(settings, device)
    forward = prepare_model(model, precision, compile=False)
    g = torch.Generator().manual_seed(0)
    size = (batch, 3, REFERENCE_SIZE, REFERENCE_SIZE)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    inputs = precision.inputs(((images.float() - mean) / std).to(device))
    targets = torch.randint(0, 10, (batch,), generator=g).to(device)
    sam_step(forward, optimizer, inputs, targets, precision)
    _synchronise(device)
    started = time.perf_counter()
    for _ in range(steps):
        sam_step(forward, optimizer, inputs, targets, precision)
    _synchronise(device)
    rate = batch * steps / (time.perf_counter() - started)
    seconds = REFERENCE_IMAGES * REFERENCE_EPOCHS / rate
    return {"batch_size": batch, "steps": steps, "images_per_s": rate, "seconds": seconds}


# Measuring ----------------------------------------------------------------------------------


def _median_ratio(runs: list[dict[str, float]]) -> float:
    return statistics.median(run["ratio"] for run in runs)


def measure(work: Workload, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Both sides, alternating, ``args.repeats`` times on ``device``; then the projection."""
    decoded = decode(work.items, work.config.data.image_size)  # before every timer
    minimal_loop(work.make_model(), *decoded, work.settings, device, 1)  # warm-up, not counted
    runs, built = [], ""
    for _ in range(args.repeats):
        ours = run_edgetune(work, device)
        theirs = run_minimal(work, decoded, device)
        built = ours["loader"]
        runs.append(
            {
                "edgetune_images_per_s": ours["images_per_s"],
                "edgetune_seconds": ours["seconds"],
                "edgetune_first_epoch_s": ours["first_epoch_s"],
                "minimal_images_per_s": theirs["images_per_s"],
                "minimal_seconds": theirs["seconds"],
                "ratio": ours["images_per_s"] / theirs["images_per_s"],
            }
        )
    return {
        "loader": loader_path(work, built),
        "runs": runs,
        "edgetune_images_per_s": statistics.median(r["edgetune_images_per_s"] for r in runs),
        "minimal_images_per_s": statistics.median(r["minimal_images_per_s"] for r in runs),
        "edgetune_first_epoch_s": statistics.median(r["edgetune_first_epoch_s"] for r in runs),
        "ratio": _median_ratio(runs),
        "projection": projection(
            device, work.settings, args.projection_batch, args.projection_steps
        ),
        "slots": measure_slots(work, device, args.slots) if args.slots > 1 else None,
    }


def measure_slots(work: Workload, device: torch.device, slots: int) -> dict[str, Any]:
    """Trials per hour with ``slots`` trainings at once on ``device`` (threads, each in its
    GPU slot, as a study's own process runs them) against one training alone."""

    def trial(_: int) -> float:
        with gpu_slot(slots, slots, in_process=True):
            started = time.perf_counter()
            run_edgetune(work, resolve_device(device.type))
            return time.perf_counter() - started

    alone = trial(0)
    started = time.perf_counter()
    with ThreadPoolExecutor(slots, thread_name_prefix="slot") as pool:
        each = list(pool.map(trial, range(slots)))
    together = time.perf_counter() - started
    return {
        "slots": slots,
        "alone_s": alone,
        "together_s": together,
        "each_s": each,
        "trials_per_hour_alone": 3600 / alone,
        "trials_per_hour_together": 3600 * slots / together,
        "ratio": slots * alone / together,
    }


def devices(choice: str) -> list[torch.device]:
    """``all``: the CPU, and CUDA when present; ``auto``: CUDA when present, else the CPU."""
    gpu = torch.cuda.is_available()
    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if gpu else [])
    return [resolve_device(choice)]


@contextmanager
def cache_folder(folder: Path | None) -> Iterator[None]:
    """The decode cache in ``folder`` meanwhile (None: the host's cache, untouched)."""
    if folder is None:
        yield
        return
    before = os.environ.get(CACHE_VARIABLE)
    os.environ[CACHE_VARIABLE] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CACHE_VARIABLE, None)
        else:
            os.environ[CACHE_VARIABLE] = before


# The report ---------------------------------------------------------------------------------


def _spread(runs: list[dict[str, float]], key: str) -> str:
    values = [run[key] for run in runs]
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def table(results: dict[str, dict[str, Any]]) -> str:
    """One markdown row per device: medians (min–max) of images/s, the ratio, the projection."""
    lines = [
        "| device | edgetune images/s | minimal images/s | edgetune / minimal "
        "| edgetune first epoch s | ResNet-18 SAM step images/s | reference workload |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        runs, projected = result["runs"], result["projection"]
        lines.append(
            f"| {name} | {_spread(runs, 'edgetune_images_per_s')} "
            f"| {_spread(runs, 'minimal_images_per_s')} | {result['ratio']:.2f} "
            f"| {result['edgetune_first_epoch_s']:.2f} | {projected['images_per_s']:.0f} "
            f"| {_duration(projected['seconds'])} |"
        )
    return "\n".join(lines)


def slots_table(results: dict[str, dict[str, Any]]) -> str:
    """Trials per hour alone and with several trainings at once (``--slots``), if measured."""
    rows = [(name, r["slots"]) for name, r in results.items() if r.get("slots")]
    if not rows:
        return ""
    lines = [
        "| device | trainings at once | one alone s | all together s | trials/h alone "
        "| trials/h together | together / alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['slots']} | {m['alone_s']:.1f} | {m['together_s']:.1f} "
            f"| {m['trials_per_hour_alone']:.0f} | {m['trials_per_hour_together']:.0f} "
            f"| {m['ratio']:.2f} |"
        )
    return "\n".join(lines)


def goal(results: dict[str, dict[str, Any]]) -> str:
    cpu = results.get("cpu")
    if cpu is None:
        return f"goal (CPU: edgetune >= {GOAL_RATIO}x the minimal loop): not measured, no CPU run"
    met = "met" if cpu["ratio"] >= GOAL_RATIO else "missed"
    return f"goal (CPU: edgetune >= {GOAL_RATIO}x the minimal loop): {met}, {cpu['ratio']:.2f}x"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: version(p) for p in ("torch", "torchvision", "numpy")},
        "torch_threads": torch.get_num_threads(),
    }


def header(facts: dict[str, Any], work: Workload, args: argparse.Namespace) -> str:
    packages = ", ".join(f"{p} {v}" for p, v in facts["packages"].items())
    data, p = work.config.data, work.settings
    return (
        f"machine: {facts['machine']}, {facts['cpus']} CPUs ({facts['cpu']}), "
        f"GPU: {facts['gpu'] or 'none available'}; {facts['platform']}; "
        f"load average (1, 5, 15 min) at start {facts['load_start']}, at end {facts['load_end']}\n"
        f"Python {facts['python']}; {packages}; {facts['torch_threads']} torch threads\n"
        f"workload: {work.config.model.arch}, {data.image_size} px, {len(work.items)} training "
        f"images, batch {p.batch_size}, {p.epochs} epochs, swa_start {p.swa_start}, augment "
        f"{data.augment.model_dump()}; {args.repeats} repeat(s) per side, alternating; "
        f"images/s median (min–max), ratio = median of the pairs' ratios\n"
        f"reference workload: {REFERENCE_IMAGES} images × {REFERENCE_EPOCHS} epochs of resnet18 "
        f"at {REFERENCE_SIZE} px, from {args.projection_steps} SAM steps of batch "
        f"{args.projection_batch} on synthetic images"
    )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=QUICKSTART, help="a study config")
    parser.add_argument("--data", type=Path, help="another dataset root (data.root)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side")
    parser.add_argument("--epochs", type=int, help="fewer epochs than the config's")
    parser.add_argument("--limit", type=int, help="train on this many images only")
    parser.add_argument("--device", choices=("all", "auto", "cpu", "cuda"), default="all")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--loader", choices=("auto", "batched", "per_image"))
    parser.add_argument("--no-cache", action="store_true", help="data.cache: false")
    parser.add_argument("--projection-batch", type=int, default=128)
    parser.add_argument("--projection-steps", type=int, default=4)
    parser.add_argument(
        "--slots", type=int, default=1, help="also time this many trainings at once per device"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    numbers = ("repeats", "epochs", "limit", "threads", "projection_batch", "projection_steps")
    for name in (*numbers, "slots"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)  # one setting for both sides
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-throughput-") as tmp:
        work = prepare(args, Path(tmp))
        with cache_folder(Path(tmp) / "cache"):
            results = {d.type: measure(work, d, args) for d in devices(args.device)}
    facts = {**machine(), "load_start": load_start, "load_end": _load()}
    parts = [header(facts, work, args), table(results), goal(results), slots_table(results)]
    text = "\n\n".join(part for part in parts if part)
    print(text)
    for name, result in results.items():
        print(f"{name} loader: {result['loader']}")
    if args.json is not None:
        record = {
            "machine": facts,
            "config": str(args.config),
            "train_images": len(work.items),
            "settings": work.settings.model_dump(),
            "reference": {"images": REFERENCE_IMAGES, "epochs": REFERENCE_EPOCHS},
            "goal_ratio": GOAL_RATIO,
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0 if all(math.isfinite(r["ratio"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
