"""The ``edgetune`` command line: a thin boundary over the flows and tasks.

Heavy imports (torch, prefect, mlflow) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from edgetune import prefect_server

app = typer.Typer(
    help="Hardware-in-the-loop hyperparameter tuning for edge vision models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Datasets: write the bundled example, preview the augmentation.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
device_app = typer.Typer(help="Boards: check what a device has.", no_args_is_help=True)
app.add_typer(device_app, name="device")
detect_app = typer.Typer(
    help="Detectors (YOLO): train and measure on the board, crop, auto-annotate.",
    no_args_is_help=True,
)
app.add_typer(detect_app, name="detect")
engine_app = typer.Typer(
    help="The project's resident engine: commands in this folder start warm.",
    no_args_is_help=True,
)
app.add_typer(engine_app, name="engine")

EXIT_BAD_INPUT = 2


def _quiet_services(verbose: bool) -> None:
    """Telemetry off; Prefect's console logs only on --verbose (progress is shown instead)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    # Prefect's own temporary server (PREFECT_HOME set, no API URL) gets as long to start
    # as the project's: 20 s, Prefect's default, is too short for a first migration on a
    # busy laptop.
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", f"{prefect_server.STARTUP_TIMEOUT_S:g}"
    )
    if os.environ.get(_PROJECT_STATE):
        Path(os.environ[_PROJECT_STATE]).mkdir(parents=True, exist_ok=True)
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
        for name in ("alembic", "optuna"):
            logging.getLogger(name).setLevel(logging.WARNING)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


#: Where the embedded Prefect server keeps its runs: in the folder edgetune runs in.
PROJECT_PREFECT_DB = Path(".prefect") / "prefect.db"
_PREFECT_PLACES = prefect_server.LOCATION_VARIABLES


def _project_prefect_state() -> None:
    """Without a Prefect server (``PREFECT_API_URL``), Prefect starts a temporary one on a
    database in ``~/.prefect``, shared by every study on the machine; edgetune gives it the
    project's own, ``.prefect/prefect.db`` in the current folder. Set by ``main`` before
    Prefect is imported; anything the user set about Prefect's location wins."""
    if any(os.environ.get(name) for name in _PREFECT_PLACES):
        return
    database = PROJECT_PREFECT_DB.resolve()
    os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{database}"
    os.environ[_PROJECT_STATE] = str(database.parent)


#: The folder ``main`` chose for the project's Prefect state: made by the commands that
#: may start Prefect (``_quiet_services``), not by ``--help`` or ``--version``.
_PROJECT_STATE = "EDGETUNE_PREFECT_STATE_DIR"


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _prefect_in_background() -> None:
    """For a command that runs flows: start the project's Prefect server now, while the
    command imports and reads its config (``edgetune.prefect_server``); ``_untraced``
    waits for it. Only where ``main`` chose the project's Prefect state."""
    state = os.environ.get(_PROJECT_STATE)
    if state and not os.environ.get("PREFECT_API_URL"):
        prefect_server.start(Path(state))


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors the user can fix: shown as one ``error:`` line, never as a traceback."""
    from tasks.compilers import CompilerUnavailableError
    from tasks.config import ConfigError
    from tasks.data import DataError
    from tasks.detection.dataset import DatasetError
    from tasks.detection.predict import PredictError
    from tasks.detection.ultra import DetectorError
    from tasks.hpo.recovery import NothingToReuseError, StudyChangedError
    from tasks.models import ModelError
    from tasks.secrets import SecretError
    from tasks.storage import StudyError
    from tasks.tracking import TrackingError

    return (
        ConfigError,
        DataError,
        ModelError,
        CompilerUnavailableError,
        StudyError,
        TrackingError,
        SecretError,
        prefect_server.ServerStartError,
        DatasetError,
        DetectorError,
        PredictError,
        StudyChangedError,
        NothingToReuseError,
    )


#: How Prefect logs a flow run stopped by Ctrl-C (``Crash detected! …``).
INTERRUPTED_CRASH = "Execution was aborted by an interrupt signal"


class _HideExpected(logging.Filter):
    """Drops a log record whose exception is an expected error (see ``_untraced``)."""

    def __init__(self, expected: tuple[type[Exception], ...]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.storage import disk_full

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.expected):
            return False
        if exc is not None and disk_full(exc) is not None:
            return False  # a full disk: the study stops with one line that says where
        # Ctrl-C: the command says "interrupted" itself
        return INTERRUPTED_CRASH not in record.getMessage()


@contextlib.contextmanager
def _untraced(verbose: bool, *also: type[Exception]) -> Iterator[None]:
    """Prefect logs a failed flow run's exception with its traceback on the console; the
    command prints an expected error (or one of ``also``) as one ``error:`` line instead.
    The record still reaches the Prefect API (the run's logs in the UI); --verbose shows it
    here too."""
    prefect_server.ready()
    prefect_server.supervise()
    hide = _HideExpected((*_user_errors(), *also))
    # MLflow logs a database error, with its traceback, on a handler of its own.
    places: list[logging.Filterer] = (
        [] if verbose else [*logging.getLogger().handlers, logging.getLogger(_MLFLOW_DB_LOGGER)]
    )
    for place in places:
        place.addFilter(hide)
    try:
        with _no_flow_heartbeats() if prefect_server.running() else contextlib.nullcontext():
            yield
    finally:
        for place in places:
            place.removeFilter(hide)


@contextlib.contextmanager
def _no_flow_heartbeats() -> Iterator[None]:
    """Flows on the command's own Prefect server send no heartbeats: nothing watches them
    (the server ends with the command), and after each flow Prefect's engine waits for its
    heartbeat thread to wake from its one-second sleep (half a second at the end of the
    command, on average)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


_MLFLOW_DB_LOGGER = "mlflow.store.db.utils"


def _load(config: Path, overrides: list[str], storage: str | None, tracking_uri: str | None) -> Any:
    """The config with the URL flags applied.

    The flags go into the environment (read where each URL is used), not into the config,
    so a password given on the command line is never saved, logged or passed to a stage.
    """
    from tasks.config import STORAGE_ENV, TRACKING_ENV
    from tasks.workloads.registry import load_study_config

    extra = list(overrides)
    if storage:
        os.environ[STORAGE_ENV] = storage
        extra.append("study.storage=null")
    if tracking_uri:
        os.environ[TRACKING_ENV] = tracking_uri
        extra.append("tracking.uri=null")
    with _warning_lines():
        return load_study_config(config, extra)


@contextlib.contextmanager
def _warning_lines() -> Iterator[None]:
    """A config's warnings (an override that replaced variants' settings) as one line each."""
    from tasks.config import OverrideWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OverrideWarning)
        yield
    for shown in caught:
        if issubclass(shown.category, OverrideWarning):
            typer.echo(f"warning: {shown.message}", err=True)
        else:
            warnings.warn_explicit(shown.message, shown.category, shown.filename, shown.lineno)


