"""Live study progress (polled from the Optuna storage) and the results table."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)


class Progress:
    """Shows done / running / failed and the best so far while the study runs.

    It reads the study's storage, like any other observer would, so it needs no hook in
    the flow and works the same when the stages run on other hosts.
    """

    def __init__(self, config: Any, *, enabled: bool = True, interval: float = 2.0) -> None:
        self.config = config
        self.enabled = enabled
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._live = Live(
                Text("starting…"), console=console, refresh_per_second=2, transient=True
            )
            self._live.__enter__()
            self._thread = threading.Thread(target=self._poll, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._live is not None:
            self._live.__exit__(kind, exc, tb)

    def _poll(self) -> None:
        import optuna

        from tasks.study import best_trial, study_budget
        from tasks.workloads import objective_for

        label = objective_for(self.config).label
        study = None
        while not self._stop.wait(self.interval):
            try:
                if study is None:
                    study = optuna.load_study(
                        study_name=self.config.study.name, storage=self.config.storage_url
                    )
                line = status_line(study, study_budget(self.config.study), best_trial(study), label)
            except Exception:  # the study may not exist yet while the flow starts
                continue
            if self._live is not None:
                self._live.update(Text(line))


def status_line(study: Any, total: int, best: Any, label: str = "device AUGRC") -> str:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) + counts.get("FAIL", 0)
    best_text = f"best {label} {best.value:.5f} (trial {best.number})" if best else "no result yet"
    return (
        f"trials {done}/{total} done · {counts.get('RUNNING', 0)} running · "
        f"{counts.get('FAIL', 0)} failed · {counts.get('PRUNED', 0)} pruned · {best_text}"
    )


def _fmt(value: Any, spec: str = ".5f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _objective(result: dict[str, Any]) -> Any:
    from tasks.study import CLASSIFIER, OBJECTIVES

    return OBJECTIVES.get(result.get("objective", ""), CLASSIFIER)


def results_table(result: dict[str, Any]) -> Table:
    objective = _objective(result)
    rows = result["trials"]
    names = sorted({name for row in rows for name in row["params"]})
    better = "higher" if objective.maximize else "lower"
    table = Table(title=f"study {result['study']}: {objective.metric} ({better} is better)")
    table.add_column("trial", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    float_label = objective.label.replace("device ", "float ")
    columns = [
        (objective.float_metric, float_label, ".5f"),
        (objective.metric, objective.label, ".5f"),
    ]
    columns += [
        ("latency_ms" if key == "device_latency_ms" else key, title, spec)
        for key, title, spec in objective.columns
    ]
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    table.add_column("state", justify="right")
    best = result["best"]["trial"] if result.get("best") else None
    for row in rows:
        state = row["state"] if not row["reason"] else f"{row['state']}: {row['reason'][:60]}"
        table.add_row(
            ("*" if row["trial"] == best else "") + str(row["trial"]),
            *[_fmt(row["params"].get(name), ".4g") for name in names],
            *[_fmt(row.get(key), spec) for key, _, spec in columns],
            state,
        )
    return table


def render_summary(result: dict[str, Any]) -> None:
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # a log file or pipe: do not squeeze the table to 80 columns
    out.print(results_table(result))
    counts = result["counts"]
    out.print(
        f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed, "
        f"{counts['RUNNING']} running"
    )
    objective = _objective(result)
    champion = result.get("champion")
    best = result.get("best")
    if champion and best and champion.get("trial") is not None:
        out.print(
            f"champion: trial {champion['trial']} ({objective.label} "
            f"{best[objective.metric]:.5f}) → models:/{champion['model']}@{champion['alias']} "
            f"(version {champion['version']})"
        )
    elif champion:
        out.print(
            f"champion unchanged: models:/{champion['model']}@{champion['alias']} (version "
            f"{champion['version']}) is better than this study's best trial"
        )
