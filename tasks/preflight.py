"""Checks that run before a study is created, so bad input creates nothing.

Local checks come first (dataset, search space, weights, toolchain, the board's key
files), then the two services a study writes to: the Optuna storage and MLflow tracking
are connected to once, with short time limits, so an unreachable one fails here in one
line instead of after the run folder exists. Every message names the setting to fix;
URLs are shown with their password masked.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tasks.compilers import COMPILERS
from tasks.config import (
    AUTO,
    STORAGE_ENV,
    TRACKING_ENV,
    ConfigError,
    EdgetuneConfig,
    OrchestrationConfig,
    at_space_file,
    space_refusal,
    trial_train_config,
)
from tasks.config.schema import class_weights_refusal
from tasks.data import DataError, DatasetInfo, inspect_dataset, split_items
from tasks.devices import DeviceConfigError, create_runner
from tasks.storage import StudyError, is_journal, journal_database
from tasks.tracking import TrackingError, mask_uri, one_line
from tasks.training.gpus import capacity_error, visible_gpus


class _Orchestrated(Protocol):
    """A classifier or detector study config: where its stages run and what they share."""

    @property
    def orchestration(self) -> OrchestrationConfig: ...
    @property
    def storage_url(self) -> str: ...
    @property
    def tracking_uri(self) -> str: ...


#: Longest wait for a storage or tracking server to answer, in seconds.
CONNECT_TIMEOUT_S = 5.0
#: SQLAlchemy drivers whose connect() takes ``connect_timeout`` (seconds).
_TIMEOUT_DRIVERS = ("psycopg2", "psycopg", "pymysql", "mysqldb")
#: Where SQLAlchemy drivers come from, for the "not installed" message.
_DRIVER_HINTS = {
    "postgresql": "postgresql+psycopg2://… (psycopg2 comes with edgetune)",
    "mysql": "mysql+pymysql://… after pip install pymysql",
}


def preflight(config: EdgetuneConfig) -> DatasetInfo:
    """Dataset, search space, weights, toolchain, board settings, storage and tracking."""
    info = inspect_dataset(config.data.root)
    split_items(info, config.data.eval_split, config.data.root)
    if config.study.retrain == "train+val" and "test" not in info.files:
        raise DataError(
            f"study.retrain: train+val measures the final model on test/, which "
            f"{config.data.root} lacks; add a test/ split or use retrain: train"
        )
    check_search_space(config)
    check_class_weights(config, info.classes)
    check_weights(config, len(info.classes))
    COMPILERS[config.compile.backend].check_available()
    check_device(config)
    check_gpu_slots(config)
    check_shared_services(config)
    check_storage(config.storage_url)
    check_tracking(config.tracking_uri)
    return info


def check_search_space(config: EdgetuneConfig) -> None:
    """Every end of every range (every choice) is a value ``train.<name>`` accepts."""
    refusal = space_refusal(
        config.study.search_space,
        lambda params: trial_train_config(config, params),
        config.train.model_dump(),
    )
    if refusal:
        raise ConfigError(at_space_file(refusal, config.study.search_space_file))


def check_class_weights(config: EdgetuneConfig, classes: tuple[str, ...]) -> None:
    """``train.class_weights`` weighs each class folder of the dataset, and only those."""
    refusal = class_weights_refusal(config.train.class_weights, classes)
    if refusal:
        raise ConfigError(refusal)


def check_weights(config: EdgetuneConfig, num_classes: int) -> None:
    """A weights file exists and loads into ``model.arch`` (torch is imported only then)."""
    weights = config.model.weights
    if not weights:
        return
    if not Path(weights).is_file():
        raise ConfigError(
            f"model.weights: file {weights} not found; give a local weights file "
            f"or remove the key to train from scratch"
        )
    # torch loads only when weights are checked.
    from tasks.models import ModelError, create_model

    try:
        create_model(
            config.model.arch, num_classes, weights=weights, finetune=config.model.finetune
        )
    except ModelError as exc:
        raise ConfigError(f"model.weights: {exc}") from None


def check_device(config: EdgetuneConfig) -> None:
    """The runner's options and local files (SSH key, known_hosts); the board is not contacted."""
    try:
        runner = create_runner(config.device.runner, **config.device.runner_options())
        runner.check_config()
    except DeviceConfigError as exc:
        raise ConfigError(f"device {config.device.name}: {exc}") from None
    except ValueError as exc:
        message = str(exc)
        where = "" if message.startswith("device.") else "device: "
        raise ConfigError(f"{where}{message}") from None