ConfigArg = Annotated[Path, typer.Argument(help="study config (YAML)", show_default=False)]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="overrides: section.key=value", show_default=False)
]
StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", help="Optuna storage URL (default: a file in the run dir)"),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: a file in the run dir)"),
]
WideOpt = Annotated[
    bool, typer.Option("--wide", help="every column of the tables (each parameter, the gaps)")
]
CsvOpt = Annotated[
    bool, typer.Option("--csv", help="print the results as CSV: one row per trial, every column")
]


@app.command()
def tune(
    config: ConfigArg,
    overrides: Overrides = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the final summary as JSON")
    ] = False,
    as_csv: CsvOpt = False,
    wide: WideOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="delete the stored study and start afresh")
    ] = False,
    reuse_best: Annotated[
        bool,
        typer.Option(
            "--reuse-best", help="skip the search: retrain, compile and evaluate the best trial"
        ),
    ] = False,
    time_budget: Annotated[
        str | None,
        typer.Option("--time-budget", help="ask no new trial after this long (6h, 90m, 1h30m)"),
    ] = None,
    hpo_time_ratio: Annotated[
        float | None,
        typer.Option("--hpo-time-ratio", help="ask no new trial after R times one full training"),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option("--patience", help="stop after K finished trials without a new best"),
    ] = None,
) -> None:
    """Run (or continue) a study: train, compile and evaluate each trial on the device.

    Running a study again continues it up to study.n_trials results, re-running trials
    that a crash left behind. The budgets stop asking new trials; trials in flight finish.
    """
    _quiet_services(verbose)
    _prefect_in_background()
    if restart and reuse_best:
        raise _fail("--restart and --reuse-best exclude each other; choose one")
    if as_json and as_csv:
        raise _fail("--json and --csv exclude each other; choose one")
    from tasks.hpo.recovery import check_resume
    from tasks.workloads.registry import objective_for, preflight

    budgets = {
        "study.time_budget": time_budget,
        "study.hpo_time_ratio": hpo_time_ratio,
        "study.patience": patience,
    }
    given = [f"{key}={json.dumps(value)}" for key, value in budgets.items() if value is not None]
    try:
        cfg = _load(config, [*(overrides or []), *given], storage, tracking_uri)
        info = preflight(cfg)
        check_resume(cfg, restart=restart, reuse_best=reuse_best)  # before the flow starts
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    from edgetune.progress import Progress
    from edgetune.tables import print_result
    from tasks.hpo.study import study_budget

    if cfg.variants:
        from tasks.config.variants import expand

        runs = ", ".join(
            f"{spec.name} ({f'{study_budget(v.study)} trials' if spec.search else 'once'})"
            for spec, v in expand(cfg)
        )
        what = f"variants {runs}"
    else:
        what = f"{study_budget(cfg.study)} trials"
    typer.echo(
        f"study {cfg.study.name}: {what}, {cfg.study.parallel} in parallel, "
        f"{len(info.classes)} classes, {objective_for(cfg).label}, device {cfg.device.name} "
        f"({cfg.compile.backend}); run dir {cfg.run_path}",
        err=True,
    )
    from flows.tune import tune as tune_flow

    # On a terminal a live view; in a log, a pipe or CI one line per event (on stderr).
    progress = Progress(cfg, enabled=not reuse_best, live=sys.stderr.isatty(), fresh=restart)
    from flows.tune import BoardPaused, SampleRejected
    from tasks.hpo.recovery import DiskFull
    from tasks.hpo.trial_stages import Interrupted  # a training stopped by Ctrl-C

    try:
        done = _dry_run_while_the_server_starts(cfg)
        with progress, _untraced(verbose, BoardPaused, SampleRejected, Interrupted, DiskFull):
            result = tune_flow(cfg, restart=restart, reuse_best=reuse_best, dry_run_done=done)
    except KeyboardInterrupt:
        raise _fail(
            "interrupted; trials in flight were told FAIL, re-run to continue", 130
        ) from None
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    except (BoardPaused, SampleRejected, DiskFull) as exc:
        raise _fail(str(exc), 1) from None
    print_result(result, as_json=as_json, as_csv=as_csv, wide=wide)
    if result["counts"]["COMPLETE"] == 0:
        raise _fail("no trial completed; see the reasons above", 1)


def _dry_run_while_the_server_starts(cfg: Any) -> list[dict[str, Any]] | None:
    """The study's dry run, before its flow, while the command's own Prefect server is
    still starting (the flow would run it after the wait for the server); what it did, for
    the flow to log. None with a Prefect server of the user's: no wait to fill, the flow
    runs it (as when a deployment runs the flow)."""
    if not prefect_server.running():
        return None
    from tasks.hpo.campaign import run_dry_run

    done = run_dry_run(cfg)
    return None if done is None else [dataclasses.asdict(each) for each in done]


