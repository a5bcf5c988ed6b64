"""The tables the CLI prints: a study's trials, its variants compared, the seed check.

Compact by default, to fit 80 columns: the trial, the objective and the key metrics, the
state, and the parameters under short names in one column. Number columns never wrap and
are never cut; the text columns (parameters, state, settings) wrap instead. ``wide``
shows every column (each parameter, the gaps, a variant's settings and best parameters)
at its natural width. ``--json`` and ``--csv`` (one row per trial, every column) are for
machines: ``print_result``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

#: Parameters with a conventional short name; any other is shortened by ``short_names``.
KNOWN_SHORT = {"weight_decay": "wd", "momentum": "mom", "batch_size": "bs", "learning_rate": "lr"}
#: A name this short is shown as it is.
SHORT_ENOUGH = 6
#: The narrowest a compact table's state column wraps at.
STATE_MIN = 12
#: A variant name up to this long is never wrapped in the compact table.
MAX_NAME = 20
#: Width of a table printed to a file or pipe (no terminal to fit).
LOG_WIDTH = 200


@dataclass(frozen=True)
class Metric:
    """One metric column: the row's key, its title and its format."""

    key: str
    title: str
    spec: str


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


def short_names(names: list[str]) -> dict[str, str]:
    """A short, unique name for each parameter: short names as they are, the conventional
    ones (``wd``), the others cut to 3 letters a word (``swa_start`` → ``swa_sta``); a
    name whose short form another already has stays whole."""
    short: dict[str, str] = {}
    for name in names:
        if len(name) <= SHORT_ENOUGH:
            short[name] = name
        else:
            short[name] = KNOWN_SHORT.get(name) or "_".join(p[:3] for p in name.split("_"))
    taken = list(short.values())
    return {n: s if taken.count(s) == 1 or s == n else n for n, s in short.items()}


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, padding=0)


def _number_column(table: Table, title: str, wide: bool) -> None:
    """A column that never wraps nor cuts its cells; compact, its title goes one word a line."""
    table.add_column(title if wide else title.replace(" ", "\n"), justify="right", no_wrap=True)


def _text_column(table: Table, title: str, max_width: int | None = None) -> None:
    """A column that wraps (and folds a word longer than the column) instead of cutting."""
    table.add_column(title, justify="left", overflow="fold", max_width=max_width)


def metric_columns(result: dict[str, Any], *, wide: bool = False) -> list[Metric]:
    """The metric columns of a result's objective. Compact leaves out the gaps (float minus
    device: ``--wide`` shows them)."""
    objective = _objective(result)
    columns = [
        Metric(objective.float_metric, objective.label.replace("device ", "float "), ".5f"),
        Metric(objective.metric, objective.label, ".5f"),
        *[
            Metric("latency_ms" if key == "device_latency_ms" else key, title, spec)
            for key, title, spec in objective.columns
            if wide or not key.endswith("gap")
        ],
    ]
    goals = result.get("goals") or {}
    if "compiled_size_mb" in goals.get("metrics", ()) or goals.get("max_size_mb") is not None:
        columns.append(Metric("compiled_size_mb", "size MB", ".3f"))
    return columns


def state_text(row: dict[str, Any]) -> str:
    """A trial's state with why it failed, broke a limit, was flagged or was not trained."""
    state = row["state"] if not row["reason"] else f"{row['state']}: {row['reason'][:60]}"
    if row.get("infeasible"):
        state = f"{state} (infeasible: {row['infeasible'][:60]})"
    for flag, why in (row.get("flags") or {}).items():
        state = f"{state} ({flag}: {why[:60]})"
    if row.get("repeat_of") is not None:
        state = f"{state} (repeat of trial {row['repeat_of']}: not trained)"
    return state


def _legend(short: dict[str, str]) -> str | None:
    renamed = [f"{s} = {n}" for n, s in short.items() if s != n]
    return ", ".join(renamed) if renamed else None


