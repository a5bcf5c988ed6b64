"""The Optuna study storage: opened once with a clear error, and patient while the
database restarts (a leaf: stages on any host reach their trial through it).

Three kinds of URL:

- ``sqlite:///FILE``: Optuna's tables in a local file (the embedded default);
- ``postgresql+psycopg2://…`` (any SQLAlchemy URL): Optuna's tables in a database server;
- ``journal+postgresql://user@host:port/database``: the study as Optuna's journal (one row
  per operation, appended in one statement) in a PostgreSQL database. Each process replays
  the journal into memory and then reads only the rows added since, so reading the study's
  trials costs one query instead of several per unfinished trial. It is the faster of the
  two on a server (see docs/pipeline-benchmark.md) and the one infra/ sets up. A stage's
  heartbeat appends its rows without the replay (``JournalBeat``): a stage process would
  otherwise replay the whole journal to write one attribute.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import optuna
import psycopg2
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.storages.journal import BaseJournalBackend, JournalStorage
from optuna.storages.journal._storage import JournalOperation
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
    if isinstance(exc, (OperationalError, psycopg2.OperationalError, psycopg2.InterfaceError)):
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


# The journal in PostgreSQL ------------------------------------------------------------------
JOURNAL_SCHEMES = ("journal+postgresql", "journal+postgresql+psycopg2")
#: The journal's table: ``n`` numbers the operations from 0 without a gap (Optuna's log
#: numbers), ``uid`` names each so that an append retried after a lost reply is not made
#: twice.
JOURNAL_TABLE = "optuna_journal"
_CREATE = f"""
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('{JOURNAL_TABLE}'));
CREATE TABLE IF NOT EXISTS {JOURNAL_TABLE} (
    n bigint PRIMARY KEY, uid uuid NOT NULL UNIQUE, log text NOT NULL);