@app.command()
def report(
    study: Annotated[
        Path, typer.Argument(help="run directory or study config", show_default=False)
    ],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the table as JSON")] = False,
    as_csv: CsvOpt = False,
    wide: WideOpt = False,
) -> None:
    """Print a study's results table from its storage (compact: --wide for every column)."""
    _quiet_services(False)
    if as_json and as_csv:
        raise _fail("--json and --csv exclude each other; choose one")
    from edgetune.tables import print_result
    from tasks.hpo.study import open_study
    from tasks.hpo.study import summary as study_summary

    source = study / "config.yaml" if study.is_dir() else study
    try:
        cfg = _load(source, [], storage, None)
        if cfg.variants:
            from tasks.hpo.variants import compare

            result = compare(cfg)
            if all(row["counts"] is None for row in result["variants"]):
                raise KeyError(cfg.study.name)
            result["champion"] = _variants_champion(result)
        else:
            result = study_summary(open_study(cfg.storage_url, cfg.study, cfg.seed, create=False))
    except KeyError:
        raise _fail(
            f"no study named {cfg.study.name!r}{' (nor any of its variants)' if cfg.variants else ''}"
            f" in its storage; run edgetune tune first"
        ) from None
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    print_result(result, as_json=as_json, as_csv=as_csv, wide=wide)


@app.command()
def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, a checkpoint file "
            "(.pt, with --config; float only), or a study config or run directory (its @final "
            "if study.retrain made one, else its @champion)",
            show_default=False,
        ),
    ],
    split: Annotated[
        str, typer.Option("--split", help="the split to measure: test (the final report) or val")
    ] = "test",
    on_device: Annotated[
        bool,
        typer.Option(
            "--on-device/--float-only",
            help="measure the compiled model on the board beside the float one",
        ),
    ] = True,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="study config for the data, board and tracking (default: the model's own)",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="the report's folder (default: the study's evaluation/ folder, else reports/)",
        ),
    ] = None,
    target_risk: Annotated[
        float,
        typer.Option("--target-risk", help="selective risk the deployment threshold is read at"),
    ] = 0.01,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Measure a classifier on a split, on the board and in float (test_* names), and write
    its report: per-class figures, confusion matrices, curves and galleries of failures."""
    _quiet_services(False)
    from tasks.devices import DeviceError
    from tasks.report import ReportError
    from tasks.workloads.evaluation import EvaluationError

    if split not in ("val", "test"):
        raise _fail(f"--split {split}: choose test (the final report) or val")
    if not 0.0 <= target_risk <= 1.0:
        raise _fail(f"--target-risk {target_risk}: give a fraction between 0 and 1, e.g. 0.01")
    try:
        record = _evaluate(model, split, on_device, config, out, target_risk, tracking_uri)
    except DeviceError as exc:
        raise _fail(f"the board failed: {exc}", 1) from None
    except (EvaluationError, ReportError, *_user_errors()) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    _print_evaluation(record)


def _evaluate(
    model: str,
    split: str,
    on_device: bool,
    config: Path | None,
    out: Path | None,
    target_risk: float,
    tracking_uri: str | None,
) -> dict[str, Any]:
    """``evaluate``'s measurement: the model named on the command line, found and measured."""
    from tasks.config import TRACKING_ENV
    from tasks.tracking import Tracker
    from tasks.workloads.evaluation import (
        champion_of,
        default_report_dir,
        evaluate_checkpoint,
        evaluate_version,
        parse_model_uri,
        resolve_target,
    )

    source, cfg = Path(model), None
    if source.suffix in (".pt", ".pth"):
        if config is None:
            raise _fail(
                f"{model}: a checkpoint file needs the config it was trained with (--config)"
            )
        if on_device:
            raise _fail(
                f"{model}: a checkpoint file is measured in float only; add --float-only, or "
                f"give its run (runs:/RUN_ID) or registered model to measure it on the board"
            )
        cfg = _load(config, [], None, None)
        target_out = out or Path("reports") / f"{source.stem}-{split}"
        return evaluate_checkpoint(cfg, source, split, target_out, target_risk)
    if source.exists():
        cfg = _load(source / "config.yaml" if source.is_dir() else source, [], None, None)
        model = champion_of(cfg)
    else:
        parse_model_uri(model)
        if config is not None:
            cfg = _load(config, [], None, None)
    uri = tracking_uri or os.environ.get(TRACKING_ENV) or (cfg.tracking_uri if cfg else None)
    if uri is None:
        raise _fail(f"{model}: no tracking URI; give --tracking-uri URI or --config CONFIG")
    store = Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("sqlite:///") and not store.is_file():  # opening it would create it
        raise _fail(
            f"{model}: no MLflow tracking store {store}; run 'edgetune tune' first, or give "
            f"--tracking-uri URI"
        )
    tracker = Tracker(uri)
    target = resolve_target(tracker, model)
    folder = out or default_report_dir(cfg, target, split)
    return evaluate_version(
        tracker, target, split, cfg, on_device=on_device, out=folder, target_risk=target_risk
    )


