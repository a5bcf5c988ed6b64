"""The ``edgetune`` command line: a thin boundary over the flows and tasks.

Heavy imports (torch, prefect, mlflow) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Hardware-in-the-loop hyperparameter tuning for edge vision models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: write the bundled example.", no_args_is_help=True)
app.add_typer(data_app, name="data")
device_app = typer.Typer(help="Boards: check what a device has.", no_args_is_help=True)
app.add_typer(device_app, name="device")

EXIT_BAD_INPUT = 2


def _quiet_services(verbose: bool) -> None:
    """Telemetry off; Prefect's console logs only on --verbose (progress is shown instead)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    if not verbose:
        import logging

        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
        for name in ("alembic", "optuna"):
            logging.getLogger(name).setLevel(logging.WARNING)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _user_errors() -> tuple[type[Exception], ...]:
    from tasks.compilers import CompilerUnavailableError
    from tasks.config import ConfigError
    from tasks.data import DataError
    from tasks.models import ModelError
    from tasks.secrets import SecretError
    from tasks.study import StudyError
    from tasks.tracking import TrackingError

    return (
        ConfigError,
        DataError,
        ModelError,
        CompilerUnavailableError,
        StudyError,
        TrackingError,
        SecretError,
    )


def _load(config: Path, overrides: list[str], storage: str | None, tracking_uri: str | None) -> Any:
    """The config with the URL flags applied.

    The flags go into the environment (read where each URL is used), not into the config,
    so a password given on the command line is never saved, logged or passed to a stage.
    """
    from tasks.config import STORAGE_ENV, TRACKING_ENV, load_config

    extra = list(overrides)
    if storage:
        os.environ[STORAGE_ENV] = storage
        extra.append("study.storage=null")
    if tracking_uri:
        os.environ[TRACKING_ENV] = tracking_uri
        extra.append("tracking.uri=null")
    return load_config(config, extra)


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


@app.command()
def tune(
    config: ConfigArg,
    overrides: Overrides = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the final summary as JSON")
    ] = False,
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
) -> None:
    """Run (or continue) a study: train, compile and evaluate each trial on the device.

    Running a study again continues it up to study.n_trials results, re-running trials
    that a crash left behind.
    """
    _quiet_services(verbose)
    if restart and reuse_best:
        raise _fail("--restart and --reuse-best exclude each other; choose one")
    from tasks.preflight import preflight

    try:
        cfg = _load(config, overrides or [], storage, tracking_uri)
        info = preflight(cfg)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    from edgetune.progress import Progress, render_summary

    typer.echo(
        f"study {cfg.study.name}: {cfg.study.n_trials} trials, {cfg.study.parallel} in parallel, "
        f"{len(info.classes)} classes, device {cfg.device.name} ({cfg.compile.backend}); "
        f"run dir {cfg.run_path}",
        err=True,
    )
    from flows.tune import tune as tune_flow

    progress = Progress(cfg, enabled=not (as_json or reuse_best) and sys.stderr.isatty())
    from flows.tune import BoardPaused
    from tasks.recovery import NothingToReuseError, StudyChangedError

    try:
        with progress:
            result = tune_flow(cfg.model_dump(mode="json"), restart=restart, reuse_best=reuse_best)
    except KeyboardInterrupt:
        raise _fail(
            "interrupted; trials in flight were told FAIL, re-run to continue", 130
        ) from None
    except (*_user_errors(), StudyChangedError, NothingToReuseError) as exc:
        raise _fail(str(exc)) from None
    except BoardPaused as exc:
        raise _fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        render_summary(result)
    if result["counts"]["COMPLETE"] == 0:
        raise _fail("no trial completed; see the reasons above", 1)


@app.command()
def report(
    study: Annotated[
        Path, typer.Argument(help="run directory or study config", show_default=False)
    ],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the table as JSON")] = False,
) -> None:
    """Print a study's results table from its storage."""
    _quiet_services(False)
    from edgetune.progress import render_summary
    from tasks.study import open_study
    from tasks.study import summary as study_summary

    source = study / "config.yaml" if study.is_dir() else study
    try:
        cfg = _load(source, [], storage, None)
        handle = open_study(cfg.storage_url, cfg.study, cfg.seed, create=False)
    except KeyError:
        raise _fail(
            f"no study named {cfg.study.name!r} in its storage; run edgetune tune first"
        ) from None
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    result = study_summary(handle)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        render_summary(result)


@app.command()
def validate(config: ConfigArg, overrides: Overrides = None) -> None:
    """Check a config, its dataset, toolchain, storage and tracking without creating anything."""
    from tasks.preflight import preflight

    try:
        cfg = _load(config, overrides or [], None, None)
        info = preflight(cfg)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"ok: {cfg.study.name}: classes {list(info.classes)}, images {info.counts()}")


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

    from tasks.wrappers import release_board

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