def results_table(result: dict[str, Any], *, wide: bool = False, width: int | None = None) -> Table:
    """One row per trial (samples the constraints rejected ran nothing: the count line
    below the table says how many); the best marked *, the rest of a Pareto front +.

    Compact on a console ``width`` wide, a long state (a failure's reason) wraps within a
    sixth of it, so the parameters keep most of the room the numbers leave.
    """
    objective = _objective(result)
    rows = [row for row in result["trials"] if row["state"] != "REJECTED"]
    names = sorted({name for row in rows for name in row["params"]})
    short = short_names(names)
    better = "higher" if objective.maximize else "lower"
    table = _table(f"study {result['study']}: {objective.metric} ({better} is better)")
    _number_column(table, "trial", wide)
    if wide:
        for name in names:
            _number_column(table, name, wide)
    else:
        _text_column(table, "parameters")
        table.caption, table.caption_justify = _legend(short), "left"
    columns = metric_columns(result, wide=wide)
    for column in columns:
        _number_column(table, column.title, wide)
    _text_column(table, "state", None if wide or width is None else max(STATE_MIN, width // 6))
    best = result["best"]["trial"] if result.get("best") else None
    front = set(result.get("pareto_front") or ())
    for row in rows:
        mark = "*" if row["trial"] == best else "+" if row["trial"] in front else ""
        values = {name: _fmt(row["params"].get(name), ".4g") for name in names}
        params = (
            list(values.values())
            if wide
            else [" ".join(f"{short[n]}={v}" for n, v in values.items() if v != "-") or "-"]
        )
        table.add_row(
            mark + str(row["trial"]),
            *params,
            *[_fmt(row.get(column.key), column.spec) for column in columns],
            state_text(row),
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
    registered = f" → {model_ref(champion)}" if champion.get("trial") is not None else ""
    note = f"; {champion['note']}" if champion.get("note") else ""
    return f"{head}: {label} {best[metric]:.5f}{registered}{note}"


def model_ref(registered: dict[str, Any]) -> str:
    """``models:/NAME@ALIAS (version N)``, or ``models:/NAME/N`` for a version with no alias
    (a search whose best did not beat an earlier champion)."""
    if not registered.get("alias"):
        return f"models:/{registered['model']}/{registered['version']}"
    return f"models:/{registered['model']}@{registered['alias']} (version {registered['version']})"


def console_for(table: Table, *, wide: bool) -> Console:
    """Where a summary prints: the terminal's width (a file or pipe: LOG_WIDTH); wide, at
    least the table's natural width, so no column is squeezed (a narrower terminal wraps
    the lines)."""
    out = Console()
    width = out.width if out.is_terminal else LOG_WIDTH
    if wide:
        width = max(width, Console(width=100_000).measure(table).maximum)
    return out if width == out.width and out.is_terminal else Console(width=width)


def render_summary(
    result: dict[str, Any], *, wide: bool = False, out: Console | None = None
) -> None:
    if "variants" in result:
        render_variants(result, wide=wide, out=out)
        return
    out = out or console_for(results_table(result, wide=wide), wide=wide)
    out.print(results_table(result, wide=wide, width=out.width))
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
        out.print(confirmation_table(confirmation, objective.label, wide=wide))
        out.print(confirmation_line(confirmation, objective.label))
    if champion and confirmation and champion.get("trial") is not None:
        out.print(f"champion: trial {champion['trial']} (best mean) → {model_ref(champion)}")
    elif champion and best and champion.get("trial") is not None:
        what = "champion" if champion["alias"] == "champion" else "best trial"
        out.print(
            f"{what}: trial {champion['trial']} ({objective.label} "
            f"{best[objective.metric]:.5f}) → {model_ref(champion)}"
        )
    elif champion:
        out.print(
            f"champion unchanged: {model_ref(champion)} is better than this study's best trial"
        )
    if champion and champion.get("note") and champion.get("alias") != "champion":
        out.print(champion["note"])
    if result.get("retrained"):
        out.print(retrained_line(result["retrained"], objective.label, objective.metric))


def confirmation_table(record: dict[str, Any], label: str, *, wide: bool = False) -> Table:
    """The seed check: each top trial's runs, mean and spread; the winner marked *."""
    table = _table(f"seed check: the top trials with {record['seeds']} more seed(s)")
    for title in ("trial", f"mean {label}", "std", "runs"):
        _number_column(table, title, wide)
    _text_column(table, "values")
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


def _done_text(row: dict[str, Any], wide: bool) -> str:
    """Trials with an outcome of the variant's budget; wide, and whether it searched."""
    counts = row.get("counts")
    if counts is None:
        return "not run"
    return (
        f"{counts.get('COMPLETE', 0)}/{row['n_trials']}"
        + ("" if row["search"] or not wide else " once")
        + "".join(f" {counts[k]} {k.lower()}" for k in ("PRUNED", "FAIL") if counts.get(k))
    )


def variant_run_text(row: dict[str, Any]) -> str:
    """How a variant ran and what it sets, in one line (compact: below the table)."""
    from tasks.config.variants import settings_text

    how = f"search, {row['n_trials']} trials" if row["search"] else "trained once"
    return f"{row['variant']} ({how}): {settings_text(row['settings']) or 'the study as it is'}"


def variants_table(result: dict[str, Any], *, wide: bool = False) -> Table:
    """One row per variant: how far it ran, its best trial, and which won (*); wide, with
    its settings and the best trial's parameters."""
    from tasks.config.variants import settings_text

    objective = _objective(result)
    better = "higher" if objective.maximize else "lower"
    table = _table(f"variants of {result['study']}: {objective.metric} ({better} is better)")
    names = [row["variant"] for row in result["variants"]]
    # A name stays on one line unless it is long; the trials column wraps instead.
    long_names = max(map(len, names), default=0) > MAX_NAME
    table.add_column("variant", overflow="fold", no_wrap=not (wide or long_names))
    if wide:
        _text_column(table, "settings")
    _text_column(table, "trials")
    _number_column(table, "best trial", wide)
    if wide:
        _text_column(table, "best params")
    columns = metric_columns(result, wide=wide)
    for column in columns:
        _number_column(table, column.title, wide)
    if wide:
        _text_column(table, "registered")
    else:  # the alias is the variant's name
        _number_column(table, "version", wide)
    for row in result["variants"]:
        best = row.get("best") or {}
        champion = row.get("champion") or {}
        params = ", ".join(f"{k}={_fmt(v, '.4g')}" for k, v in best.get("params", {}).items())
        registered = "-"
        if champion.get("trial") is not None:
            version = str(champion["version"])
            registered = f"@{champion['alias']} v{version}" if wide else version
        table.add_row(
            ("*" if row.get("winner") else "") + row["variant"],
            *([settings_text(row["settings"]) or "-"] if wide else []),
            _done_text(row, wide),
            _fmt(best.get("trial")),
            *([params or "-"] if wide else []),
            *[_fmt(best.get(column.key), column.spec) for column in columns],
            registered,
        )
    return table


def render_variants(
    result: dict[str, Any], *, wide: bool = False, out: Console | None = None
) -> None:
    table = variants_table(result, wide=wide)
    out = out or console_for(table, wide=wide)
    out.print(table)
    if not wide:
        out.print("settings (--wide: with the best parameters and the gaps):")
        for row in result["variants"]:
            out.print(f"  {variant_run_text(row)}")
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
            f"({objective.label} {best[objective.metric]:.5f}) → {model_ref(champion)}"
        )
    elif champion:
        out.print(
            f"champion unchanged: {model_ref(champion)} is better than every variant's best "
            f"trial" + (f" ({champion['note']})" if champion.get("note") else "")
        )
    elif best is None:
        out.print("no variant has a complete trial that meets the limits: no champion")
    if result.get("retrained"):
        out.print(retrained_line(result["retrained"], objective.label, objective.metric))


# For machines ---------------------------------------------------------------------------


def _flat(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted columns (``params.lr``); lists and empty mappings as JSON."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            flat.update(_flat(item, f"{name}."))
        else:
            flat[name] = json.dumps(item) if isinstance(item, list | dict) else item
    return flat


def result_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per trial (every trial, rejected samples too), with ``best``; for a
    variant run, one per variant (each variant's trials: report its own run directory)."""
    if "variants" in result:
        return [_flat(row) for row in result["variants"]]
    best = result["best"]["trial"] if result.get("best") else None
    return [
        {
            "trial": row["trial"],
            "state": row["state"],
            "best": row["trial"] == best,
            **_flat({**row, "params": dict(sorted(row["params"].items()))}),
        }
        for row in result["trials"]
    ]


def result_csv(result: dict[str, Any]) -> str:
    """``result_rows`` as CSV: a header with every column any row has, empty where none."""
    rows = result_rows(result)
    header = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return text.getvalue()


def print_result(
    result: dict[str, Any], *, as_json: bool = False, as_csv: bool = False, wide: bool = False
) -> None:
    """A study's (or a variant run's) result on stdout: JSON, CSV, or the tables."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    elif as_csv:
        print(result_csv(result), end="")
    else:
        render_summary(result, wide=wide)