def _print_evaluation(record: dict[str, Any]) -> None:
    m, split = record["metrics"], record["split"]
    p = f"{split}_"
    who = (
        f"{record['model']} (version {record['version']})"
        if record["version"]
        else (record["model"] or f"run {record['run_id']}")
    )
    where = f", board {record['device']}" if record["device"] else ", float only"
    typer.echo(f"{who} on {split} ({m[p + 'images']:.0f} images){where}:")
    if record["device"]:
        typer.echo(
            f"  {split} device AUGRC {m[p + 'device_augrc']:.5f} "
            f"[{m[p + 'device_augrc_ci_low']:.5f}, {m[p + 'device_augrc_ci_high']:.5f}]  "
            f"float {m[p + 'float_augrc']:.5f}  gap {m[p + 'augrc_gap']:+.5f}"
        )
        typer.echo(
            f"  {split} device accuracy {m[p + 'device_accuracy']:.4f}  "
            f"float {m[p + 'float_accuracy']:.4f}  gap {m[p + 'accuracy_gap']:+.4f}  "
            f"latency {m['device_latency_ms']:.3f} ms"
        )
        changed = record["changed"] or {}
        typer.echo(
            f"  predictions changed on the board: {changed.get('total', 0)} "
            f"({changed.get('device_wrong', 0)} now wrong, {changed.get('device_right', 0)} "
            f"now right, {changed.get('both_wrong', 0)} wrong both ways)"
        )
    else:
        typer.echo(
            f"  {split} float AUGRC {m[p + 'float_augrc']:.5f} "
            f"[{m[p + 'float_augrc_ci_low']:.5f}, {m[p + 'float_augrc_ci_high']:.5f}]  "
            f"accuracy {m[p + 'float_accuracy']:.4f}"
        )
    typer.echo(f"  report: {record['report']}")


def _variants_champion(result: dict[str, Any]) -> dict[str, Any] | None:
    """The winning variant's registration, as the run that compared them crowned it."""
    winner = next((row for row in result["variants"] if row["winner"]), None)
    registered = (winner or {}).get("champion") or {}
    if winner is None or registered.get("trial") is None:
        return None
    from tasks.tracking import CHAMPION

    return {**registered, "alias": CHAMPION, "variant": winner["variant"]}


@app.command()
def dashboard(
    study: Annotated[
        Path, typer.Argument(help="run directory or study config", show_default=False)
    ],
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8080,
) -> None:
    """Serve optuna-dashboard on a study's Optuna storage until Ctrl-C."""
    _quiet_services(False)
    from tasks.hpo.reports import dashboard_server
    from tasks.hpo.study import open_study
    from tasks.storage import open_storage
    from tasks.tracking import mask_uri, one_line

    if not study.exists():
        raise _fail(f"{study} not found; pass a study's run directory or its config")
    source = study / "config.yaml" if study.is_dir() else study
    if not source.is_file():
        raise _fail(f"{study} has no config.yaml; pass a run directory made by edgetune tune")
    try:
        cfg = _load(source, [], storage, None)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    url = cfg.storage_url
    missing = (
        f"no study named {cfg.study.name!r} in {mask_uri(url)}; run 'edgetune tune {source}' "
        f"first, or pass the study's storage with --storage URL"
    )
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise _fail(missing)  # opening it would create an empty database
    if cfg.variants:  # the dashboard lists every study of the storage: the variants'
        from tasks.config.variants import expand

        cfg = expand(cfg)[0][1]
    try:
        open_study(url, cfg.study, cfg.seed, create=False)  # KeyError: no such study
        server = dashboard_server(open_storage(url), host, port)
    except KeyError:
        raise _fail(missing) from None
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(
            f"cannot listen on {host}:{port}: {one_line(exc)}; choose another --port"
        ) from None
    typer.echo(
        f"optuna-dashboard for study {cfg.study.name} ({mask_uri(url)}) on "
        f"http://{host}:{port}/dashboard; Ctrl-C stops it",
        err=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
def validate(
    config: ConfigArg,
    overrides: Overrides = None,
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="also the dry run: an untrained model exported, compiled with the study's "
            "settings and run once on the board (seconds; nothing trained or created)",
        ),
    ] = False,
) -> None:
    """Check a config, its dataset, toolchain, storage and tracking without creating anything."""
    from tasks.board import BoardBusyError
    from tasks.devices import DeviceUnreachableError
    from tasks.workloads.registry import dry_run, preflight

    try:
        cfg = _load(config, overrides or [], None, None)
        info = preflight(cfg)
        done = dry_run(cfg) if deep else []
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    except (DeviceUnreachableError, BoardBusyError) as exc:  # a fault of the board, not input
        raise _fail(f"device {cfg.device.name}: {exc}", 1) from None
    runs = "".join(f"; dry run: {each.summary()}" for each in done)
    typer.echo(f"ok: {cfg.study.name}: classes {list(info.classes)}, images {info.counts}{runs}")


@app.command("deploy")
def deploy_command(
    file: Annotated[Path | None, typer.Option("--file", help="deployments file")] = None,
    configs: Annotated[
        list[Path] | None, typer.Option("--config", help="study config whose board to register")
    ] = None,
    devices: Annotated[list[str] | None, typer.Option("--device", help="board name")] = None,
) -> None:
    """Create or update the work pools, the per-board limits and the deployments."""
    _quiet_services(False)
    from tasks.config import load_config
    from tasks.deploy import DEFAULT_FILE, DeployError, deploy

    try:
        names = [load_config(c).device.name for c in configs or []] + list(devices or [])
        report = deploy(file or DEFAULT_FILE, devices=names or ["local-cpu"])
    except (DeployError, *_user_errors()) as exc:
        raise _fail(str(exc)) from None
    for pool, limit in report.pools.items():
        typer.echo(f"work pool {pool}: concurrency limit {limit if limit else 'none'}")
    for name in report.device_limits:
        typer.echo(f"concurrency limit {name}: 1 (strict, leased)")
    for name in report.deployments:
        typer.echo(f"deployment {name}")


