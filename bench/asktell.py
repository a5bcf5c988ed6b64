"""Ask/tell benchmark: what one trial costs the study process, at 1,000 trials.

On a throwaway PostgreSQL cluster (``bench.postgres``; Optuna's tables, and edgetune's
journal in PostgreSQL, ``journal+postgresql://``), a journal file and in memory, each case
runs ``--trials`` trials in one study and times each trial:

- ``edgetune loop``: edgetune's real ask/tell loop (``tasks.hpo.loop.StudyLoop``) with its
  storage and sampler, one trial at a time (``parallel: 1``), its stages instant (named
  ``Instant*`` below: they return at once what a classifier trial reports, about 30 user
  attributes). A trial's time runs from the previous trial told to this one told: the
  sampler, every read and write, the heartbeats, all the parent does for it;
- ``edgetune storage, ask/tell``: edgetune's storage and sampler without the loop: ask,
  suggest, three user attributes, tell;
- ``optuna``: Optuna's own storage and ``TPESampler``, the same ask/tell;
- ``open: replay whole journal``: after the loop's trials, a new journal storage on the
  loop's journal in PostgreSQL reads and replays it all, as a process opening the study for
  the first time does (times per opening, three openings, not per trial).

Every case draws the same five parameters (the quickstart's space) and tells the same
function of them. ``commits`` counts the database's transactions per trial (reads commit
too), ``writes`` those that wrote; on the journal in PostgreSQL, its queries (each one
statement or one transaction) and its appends. The goal is an edgetune loop on PostgreSQL
at p95 <= 50 ms.

    python -m bench.asktell --trials 1000
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy import event
from sqlalchemy.engine import Engine

from bench.dispatch import percentile
from bench.postgres import Cluster, throwaway_postgres, unavailable
from tasks.config import parse_config
from tasks.hpo.launch import Slot
from tasks.hpo.loop import StudyLoop
from tasks.hpo.study import make_sampler, open_study
from tasks.storage import PostgresJournal, new_journal_storage, open_storage
from tasks.tracking import Promotion
from tasks.workloads.base import Checked, CompileOutcome, DeviceOutcome, StudyTarget, TrainOutcome
from tasks.workloads.classifier import CLASSIFIER

GOAL_P95_MS = 50.0
SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
    "swa_start": {"type": "int", "low": 5, "high": 7},
    "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "momentum": {"type": "float", "low": 0.85, "high": 0.99},
    "swa_lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
}
LOG = logging.getLogger("bench.asktell")
ASYNC = "pg, sync off"  # synchronous_commit=off
PG_JOURNAL = "pg journal"  # journal+postgresql://
REPLAY = "open: replay whole journal"  # per opening, not per trial


def value_of(params: dict[str, Any]) -> float:
    """The told value: lowest at lr = 0.03, so the sampler has something to learn."""
    return 0.01 + abs(float(params["lr"]) - 0.03) + 0.001 * float(params["momentum"])


@dataclass
class Row:
    case: str
    storage: str
    seconds: list[float]
    commits: float | None = None  # per trial
    writes: float | None = None

    def ms(self, q: float) -> float:
        return 1000 * (statistics.median(self.seconds) if q == 50 else percentile(self.seconds, q))


# Fakes: the stages and MLflow, instant ------------------------------------------------------
class InstantStages:
    """FAKE stages: return at once what a classifier trial's stages report."""

    def prepare(self, parent_run_id: str) -> Checked:
        return Checked(("a", "b"), {"train": 64, "val": 32})

    def train(self, slot: Slot) -> TrainOutcome:
        now, augrc = time.time(), value_of(slot.params)
        names = ("augrc", "accuracy", "e_augrc", "aurc")
        metrics = {f"float_{k}": augrc * (1 + i / 10) for i, k in enumerate(names)}
        metrics.update(onnx_max_abs_diff=1e-6, train_seconds=0.0, train_images=64.0)
        return TrainOutcome(metrics=metrics, started_at=now, finished_at=now)

    def compile(self, slot: Slot) -> CompileOutcome:
        now = time.time()
        metrics = {"compiled_size_mb": 0.5, "compile_seconds": 0.0}
        return CompileOutcome("compiled/model.int8.onnx", metrics, now, now)

    def evaluate(self, slot: Slot, artifact: str) -> DeviceOutcome:
        now, augrc = time.time(), value_of(slot.params)
        metrics = {key: augrc for key in CLASSIFIER.trial_attrs}
        metrics.update(device_augrc=augrc, device_accuracy=0.9, device_latency_ms=0.2)
        return DeviceOutcome(metrics=metrics, started_at=now, finished_at=now)

    def cancel(self, trial_numbers: list[int]) -> int:
        return 0


