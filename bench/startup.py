"""Start-up benchmark: what an embedded ``edgetune tune`` spends around its one trial.

Runs ``edgetune tune`` on a one-trial study (16 px digits, tinycnn, 2 epochs) in a
project folder of its own, with no Prefect server configured (the embedded default), and
reads the times from the study's storage:

- ``first ask``: from the command's start to trial 0's start (Optuna's ``datetime_start``);
- ``trial``: from the first ask to the last tell;
- ``after tell``: from the last tell to the command's exit;
- ``wall``: the whole command.

Each run restarts the study (``--restart``); a warm-up run first makes the project's
databases (a first run also migrates them). With ``--vs DIR`` the same runs alternate with
another edgetune checkout (on ``PYTHONPATH``), and the ratios are taken pair by pair, so a
comparison holds while the machine's speed drifts.

With ``--plain`` each round also times ``bench.plain_trial``: a plain script doing the
trial's training, export, compilation and board evaluation without Prefect, Optuna or
MLflow; the report adds each side's wall time over the plain script's, round by round.

With ``--engine`` a third side runs the same command as a user's default would: the
environment without ``EDGETUNE_ENGINE`` (and without ``CI``), so its warm-up run, which
finds no engine, runs cold and starts the project's resident engine when it ends
(``edgetune.engine``), and its timed runs go through that engine. It comes first, so the
ratio column (with two sides) is the engine's over a cold command's (``EDGETUNE_ENGINE=off``).

    python -m bench.startup --runs 5 --vs ../edgetune-before
    python -m bench.startup --runs 5 --epochs 1 --plain
    python -m bench.startup --runs 5 --epochs 1 --plain --engine
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import optuna
import yaml

BIN = Path(sys.executable).parent
FIGURES = ("first ask", "trial", "after tell", "wall")
WARM_SIDE = "engine (warm)"


def _config(data: Path, epochs: int = 2) -> dict[str, object]:
    return {
        "seed": 0,
        "run_dir": "runs/one",
        "data": {"root": str(data), "image_size": 16, "augment": {"rotation": 0.0}},
        "model": {"arch": "tinycnn"},
        "train": {
            "epochs": epochs,
            "batch_size": 128,
            "swa_start": min(1, epochs - 1),  # SWA starts before the last epoch
            "lr": 0.05,
            "swa_lr": 0.02,
        },
        "compile": {"calibration_samples": 32},
        "device": {"name": "bench-startup", "warmup": 0},
        "study": {
            "name": "one",
            "n_trials": 1,
            "parallel": 1,
            "bootstrap": 20,
            "search_space": {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
        },
    }


def _project(root: Path, data: Path, epochs: int = 2) -> Path:
    root.mkdir(parents=True)
    (root / "one.yaml").write_text(yaml.safe_dump(_config(data, epochs)))
    return root


def _environment(checkout: Path | None, engine: bool) -> dict[str, str]:
    """No Prefect server configured; the other checkout first on the path; the project's
    engine as by default on the side that has one, never on the others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    for name in ("EDGETUNE_ENGINE", "CI"):
        env.pop(name, None)
    if not engine:
        env["EDGETUNE_ENGINE"] = "off"
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    return env