@app.command("worker")
def worker_command(
    pool: Annotated[str, typer.Option("--pool", help="work pool: gpu, compile or edge")],
    name: Annotated[
        str | None, typer.Option("--name", help="worker name (unique per pool)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="runs at a time (slots)")] = 1,
    poll: Annotated[
        float, typer.Option("--poll", min=0.05, help="seconds between looks for new runs")
    ] = 1.0,
    preload: Annotated[
        list[str] | None, typer.Option("--preload", help="one more module to import once")
    ] = None,
    stages: Annotated[
        list[str] | None,
        typer.Option(
            "--stage",
            help="one more flow (MODULE:FLOW) to run without the flow engine; it must "
            "leave its outcome where its caller reads it",
        ),
    ] = None,
) -> None:
    """Serve a stage pool: every stage run forked from a process that imported edgetune once.

    A Prefect process worker to the API and the UI; other flows run as a process worker
    runs them. Stops on SIGINT or SIGTERM, with the stages it runs."""
    _quiet_services(True)
    if not os.environ.get("PREFECT_API_URL"):
        raise _fail(
            "PREFECT_API_URL is not set: a worker serves a Prefect server's pool; "
            "export PREFECT_API_URL (infra/services.sh env prints it)"
        )
    from edgetune.worker import WorkerSetupError, check_pool, serve

    try:
        check_pool(pool)
    except WorkerSetupError as exc:
        raise _fail(str(exc)) from None
    serve(pool, name, limit, poll, tuple(preload or ()), tuple(stages or ()))


@engine_app.command("start")
def engine_start(
    idle: Annotated[
        float, typer.Option("--idle", help="minutes without a command before it stops")
    ] = 30.0,
) -> None:
    """Start the project's engine: a background process that keeps the imports and the
    project's Prefect server warm, so the commands run in this folder start at once."""
    from edgetune import engine

    if not idle > 0:
        raise _fail(f"--idle must be a positive number of minutes, not {idle:g}")
    project = Path.cwd()
    status = engine.control(project, "status")
    if status is not None and not status["stopping"]:
        typer.echo(f"the engine runs already (pid {status['pid']}); edgetune engine status")
        return
    if status is not None and not engine.wait_stopped(project, 30):
        raise _fail(f"the engine (pid {status['pid']}) is still stopping; try again", 1)
    clock = time.monotonic()
    try:
        status = engine.start(project, idle, dict(_GIVEN_ENVIRONMENT or os.environ))
    except engine.EngineError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(
        f"the engine is ready (pid {status['pid']}, {time.monotonic() - clock:.1f} s): "
        f"commands in this folder start warm; it stops after {idle:g} min without one "
        "(edgetune engine stop)"
    )


@engine_app.command("stop")
def engine_stop() -> None:
    """Stop the project's engine (after the commands it runs)."""
    from edgetune import engine

    status = engine.control(Path.cwd(), "stop")
    if status is None:
        typer.echo("no engine runs in this folder")
        return
    if status["running"]:
        typer.echo(f"the engine (pid {status['pid']}) stops after its {status['running']} commands")
    elif engine.wait_stopped(Path.cwd(), 30):
        typer.echo(f"the engine (pid {status['pid']}) stopped")
    else:
        raise _fail(f"the engine (pid {status['pid']}) did not stop in 30 s", 1)


@engine_app.command("status")
def engine_status() -> None:
    """Whether the project's engine runs; exit code 1 when none does."""
    from edgetune import engine

    status = engine.control(Path.cwd(), "status")
    if status is None:
        typer.echo("no engine runs in this folder (edgetune engine start)")
        raise typer.Exit(1)
    up = (time.time() - status["since"]) / 60
    typer.echo(
        f"engine pid {status['pid']}: up {up:.1f} min, {status['served']} commands served, "
        f"{status['running']} running; stops after {status['idle_minutes']:g} min idle; "
        f"Prefect server {status['prefect']}"
        + (f"; stopping: {status['stopping']}" if status["stopping"] else "")
    )


@device_app.command("check")
def device_check(config: ConfigArg, overrides: Overrides = None) -> None:
    """Run the device-side evaluator's `info` on the config's board and print it."""
    from tasks.devices import DeviceConfigError, DeviceError, create_runner

    try:
        cfg = _load(config, overrides or [], None, None)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    try:
        runner = create_runner(cfg.device.runner, **cfg.device.runner_options())
        info = runner.info()
    except DeviceConfigError as exc:  # host key, client key, key files: fix the settings
        raise _fail(f"device {cfg.device.name}: {exc}") from None
    except DeviceError as exc:  # the board is down or its evaluator fails
        raise _fail(f"device {cfg.device.name}: {exc}", 1) from None
    except ValueError as exc:  # the runner's options (device.ssh.work_dir, ...)
        raise _fail(f"device {cfg.device.name}: {exc}") from None
    typer.echo(json.dumps({"device": cfg.device.name, **info}, indent=2, default=str))


@device_app.command("release")
def device_release(config: ConfigArg, overrides: Overrides = None) -> None:
    """Free the board's slot left taken by a killed run (only when no study uses the board)."""
    _quiet_services(False)
    from prefect.exceptions import ObjectNotFound

    from tasks.board import release_board

    try:
        cfg = _load(config, overrides or [], None, None)
        taken = release_board(cfg.device.concurrency_limit)
    except ObjectNotFound:
        raise _fail(
            f"no concurrency limit {cfg.device.concurrency_limit}; nothing to release"
        ) from None
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"board {cfg.device.name}: released {taken} slot(s) of {cfg.device.concurrency_limit}"
    )


@data_app.command("digits")
def data_digits(
    directory: Annotated[
        Path, typer.Argument(help="where to write the dataset", show_default=False)
    ],
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    val_fraction: Annotated[float, typer.Option(help="share of images for val/")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="share of images for test/")] = 0.2,
) -> None:
    """Write scikit-learn's digits as an image-folder dataset (train/, val/, test/)."""
    from tasks.data import DataError, write_digits

    try:
        info = write_digits(
            directory, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    except DataError as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"digits dataset in {directory}: {info.counts()} images, {len(info.classes)} classes"
    )


