"""The study as Optuna's journal in PostgreSQL (``journal+postgresql://…``): one append per
operation batch, numbered without a gap across processes, replayed the same by every
reader, several attributes written in one append, a restarted server waited out with a
retried append written once, a wrong URL refused in one line, and a stage's heartbeat
written without replaying the journal.

Everything runs on a throwaway PostgreSQL cluster (``bench/postgres.py``) on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest
from optuna.trial import TrialState

from bench.postgres import Cluster, throwaway_postgres, unavailable
from tasks import preflight
from tasks.hpo import optuna_ops
from tasks.hpo.launch import ATTR_STAGE_BEAT
from tasks.hpo.study import open_study
from tasks.hpo.trial_stages import stage_heartbeat
from tasks.storage import (
    _APPEND,
    JOURNAL_TABLE,
    JournalBeat,
    JournalStudyStorage,
    PostgresJournal,
    StudyError,
    is_journal,
    journal_dsn,
    new_journal_storage,
    open_for_beats,
    open_storage,
)
from tasks.workloads.classifier import CLASSIFIER

from fakes.engine import fake_config, fake_loop

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with throwaway_postgres() as started:
        yield started


def journal_url(cluster: Cluster, name: str) -> str:
    return "journal+" + cluster.create_database(name).replace("+psycopg2", "", 1)


def rows(url: str) -> list[tuple[int, str]]:
    connection = psycopg2.connect(journal_dsn(url))
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT n, log FROM {JOURNAL_TABLE} ORDER BY n")
            return list(cursor.fetchall())
    finally:
        connection.close()


def test_a_journal_url_keeps_the_study_in_postgresql_for_every_process(cluster: Cluster) -> None:
    url = journal_url(cluster, "shared")
    assert is_journal(url) and not is_journal(url.removeprefix("journal+"))
    storage = open_storage(url)
    assert isinstance(storage, JournalStudyStorage)
    assert open_storage(url) is storage  # a second open replays nothing again
    study = optuna.create_study(storage=storage, study_name="s")
    for x in (0.25, 0.5):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1) * 0 + x)

    # another process replays the same journal from the database
    script = f"""
        import json, optuna
        from tasks.storage import open_storage
        study = optuna.load_study(study_name="s", storage=open_storage({url!r}))
        print(json.dumps([[t.number, t.state.name, t.value] for t in study.trials]))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == [[0, "COMPLETE", 0.25], [1, "COMPLETE", 0.5]]


