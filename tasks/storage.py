"""The Optuna study storage: opened once with a clear error, and patient while the
database restarts (a leaf: stages on any host reach their trial through it)."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
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
    (``pool_pre_ping`` then replaces the connection), and calls during the restart fail
    until the server accepts connections again. Gives up after ``patience_s``.
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
)


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose calls wait (bounded) while the database restarts.

    Opening it still fails at once on a wrong URL: only a database that was reachable and
    went away is waited for.
    """


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(optuna.storages.RDBStorage, name)

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
            return ResilientRDBStorage(
                url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {}
            )
        except Exception as exc:
            raise StudyError(
                f"cannot open Optuna storage {mask_uri(url)}: {str(exc).splitlines()[0]}; "
                f"check study.storage (or --storage) and that the database is running"
            ) from None
