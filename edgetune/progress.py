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

        from tasks.hpo.study import best_trial, study_budget
        from tasks.workloads.registry import objective_for

        label = objective_for(self.config).label
        from tasks.config.variants import expand, variant_name

        targets = [variant for _, variant in expand(self.config)] or [self.config]
        studies: dict[str, Any] = {}
        while not self._stop.wait(self.interval):
            lines = []
            for target in targets:
                name = target.study.name
                try:
                    if name not in studies:
                        studies[name] = optuna.load_study(
                            study_name=name, storage=target.storage_url
                        )
                    study = studies[name]
                    line = status_line(study, study_budget(target.study), best_trial(study), label)
                except Exception:  # the study may not exist yet while the flow starts
                    continue
                lines.append(f"{variant_name(target)}: {line}" if len(targets) > 1 else line)
            if lines and self._live is not None:
                self._live.update(Text("\n".join(lines)))


def status_line(study: Any, total: int, best: Any, label: str = "device AUGRC") -> str:
    from tasks.hpo.study import state_name

    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[state_name(trial)] = counts.get(state_name(trial), 0) + 1
    done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) + counts.get("FAIL", 0)
    best_text = (
        f"best {label} {float(best.values[0]):.5f} (trial {best.number})"
        if best
        else "no result yet"
    )
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
    from tasks.workloads.classifier import CLASSIFIER
    from tasks.workloads.registry import OBJECTIVES

    return OBJECTIVES.get(result.get("objective", ""), CLASSIFIER)


def metric_columns(result: dict[str, Any], table: Table) -> list[tuple[str, str, str]]:
    """Add the metric columns of a result's objective to ``table``: (row key, title, format)."""
    objective = _objective(result)
    float_label = objective.label.replace("device ", "float ")
    columns = [
        (objective.float_metric, float_label, ".5f"),
        (objective.metric, objective.label, ".5f"),
        *[
            ("latency_ms" if key == "device_latency_ms" else key, title, spec)
            for key, title, spec in objective.columns
        ],
    ]
    goals = result.get("goals") or {}
    if "compiled_size_mb" in goals.get("metrics", ()) or goals.get("max_size_mb") is not None:
        columns.append(("compiled_size_mb", "size MB", ".3f"))
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    return columns