@data_app.command("relabel")
def data_relabel(
    src: Annotated[Path, typer.Argument(help="the dataset the doubts were found on")],
    dst: Annotated[Path, typer.Argument(help="a new folder for the corrected dataset")],
    fixes: Annotated[
        Path,
        typer.Option(
            "--fixes",
            help="the reviewed doubts.csv (a 'corrected' column: a class or drop) or a CVAT "
            "for images 1.1 XML export of the review",
        ),
    ],
    accept_suggested: Annotated[
        bool,
        typer.Option(
            "--accept-suggested", help="flagged rows without a correction take the suggestion"
        ),
    ] = False,
) -> None:
    """Write a corrected copy of a dataset: reviewed label fixes applied, nothing else
    changed (the source stays as it is)."""
    from tasks.data import DataError, inspect_dataset
    from tasks.relabel import read_fixes, relabel

    try:
        info = inspect_dataset(src, verify_images=False)
        done = relabel(src, dst, read_fixes(fixes, info.classes, accept_suggested))
    except DataError as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{done.out}: {done.images} images, {len(done.moved)} moved to another class, "
        f"{len(done.dropped)} dropped (relabel.json lists them)"
    )


@data_app.command("preview")
def data_preview(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="the contact sheet (PNG)")] = Path(
        "augmented.png"
    ),
    images: Annotated[int, typer.Option(help="augmented training images on the sheet")] = 32,
    seed: Annotated[int, typer.Option(help="the trial seed whose draws are shown")] = 0,
    overrides: Overrides = None,
) -> None:
    """Write a contact sheet of augmented training images: what the model sees."""
    from tasks.config import ConfigError, EdgetuneConfig
    from tasks.training.preview import write_preview

    try:
        cfg = _load(config, overrides or [], None, None)
        if not isinstance(cfg, EdgetuneConfig):
            raise ConfigError(
                f"{config} is a detector config: Ultralytics draws its own augmentation; "
                f"give a classifier config"
            )
        preview = write_preview(cfg, out, images, seed)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    shown = ", ".join(f"{k}={v}" for k, v in cfg.data.augment.model_dump().items())
    typer.echo(
        f"{preview.path}: {preview.images} training images at {cfg.data.image_size} px as a "
        f"trial with seed {seed} draws them ({preview.loader}; {shown}), "
        f"{preview.columns} per row, {preview.tile} px tiles"
    )


@data_app.command("doubts")
def data_doubts(
    config: ConfigArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="the folder to write (new or empty)")
    ] = Path("doubts"),
    folds: Annotated[int, typer.Option(help="stratified folds, each predicted by the rest")] = 5,
    epochs: Annotated[
        int | None, typer.Option(help="epochs of each fold's training (default: train.epochs)")
    ] = None,
    top: Annotated[int, typer.Option(help="most doubtful images on the contact sheet")] = 40,
    seed: Annotated[
        int | None, typer.Option(help="folds' and trainings' seed (default: the config's)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --out")] = False,
    overrides: Overrides = None,
) -> None:
    """Rank the training images by how much the data doubts their labels (cleanlab on
    out-of-fold probabilities of models trained as trials train); flagged ones for CVAT."""
    from tasks.config import ConfigError, EdgetuneConfig
    from tasks.failures import TrainingDiverged
    from tasks.training.doubts import check_output, check_settings, find_doubts, write_doubts

    try:
        check_settings(folds, epochs, top)
        cfg = _load(config, overrides or [], None, None)
        if not isinstance(cfg, EdgetuneConfig):
            raise ConfigError(
                f"{config} is a detector config: label doubts are found for a classifier's "
                f"image folders; give a classifier config"
            )
        check_output(out, force)
        seed = cfg.seed if seed is None else seed
        doubts = find_doubts(cfg, folds, epochs, seed)
        written = write_doubts(doubts, out, top, force=force)
    except (*_user_errors(), TrainingDiverged) as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{written.path}: {written.flagged} of {written.images} training images flagged "
        f"({folds} folds, {doubts.settings.epochs} epochs each, seed {seed}); {written.path}/"
        f"doubts.csv ranks them all, doubts.png shows the first {written.shown}, "
        f"annotations.xml and images/ hold the flagged for review in CVAT"
    )


def _split_embedding(
    checkpoint: Path | None,
    config: Path | None,
    model: str | None,
    tracking_uri: str | None,
    work: Path,
) -> Any:
    """What ``data split`` embeds images with: pixels; a local checkpoint, with the config
    it was trained with; or a registered version's checkpoint and its study's config
    (downloaded into ``work``)."""
    from tasks.config import TRACKING_ENV, ConfigError, EdgetuneConfig
    from tasks.data import DataError
    from tasks.data_split import Embedding

    if model is not None:
        from tasks.tracking import Tracker
        from tasks.workloads.classifier import CHECKPOINT
        from tasks.workloads.evaluation import resolve_target, study_config

        uri = tracking_uri or os.environ.get(TRACKING_ENV)
        if not uri:
            raise ConfigError(f"--model {model}: no tracking URI; give --tracking-uri URI")
        tracker = Tracker(uri)
        target = resolve_target(tracker, model)
        own = study_config(tracker, target.run_id, work)
        try:
            local = tracker.download(target.run_id, CHECKPOINT, work / "model")
        except Exception as exc:  # MLflow raises its own for a missing artifact
            raise DataError(
                f"--model {model}: run {target.run_id} has no {CHECKPOINT} "
                f"({type(exc).__name__}); give a classifier version registered by a study"
            ) from None
        source = f"{model} (run {target.run_id})"
        return Embedding(local, own.model.arch, own.data.image_size, source=source)
    if checkpoint is None or config is None:
        return Embedding()
    cfg = _load(config, [], None, None)
    if not isinstance(cfg, EdgetuneConfig):
        raise ConfigError(
            f"{config} is a detector config; give the classifier config the --checkpoint "
            f"was trained with"
        )
    return Embedding(checkpoint, cfg.model.arch, cfg.data.image_size)


