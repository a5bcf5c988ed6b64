"""The tables the CLI prints fit 80 columns and cut no number; ``--wide`` shows every column;
``--json`` and ``--csv`` are for machines.

The study is a real one in SQLite, run on fake stages (``tests/fakes/engine.py``) with the
quickstart's five parameters: complete, pruned and failed trials, no training.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from edgetune.cli import app
from edgetune.tables import confirmation_table, render_summary
from tasks.config import dump_config
from tasks.hpo.launch import Slot
from tasks.hpo.loop import StudyLoop
from tasks.hpo.study import open_study, summary
from tasks.workloads.classifier import ClassifierWorkload

from fakes.engine import FakeStages, FakeTracker, fake_config

QUICKSTART = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml").read_text()
)["study"]["search_space"]
#: A row's first cell ends within this many characters (the trial's, or a variant's name).
FIRST_COLUMN = 7
NUMBER = re.compile(r"^[+-]?\d+\.\d+$|^-$")
runner = CliRunner()


class Unregistered(ClassifierWorkload):
    """The classifier, without the model registry (not what these tests are about)."""

    def register_best(self, *args: Any, **kwargs: Any) -> None:
        return None


def _fail(stage: str, slot: Slot) -> BaseException | None:
    if stage == "compile" and slot.number == 3:
        return RuntimeError("the compiler ran out of memory while quantizing layer features.3")
    return None


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A finished study of 7 trials (a pruned and a failed one among them) and its summary."""
    tmp = tmp_path_factory.mktemp("tables")
    config = fake_config(
        tmp,
        {"train": {"epochs": 10, "swa_start": 7}},
        n_trials=7,
        parallel=2,
        search_space=QUICKSTART,
        retries=0,
    )
    config.run_path.mkdir(parents=True)
    (config.run_path / "config.yaml").write_text(dump_config(config))
    study = open_study(config.storage_url, config.study, config.seed)
    stages = FakeStages(
        config,
        # values across magnitudes: 0.000912…, 0.0123…, 0.3…
        value=lambda p: 0.0009123 + abs(float(p["lr"]) - 0.03) * 7.0,
        fail=_fail,
        prune=lambda slot: (
            "pruned at epoch 1 with float AUGRC 0.5012" if slot.number == 5 else None
        ),
    )
    loop = StudyLoop(
        config,
        study,
        stages=stages,
        logger=__import__("logging").getLogger("test-tables"),
        tracker=FakeTracker(),  # type: ignore[arg-type]
        workload=Unregistered(config),
    )
    loop.run()
    return config.run_path, summary(study)


def console(width: int = 80) -> Console:
    return Console(width=width, record=True, file=io.StringIO(), color_system=None)


def rendered(renderable: Any, width: int = 80) -> list[str]:
    out = console(width)
    out.print(renderable)
    return out.export_text().splitlines()


def summary_lines(result: dict[str, Any], width: int = 80) -> list[str]:
    """What ``edgetune report`` prints on a terminal ``width`` columns wide."""
    out = console(width)
    render_summary(result, out=out)
    return out.export_text().splitlines()


def assert_fits(lines: list[str], width: int = 80) -> None:
    too_long = [line for line in lines if len(line.rstrip()) > width]
    assert not too_long, "\n".join(too_long)
    cut = [line for line in lines if "…" in line]
    assert not cut, "\n".join(lines)