def check_gpu_slots(config: EdgetuneConfig) -> None:
    """In this process, ``study.parallel`` trainings fit the GPUs' slots (torch loads only
    when ``gpu.slots_per_device`` is set)."""
    setting = config.gpu.slots_per_device
    local = config.orchestration.mode == "local"
    if not local or setting == AUTO or config.train.device == "cpu":
        return
    refusal = capacity_error(setting, config.study.parallel, visible_gpus())
    if refusal:
        raise ConfigError(refusal)


def check_shared_services(config: _Orchestrated) -> None:
    """Stages on work pools run on other hosts: storage and tracking must be servers."""
    if config.orchestration.mode != "deployments":
        return
    for key, url, env in (
        ("study.storage", config.storage_url, STORAGE_ENV),
        ("tracking.uri", config.tracking_uri, TRACKING_ENV),
    ):
        if url.startswith(("sqlite:", "file:")) or "://" not in url:
            raise ConfigError(
                f"{key}: orchestration.mode 'deployments' runs stages on other hosts, but "
                f"{key} resolves to the local file {mask_uri(url)}; set {key} or ${env} to a "
                f"server (see infra/services.sh env)"
            )


def check_storage(url: str) -> None:
    """The Optuna storage URL parses, its driver is installed and the database answers."""
    if url.startswith("sqlite"):
        return  # a local file, created with the study
    where = f"study.storage (or --storage, ${STORAGE_ENV})"
    if is_journal(url):  # a journal in PostgreSQL: the same check of its database
        _check_database(journal_database(url), "study.storage", where, shown=url)
        return
    _check_database(url, "study.storage", where)


def check_tracking(uri: str) -> None:
    """An MLflow server (http/https) or database accepts connections; local stores pass."""
    where = f"tracking.uri (or --tracking-uri, ${TRACKING_ENV})"
    try:
        parts = urlsplit(uri)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        raise ConfigError(
            f"tracking.uri: {mask_uri(uri)} is not a URL; set {where} to http://HOST:PORT or "
            f"leave it unset for a local store in the run folder"
        ) from None
    if scheme in ("", "file") or scheme.startswith("sqlite"):
        return  # a local store, created with the study
    if scheme in ("http", "https"):
        if not host:
            raise ConfigError(f"tracking.uri: {mask_uri(uri)} has no host; set {where}")
        address = (host, port or (443 if scheme == "https" else 80))
        try:
            socket.create_connection(address, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise TrackingError(
                f"cannot reach the MLflow tracking server {mask_uri(uri)}: "
                f"{type(exc).__name__}: {one_line(exc, 200)}; check {where} and that the "
                f"server is running"
            ) from None
    elif "+" in scheme or scheme in ("postgresql", "mysql", "mssql", "oracle"):
        _check_database(uri, "tracking.uri", where)


def _check_database(url: str, key: str, where: str, shown: str | None = None) -> None:
    """Parse with SQLAlchemy, load the driver, open and close one connection; messages name
    ``shown`` (the URL as the user wrote it) when given."""

    masked = mask_uri(shown or url)
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(
            f"{key}: {masked} is not a database URL; write it as "
            f"dialect+driver://user@host:port/database (e.g. "
            f"postgresql+psycopg2://optuna@127.0.0.1:5432/optuna) and set {where}"
        ) from None
    try:
        driver = parsed.get_dialect().driver
        timeout = int(CONNECT_TIMEOUT_S)
        connect_args = {"connect_timeout": timeout} if driver in _TIMEOUT_DRIVERS else {}
        engine = create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    except ImportError as exc:
        hint = _DRIVER_HINTS.get(parsed.get_backend_name(), f"install the driver ({exc.name})")
        raise ConfigError(
            f"{key}: the database driver for {parsed.drivername}:// is not installed "
            f"({one_line(exc, 120)}); use {hint}"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"{key}: {masked} cannot be used ({type(exc).__name__}: {one_line(exc, 200)}); "
            f"write it as dialect+driver://user@host:port/database and set {where}"
        ) from None
    error = StudyError if key == "study.storage" else TrackingError
    try:
        with engine.connect():
            pass
    except Exception as exc:
        reason = one_line(getattr(exc, "orig", None) or exc, 200)
        if parsed.password:
            reason = reason.replace(parsed.password, "***")
        raise error(
            f"cannot connect to the {'Optuna storage' if error is StudyError else 'tracking'} "
            f"database {masked}: {reason}; check {where} and that the database is running"
        ) from None
    finally:
        engine.dispose()