class NullTracker:
    """FAKE MLflow: accepts every call the loop makes, keeps nothing."""

    runs = 0

    @property
    def client(self) -> NullTracker:
        return self

    def get_run(self, run_id: str) -> Any:
        return SimpleNamespace(info=SimpleNamespace(status="FINISHED"))

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        return "0"

    def start_run(self, experiment_id: str, name: str, **kwargs: Any) -> str:
        self.runs += 1
        return f"run-{self.runs}"

    def register(self, name: str, run_id: str, path: str, **kwargs: Any) -> str:
        return "1"

    def promote(self, name: str, version: str, metric: str, value: float, **kw: Any) -> Promotion:
        return Promotion(True, version, value, "the first champion")

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None  # set_tags, log_params, end_run, …


class TellClock:
    """The loop's outcome hooks, used as a clock: when each trial was told."""

    def __init__(self) -> None:
        self.told = [time.perf_counter()]

    def on_trial_outcome(self, run: Any, trial: Any) -> None:
        self.told.append(time.perf_counter())

    def on_study_end(self, run: Any, state: str) -> None:
        return None


# Counting transactions ------------------------------------------------------------------------
@dataclass
class Commits:
    """The commits on one engine, and those whose transaction wrote."""

    total: int = 0
    writes: int = 0
    wrote: set[int] = field(default_factory=set)

    def executed(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self.wrote.add(id(conn.connection))

    def committed(self, conn: Any) -> None:
        self.total += 1
        if id(conn.connection) in self.wrote:
            self.wrote.discard(id(conn.connection))
            self.writes += 1


def engine_of(storage: optuna.storages.BaseStorage) -> Engine | None:
    backend = getattr(storage, "_backend", storage)  # Optuna wraps RDB storage in a cache
    return getattr(backend, "engine", None)


@contextmanager
def counting(storage: optuna.storages.BaseStorage) -> Iterator[Commits | None]:
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, PostgresJournal):
        with counting_journal(backend) as commits:
            yield commits
        return
    engine = engine_of(storage)
    if engine is None:
        yield None
        return
    commits = Commits()
    event.listen(engine, "after_cursor_execute", commits.executed)
    event.listen(engine, "commit", commits.committed)
    try:
        yield commits
    finally:
        event.remove(engine, "after_cursor_execute", commits.executed)
        event.remove(engine, "commit", commits.committed)


@contextmanager
def counting_journal(backend: PostgresJournal) -> Iterator[Commits]:
    """The journal's queries (each a read or an append of one transaction) and appends."""
    commits = Commits()
    read, append = backend.read_logs, backend.append_logs

    def reading(log_number_from: int) -> list[dict[str, Any]]:
        commits.total += 1
        return read(log_number_from)

    def appending(logs: list[dict[str, Any]]) -> None:
        commits.total += 1
        commits.writes += 1
        append(logs)

    backend.read_logs, backend.append_logs = reading, appending  # type: ignore[method-assign]
    try:
        yield commits
    finally:
        del backend.read_logs, backend.append_logs


# The cases ----------------------------------------------------------------------------------
def loop_config(work: Path, trials: int, name: str) -> StudyTarget:
    """A classifier study of ``trials`` trials, one at a time, over the quickstart's space."""
    raw = {
        "seed": 0,
        "run_dir": str(work / name),
        "data": {"root": str(work), "image_size": 16},
        "model": {"arch": "tinycnn"},
        "train": {"epochs": 10, "batch_size": 64, "swa_start": 7, "lr": 0.05, "swa_lr": 0.01},
        "device": {"name": f"bench-{name}", "warmup": 0},
        "study": {"name": name, "n_trials": trials, "parallel": 1, "search_space": SPACE},
    }
    config = parse_config(raw)
    assert isinstance(config, StudyTarget)
    return config


