"""What keeps a long study whole: owners and heartbeats, stale trials, retries, resumes.

Optuna's own heartbeat covers ``study.optimize`` only; edgetune drives ask/tell, so the
parent flow marks each trial it holds with its owner (host, process, Prefect flow run)
and a heartbeat it refreshes every ``study.heartbeat_s``. A RUNNING trial whose owner is
known to be gone, or whose heartbeat is older than ``study.stale_after_s``, is stale: it
is told FAIL with the reason, and its parameters are enqueued again while ``study.retries``
allows. A study counts as done when ``study.n_trials`` trials have an outcome: COMPLETE,
PRUNED, or FAIL with no retry left. A trial told FAIL for a fault outside it (a full disk,
an interrupt) is no outcome: its retry is enqueued at once, or by the next start when the
disk was too full to enqueue it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import optuna
from optuna.trial import FrozenTrial, TrialState
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from tasks.config.variants import expand, variant_name
from tasks.host import pid_alive
from tasks.hpo.study import ATTR_REJECTED, ATTR_RUN_ID, best_trial, open_study
from tasks.storage import disk_full, open_storage
from tasks.tracking import CHAMPION, mask_uri, one_line
from tasks.workloads.base import StudyTarget
from tasks.workloads.registry import objective_for

# Trial user attributes.
ATTR_OWNER = "owner"
# Study user attribute: the study process now running it, and its heartbeat.
ATTR_PARENT = "parent"
ATTR_HEARTBEAT = "heartbeat_at"
ATTR_STAGE = "stage"
ATTR_RETRY_OF = "retry_of"
ATTR_ATTEMPT = "attempt"
# Study user attribute: what a resumed study must still match.
ATTR_FINGERPRINT = "fingerprint"
#: Trial user attribute, set before a trial is told FAIL for a fault outside it (a full
#: disk, an interrupt, a paused board): the FAIL is no outcome and its retry is not charged.
ATTR_INFRA = "infrastructure_fault"


# Owners and heartbeats ------------------------------------------------------------------------
def current_owner() -> dict[str, Any]:
    """This process as the owner of the trials it asks."""
    # The token tells this study run from an earlier one in the same process.
    owner: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid4().hex[:12],
    }
    try:
        if flow_run.id:
            owner["flow_run"] = str(flow_run.id)
    except Exception:  # pragma: no cover - outside Prefect there is no flow run
        pass
    return owner


def _flow_run_state(flow_run_id: str) -> str | None:
    """The final state of a Prefect flow run (``CRASHED``…), or None if it may still run."""
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except Exception:
        return None
    if state is None or not state.is_final():
        return None
    return state.type.value


@dataclass(frozen=True)
class Stale:
    trial: FrozenTrial
    reason: str


def gone_reason(
    owner: Any, beat: float | None, me: dict[str, Any], stale_after_s: float, now: float
) -> str | None:
    """Why the holder ``owner`` (last heard of at ``beat``) is gone; None if it may live."""
    if isinstance(owner, dict):
        if owner.get("token") == me["token"]:
            return None  # this study run: it tracks its own
        if owner.get("host") == me["host"] and not pid_alive(int(owner.get("pid", 0))):
            return f"its study process {owner.get('pid')} on {owner.get('host')} is gone"
        run_id = owner.get("flow_run")
        if run_id and run_id != me.get("flow_run"):
            final = _flow_run_state(str(run_id))
            if final is not None:
                return f"its study flow run {run_id} ended {final}"
    if beat is not None and now - beat > stale_after_s:
        return f"no heartbeat for {now - beat:.0f} s (limit {stale_after_s:g} s)"
    return None


def stale_reason(
    trial: FrozenTrial, me: dict[str, Any], stale_after_s: float, now: float | None = None
) -> str | None:
    """Why a RUNNING trial is stale, or None while its owner may still be working on it."""
    beat = trial.user_attrs.get(ATTR_HEARTBEAT)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    return gone_reason(
        trial.user_attrs.get(ATTR_OWNER),
        None if beat is None else float(beat),
        me,
        stale_after_s,
        time.time() if now is None else now,
    )


def find_stale(study: optuna.Study, me: dict[str, Any], stale_after_s: float) -> list[Stale]:
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    found = []
    for trial in running:
        reason = stale_reason(trial, me, stale_after_s)
        if reason is not None:
            found.append(Stale(trial, reason))
    return found


def foreign_running(study: optuna.Study, me: dict[str, Any]) -> list[FrozenTrial]:
    """RUNNING trials held by another study run (alive, as far as we can tell)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [
        t
        for t in running
        if not (
            isinstance(t.user_attrs.get(ATTR_OWNER), dict)
            and t.user_attrs[ATTR_OWNER].get("token") == me["token"]
        )
    ]