def blocks(lines: list[str]) -> dict[str, list[str]]:
    """The table's rows by their first cell (without the * or + mark): a row goes on over
    the lines whose first column is blank (its text columns wrapped)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    start = next(i for i, line in enumerate(lines) if "───" in line) + 1
    for line in lines[start:]:
        if not line.strip():
            break  # the end of the table
        if line[:FIRST_COLUMN].strip():
            current = found.setdefault(line.split()[0].lstrip("*+"), [])
        assert current is not None
        current.append(line)
    return found


def assert_same(shown: str, value: Any, spec: str) -> None:
    """A printed cell gives back the number within the rounding of its format."""
    if value is None:
        assert shown == "-"
        return
    decimals = int(re.search(r"\.(\d+)", spec).group(1))  # type: ignore[union-attr]
    assert float(shown) == pytest.approx(value, abs=0.51 * 10**-decimals), (shown, value)


def legend(lines: list[str]) -> dict[str, str]:
    """Short parameter names → names, from the line below the table."""
    pairs = re.findall(r"(\w+) = (\w+)", " ".join(lines))
    return dict(pairs)


METRICS = [  # the compact study table's numbers: (row key, format)
    ("float_augrc", ".5f"),
    ("device_augrc", ".5f"),
    ("device_accuracy", ".3f"),
    ("latency_ms", ".3f"),
]


def test_the_study_table_fits_80_columns_and_cuts_no_number(
    study_dir: tuple[Path, dict[str, Any]],
) -> None:
    _, result = study_dir
    lines = summary_lines(result)
    assert_fits(lines)
    rows = blocks(lines)
    trials = {str(row["trial"]): row for row in result["trials"]}
    assert set(rows) == set(trials)
    assert {row["state"] for row in result["trials"]} == {"COMPLETE", "PRUNED", "FAIL"}
    names = legend(lines)
    at = next(line for line in lines if line.rstrip().endswith("state")).rindex("state")
    for number, block in rows.items():
        row = trials[number]
        cells = [t for t in block[0].split()[1:] if "=" not in t and NUMBER.match(t)]
        for shown, (key, spec) in zip(cells, METRICS, strict=False):
            assert_same(shown, row[key], spec)
        # the parameters, under their short names, wrapped but whole
        params = dict(re.findall(r"(\w+)=(\S+)", " ".join(block)))
        assert {names.get(k, k) for k in params} == set(row["params"])
        for short, shown in params.items():
            assert float(shown) == pytest.approx(row["params"][names.get(short, short)], rel=5e-4)
        # the state, with the reason why, wrapped in its column but whole
        state = " ".join(line[at:].strip() for line in block if line[at:].strip())
        assert state == (f"{row['state']}: {row['reason'][:60]}" if row["reason"] else row["state"])


def test_the_detector_table_fits_80_columns(study_dir: tuple[Path, dict[str, Any]]) -> None:
    _, study = study_dir
    result = {**study, "objective": "device_map50_95", "trials": []}
    for n, row in enumerate(study["trials"]):
        done = row["state"] == "COMPLETE"
        result["trials"].append(
            {
                **row,
                "params": {"lr0": 0.01234 * (n + 1), "mosaic": 0.5, "warmup_epochs": 2.75},
                "float_map50_95": 0.74213 - n / 100 if done else None,
                "device_map50_95": 0.70151 - n / 100 if done else None,
                "device_map50": 0.95123 if done else None,
                "map50_95_gap": 0.04062 if done else None,
            }
        )
    result["best"] = result["trials"][0]
    lines = summary_lines(result)
    assert_fits(lines)
    rows = blocks(lines)
    for row in result["trials"]:
        cells = [t for t in rows[str(row["trial"])][0].split()[1:] if NUMBER.match(t)]
        expected = [
            (row["float_map50_95"], ".5f"),
            (row["device_map50_95"], ".5f"),
            (row["device_map50"], ".4f"),
            (row["latency_ms"], ".3f"),
        ]
        for shown, (value, spec) in zip(cells, expected, strict=False):
            assert_same(shown, value, spec)


VARIANTS = {
    "study": "quickstart-variants",
    "objective": "device_augrc",
    "goals": {},
    "counts": {"COMPLETE": 10, "PRUNED": 1},
    "winner": "mobilenet",
    "variants": [
        {
            "variant": "tinycnn",
            "search": True,
            "settings": {"model.arch": "tinycnn"},
            "n_trials": 6,
            "counts": {"COMPLETE": 6, "PRUNED": 0, "FAIL": 0},
            "best": {
                "trial": 5,
                "params": {"lr": 0.01234, "momentum": 0.9},
                "float_augrc": 0.028712,
                "device_augrc": 0.028704,
                "device_accuracy": 0.8611,
                "latency_ms": 0.0612,
                "augrc_gap": -0.000008,
                "accuracy_gap": 0.0,
            },
            "champion": {"alias": "tinycnn", "version": "1", "trial": 5},
            "winner": False,
        },
        {
            "variant": "tinycnn-high-lr",
            "search": True,
            "settings": {"study.n_trials": 4, "study.search_space": {"lr": {}}},
            "n_trials": 4,
            "counts": {"COMPLETE": 3, "PRUNED": 1, "FAIL": 0},
            "best": {
                "trial": 1,
                "params": {"lr": 0.06231},
                "float_augrc": 0.069462,
                "device_augrc": 0.069661,
                "device_accuracy": 0.7643,
                "latency_ms": 0.0581,
                "augrc_gap": 0.000199,
                "accuracy_gap": -0.0012,
            },
            "champion": {"alias": "tinycnn-high-lr", "version": "2", "trial": 1},
            "winner": False,
        },
        {
            "variant": "mobilenet",
            "search": False,
            "settings": {
                "model.arch": "mobilenet_v3_small",
                "train.lr": 0.02,
                "train.swa_lr": 0.005,
            },
            "n_trials": 1,
            "counts": {"COMPLETE": 1},
            "best": {
                "trial": 0,
                "params": {},
                "float_augrc": 0.000941,
                "device_augrc": 0.000912,
                "device_accuracy": 0.9811,
                "latency_ms": 0.4102,
                "augrc_gap": -0.000029,
                "accuracy_gap": 0.0,
            },
            "champion": {"alias": "mobilenet", "version": "3", "trial": 0},
            "winner": True,
        },
    ],
}


def test_the_variants_table_fits_80_columns_and_cuts_no_number() -> None:
    lines = summary_lines(VARIANTS)
    assert_fits(lines)
    rows = blocks(lines)
    assert set(rows) == {"tinycnn", "tinycnn-high-lr", "mobilenet"}
    for variant in VARIANTS["variants"]:
        best = variant["best"]
        cells = [t for t in rows[variant["variant"]][0].split()[1:] if NUMBER.match(t)]
        expected = [
            (best["float_augrc"], ".5f"),
            (best["device_augrc"], ".5f"),
            (best["device_accuracy"], ".3f"),
            (best["latency_ms"], ".3f"),
        ]
        for shown, (value, spec) in zip(cells, expected, strict=True):
            assert_same(shown, value, spec)


def test_the_seed_check_table_fits_80_columns() -> None:
    values = [[0.035751, 0.046392, 0.047333, 0.041, 0.052], [0.10983, 0.10328, 0.09533, 0.1, 0.11]]
    record = {
        "seeds": 4,
        "winner": 4,
        "rows": [
            {"trial": t, "mean": sum(v) / 5, "std": 0.00643, "runs": 5, "values": v}
            for t, v in zip((4, 2), values, strict=True)
        ],
    }
    lines = rendered(confirmation_table(record, "device AUGRC"))
    assert_fits(lines)
    rows = blocks(lines)
    for row in record["rows"]:
        shown = [float(t) for t in " ".join(rows[str(row["trial"])]).split()[1:] if NUMBER.match(t)]
        assert shown == pytest.approx([row["mean"], row["std"], *row["values"]], abs=5.1e-6)


def test_wide_shows_every_parameter_and_metric(study_dir: tuple[Path, dict[str, Any]]) -> None:
    run_dir, result = study_dir
    shown = runner.invoke(app, ["report", str(run_dir), "--wide"])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert "…" not in shown.stdout
    header = next(line for line in lines if " trial " in f" {line} ")
    titles = [*sorted(QUICKSTART), "float AUGRC", "device AUGRC", "device acc", "latency ms"]
    for title in [*titles, "AUGRC gap", "acc gap", "state"]:
        assert title in header, header
    rows = blocks(lines)
    for row in result["trials"]:
        cells = rows[str(row["trial"])][0].split()
        params = [row["params"][name] for name in sorted(QUICKSTART)]
        assert [float(c) for c in cells[1:6]] == pytest.approx(params, rel=5e-4)


def test_compact_is_the_default_and_names_what_wide_adds(
    study_dir: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, _ = study_dir
    shown = runner.invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    assert "AUGRC gap" not in shown.stdout and "parameters" in shown.stdout
    assert "mom = momentum" in shown.stdout and "wd = weight_decay" in shown.stdout


def test_json_and_csv_give_every_trial_and_column(study_dir: tuple[Path, dict[str, Any]]) -> None:
    run_dir, result = study_dir
    as_json = runner.invoke(app, ["report", str(run_dir), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["trials"] == json.loads(json.dumps(result["trials"]))

    as_csv = runner.invoke(app, ["report", str(run_dir), "--csv"])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [int(r["trial"]) for r in rows] == [t["trial"] for t in result["trials"]]
    columns = set(rows[0])
    assert {f"params.{name}" for name in QUICKSTART} <= columns
    metrics = {"float_augrc", "device_augrc", "device_accuracy", "latency_ms", "augrc_gap"}
    assert metrics | {"state", "best", "reason", "mlflow_run_id"} <= columns
    for shown, row in zip(rows, result["trials"], strict=True):
        assert shown["state"] == row["state"]
        assert shown["best"] == str(row["trial"] == result["best"]["trial"])
        for name, value in row["params"].items():
            assert float(shown[f"params.{name}"]) == value  # every digit
        for key in metrics:
            assert shown[key] == ("" if row[key] is None else repr(row[key]))
        assert shown["reason"] == (row["reason"] or "")

    both = runner.invoke(app, ["report", str(run_dir), "--json", "--csv"])
    assert both.exit_code == 2 and "--json and --csv exclude each other" in both.stderr


def test_tune_offers_the_same_outputs() -> None:
    shown = runner.invoke(app, ["tune", "--help"], env={"COLUMNS": "200"})
    for option in ("--json", "--csv", "--wide"):
        assert option in shown.stdout