def results_table(result: dict[str, Any]) -> Table:
    objective = _objective(result)
    # Samples the constraints rejected ran nothing: the line below the table counts them.
    rows = [row for row in result["trials"] if row["state"] != "REJECTED"]
    names = sorted({name for row in rows for name in row["params"]})
    better = "higher" if objective.maximize else "lower"
    table = Table(title=f"study {result['study']}: {objective.metric} ({better} is better)")
    table.add_column("trial", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    columns = metric_columns(result, table)
    table.add_column("state", justify="right")
    best = result["best"]["trial"] if result.get("best") else None
    front = set(result.get("pareto_front") or ())
    for row in rows:
        state = row["state"] if not row["reason"] else f"{row['state']}: {row['reason'][:60]}"
        if row.get("infeasible"):
            state = f"{state} (infeasible: {row['infeasible'][:60]})"
        for flag, why in (row.get("flags") or {}).items():
            state = f"{state} ({flag}: {why[:60]})"
        if row.get("repeat_of") is not None:
            state = f"{state} (repeat of trial {row['repeat_of']}: not trained)"
        mark = "*" if row["trial"] == best else "+" if row["trial"] in front else ""
        table.add_row(
            mark + str(row["trial"]),
            *[_fmt(row["params"].get(name), ".4g") for name in names],
            *[_fmt(row.get(key), spec) for key, _, spec in columns],
            state,
        )
    return table


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def pruning_line(saved: dict[str, Any]) -> str:
    """What pruning saved: GPU epochs, compilations and board evaluations not spent."""
    n = saved["trials"]
    s = "" if n == 1 else "s"
    parts = [f"{saved['epochs']} training epochs ({_duration(saved['train_s'])})"]
    if saved.get("compile_s") is not None:
        parts.append(f"{n} compilation{s} ({_duration(saved['compile_s'])})")
    if saved.get("board_s") is not None:
        parts.append(f"{n} board evaluation{s} ({_duration(saved['board_s'])})")
    return f"pruning stopped {n} trial{s} early, saving ~" + ", ~".join(parts)


def retrained_line(retrained: dict[str, Any], label: str, metric: str) -> str:
    """The final model trained again from the best trial's parameters (measured on test, it
    reports under its own names: ``test device AUGRC``, never the selection metric's)."""
    best = retrained.get("best")
    label = retrained.get("objective_label", label)
    metric = retrained.get("objective", metric)
    where = "train and val, measured on test" if retrained["data"] == "train+val" else "train"
    head = (
        f"final model: trial {retrained['from_trial']}'s parameters trained again on {where} "
        f"(seed {retrained['seed']}, study {retrained['study']})"
    )
    if not best:
        return f"{head}: no result; the search's champion stands"
    champion = retrained.get("champion") or {}
    registered = (
        f" → models:/{champion['model']}@{champion['alias']} (version {champion['version']})"
        if champion.get("trial") is not None
        else ""
    )
    return f"{head}: {label} {best[metric]:.5f}{registered}"


def render_summary(result: dict[str, Any]) -> None:
    if "variants" in result:
        render_variants(result)
        return
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # a log file or pipe: do not squeeze the table to 80 columns
    out.print(results_table(result))
    counts = result["counts"]
    rejected = counts.get("REJECTED", 0)
    repeats = sum(1 for row in result["trials"] if row.get("repeat_of") is not None)
    out.print(
        f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed, "
        f"{counts['RUNNING']} running"
        + (f"; {rejected} samples rejected by the constraints" if rejected else "")
        + (f"; {repeats} repeated parameter sets answered without training" if repeats else "")
    )
    saved = result.get("pruning_saved")
    if saved:
        out.print(pruning_line(saved))
    if result.get("stopped_by"):
        out.print(f"stopped early: {result['stopped_by']}")
    goals = result.get("goals") or {}
    if result.get("pareto_front") is not None:
        out.print(
            f"Pareto front of {', '.join(goals.get('metrics', []))} (feasible trials, + and *): "
            f"{', '.join(str(n) for n in result['pareto_front']) or 'none'}; champion rule: "
            f"{goals.get('champion', 'primary')}"
        )
    if result.get("infeasible"):
        limits = [
            f"{key} <= {goals[key]:g}"
            for key in ("max_latency_ms", "max_size_mb")
            if goals.get(key) is not None
        ]
        out.print(
            f"{result['infeasible']} complete trials broke the limits ({', '.join(limits)}) and "
            f"cannot be the champion"
        )
        if not result.get("best"):
            out.print("no complete trial met the limits: no champion was registered")
    objective = _objective(result)
    champion = result.get("champion")
    best = result.get("best")
    confirmation = result.get("confirmation")
    if confirmation:
        out.print(confirmation_table(confirmation, objective.label))
        out.print(confirmation_line(confirmation, objective.label))
    if champion and confirmation and champion.get("trial") is not None:
        out.print(
            f"champion: trial {champion['trial']} (best mean) → "
            f"models:/{champion['model']}@{champion['alias']} (version {champion['version']})"
        )
    elif champion and best and champion.get("trial") is not None:
        what = "champion" if champion["alias"] == "champion" else "best of the variant"
        out.print(
            f"{what}: trial {champion['trial']} ({objective.label} "
            f"{best[objective.metric]:.5f}) → models:/{champion['model']}@{champion['alias']} "
            f"(version {champion['version']})"
        )
    elif champion:
        out.print(
            f"champion unchanged: models:/{champion['model']}@{champion['alias']} (version "
            f"{champion['version']}) is better than this study's best trial"
        )
    if result.get("retrained"):
        out.print(retrained_line(result["retrained"], objective.label, objective.metric))


def confirmation_table(record: dict[str, Any], label: str) -> Table:
    """The seed check: each top trial's runs, mean and spread; the winner marked *."""
    table = Table(title=f"seed check: the top trials with {record['seeds']} more seed(s)")
    for title in ("trial", f"mean {label}", "std", "runs", "values"):
        table.add_column(title, justify="right")
    for row in record["rows"]:
        mark = "*" if row["trial"] == record["winner"] else ""
        table.add_row(
            f"{mark}{row['trial']}",
            f"{row['mean']:.5f}",
            f"{row['std']:.5f}",
            str(row["runs"]),
            " ".join(f"{v:.5f}" for v in row["values"]),
        )
    return table


def confirmation_line(record: dict[str, Any], label: str) -> str:
    """Whether the winner stands out from the runner-up by more than the seed noise."""
    if "separated" not in record:
        return f"seed check: trial {record['winner']} alone (no runner-up to compare)"
    verdict = (
        "separated from"
        if record["separated"]
        else "NOT separated from (treat them as equal, or add seeds)"
    )
    return (
        f"seed check: trial {record['winner']} is {verdict} trial {record['runner_up']}: "
        f"means differ by {record['difference']:.5f} {label}, noise (2 standard errors) "
        f"{record['noise']:.5f}"
    )


def variants_table(result: dict[str, Any]) -> Table:
    """One row per variant: how it ran, its best trial, and which won (*)."""
    from tasks.config.variants import settings_text

    objective = _objective(result)
    better = "higher" if objective.maximize else "lower"
    table = Table(title=f"variants of {result['study']}: {objective.metric} ({better} is better)")
    for title in ("variant", "run", "settings", "done", "best trial", "best params"):
        table.add_column(title, justify="left" if title in ("variant", "settings") else "right")
    columns = metric_columns(result, table)
    table.add_column("registered", justify="right")
    for row in result["variants"]:
        counts = row.get("counts")
        best = row.get("best") or {}
        champion = row.get("champion") or {}
        done = (
            "not run"
            if counts is None
            else f"{counts.get('COMPLETE', 0)}/{row['n_trials']}"
            + "".join(f" {counts[k]} {k.lower()}" for k in ("PRUNED", "FAIL") if counts.get(k))
        )
        params = ", ".join(f"{k}={_fmt(v, '.4g')}" for k, v in best.get("params", {}).items())
        table.add_row(
            ("*" if row.get("winner") else "") + row["variant"],
            f"search {row['n_trials']}" if row["search"] else "once",
            settings_text(row["settings"]) or "-",
            done,
            _fmt(best.get("trial")),
            params or "-",
            *[_fmt(best.get(key), spec) for key, _, spec in columns],
            f"@{champion['alias']} v{champion['version']}"
            if champion.get("trial") is not None
            else "-",
        )
    return table


def render_variants(result: dict[str, Any]) -> None:
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)
    out.print(variants_table(result))
    objective = _objective(result)
    for row in result["variants"]:
        if row.get("pruning_saved"):
            out.print(f"{row['variant']}: {pruning_line(row['pruning_saved'])}")
        if row.get("stopped_by"):
            out.print(f"{row['variant']}: stopped early: {row['stopped_by']}")
    champion = result.get("champion")
    best = result.get("best")
    if champion and best and champion.get("variant") is not None:
        out.print(
            f"champion: variant {champion['variant']}, trial {champion['trial']} "
            f"({objective.label} {best[objective.metric]:.5f}) → "
            f"models:/{champion['model']}@{champion['alias']} (version {champion['version']})"
        )
    elif champion:
        out.print(
            f"champion unchanged: models:/{champion['model']}@{champion['alias']} (version "
            f"{champion['version']}) is better than every variant's best trial"
        )
    elif best is None:
        out.print("no variant has a complete trial that meets the limits: no champion")
    if result.get("retrained"):
        out.print(retrained_line(result["retrained"], objective.label, objective.metric))
