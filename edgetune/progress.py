"""Progress of a study while it runs, read from its Optuna storage.

Every ``interval`` seconds the study's trials are read into a ``Snapshot``: the outcomes so
far, and each running trial's stage (the loop's ``stage`` attribute) and epoch (the float
metric it reports each epoch). Two views of the snapshots:

- on a terminal, a live panel redrawn in place (one line per study and per running trial,
  each cut to the terminal's width, never wrapped);
- anywhere else (a log file, a pipe, CI), one plain line per event: a trial started,
  changed stage, began an epoch or finished, each with the elapsed time and an ETA.

In the Prefect UI the flow's progress artifact shows the same (``flows.tune``).

Reading the storage, like any other observer, needs no hook in the flow and works the same
when the stages run on other hosts.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

# The tables, printed after the study, are in edgetune.tables; these are imported from here.
from edgetune.tables import (
    confirmation_line,
    pruning_line,
    render_summary,
    results_table,
    retrained_line,
)

__all__ = [
    "Progress",
    "Running",
    "Snapshot",
    "clock",
    "confirmation_line",
    "epoch_lines",
    "eta_s",
    "events",
    "live_view",
    "pruning_line",
    "read_snapshot",
    "render_summary",
    "results_table",
    "retrained_line",
]

console = Console(stderr=True)

#: What each stage of the loop (its ``stage`` trial attribute) is called in a progress line.
STAGES = {"evaluate": "waiting for the compiler", "compile": "compile", "device": "device"}
#: Without any event for this long, the plain view prints the study's status again.
QUIET_S = 300.0


def clock(seconds: float) -> str:
    """``75`` → ``1:15``; ``3725`` → ``1:02:05``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class Running:
    """A trial in flight: its stage, and while it trains, its epochs done and planned."""

    number: int
    stage: str
    epochs_done: int
    epochs: int | None
    age_s: float

    def text(self) -> str:
        if self.stage == "train" and self.epochs:
            epoch = min(self.epochs_done + 1, self.epochs)  # the one it trains now
            return f"trial {self.number}: train epoch {epoch}/{self.epochs}"
        return f"trial {self.number}: {STAGES.get(self.stage, self.stage)}"


@dataclass(frozen=True)
class Snapshot:
    """One study as read from its storage at one moment."""

    study: str
    label: str  # the variant's name in a variant run, else ""
    total: int  # the trials it runs (study.n_trials, or the grid's size)
    done: int  # trials with an outcome (a failed trial retried is not one yet)
    to_ask: int  # trials not asked yet
    counts: dict[str, int]
    running: tuple[Running, ...]
    finished: dict[int, str]  # trial number → its outcome, as a progress line says it
    durations: tuple[float, ...]  # seconds from start to outcome of the finished trials
    best: str  # "best device AUGRC 0.01234 (trial 2)", or "no result yet"
    parallel: int

    def status(self) -> str:
        failed, pruned = self.counts.get("FAIL", 0), self.counts.get("PRUNED", 0)
        return (
            f"{self.done}/{self.total} done · {len(self.running)} running · "
            f"{pruned} pruned · {failed} failed"
        )


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def _outcome(trial: Any, label: str, best: int | None) -> str:
    """A finished trial in a few words: its value, or why it was pruned or failed."""
    from tasks.hpo.study import ATTR_FAIL_REASON, ATTR_FAIL_STAGE, ATTR_REPEAT_OF, state_name

    attrs, state = trial.user_attrs, state_name(trial)
    took = _seconds(trial.datetime_start, trial.datetime_complete)
    after = f" after {clock(took)}" if took is not None else ""
    if state == "COMPLETE":
        value = float((trial.values or [float("nan")])[0])
        text = f"COMPLETE, {label} {value:.5f}{after}"
        if attrs.get(ATTR_REPEAT_OF) is not None:
            text += f" (repeat of trial {attrs[ATTR_REPEAT_OF]}: not trained)"
        return text + (" · best so far" if trial.number == best else "")
    why = str(attrs.get(ATTR_FAIL_REASON) or "")[:200]
    if state == "FAIL":
        return f"FAIL in {attrs.get(ATTR_FAIL_STAGE, 'unknown stage')}{after}: {why}"
    return f"{state}{after}" + (f": {why}" if why else "")