def engine(project: Path, what: str) -> None:
    """``edgetune engine start`` or ``stop`` in ``project``."""
    done = subprocess.run(
        [str(BIN / "edgetune"), "engine", what],
        cwd=project,
        env=_environment(None, True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        sys.exit(f"error: edgetune engine {what} failed in {project}: {done.stderr.strip()}")


def wait_for_engine(project: Path, timeout: float = 300) -> None:
    """Until the engine the warm-up run started in ``project`` answers."""
    from edgetune.engine import control, log_path

    deadline = time.monotonic() + timeout
    while control(project, "status") is None:
        if time.monotonic() > deadline:
            log = log_path(project)
            text = log.read_text()[-1500:] if log.exists() else "no log"
            sys.exit(f"error: no engine answered in {project} after its first run: {text}")
        time.sleep(0.2)


def run_once(
    project: Path, checkout: Path | None, warm: bool = False, first: bool = False
) -> dict[str, float]:
    """One ``edgetune tune`` in ``project`` (``warm``: as by default, through the project's
    engine unless ``first``); its figures in seconds."""
    env = _environment(checkout, warm)
    started, clock = datetime.now(), time.monotonic()
    done = subprocess.run(
        [str(BIN / "edgetune"), "tune", "one.yaml", "--restart", "--json"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall, ended = time.monotonic() - clock, datetime.now()
    if done.returncode != 0:
        sys.exit(f"error: edgetune tune failed in {project}: {done.stderr.strip()[-1500:]}")
    if warm and not first and "note: " in done.stderr:  # the engine refused it: a cold run
        sys.exit(f"error: the engine did not run the command in {project}: {done.stderr}")
    storage = f"sqlite:///{project / 'runs' / 'one' / 'optuna.db'}"
    (trial,) = optuna.load_study(study_name="one", storage=storage).trials
    assert trial.datetime_start is not None and trial.datetime_complete is not None
    return {
        "first ask": (trial.datetime_start - started).total_seconds(),
        "trial": (trial.datetime_complete - trial.datetime_start).total_seconds(),
        "after tell": (ended - trial.datetime_complete).total_seconds(),
        "wall": wall,
    }


def run_plain(project: Path) -> float:
    """Seconds of ``bench.plain_trial`` on the project's config: the same training, export,
    compilation and board evaluation as the trial, in a plain script (this checkout's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    clock = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench.plain_trial", "one.yaml"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        sys.exit(f"error: the plain script failed in {project}: {done.stderr.strip()[-1500:]}")
    return time.monotonic() - clock


def _median(rows: list[dict[str, float]], key: str) -> str:
    values = [row[key] for row in rows]
    return f"{statistics.median(values):6.2f} ({min(values):.2f}–{max(values):.2f})"


def report(runs: dict[str, list[dict[str, float]]]) -> str:
    """Medians (min–max) per figure; with two sides, the pairwise ratios' medians."""
    names = list(runs)
    lines = [f"{'figure':<11}" + "".join(f"{name:>26}" for name in names)]
    if len(names) == 2:
        lines[0] += f"{'ratio (median)':>18}"
    for key in FIGURES:
        line = f"{key:<11}" + "".join(f"{_median(runs[name], key):>26}" for name in names)
        if len(names) == 2:
            a, b = (runs[name] for name in names)
            ratios = [x[key] / y[key] for x, y in zip(a, b, strict=True) if y[key] > 0]
            line += f"{statistics.median(ratios):>18.3f}"
        lines.append(line)
    return "\n".join(lines)


def plain_report(runs: dict[str, list[dict[str, float]]], plain: list[float]) -> str:
    """The plain script's wall time, and each side's wall over it, round by round."""
    lines = [f"{'plain script':<13}{_median([{'wall': w} for w in plain], 'wall')}"]
    for name, rows in runs.items():
        ratios = [row["wall"] / p for row, p in zip(rows, plain, strict=True) if p > 0]
        lines.append(
            f"{name} wall / plain script: {statistics.median(ratios):.3f} "
            f"(median of rounds; {min(ratios):.3f}–{max(ratios):.3f})"
        )
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    from importlib.metadata import version

    packages = ", ".join(f"{p} {version(p)}" for p in ("prefect", "optuna", "mlflow", "torch"))
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"Python {platform.python_version()}; {packages}\n"
        f"workload: 1 trial, tinycnn, 16 px digits, {args.epochs} epoch(s); {args.runs} runs "
        f"per side after one warm-up, alternating; seconds, median (min–max); load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vs", type=Path, help="another edgetune checkout to compare with")
    parser.add_argument("--data", type=Path, help="a digits folder (default: written anew)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the trial")
    parser.add_argument(
        "--engine",
        action="store_true",
        help="also time this checkout's commands as by default: through the project's "
        "engine, which its warm-up run starts when it ends",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="also time a plain script doing the trial's work (bench.plain_trial) each round",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-startup-") as tmp:
        data = args.data.resolve() if args.data else None
        if data is None:
            from tasks.data import write_digits

            data = Path(tmp) / "digits"
            write_digits(data)
        sides: dict[str, tuple[Path | None, bool]] = (
            {WARM_SIDE: (None, True)} if args.engine else {}
        )
        sides["this checkout"] = (None, False)
        if args.vs is not None:
            sides[f"--vs {args.vs.name}"] = (args.vs.resolve(), False)
        projects = {
            n: _project(Path(tmp) / f"p{i}", data, args.epochs) for i, n in enumerate(sides)
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        plain: list[float] = []
        for name, (checkout, warm) in sides.items():
            # warm-up: makes and migrates the databases (and, as by default, the engine)
            run_once(projects[name], checkout, warm, first=True)
        if args.engine:
            wait_for_engine(projects[WARM_SIDE])
        if args.plain:
            run_plain(projects["this checkout"])  # warm-up: the file cache
        try:
            for _ in range(args.runs):
                for name, (checkout, warm) in sides.items():
                    runs[name].append(run_once(projects[name], checkout, warm))
                if args.plain:
                    plain.append(run_plain(projects["this checkout"]))
        finally:
            if args.engine:
                engine(projects[WARM_SIDE], "stop")
        print(header(args))
        print(report(runs))
        if args.plain:
            print(plain_report(runs, plain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
