"""A study's shared inputs (the board's bundle, the calibration set), fetched from MLflow
once per host rather than once per stage.

MLflow is the artifact bus between hosts: every trial's training, compile and device stage
read the study's bundle or calibration set from the study's run. Fetched by each stage,
the validation bundle (uncompressed, 150 KB a 224 px image) crossed the network again for
every stage run, and the board runner hashed it again for every staging; on the work
pools the next evaluation does both after the last one has ended, while the board waits.

Here the study logs each input with its SHA-256 as a tag of its run
(``edgetune.sha256.<artifact path>``). A stage reads the tag (one API call) and opens
``<cache>/<sha256>/<file name>``; a missing entry is downloaded under a lock (stages
starting together fetch it once), checked against the tag, remembered with its hash
(``tasks.digest``) and renamed into place when complete, so nobody reads half a file.
The key is the content: a study resumed on other data logs another hash and finds another
entry; a new study on the same data finds the same one. An input without the tag (a study
logged by an older edgetune), or whose content is not what the tag says, is downloaded
for the stage alone, as before.

Folder: ``$EDGETUNE_CACHE_DIR/inputs``, else ``$XDG_CACHE_HOME/edgetune/inputs``, else
``~/.cache/edgetune/inputs``. Entries are read, never changed; removing the folder is safe
while no stage runs on the host.

A trial's own artifact (its compiled model) is used once, by the stage that comes next. A
worker that sees that stage waiting can fetch it ahead (``stage_artifact``) into
``staged/<key>/`` beside ``inputs``, the key naming the run and the artifact path; the
stage then takes the file (``take_staged``: the folder is renamed first, so one stage
takes it) rather than downloading it. Folders nobody took are removed after an hour.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

from tasks.digest import note_path, remember_sha256, sha256_of
from tasks.host import CACHE_ENV, file_lock, user_cache_home
from tasks.tracking import Tracker

#: The tag of a study run that holds the SHA-256 of one of its inputs, + the artifact path.
DIGEST_TAG = "edgetune.sha256."
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: Seconds after which an artifact fetched ahead that no stage took is removed.
STALE_STAGED_S = 3600.0

_log = logging.getLogger(__name__)


def inputs_dir() -> Path:
    """The folder of study inputs on this host (see the module docstring)."""
    chosen = os.environ.get(CACHE_ENV)
    return (Path(chosen) if chosen else user_cache_home()) / "inputs"


def log_study_input(tracker: Tracker, run_id: str, path: Path, artifact_dir: str) -> None:
    """Log ``path`` under ``artifact_dir`` of the study's run, with its hash as a tag."""
    digest = sha256_of(path)
    tracker.log_artifact(run_id, path, artifact_dir)
    tracker.set_tags(run_id, {f"{DIGEST_TAG}{artifact_dir}/{path.name}": digest})


def fetch_study_input(tracker: Tracker, run_id: str, artifact_path: str, dst: Path) -> Path:
    """The study input ``artifact_path`` of run ``run_id`` as a local file, read-only.

    From this host's cache when the run names its hash (fetched into it when missing);
    else downloaded into ``dst`` as ``Tracker.download`` does.
    """
    digest = tracker.client.get_run(run_id).data.tags.get(DIGEST_TAG + artifact_path, "")
    if not _SHA256.fullmatch(digest):
        return tracker.download(run_id, artifact_path, dst)
    entry = inputs_dir() / digest / PurePosixPath(artifact_path).name
    if entry.is_file():
        return entry
    folder = entry.parent.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / f"{digest}.lock"):
            if entry.is_file():
                return entry
            return _fetch_entry(tracker, run_id, artifact_path, digest, entry, dst)
    except OSError as exc:  # no room or no write access: this stage goes without the cache
        _log.warning(
            "the study-input cache %s cannot be written (%s: %s); %s is downloaded for this "
            "stage alone (set %s to a writable folder with room)",
            folder,
            type(exc).__name__,
            exc,
            artifact_path,
            CACHE_ENV,
        )
        return tracker.download(run_id, artifact_path, dst)


def _fetch_entry(
    tracker: Tracker, run_id: str, artifact_path: str, digest: str, entry: Path, dst: Path
) -> Path:
    """Download into a partial folder beside the entries, check, rename into place; a file
    that is not what the tag says goes to ``dst`` for this stage alone."""
    part = Path(tempfile.mkdtemp(dir=entry.parent.parent, prefix=f".{digest[:16]}-"))
    try:
        fetched = tracker.download(run_id, artifact_path, part)
        found = sha256_of(fetched)
        if found != digest:
            _log.warning(
                "%s of MLflow run %s has SHA-256 %s, its tag %s%s says %s (logged again "
                "since): it is used for this stage alone, not cached",
                artifact_path,
                run_id,
                found[:12],
                DIGEST_TAG,
                artifact_path,
                digest[:12],
            )
            dst.mkdir(parents=True, exist_ok=True)
            return Path(shutil.move(fetched, dst / fetched.name))
        remember_sha256(fetched, digest)
        entry.parent.mkdir(exist_ok=True)
        os.replace(note_path(fetched), note_path(entry))
        os.replace(fetched, entry)
        return entry
    finally:
        shutil.rmtree(part, ignore_errors=True)


# A trial's artifact fetched ahead of its stage -------------------------------------------


def staged_dir() -> Path:
    """The folder of artifacts fetched ahead of their stage on this host."""
    return inputs_dir().parent / "staged"


def staging_key(run_id: str, artifact_path: str) -> str:
    """The name of what is fetched ahead for ``artifact_path`` of run ``run_id``, here and on
    the board (hex digits)."""
    return hashlib.sha256(f"{run_id}/{artifact_path}".encode()).hexdigest()[:32]


def stage_artifact(tracker: Tracker, run_id: str, artifact_path: str) -> Path:
    """``artifact_path`` of run ``run_id`` downloaded into ``staged/<key>/`` for the stage that
    will take it (``take_staged``); what is there already is kept."""
    key = staging_key(run_id, artifact_path)
    root = staged_dir()
    entry = root / key / PurePosixPath(artifact_path).name
    if entry.is_file():
        return entry
    root.mkdir(parents=True, exist_ok=True)
    _sweep_staged(root, time.time() - STALE_STAGED_S)
    part = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    try:
        fetched = tracker.download(run_id, artifact_path, part / "download")
        os.replace(fetched, part / entry.name)
        shutil.rmtree(part / "download", ignore_errors=True)
        os.rename(part, entry.parent)
    except OSError:
        if not entry.is_file():  # another process fetched it first, else it fails here
            raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return entry


def take_staged(run_id: str, artifact_path: str, dst: Path) -> Path | None:
    """The artifact fetched ahead for this stage, moved into ``dst``; None when there is none
    (the stage downloads it)."""
    key = staging_key(run_id, artifact_path)
    root = staged_dir()
    taken = root / f".taken-{key}-{uuid.uuid4().hex}"
    try:
        os.rename(root / key, taken)
    except OSError:  # nothing fetched ahead, or another stage took it
        return None
    found = taken / PurePosixPath(artifact_path).name
    try:
        dst.mkdir(parents=True, exist_ok=True)
        return Path(shutil.move(found, dst / found.name))
    except OSError:  # not there (swept meanwhile, or never complete): the stage downloads it
        return None
    finally:
        shutil.rmtree(taken, ignore_errors=True)


def _sweep_staged(root: Path, before: float) -> None:
    for folder in root.iterdir():
        try:
            stale = folder.stat().st_mtime < before
        except OSError:
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