def run_loop(
    storage: optuna.storages.BaseStorage, trials: int, work: Path, name: str, kind: str = ""
) -> Row:
    """edgetune's loop on ``storage``: the time from one trial told to the next."""
    config = loop_config(work, trials, name)
    study = open_study("", config.study, config.seed, objective=CLASSIFIER, storage=storage)
    clock = TellClock()
    loop = StudyLoop(
        config,
        study,
        stages=InstantStages(),
        logger=LOG,
        tracker=NullTracker(),  # type: ignore[arg-type]
        hooks=clock,
    )
    with counting(storage) as commits:
        clock.told = [time.perf_counter()]
        loop.run()
    told = clock.told
    seconds = [b - a for a, b in itertools.pairwise(told)]
    return _row("edgetune loop", storage, seconds, commits, kind)


def run_asktell(
    storage: optuna.storages.BaseStorage,
    sampler: optuna.samplers.BaseSampler,
    trials: int,
    case: str,
) -> Row:
    """Ask, suggest, three user attributes, tell: the time of each trial."""
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=case)
    seconds = []
    with counting(storage) as commits:
        for _ in range(trials):
            started = time.perf_counter()
            trial = study.ask()
            for key, value in (("owner", "bench"), ("heartbeat_at", time.time()), ("stage", "")):
                trial.set_user_attr(key, value)
            params = {name: _suggest(trial, name, spec) for name, spec in SPACE.items()}
            study.tell(trial, value_of(params))
            seconds.append(time.perf_counter() - started)
    return _row(case, storage, seconds, commits)


def run_replay(url: str, times: int = 3) -> Row:
    """What a process that opens the journal for the first time pays (a stage run's start):
    the whole journal read and replayed, and the study's trials listed."""
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        storage = new_journal_storage(url)
        for study in storage.get_all_studies():
            storage.get_all_trials(study._study_id, deepcopy=False)
        seconds.append(time.perf_counter() - started)
    return Row(REPLAY, PG_JOURNAL, seconds)


def _suggest(trial: optuna.Trial, name: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "int":
        return trial.suggest_int(name, spec["low"], spec["high"])
    return trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))


def _row(
    case: str,
    storage: optuna.storages.BaseStorage,
    seconds: list[float],
    commits: Commits | None,
    kind: str = "",
) -> Row:
    n = len(seconds)
    kind = kind or kind_of(storage)
    if commits is None:
        return Row(case, kind, seconds)
    return Row(case, kind, seconds, commits.total / n, commits.writes / n)


def kind_of(storage: optuna.storages.BaseStorage) -> str:
    if isinstance(getattr(storage, "_backend", None), PostgresJournal):
        return PG_JOURNAL
    engine = engine_of(storage)
    if engine is not None:
        return str(engine.name)
    return {"InMemoryStorage": "memory", "JournalStorage": "journal"}.get(
        type(storage).__name__, type(storage).__name__
    )


def journal(path: Path) -> optuna.storages.BaseStorage:
    return JournalStorage(JournalFileBackend(str(path)))


def run_cases(trials: int, work: Path, cluster: Cluster | None) -> list[Row]:
    """Every case, PostgreSQL first (``cluster`` None: without PostgreSQL)."""
    tpe = lambda: optuna.samplers.TPESampler(seed=0)  # noqa: E731
    ours = lambda: make_sampler("tpe", 0)  # noqa: E731
    rows = []
    if cluster is not None:
        rows.append(run_loop(open_storage(cluster.create_database("loop")), trials, work, "pg"))
        # the same, its commits not waiting for the log's flush (an option of the URL)
        url = cluster.create_database("async") + "?options=-c%20synchronous_commit%3Doff"
        rows.append(run_loop(open_storage(url), trials, work, "async", ASYNC))
        edgetune = open_storage(cluster.create_database("edgetune"))
        rows.append(run_asktell(edgetune, ours(), trials, "edgetune storage, ask/tell"))
        plain = optuna.storages.RDBStorage(cluster.create_database("plain"))
        rows.append(run_asktell(plain, tpe(), trials, "optuna"))
        url = "journal+" + cluster.create_database("journal").replace("+psycopg2", "", 1)
        rows.append(run_loop(open_storage(url), trials, work, "pg-journal"))
        rows.append(run_replay(url))
        dsn = cluster.create_database("plain_journal").replace("+psycopg2", "", 1)
        plain_journal = JournalStorage(PostgresJournal(dsn))  # Optuna's, on edgetune's table
        rows.append(run_asktell(plain_journal, tpe(), trials, "optuna"))
    rows.append(run_loop(journal(work / "loop.log"), trials, work, "journal"))
    rows.append(run_asktell(journal(work / "plain.log"), tpe(), trials, "optuna"))
    rows.append(run_loop(optuna.storages.InMemoryStorage(), trials, work, "memory"))
    rows.append(run_asktell(optuna.storages.InMemoryStorage(), tpe(), trials, "optuna"))
    return rows