# Retries and counting --------------------------------------------------------------------------
def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of trials that another trial retries."""
    return {
        int(t.user_attrs[ATTR_RETRY_OF])
        for t in trials
        if t.user_attrs.get(ATTR_RETRY_OF) is not None
    }


def enqueue_retry(
    study: optuna.Study, trial: FrozenTrial, retries: int, *, charge: bool = True
) -> bool:
    """Enqueue the failed trial's parameters again if ``retries`` allows; True if enqueued.

    The new trial carries ``retry_of`` (the failed trial's number) and ``attempt``. A retry
    not charged (the board was paused, the study interrupted) keeps the attempt count.
    """
    attempt = int(trial.user_attrs.get(ATTR_ATTEMPT, 0))
    if charge and attempt >= retries:
        return False
    trials = study.get_trials(deepcopy=False)
    if trial.number in retried_numbers(trials):
        return True  # already enqueued (a resumed study reconciling twice)
    if not trial.params and ATTR_RUN_ID not in trial.user_attrs:
        # failed before its parameters were drawn: nothing to repeat (a trial with a run
        # and no parameters is one of a space with none: a variant trained once)
        return False
    study.enqueue_trial(
        dict(trial.params),
        user_attrs={ATTR_RETRY_OF: trial.number, ATTR_ATTEMPT: attempt + (1 if charge else 0)},
        skip_if_exists=False,
    )
    return True


def outcome_count(trials: Iterable[FrozenTrial]) -> int:
    """Trials with an outcome: COMPLETE, PRUNED, or FAIL with no retry enqueued for it.

    A sample rejected by the study's constraints ran nothing and is not counted (it is told
    PRUNED, for the sampler; studies before that told it FAIL), nor is a FAIL for a fault
    outside the trial (``ATTR_INFRA``), even while its retry is missing.
    """
    trials = list(trials)
    retried = retried_numbers(trials)
    return sum(
        1
        for t in trials
        if not t.user_attrs.get(ATTR_REJECTED)
        and (
            t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (
                t.state == TrialState.FAIL
                and t.number not in retried
                and not t.user_attrs.get(ATTR_INFRA)
            )
        )
    )


def enqueue_missing_retries(study: optuna.Study) -> list[int]:
    """Enqueue the retry of each trial told FAIL for a fault outside it whose retry could
    not be enqueued then (the disk was full); returns the numbers of those trials."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    missing = [
        t
        for t in trials
        if t.state == TrialState.FAIL and t.user_attrs.get(ATTR_INFRA) and t.number not in retried
    ]
    return [t.number for t in missing if enqueue_retry(study, t, 0, charge=False)]


def still_to_ask(trials: Sequence[FrozenTrial], n_trials: int) -> int:
    """How many more trials to ask: ``n_trials`` minus outcomes minus trials RUNNING, of
    the study's ``trials``."""
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return max(n_trials - outcome_count(trials) - running, 0)


# A full disk -------------------------------------------------------------------------------------
class DiskFull(RuntimeError):
    """A disk the study writes to is full: the study stops; run again, it continues."""


def disk_full_error(exc: BaseException, config: StudyTarget) -> DiskFull | None:
    """``exc`` as the one-line error of a full disk (where, how much room is left, the
    fix), or None when it is another fault."""
    if isinstance(exc, DiskFull):
        return exc
    link = disk_full(exc)
    if link is None:
        return None
    fix = "then run the study again to continue (the trials it cut short run again)"
    folder = _full_folder(link, config)
    if folder is None:  # a database server, or a stage's host, says so in its message
        stores = f"study.storage {mask_uri(config.storage_url)}"
        return DiskFull(f"disk full: {one_line(link)} ({stores}); free space there, {fix}")
    return DiskFull(
        f"disk full: no space left on the filesystem of {folder} ({room(folder)}): "
        f"{one_line(link)}; free space there, {fix}"
    )


def _full_folder(link: BaseException, config: StudyTarget) -> Path | None:
    """The folder whose filesystem is full: where the failed write went, else the fuller
    folder of the study's SQLite databases; None when its databases are servers."""
    if isinstance(link, OSError):
        return Path(os.fsdecode(link.filename)).parent if link.filename else config.run_path
    urls = (config.storage_url, config.tracking_uri)
    local = [Path(u.removeprefix("sqlite:///")).parent for u in urls if u.startswith("sqlite:///")]
    return min(local, key=_free) if local else None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free(path: Path) -> int:
    stats = os.statvfs(_existing(path))
    return stats.f_bavail * stats.f_frsize