@data_app.command("split")
def data_split(
    src: Annotated[
        Path,
        typer.Argument(
            help="the dataset: train/ val/ (test/), or class folders", show_default=False
        ),
    ],
    dst: Annotated[
        Path | None, typer.Argument(help="the folder to write (new or empty)", show_default=False)
    ] = None,
    by: Annotated[
        str, typer.Option("--by", help="random, or features: near-duplicates in one split")
    ] = "random",
    val: Annotated[float, typer.Option("--val", help="share of each class for val/")] = 0.15,
    test: Annotated[float, typer.Option("--test", help="share of each class for test/")] = 0.15,
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="embed images by this state dict's penultimate layer")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="the study config the --checkpoint was trained with")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="embed by a registered version: models:/NAME@ALIAS")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="--model's MLflow store (or $MLFLOW_TRACKING_URI)"),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="cosine similarity from which images are near-duplicates")
    ] = 0.97,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="only print SRC's cross-split near-duplicates")
    ] = False,
) -> None:
    """Split a dataset anew, stratified by class: at random, or by image features so that
    near-duplicates never straddle train/val/test; reports those across splits."""
    import tempfile

    import tasks.data_split as splitting
    from tasks.workloads.evaluation import EvaluationError

    try:
        splitting.check_settings(by, val, test, threshold)
        splitting.check_paths(dst, report_only, checkpoint, config, model)
        if dst is not None:
            splitting.check_target(dst, src)
        with tempfile.TemporaryDirectory(prefix="edgetune-split-") as work:
            embedding = _split_embedding(checkpoint, config, model, tracking_uri, Path(work))
            pool = splitting.read_pool(src)
            if dst is None:
                lines = splitting.source_report(pool, embedding, threshold)
            else:
                plan = splitting.plan_split(pool, by, (val, test), seed, embedding, threshold)
                splitting.write_split(plan, dst)
                report = splitting.report_lines(pool, plan.pairs, threshold, embedding, plan)
                lines = [splitting.summary_line(plan, dst), *report]
    except (*_user_errors(), EvaluationError) as exc:
        raise _fail(str(exc)) from None
    typer.echo("\n".join(lines))


@data_app.command("shapes")
def data_shapes(
    directory: Annotated[
        Path, typer.Argument(help="where to write the dataset", show_default=False)
    ],
    train: Annotated[int, typer.Option(help="train images")] = 48,
    val: Annotated[int, typer.Option(help="val images")] = 16,
    single_class: Annotated[
        bool, typer.Option("--single-class", help="one class, insulator")
    ] = False,
    seed: Annotated[int, typer.Option(help="drawing seed")] = 0,
) -> None:
    """Write a small synthetic YOLO dataset of insulator-like shapes (data.yaml + images)."""
    from tasks.detection.synthetic import write_shapes_dataset

    try:
        data_yaml = write_shapes_dataset(
            directory, train=train, val=val, single_class=single_class, seed=seed
        )
    except (FileExistsError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"shapes dataset in {directory}: {train} train, {val} val images; {data_yaml}")


@detect_app.command("train")
def detect_train_command(
    config: Annotated[Path, typer.Argument(help="detector config (YAML)", show_default=False)],
    overrides: Overrides = None,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")] = False,
) -> None:
    """Train a detector, export, compile, measure mAP on the board; register the best."""
    _quiet_services(verbose)
    _prefect_in_background()
    from tasks.board import BoardBusyError
    from tasks.config import TRACKING_ENV
    from tasks.detection.config import load_detector_config
    from tasks.devices import DeviceError

    extra = list(overrides or [])
    if tracking_uri:
        os.environ[TRACKING_ENV] = tracking_uri
        extra.append("tracking.uri=null")
    from tasks.detection.pipeline import check_detector
    from tasks.devices import DeviceConfigError

    try:
        with _warning_lines():
            cfg = load_detector_config(config, extra)
        check_detector(cfg)
    except (*_user_errors(), DeviceConfigError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"detector {cfg.name}: {cfg.model.arch}, imgsz {cfg.train.imgsz}, "
        f"{cfg.train.epochs} epochs; device {cfg.device.name} ({cfg.compile.backend}); "
        f"run dir {cfg.run_path}",
        err=True,
    )
    from edgetune.progress import epoch_lines
    from flows.detect import detect_train
    from tasks.detection.ultra import EPOCH_LOG

    try:  # one line per training epoch on stderr; Ultralytics' own output stays off
        with _untraced(verbose, DeviceError, BoardBusyError), epoch_lines(EPOCH_LOG.name):
            outcome = detect_train(cfg.model_dump(mode="json"))
    except KeyboardInterrupt:
        raise _fail("interrupted; the MLflow run was ended KILLED", 130) from None
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    except (DeviceError, BoardBusyError) as exc:
        raise _fail(f"device {cfg.device.name}: {exc}", 1) from None
    if as_json:
        typer.echo(json.dumps(outcome, indent=2, default=float))
        return
    metrics = outcome["metrics"]
    typer.echo(
        "{}: mAP50-95 val {:.4f} | float ONNX {:.4f} | device {:.4f} ({:+.4f} vs float), "
        "{:.2f} ms/batch on {}".format(
            cfg.name,
            metrics.get("val_map50_95", float("nan")),
            metrics["float_map50_95"],
            metrics["device_map50_95"],
            -metrics["map50_95_gap"],
            metrics["device_latency_ms"],
            cfg.device.name,
        )
    )
    champion = outcome["champion"]
    if champion:
        typer.echo(
            f"champion: {champion['model']} version {champion['version']} (@champion), "
            f"run {champion['run_id']}"
        )


