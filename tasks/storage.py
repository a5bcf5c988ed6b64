"""The Optuna study storage: opened once with a clear error, and patient while the
database restarts (a leaf: stages on any host reach their trial through it)."""

from __future__ import annotations

import errno
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import optuna
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError

from tasks.tracking import creation_lock, mask_uri

_T = TypeVar("_T")


#: How a full disk shows: the errno of a write (ENOSPC, or EDQUOT past a quota), and the
#: words of SQLite, of PostgreSQL (``could not extend file …: No space left on device``)
#: and of an error carried as text (a stage run on a work pool reports it in its state).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_WORDS = ("database or disk is full", "No space left on device", "Disk quota exceeded")


def disk_full(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain (its causes and contexts) that says a disk is full,
    or None: Optuna and MLflow wrap the database's error in errors of their own."""
    todo, seen = [exc], set[int]()
    while todo:
        link = todo.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno in FULL_ERRNOS:
            return link
        if any(words in str(link) for words in FULL_WORDS):
            return link
        todo.extend(e for e in (link.__cause__, link.__context__) if e is not None)
    return None


def _transient(exc: BaseException) -> bool:
    if disk_full(exc) is not None:
        return False  # waiting does not free space: the study stops and says so
    if isinstance(exc, optuna.exceptions.StorageInternalError):
        return True
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def db_retry(fn: Callable[..., _T], *args: Any, patience_s: float = 120.0, **kwargs: Any) -> _T:
    """Call ``fn``; while the study database is unreachable, retry with backoff.

    A restarted PostgreSQL drops every pooled connection: the first call after it fails
    with a disconnect (SQLAlchemy then discards every pooled connection, so the retry opens
    a new one), and calls during the restart fail until the server accepts connections
    again. Gives up after ``patience_s``. Checking each connection before use
    (``pool_pre_ping``) would spare that one failed call at the price of a round trip on
    every call, thousands per study.
    """
    deadline = time.monotonic() + patience_s
    delay = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _transient(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


#: RDBStorage calls that wait out a database restart (see ``ResilientRDBStorage``).
_RETRIED = (
    *sorted(optuna.storages.BaseStorage.__abstractmethods__),
    "_get_trials",
    "get_n_trials",
    "get_best_trial",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
    "set_trial_user_attrs",
)


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose calls wait (bounded) while the database restarts.

    Opening it still fails at once on a wrong URL: only a database that was reachable and
    went away is waited for.
    """

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Set several user attributes of a trial in one transaction and, on PostgreSQL and
        SQLite, one statement: ``set_trial_user_attr`` makes a commit per key (each a round
        trip and, on PostgreSQL, a flush of its log) and two statements. Raises
        ``UpdateFinishedTrialError`` once the trial has been told, and then writes none."""
        if not attrs:
            return
        model = models.TrialUserAttributeModel
        with _create_scoped_session(self.scoped_session, True) as session:
            upsert = _upsert(self.engine.name)
            if upsert is None:  # Optuna's own statements, one key at a time
                for key, value in attrs.items():
                    self._set_trial_attr_without_commit(session, model, trial_id, key, value)
                return
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, cast(optuna.trial.TrialState, trial.state))
            rows = [
                {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                for k, v in attrs.items()
            ]
            insert = upsert(model).values(rows)
            session.execute(
                insert.on_conflict_do_update(
                    index_elements=[model.trial_id, model.key],
                    set_={"value_json": insert.excluded.value_json},
                )
            )


def _upsert(dialect: str) -> Callable[..., Any] | None:
    """The INSERT of ``dialect`` that updates the rows whose keys exist (Optuna's upsert,
    for many rows at once), or None where Optuna has none."""
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        return sqlite.insert
    return None


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(ResilientRDBStorage, name)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return db_retry(method, self, *args, **kwargs)

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call


for _name in _RETRIED:
    setattr(ResilientRDBStorage, _name, _retrying(_name))


class StudyError(RuntimeError):
    """The study storage cannot be used; the message names the URL (masked) and the fix."""


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage at ``url``; a new SQLite file is created under its lock
    (``creation_lock``), so that two processes starting one run directory both open it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with creation_lock(url):
        try:
            return ResilientRDBStorage(url)
        except Exception as exc:
            raise StudyError(
                f"cannot open Optuna storage {mask_uri(url)}: {str(exc).splitlines()[0]}; "
                f"check study.storage (or --storage) and that the database is running"
            ) from None