def room(path: Path) -> str:
    """Where ``path``'s filesystem is mounted and how much of it is free."""
    mount = _existing(path).resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    stats = os.statvfs(mount)
    size = _size(stats.f_blocks * stats.f_frsize)
    return f"mounted on {mount}, {_size(_free(path))} free of {size}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


#: Room a running study keeps in its run directory to record its own stop on a full disk.
RESERVE_BYTES = 4 * 2**20
RESERVE_PREFIX = ".edgetune-reserve-"


class SpaceReserve:
    """A file of ``RESERVE_BYTES`` in each run directory while its studies run.

    On a full disk every write fails: telling the trials in flight FAIL, enqueueing them
    again and ending the MLflow runs too (SQLite needs room for its journal), and they
    would be left RUNNING. The study deletes its reserve when it meets a full disk, before
    it records its stop, and when it ends. A folder without room for it gets none; the
    reserve of a process killed on this host is removed by the next one.
    """

    def __init__(self, folders: Iterable[Path]) -> None:
        self.paths = [p for p in map(_reserve, sorted(set(folders))) if p is not None]

    def release(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.paths = []


def _reserve(folder: Path) -> Path | None:
    host = socket.gethostname()
    for left in folder.glob(f"{RESERVE_PREFIX}{host}-*"):
        pid = left.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            left.unlink(missing_ok=True)
    path = folder / f"{RESERVE_PREFIX}{host}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)
            else:  # pragma: no cover - no fallocate (macOS): written zeros hold the room
                handle.write(bytes(RESERVE_BYTES))
    except OSError:
        path.unlink(missing_ok=True)
        return None
    return path


# Resume: the study must still be the same study -------------------------------------------------
def fingerprint(config: StudyTarget) -> dict[str, Any]:
    """What a resumed study must share with the one stored: space, objective, measurement."""
    objective = objective_for(config)
    return {
        "objective": objective.metric,
        "direction": objective.direction,
        "search_space": {
            name: param.model_dump(mode="json", exclude_defaults=True)
            for name, param in sorted(config.study.search_space.items())
        },
        "model": config.model.arch,
        "compile": config.compile.backend,
        "device": config.device.name,
    }


def _differences(stored: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(stored) | set(current)):
            where = f"{path}.{key}" if path else str(key)
            if key not in current:
                found.append(f"{where} removed")
            elif key not in stored:
                found.append(f"{where} added")
            else:
                found.extend(_differences(stored[key], current[key], where))
        return found
    if stored != current:
        return [f"{path}: {json.dumps(stored)} -> {json.dumps(current)}"]
    return []


class StudyChangedError(RuntimeError):
    """The stored study was run with another search space or objective."""


def check_fingerprint(study: optuna.Study, config: StudyTarget, *, record: bool = True) -> None:
    """Record the fingerprint on a new study (unless not ``record``); refuse to continue a
    study that differs."""
    current = fingerprint(config)
    stored = study.user_attrs.get(ATTR_FINGERPRINT)
    if stored is None:
        if record:
            study.set_user_attr(ATTR_FINGERPRINT, current)
        return
    changes = _differences(stored, current)
    if changes:
        shown = "; ".join(changes[:4]) + ("; …" if len(changes) > 4 else "")
        raise StudyChangedError(
            f"study {config.study.name!r} was run with a different search space or objective "
            f"({shown}); to continue it, restore those settings; to start afresh, run with "
            f"--restart; to keep both, choose a new study.name"
        )


# Restart and reuse ------------------------------------------------------------------------------
#: How many times this process deleted each study (storage URL, study name): a reader that
#: holds one loaded sees that what it holds is gone, though a study made again under the
#: name may get the same id (SQLite reuses it) and its storage's cache would mix the two.
_FORGOTTEN: dict[tuple[str, str], int] = {}


def forget_study(config: StudyTarget) -> bool:
    """Delete the stored study (``--restart``); True if there was one. MLflow runs stay."""
    storage = open_storage(config.storage_url)
    try:
        optuna.delete_study(study_name=config.study.name, storage=storage)
    except KeyError:
        return False
    key = (config.storage_url, config.study.name)
    _FORGOTTEN[key] = _FORGOTTEN.get(key, 0) + 1
    return True


def forgotten(url: str, name: str) -> int:
    """How many times this process deleted study ``name`` of ``url`` (``forget_study``)."""
    return _FORGOTTEN.get((url, name), 0)


class NothingToReuseError(RuntimeError):
    """``--reuse-best`` on a study without a COMPLETE trial."""


def stored_study(config: StudyTarget) -> optuna.Study | None:
    """The config's study as stored, or None when there is none; creates nothing (a SQLite
    file that does not exist yet is not made)."""
    url = config.storage_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    try:
        return open_study(url, config.study, config.seed, create=False)
    except KeyError:
        return None


def check_resume(config: StudyTarget, *, restart: bool, reuse_best: bool) -> None:
    """Refuse a run that the campaign would stop at once, before anything starts or is
    created: a stored study (or variant) run with another search space or objective, or
    ``reuse_best`` without a COMPLETE trial. The campaign checks the same again when it
    opens the studies; this answers in seconds instead of after the flow has started."""
    if restart:
        return  # the stored studies are deleted first
    targets = [variant for _, variant in expand(config)] if config.variants else [config]
    stored = [(target, stored_study(target)) for target in targets]
    if not reuse_best:
        for target, study in stored:
            if study is not None:
                check_fingerprint(study, target, record=False)
        return
    if not any(study is not None and best_trial(study) for _, study in stored):
        name = config.study.name
        what = f"no variant of {name!r} has a" if config.variants else f"study {name!r} has no"
        raise NothingToReuseError(
            f"{what} COMPLETE trial to reuse; run the search first (edgetune tune CONFIG) or "
            f"check study.storage"
        )


#: The alias a derived study's registration takes, by its name's suffix (``<study>-best``
#: from ``--reuse-best``, ``<study>-final`` from ``study.retrain``).
DERIVED_ALIASES = {"best": "retrained", "final": "final"}


def own_alias(config: StudyTarget) -> str:
    """The alias a study's best trial is registered under: its variant's name, its derived
    study's alias (``retrained``, ``final``), or ``champion`` for a search. Only a search
    gives ``champion`` directly; the others take it only by beating it (``Tracker.promote``)."""
    variant = variant_name(config)
    if variant:
        return variant
    if config.study.derived_from:
        suffix = config.study.name.removeprefix(f"{config.study.derived_from}-")
        return DERIVED_ALIASES.get(suffix, suffix)
    return CHAMPION


def derived_config(config: StudyTarget, name: str, n_trials: int, **study: Any) -> StudyTarget:
    """The config of a study derived from ``config``'s search (``<name>-best``, ``-final``,
    ``-seed<r>``): its own name, no search features, the same tracking and run directory;
    ``study`` items go over the study section."""
    data = config.model_dump(mode="json")
    data["study"].update(
        name=name,
        n_trials=n_trials,
        max_pending=None,
        pruner="none",  # the trials run to the end
        retrain="none",
        derived_from=config.study.name,
        variant_of=None,  # registered as the champion, not under a variant's alias
        time_budget=None,
        hpo_time_ratio=None,
        patience=None,
        confirm_seeds=0,
        **study,
    )
    data["tracking"].update(
        experiment=config.experiment_name, registered_model=config.registered_model_name
    )
    data["run_dir"] = str(config.run_path)  # the same default storage and tracking files
    return config.model_validate(data)


def reuse_best_config(
    config: StudyTarget, retrain: str | None = None, chosen: int | None = None
) -> tuple[StudyTarget, FrozenTrial]:
    """The config of a one-trial study that retrains the best parameters of ``config``'s study.

    It is stored beside the search as ``<study>-best`` (``--reuse-best``: the same seed and
    data), or as ``<study>-final`` after a search with ``study.retrain`` (seed + 1, so a fresh
    model; ``train+val``: trained on train and val, measured on test). It logs to the same
    experiment and registers under the same model name, so its result becomes the champion.
    """
    try:
        study = open_study(config.storage_url, config.study, config.seed, create=False)
    except KeyError:
        raise NothingToReuseError(
            f"study {config.study.name!r} is not in its storage; run the search first "
            f"(edgetune tune CONFIG) or check study.storage"
        ) from None
    best = best_trial(study) if chosen is None else study.trials[chosen]
    if best is None:
        raise NothingToReuseError(
            f"study {config.study.name!r} has no COMPLETE trial to reuse; run the search first"
        )
    derived = derived_config(
        config, f"{config.study.name}-{'final' if retrain else 'best'}", 1, parallel=1
    )
    if not retrain:
        return derived, best
    data = derived.model_dump(mode="json")
    data["seed"] = config.seed + 1
    if retrain == "train+val":
        data["data"].update(train_splits=["train", "val"], eval_split="test")
    return config.model_validate(data), best


def enqueue_best(study: optuna.Study, best: FrozenTrial) -> None:
    """Enqueue the reused parameters once (a resumed ``--reuse-best`` does not repeat them)."""
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(dict(best.params), user_attrs={"reused_from": best.number})