def read_snapshot(
    study: Any, target: Any, label: str = "", now: datetime | None = None
) -> Snapshot:
    """The study's progress now: outcomes, running trials with stage and epoch, the best."""
    from optuna.trial import TrialState

    from tasks.hpo.recovery import ATTR_STAGE, outcome_count
    from tasks.hpo.study import ATTR_APPLIED, best_trial, state_name, study_budget
    from tasks.workloads.registry import objective_for, workload_for

    now = now or datetime.now()
    trials = study.get_trials(deepcopy=False)
    objective, workload = objective_for(target), workload_for(target)
    best = best_trial(study)
    counts: dict[str, int] = {}
    running: list[Running] = []
    finished: dict[int, str] = {}
    durations: list[float] = []
    for trial in trials:
        state = state_name(trial)
        counts[state] = counts.get(state, 0) + 1
        if trial.state == TrialState.RUNNING:
            params = trial.user_attrs.get(ATTR_APPLIED) or trial.params
            try:
                epochs: int | None = workload.planned_epochs(dict(params))
            except Exception:  # a parameter set the workload cannot read: no epoch count
                epochs = None
            age = _seconds(trial.datetime_start, now) or 0.0
            stage = str(trial.user_attrs.get(ATTR_STAGE, "train"))
            running.append(
                Running(trial.number, stage, len(trial.intermediate_values), epochs, age)
            )
        elif state != "REJECTED" and trial.state != TrialState.WAITING:
            finished[trial.number] = _outcome(
                trial, objective.label, None if best is None else best.number
            )
            took = _seconds(trial.datetime_start, trial.datetime_complete)
            if took is not None:
                durations.append(took)
    total = study_budget(target.study)
    done = outcome_count(trials)
    return Snapshot(
        study=study.study_name,
        label=label,
        total=total,
        done=done,
        to_ask=max(total - done - len(running), 0),
        counts=counts,
        running=tuple(running),
        finished=finished,
        durations=tuple(durations),
        best=(
            f"best {objective.label} {float(best.values[0]):.5f} (trial {best.number})"
            if best is not None
            else "no result yet"
        ),
        parallel=target.study.parallel,
    )


def eta_s(snapshots: list[Snapshot], budget_left_s: float | None = None) -> float | None:
    """Seconds until the run's last trial has its outcome, or None before any trial finished.

    The work left is each study's trials still to ask at the mean duration of its finished
    trials (of all studies' while it has none), plus what its running trials have left of
    that mean; the studies share their ``parallel`` slots, and no estimate is shorter than
    the longest running trial's rest. With a time budget, no new trial starts after
    ``budget_left_s``: the trials then in flight still finish.
    """
    every = [d for s in snapshots for d in s.durations]
    if not every:
        return None if any(s.to_ask or s.running for s in snapshots) else 0.0
    overall = sum(every) / len(every)
    work, longest = 0.0, 0.0
    for snap in snapshots:
        mean = sum(snap.durations) / len(snap.durations) if snap.durations else overall
        rests = [max(mean - t.age_s, 0.0) for t in snap.running]
        work += snap.to_ask * mean + sum(rests)
        longest = max([longest, *rests])
    parallel = max(max((s.parallel for s in snapshots), default=1), 1)
    eta = max(work / parallel, longest)
    if budget_left_s is not None:
        eta = min(eta, max(budget_left_s, 0.0) + overall)
    return eta


def events(before: Snapshot | None, after: Snapshot) -> list[str]:
    """What happened to a study between two snapshots, one line each: trials that finished,
    then trials that started, changed stage or began an epoch. With ``before`` None (a
    study first seen) every trial in it is news; so is every trial of a study that lost a
    finished trial since ``before`` (it was deleted and started afresh)."""
    if before is not None and not set(before.finished) <= set(after.finished):
        before = None
    finished = before.finished if before is not None else {}
    was = {t.number: t for t in before.running} if before is not None else {}
    lines = [
        f"trial {number}: {after.finished[number]} ({after.done}/{after.total} done)"
        for number in sorted(set(after.finished) - set(finished))
    ]
    for trial in after.running:
        old = was.get(trial.number)
        if old is None:
            lines.append(trial.text().replace(":", " started:", 1))
        elif old.text() != trial.text():
            lines.append(trial.text())
    return lines


def observer_storage(url: str) -> Any:
    """The study's storage, read as an observer: it never creates the database or its
    tables (the study does), so a study that does not exist yet is an error here, and the
    next poll tries again. Optuna still writes a missing version row: under the lock the
    study holds while it creates the database, or the two would collide."""
    import optuna

    from tasks.storage import is_journal, open_storage
    from tasks.tracking import creation_lock

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(url)
    if is_journal(url):  # no Optuna schema to write; at most its one table, made at once
        return open_storage(url)
    with creation_lock(url):  # Optuna still writes its version rows when they are missing
        return optuna.storages.RDBStorage(
            url, skip_table_creation=True, skip_compatibility_check=True
        )