# The report ---------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = [
        f"{'case':<28}{'storage':<14}{'n':>6}{'median':>9}{'p95':>9}{'p99':>9}"
        f"{'commits':>9}{'writes':>8}"
    ]
    for row in rows:
        counts = "".join(
            f"{'-':>{w}}" if c is None else f"{c:>{w}.1f}"
            for c, w in ((row.commits, 9), (row.writes, 8))
        )
        lines.append(
            f"{row.case:<28}{row.storage:<14}{len(row.seconds):>6}{row.ms(50):>9.1f}"
            f"{row.ms(95):>9.1f}{row.ms(99):>9.1f}{counts}"
        )
    return "\n".join(lines)


def verdict(rows: list[Row]) -> str:
    """The goal, judged on each PostgreSQL storage edgetune offers (the journal first)."""
    goal = f"goal (edgetune loop on PostgreSQL, p95 <= {GOAL_P95_MS:g} ms)"
    loops = {r.storage: r for r in rows if r.case == "edgetune loop"}
    judged = []
    for kind, words in (
        (PG_JOURNAL, "the journal in PostgreSQL"),
        ("postgresql", "Optuna's tables"),
    ):
        if kind in loops:
            p95 = loops[kind].ms(95)
            met = "met" if p95 <= GOAL_P95_MS else "missed"
            judged.append(f"{met} on {words}, p95 {p95:.1f} ms")
    if not judged:
        return f"{goal}: not measured, no PostgreSQL"
    return f"{goal}: " + "; ".join(judged)


def snapshot() -> str:
    """The machine's load now: its load average, and the share of the last minute some
    task waited for I/O (Linux's pressure stall information), which a commit's flush feels."""
    load = ",".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        some = Path("/proc/pressure/io").read_text().splitlines()[0].split()
        return f"{load}, I/O stalled {float(some[2].split('=')[1]):.0f}%"
    except (OSError, IndexError, ValueError):
        return load


def header(args: argparse.Namespace, loads: list[str], server: str) -> str:
    import psycopg2

    packages = ", ".join(f"{p} {version(p)}" for p in ("optuna", "sqlalchemy"))
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"load average (1, 5, 15 min) and I/O stall (avg60) at start {loads[0]}, "
        f"at end {loads[1]}\n"
        f"Python {platform.python_version()}; {packages}, psycopg2 "
        f"{psycopg2.__version__.split()[0]}; {server}\n"
        f"{args.trials} trials per case, 1 run; TPE, 5 parameters; ms per trial"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument(
        "--postgres", action=argparse.BooleanOptionalAction, default=True,
        help="run the PostgreSQL cases on a throwaway cluster (needs initdb)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.postgres and unavailable():
        parser.error(f"no PostgreSQL here: {unavailable()}; or run with --no-postgres")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loads = [snapshot()]
    with (
        tempfile.TemporaryDirectory(prefix="edgetune-bench-asktell-") as tmp,
        throwaway_postgres() if args.postgres else nullcontext() as cluster,
    ):
        server = "no PostgreSQL" if cluster is None else (
            f"PostgreSQL {cluster.server_version()} on loopback, default settings (fsync on)"
        )  # fmt: skip
        rows = run_cases(args.trials, Path(tmp), cluster)
    loads.append(snapshot())
    print(header(args, loads, server))
    print(table(rows))
    print(verdict(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