COMMIT;
"""
# One round trip. The lock, held until the commit, orders the appends: the next one reads
# max(n) only after this one's rows are visible, so readers never see a number before the
# numbers below it. The NOT EXISTS makes a retried append (same uids) a no-op.
_APPEND = f"""
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('{JOURNAL_TABLE}'));
INSERT INTO {JOURNAL_TABLE} (n, uid, log)
SELECT (SELECT coalesce(max(n) + 1, 0) FROM {JOURNAL_TABLE}) + x.i - 1, x.u, x.l
FROM unnest(%(uids)s::uuid[], %(logs)s::text[]) WITH ORDINALITY AS x(u, l, i)
WHERE NOT EXISTS (SELECT 1 FROM {JOURNAL_TABLE} WHERE uid = %(first)s::uuid);
COMMIT;
"""
_READ = f"SELECT log FROM {JOURNAL_TABLE} WHERE n >= %s ORDER BY n"
_LAST = f"SELECT coalesce(max(n), -1) FROM {JOURNAL_TABLE}"
# A trial's state rows among n in [from, to]: the LIKEs keep a superset of them (the rows are
# json.dumps's, with its separators), which JournalBeat checks exactly.
_STATE_ROWS = f"""
SELECT log FROM {JOURNAL_TABLE}
WHERE n BETWEEN %(from)s AND %(to)s AND log LIKE %(op)s AND log LIKE %(trial)s
"""


def is_journal(url: str) -> bool:
    """Whether ``url`` names a journal in PostgreSQL (``journal+postgresql://…``)."""
    return url.partition("://")[0].lower() in JOURNAL_SCHEMES


def journal_database(url: str) -> str:
    """The database of a journal URL as SQLAlchemy writes it (for checks and messages)."""
    return "postgresql+psycopg2://" + url.partition("://")[2]


def journal_dsn(url: str) -> str:
    """The database of a journal URL as libpq (psycopg2) reads it."""
    return "postgresql://" + url.partition("://")[2]


class PostgresJournal(BaseJournalBackend):
    """Optuna's journal as rows of one table in PostgreSQL, safe for many processes and
    threads (one connection per thread and process). While the database restarts, reads and
    appends wait and retry (``db_retry``); a retried append is written once."""

    def __init__(self, dsn: str, patience_s: float = 120.0) -> None:
        self._dsn = dsn
        self._patience_s = patience_s
        self._local = threading.local()
        with self._connection().cursor() as cursor:  # a wrong URL fails here, at once
            cursor.execute(_CREATE)

    def __getstate__(self) -> dict[str, Any]:
        return {"_dsn": self._dsn, "_patience_s": self._patience_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _connection(self) -> Any:
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid() and not held[1].closed:
            return held[1]
        connection = psycopg2.connect(self._dsn, connect_timeout=10)
        connection.autocommit = True  # reads are one statement; appends say BEGIN
        self._local.held = (os.getpid(), connection)
        return connection

    def _run(self, statement: str, args: Any, fetch: bool) -> list[Any]:
        connection = self._connection()
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement, args)
                return cursor.fetchall() if fetch else []
        except Exception:
            self._local.held = None  # a broken or aborted connection is not reused
            connection.close()
            raise

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        return [json.loads(row[0]) for row in self.read_rows(_READ, (log_number_from,))]

    def read_rows(self, statement: str, args: Any) -> list[Any]:
        """The rows of one read of the journal's table (waited out while it restarts)."""
        return db_retry(self._run, statement, args, True, patience_s=self._patience_s)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if not logs:
            return
        uids = [str(uuid.uuid4()) for _ in logs]
        args = {"uids": uids, "logs": [json.dumps(log) for log in logs], "first": uids[0]}
        db_retry(self._run, _APPEND, args, False, patience_s=self._patience_s)


class JournalBeat:
    """A stage's heartbeat in a PostgreSQL journal, written without replaying it.

    Opening ``JournalStudyStorage`` replays the whole journal (every study in the database:
    about 0.1 s of CPU per 5,000 rows here, and a study's heartbeats add rows all run
    long), in every stage process, beside the stage's own start: the board's slot was taken
    up to 0.14 s later with a 13,000-row journal. A beat needs only to append its row and
    to know whether the trial was finished elsewhere: this reads the trial's state rows, and
    after the first beat only among the rows added since the last.
    """

    def __init__(self, url: str) -> None:
        self._journal = PostgresJournal(journal_dsn(url))
        self._worker = f"{uuid.uuid4()}-beat"  # no replay takes these rows for its own
        self._read_from = 0
        self._finished: set[int] = set()

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        """Append the attribute's row (one statement), as Optuna's journal storage writes it;
        raise ``UpdateFinishedTrialError`` once the trial has been told, writing nothing."""
        if self._told(trial_id):
            raise UpdateFinishedTrialError(f"trial {trial_id} has already finished")
        row = {
            "op_code": int(JournalOperation.SET_TRIAL_USER_ATTR),
            "worker_id": self._worker,
            "trial_id": trial_id,
            "user_attr": {key: value},
        }
        self._journal.append_logs([row])

    def _told(self, trial_id: int) -> bool:
        if trial_id in self._finished:
            return True
        last = self._journal.read_rows(_LAST, ())[0][0]
        args = {
            "from": self._read_from,
            "to": last,
            "op": f'%"op_code": {int(JournalOperation.SET_TRIAL_STATE_VALUES)}%',
            "trial": f'%"trial_id": {trial_id}%',
        }
        for (text,) in self._journal.read_rows(_STATE_ROWS, args):
            log = json.loads(text)
            if (
                log.get("op_code") == JournalOperation.SET_TRIAL_STATE_VALUES
                and log.get("trial_id") == trial_id
                and optuna.trial.TrialState(log["state"]).is_finished()
            ):
                self._finished.add(trial_id)
        self._read_from = last + 1
        return trial_id in self._finished


class JournalStudyStorage(JournalStorage):
    """Optuna's journal storage with the several-attributes write edgetune's loop uses."""

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Set several user attributes of a trial in one append (one row each, as Optuna
        replays them). Raises ``UpdateFinishedTrialError`` once the trial has been told, and
        then writes none (unless another process tells it between the check and the write:
        then the rows are written and ignored by every replay, as Optuna's own are)."""
        if not attrs:
            return
        with self._thread_lock:
            self._sync_with_backend()
            trial = self._replay_result.get_trial(trial_id)
            if trial.state.is_finished():
                raise UpdateFinishedTrialError(
                    f"Trial#{trial.number} has already finished and can not be updated."
                )
            worker = self._replay_result.worker_id
            op = int(JournalOperation.SET_TRIAL_USER_ATTR)
            self._backend.append_logs(
                [
                    {"op_code": op, "worker_id": worker, "trial_id": trial_id, "user_attr": {k: v}}
                    for k, v in attrs.items()
                ]
            )
            self._sync_own_rows()

    def _sync_own_rows(self) -> None:
        # The replay raises once per row of this thread that came too late (the trial was
        # told in between); each raise consumes its row: read on until all are replayed.
        late: UpdateFinishedTrialError | None = None
        while True:
            try:
                self._sync_with_backend()
                break
            except UpdateFinishedTrialError as exc:
                late = late or exc
        if late is not None:
            raise late


def refuse_study_in_tables(url: str, storage: optuna.storages.BaseStorage, name: str) -> None:
    """Raise ``StudyError`` when the journal at ``url`` lacks the study ``name`` while
    Optuna's tables in the same database hold it (a study begun with the database's
    ``postgresql+psycopg2://`` URL): carrying on would start it afresh in the journal."""
    try:
        storage.get_study_id_from_name(name)
        return
    except KeyError:
        pass
    backend = getattr(storage, "_backend", None)
    if not isinstance(backend, PostgresJournal):
        return
    query = "SELECT 1 FROM studies WHERE study_name = %s"
    with backend._connection().cursor() as cursor:
        cursor.execute("SELECT to_regclass('studies') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return
        cursor.execute(query, (name,))
        if cursor.fetchone() is None:
            return
    raise StudyError(
        f"study {name!r} is in Optuna's tables of {mask_uri(journal_database(url))}, not in "
        f"its journal ({mask_uri(url)}); to resume it, set study.storage (or --storage) to "
        f"the postgresql+psycopg2:// URL, or choose another study.name"
    )


def new_journal_storage(url: str) -> JournalStudyStorage:
    """A journal storage of its own, not the process's shared one (``open_storage``): it
    reads and replays the whole journal."""
    return JournalStudyStorage(PostgresJournal(journal_dsn(url)))


_JOURNALS: dict[tuple[int, str], JournalStudyStorage] = {}
_JOURNALS_LOCK = threading.Lock()


def _journal_storage(url: str) -> JournalStudyStorage:
    """One journal storage per URL in a process: a second open reads only the rows added
    since the first, not the whole journal again."""
    key = (os.getpid(), url)
    with _JOURNALS_LOCK:
        if key not in _JOURNALS:
            _JOURNALS[key] = new_journal_storage(url)
        return _JOURNALS[key]


class StudyError(RuntimeError):
    """The study storage cannot be used; the message names the URL (masked) and the fix."""


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage at ``url``; a new SQLite file is created under its lock
    (``creation_lock``), so that two processes starting one run directory both open it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with creation_lock(url):
        return _opened(url, _journal_storage if is_journal(url) else ResilientRDBStorage)


def open_for_beats(url: str) -> JournalBeat | optuna.storages.BaseStorage:
    """What a stage's heartbeat writes to: a journal's rows without its replay
    (``JournalBeat``), else the storage itself."""
    if is_journal(url):
        return _opened(url, JournalBeat)
    return open_storage(url)


def _opened(url: str, opens: Callable[[str], _T]) -> _T:
    try:
        return opens(url)
    except Exception as exc:
        raise StudyError(
            f"cannot open Optuna storage {mask_uri(url)}: {str(exc).splitlines()[0]}; "
            f"check study.storage (or --storage) and that the database is running"
        ) from None