class Progress:
    """Shows the study's progress on stderr while the block runs: live on a terminal
    (``live``), else one line per event (see the module). ``fresh``: the run deletes the
    stored study first (``--restart``): where it stands now is not worth a line."""

    def __init__(
        self,
        config: Any,
        *,
        enabled: bool = True,
        live: bool = True,
        fresh: bool = False,
        interval: float = 2.0,
        out: TextIO | None = None,
        quiet_s: float = QUIET_S,
    ) -> None:
        self.config = config
        self.enabled = enabled
        self.live = live
        self.fresh = fresh
        self.interval = interval
        self.out = out
        self.quiet_s = quiet_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None
        self._studies: dict[str, Any] = {}
        self._deleted: dict[str, int] = {}  # each study's deletions when it was loaded
        self._last: dict[str, Snapshot] = {}
        self._started = self._said = time.monotonic()

    def __enter__(self) -> Progress:
        self._started = self._said = time.monotonic()
        if not self.enabled:
            return self
        if self.live:
            self._live = Live(
                Text("starting…"), console=console, refresh_per_second=2, transient=True
            )
            self._live.__enter__()
        else:  # what is stored already is no news; a study run again says where it stands
            for snap in self.snapshots():
                self._last[snap.study] = snap
                if not self.fresh:
                    self._say([f"{snap.label or snap.study}: {snap.status()} · {snap.best}"])
        self._thread = threading.Thread(target=self._poll, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if not self.live and kind is None:
                with contextlib.suppress(Exception):  # a display never fails the command
                    self.tick()  # the last outcomes, before the summary
        if self._live is not None:
            self._live.__exit__(kind, exc, tb)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a display never stops the study; the next poll tries again
                continue

    def _targets(self) -> list[tuple[str, Any]]:
        from tasks.config.variants import expand, variant_name

        targets = [variant for _, variant in expand(self.config)] or [self.config]
        many = len(targets) > 1
        return [((variant_name(t) or "") if many else "", t) for t in targets]

    def snapshots(self) -> list[Snapshot]:
        """Each study of the run that exists yet, read now."""
        import optuna

        from tasks.hpo.recovery import forgotten

        found = []
        for label, target in self._targets():
            name = target.study.name
            deleted = forgotten(target.storage_url, name)
            if self._deleted.setdefault(name, deleted) != deleted:  # --restart deleted it:
                self._deleted[name] = deleted  # what is read next is a new study, all news
                self._studies.pop(name, None)
                self._last.pop(name, None)
            try:
                if name not in self._studies:
                    self._studies[name] = optuna.load_study(
                        study_name=name, storage=observer_storage(target.storage_url)
                    )
                found.append(read_snapshot(self._studies[name], target, label))
            except Exception:  # not created yet, deleted to start afresh, or the database
                self._studies.pop(name, None)  # is busy: load it again next time
        return found

    def _when(self, snaps: list[Snapshot]) -> str:
        elapsed = time.monotonic() - self._started
        budget = self.config.study.time_budget_s
        eta = eta_s(snaps, None if budget is None else budget - elapsed)
        return f"{clock(elapsed)} elapsed, ETA {'?' if eta is None else clock(eta)}"

    def _say(self, lines: list[str], snaps: list[Snapshot] | None = None) -> None:
        when = self._when(snaps if snaps is not None else list(self._last.values()))
        for line in lines:
            print(f"[{when}] {line}", file=self.out or sys.stderr, flush=True)
        if lines:
            self._said = time.monotonic()

    def tick(self) -> None:
        """Read the studies once and show what changed."""
        snaps = self.snapshots()
        if not snaps:
            return
        if self._live is not None:
            self._live.update(live_view(snaps, self._when(snaps)))
            return
        lines = []
        for snap in snaps:
            prefix = f"{snap.label}: " if snap.label else ""
            lines += [prefix + line for line in events(self._last.get(snap.study), snap)]
            self._last[snap.study] = snap
        if not lines and time.monotonic() - self._said >= self.quiet_s:
            lines = [f"{s.label or s.study}: {s.status()} · {s.best}" for s in snaps]
        self._say(lines, snaps)


def live_view(snaps: list[Snapshot], when: str) -> Group:
    """The live panel: the time, then per study its status, best and running trials; each
    line cut to the terminal's width rather than wrapped."""

    def line(text: str) -> Text:
        return Text(text, no_wrap=True, overflow="ellipsis")

    lines = [line(when)]
    for snap in snaps:
        prefix = f"{snap.label}: " if snap.label else ""
        lines += [line(f"{prefix}{snap.status()}"), line(f"  {snap.best}")]
        lines += [line(f"  {t.text()}") for t in snap.running]
    return Group(*lines)


@contextlib.contextmanager
def epoch_lines(logger_name: str, out: TextIO | None = None) -> Iterator[None]:
    """Print the INFO records of ``logger_name`` (a detector's training epochs) as plain
    lines on stderr while the block runs; elsewhere they are dropped."""
    logger = logging.getLogger(logger_name)
    handler = logging.StreamHandler(out or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not again through a handler Prefect put on the root
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