def _detector_tracking(tracking_uri: str | None) -> str:
    from tasks.config import TRACKING_ENV

    if tracking_uri:
        return tracking_uri
    if os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    return f"sqlite:///{(Path('runs') / 'detectors' / 'mlflow.db').resolve()}"


ModelArg = Annotated[
    str,
    typer.Argument(
        help="detector: an .onnx file, or a registered name (s-ml, s-ml@champion, s-ml/3)",
        show_default=False,
    ),
]
ImagesArg = Annotated[Path, typer.Argument(help="folder of images", show_default=False)]
OutArg = Annotated[Path, typer.Argument(help="output folder (new)", show_default=False)]
ConfOpt = Annotated[float, typer.Option("--conf", help="minimum box score")]
DetectTrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri", help="MLflow with the registered detectors (default: runs/detectors)"
    ),
]
IouOpt = Annotated[
    float, typer.Option(help="NMS: drop a box overlapping a better one by more than this")
]
AgnosticOpt = Annotated[
    bool, typer.Option(help="NMS across classes: one box per object, whatever its class")
]


@detect_app.command("crops")
def detect_crops(
    model: ModelArg,
    images: ImagesArg,
    out: OutArg,
    labeller: Annotated[
        str | None,
        typer.Option("--label-with", help="detector whose classes label the crops (l-ml)"),
    ] = None,
    conf: ConfOpt = 0.25,
    iou: IouOpt = 0.7,
    agnostic: AgnosticOpt = True,
    margin: Annotated[float, typer.Option(help="box share added on each side")] = 0.1,
    min_size: Annotated[int, typer.Option(help="smallest crop side in pixels")] = 16,
    val_fraction: Annotated[float, typer.Option(help="share of images for val/")] = 0.2,
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    tracking_uri: DetectTrackingOpt = None,
) -> None:
    """Crop the detector's boxes into an image-folder dataset for the classifier study."""
    _quiet_services(False)
    import tempfile

    from tasks.detection.predict import (
        CropSettings,
        OnnxDetector,
        describe_model,
        resolve_model,
        write_crops,
    )

    uri = _detector_tracking(tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="edgetune-crops-") as tmp:

            def load(ref: str, folder: str) -> OnnxDetector:
                path = resolve_model(ref, uri, Path(tmp) / folder)
                return OnnxDetector(
                    path, conf=conf, iou=iou, agnostic=agnostic, source=describe_model(ref)
                )

            detector = load(model, "model")
            labels = load(labeller, "labeller") if labeller else None
            settings = CropSettings(
                margin=margin, min_size=min_size, val_fraction=val_fraction, seed=seed
            )
            summary = write_crops(detector, images, out, settings, labels)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{summary['crops']} crops from {summary['images']} images in {out}: "
        + ", ".join(f"{k} {v}" for k, v in summary["folders"].items())
    )
    if summary["warning"]:
        typer.echo(f"warning: {summary['warning']}", err=True)


@detect_app.command("annotate")
def detect_annotate(
    model: ModelArg,
    images: ImagesArg,
    out: OutArg,
    conf: ConfOpt = 0.25,
    iou: IouOpt = 0.7,
    agnostic: AgnosticOpt = True,
    tracking_uri: DetectTrackingOpt = None,
) -> None:
    """Write YOLO label files and a CVAT-for-images XML of the detector's boxes."""
    _quiet_services(False)
    import tempfile

    from tasks.detection.predict import (
        OnnxDetector,
        annotate_images,
        describe_model,
        resolve_model,
    )

    uri = _detector_tracking(tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="edgetune-annotate-") as tmp:
            path = resolve_model(model, uri, Path(tmp))
            detector = OnnxDetector(
                path, conf=conf, iou=iou, agnostic=agnostic, source=describe_model(model)
            )
            summary = annotate_images(detector, images, out)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{summary['boxes']} boxes on {summary['images']} images in {out}: labels/, "
        f"annotations.xml (CVAT for images 1.1), classes.txt"
    )


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"edgetune {version('edgetune')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Hardware-in-the-loop hyperparameter tuning for edge vision models."""


def _usage_line(exc: typer.TyperException) -> str:
    """A usage error (a missing argument, a bad option value) as one line and where to
    look, instead of the usage box."""
    context, words = getattr(exc, "ctx", None), list[str]()
    while context is not None and context.parent is not None:  # up to the program's name
        words.insert(0, context.info_name)
        context = context.parent
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    return f"{message} (see 'edgetune {' '.join([*words, '--help'])}')"


def main() -> None:
    """The ``edgetune`` command: in the project's engine where one runs
    (``edgetune.engine``), else here."""
    from edgetune import engine

    code = engine.run_in_engine(sys.argv)
    if code is not None:
        if code:
            raise SystemExit(code)
        return
    run_here()


#: The environment the command was given, before ``main`` chose the Prefect state.
_GIVEN_ENVIRONMENT: dict[str, str] = {}


def run_here() -> None:
    """The command in this process (in-process callers of ``app`` keep their own Prefect)."""
    _GIVEN_ENVIRONMENT.update(os.environ)
    _project_prefect_state()
    code = _run_app()  # the project's Prefect server stops at exit, after Prefect's last logs
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _run_app() -> Any:
    """The command, with what it raised as one line and its exit code."""
    try:
        return app(standalone_mode=False)
    except _user_errors() as exc:  # one a command missed: still one line, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except (KeyboardInterrupt, EOFError, typer.Abort):
        typer.echo("error: interrupted", err=True)
        raise SystemExit(130) from None
    except typer.TyperException as exc:  # click's errors, as vendored by typer
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group alone: its help
            exc.show()  # type: ignore[attr-defined]
        else:
            typer.echo(f"error: {_usage_line(exc)}", err=True)
        raise SystemExit(getattr(exc, "exit_code", EXIT_BAD_INPUT)) from None


if __name__ == "__main__":
    main()