def test_appends_from_many_processes_are_numbered_without_a_gap(cluster: Cluster) -> None:
    """Four processes ask and tell ten trials each at once, every event its own append: the
    rows are numbered 0..N-1, each process's trials are distinct, every one is COMPLETE
    with its own value, and a fresh replay agrees."""
    url = journal_url(cluster, "many")
    optuna.create_study(storage=open_storage(url), study_name="m")
    script = """
        import sys, optuna
        from tasks.storage import open_storage
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name="m", storage=open_storage(sys.argv[1]))
        for i in range(10):
            trial = study.ask()
            trial.set_user_attr("writer", int(sys.argv[2]))
            study.tell(trial, 100 * int(sys.argv[2]) + i)
    """
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), url, str(k)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for k in range(4)
    ]
    assert [w.wait(timeout=300) for w in workers] == [0, 0, 0, 0]

    numbered = rows(url)
    assert [n for n, _ in numbered] == list(range(len(numbered)))
    fresh = new_journal_storage(url)
    trials = optuna.load_study(study_name="m", storage=fresh).trials
    assert sorted(t.number for t in trials) == list(range(40))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.value for t in trials) == sorted(
        100 * k + i for k in range(4) for i in range(10)
    )
    assert all(t.value // 100 == t.user_attrs["writer"] for t in trials)  # type: ignore[operator]


def test_several_attributes_are_one_append_and_a_told_trial_takes_none(cluster: Cluster) -> None:
    url = journal_url(cluster, "attrs")
    storage = open_storage(url)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    before = len(rows(url))
    optuna_ops.set_attrs(trial, {"a": 1, "b": [2, 3], "c": {"d": "e"}})
    added = rows(url)[before:]
    assert len(added) == 3  # one row per key, as Optuna replays them
    assert len({json.loads(log)["worker_id"] for _, log in added}) == 1
    assert optuna_ops.fresh_trial(study, optuna_ops.trial_id(trial)).user_attrs == {
        "a": 1,
        "b": [2, 3],
        "c": {"d": "e"},
    }

    study.tell(trial, 1.0)
    told = len(rows(url))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        optuna_ops.set_trial_attrs(study, optuna_ops.trial_id(trial), {"a": 2, "f": 0})
    assert len(rows(url)) == told
    assert study.trials[0].user_attrs == {"a": 1, "b": [2, 3], "c": {"d": "e"}}


def test_rows_that_came_after_the_tell_are_refused_once_and_then_replayed(
    cluster: Cluster,
) -> None:
    """Another process told the trial between the check and the append: the call raises
    once, the late rows change nothing, and the next reads do not raise again."""
    url = journal_url(cluster, "late")
    storage = open_storage(url)
    assert isinstance(storage, JournalStudyStorage)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial_id = optuna_ops.trial_id(trial)
    other = new_journal_storage(url)
    other.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
    real_sync = storage._sync_with_backend
    calls = []

    def stale_then_real() -> None:  # the check reads before the other process's tell
        calls.append(1)
        if len(calls) > 1:
            real_sync()

    storage._sync_with_backend = stale_then_real  # type: ignore[method-assign]
    try:
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attrs(trial_id, {"a": 1, "b": 2})
    finally:
        del storage._sync_with_backend
    assert storage.get_trial(trial_id).user_attrs == {}
    assert storage.get_trial(trial_id).state == TrialState.COMPLETE


def test_a_restarted_postgresql_is_waited_out_and_a_retried_append_is_written_once(
    cluster: Cluster,
) -> None:
    url = journal_url(cluster, "restart")
    storage = open_storage(url)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    optuna_ops.set_attrs(trial, {"stage": "train"})

    cluster.restart()
    optuna_ops.set_attrs(trial, {"stage": "compile", "heartbeat_at": 1.0})
    study.tell(trial, 0.5)
    [told] = study.get_trials()
    assert told.state == TrialState.COMPLETE
    assert told.user_attrs == {"stage": "compile", "heartbeat_at": 1.0}

    # an append whose reply was lost is sent again with the same uids: written once
    backend = storage._backend
    assert isinstance(backend, PostgresJournal)
    count = len(rows(url))
    uid = "00000000-0000-4000-8000-000000000001"
    args = {"uids": [uid], "logs": [json.dumps({"op_code": -1})], "first": uid}
    backend._run(_APPEND, args, False)
    backend._run(_APPEND, args, False)
    assert len(rows(url)) == count + 1


def test_the_study_loop_runs_on_the_journal(cluster: Cluster, tmp_path: Path) -> None:
    """edgetune's loop (fake stages) on the journal: the same trials and attributes as on
    Optuna's tables."""
    config = fake_config(
        tmp_path, {"study": {"heartbeat_s": 30, "stale_after_s": 120}}, parallel=2, n_trials=4
    )
    url = journal_url(cluster, "loop")
    study = open_study(url, config.study, config.seed, objective=CLASSIFIER)
    fake_loop(config, study).run()
    fresh = new_journal_storage(url)
    trials = optuna.load_study(study_name=config.study.name, storage=fresh).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(t.user_attrs["stage"] == "device" for t in trials)
    assert all(t.user_attrs["device_accuracy"] == 0.9 for t in trials)


def test_a_wrong_journal_url_is_refused_in_one_line(cluster: Cluster) -> None:
    url = f"journal+postgresql://nobody:secret@127.0.0.1:{cluster.port}/missing"
    with pytest.raises(StudyError) as opened:
        open_storage(url)
    message = str(opened.value)
    assert "\n" not in message and "secret" not in message
    assert "journal+postgresql://nobody:***@127.0.0.1" in message
    assert "check study.storage" in message
    with pytest.raises(StudyError) as checked:
        preflight.check_storage(url)
    assert "\n" not in str(checked.value) and "secret" not in str(checked.value)
    assert str(checked.value).startswith(
        "cannot connect to the Optuna storage database journal+postgresql://nobody:***@"
    )
    preflight.check_storage(journal_url(cluster, "checked"))  # a reachable one passes


def test_a_study_in_optunas_tables_of_the_database_is_not_begun_again_in_its_journal(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A study begun with the database's ``postgresql+psycopg2://`` URL, opened through the
    journal URL of the same database, is refused in one line instead of starting afresh."""
    config = fake_config(tmp_path, {"study": {"heartbeat_s": 30, "stale_after_s": 120}})
    tables = cluster.create_database("both")
    old = open_study(tables, config.study, config.seed, objective=CLASSIFIER)
    old.tell(old.ask(), 0.1)
    url = "journal+" + tables.replace("+psycopg2", "", 1)

    with pytest.raises(StudyError) as refused:
        open_study(url, config.study, config.seed, objective=CLASSIFIER)
    message = str(refused.value)
    assert "\n" not in message
    assert f"study {config.study.name!r} is in Optuna's tables of postgresql+psycopg2://" in message
    assert "set study.storage (or --storage) to the postgresql+psycopg2:// URL" in message
    assert optuna.get_all_study_names(open_storage(url)) == []  # nothing begun

    renamed = config.study.model_copy(update={"name": "fresh"})
    study = open_study(url, renamed, config.seed, objective=CLASSIFIER)
    assert study.study_name == "fresh" and study.trials == []


def test_a_stages_heartbeat_writes_the_journal_without_replaying_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defect: each stage process replayed the whole journal (every study in it) to
    write its heartbeat, beside the stage's start: with 13,000 rows the board's slot was
    taken 0.1 s later. The beat reads no log row, and Optuna replays what it wrote."""
    url = journal_url(cluster, "beats")
    study = optuna.create_study(storage=open_storage(url))
    for _ in range(3):
        study.tell(study.ask(), 0.5)
    trial_id = optuna_ops.trial_id(study.ask())
    read_by_beat: list[int] = []
    real_read = PostgresJournal.read_logs

    def counted(self: PostgresJournal, log_number_from: int) -> list[dict[str, object]]:
        if threading.current_thread().name == "stage-heartbeat":
            read_by_beat.append(log_number_from)
        return real_read(self, log_number_from)

    monkeypatch.setattr(PostgresJournal, "read_logs", counted)
    started = time.time()
    with stage_heartbeat(url, trial_id, 0.05) as gone:
        deadline = time.monotonic() + 10
        beat = None
        while beat is None and time.monotonic() < deadline:
            beat = new_journal_storage(url).get_trial(trial_id).user_attrs.get(ATTR_STAGE_BEAT)
            time.sleep(0.05)
    assert beat is not None and beat["at"] >= started and not gone.is_set()
    assert read_by_beat == []


def test_a_journal_beat_stops_once_its_own_trial_is_told(cluster: Cluster) -> None:
    """Trials 1 and 10-12 (ids that start alike): telling the others leaves trial 1's beat
    going; telling trial 1 refuses the next beat and writes nothing."""
    url = journal_url(cluster, "told")
    storage = open_storage(url)
    study = optuna.create_study(storage=storage)
    trials = [study.ask() for _ in range(13)]
    assert [optuna_ops.trial_id(t) for t in trials] == list(range(13))  # a new database
    beat = open_for_beats(url)
    assert isinstance(beat, JournalBeat)
    beat.set_trial_user_attr(1, "k", 0)
    for number in (10, 11, 12):
        study.tell(trials[number], 0.5)
    beat.set_trial_user_attr(1, "k", 1)  # not stopped by trials 10-12
    study.tell(trials[1], state=TrialState.FAIL)
    before = len(rows(url))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        beat.set_trial_user_attr(1, "k", 2)
    assert len(rows(url)) == before
    fresh = new_journal_storage(url)
    assert fresh.get_trial(1).user_attrs == {"k": 1}
    assert fresh.get_trial(1).state == TrialState.FAIL
    beat.set_trial_user_attr(2, "k", 3)  # the other trials still beat
    assert new_journal_storage(url).get_trial(2).user_attrs == {"k": 3}


def test_a_journal_beat_that_cannot_connect_names_the_url_and_the_fix(cluster: Cluster) -> None:
    url = f"journal+postgresql://nobody:secret@127.0.0.1:{cluster.port}/missing"
    with pytest.raises(StudyError) as caught:
        open_for_beats(url)
    message = str(caught.value)
    assert "secret" not in message and "journal+postgresql://nobody:***@127.0.0.1" in message
    assert message.endswith("check study.storage (or --storage) and that the database is running")
