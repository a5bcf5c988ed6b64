"""This host's processes: whether the process that left a record behind still lives, and
the scratch folders of processes that are gone."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The API URL of the temporary Prefect server an ``edgetune`` command started for itself
#: (``edgetune.prefect_server``): like Prefect's own, it lives and dies with one process.
EMBEDDED_PREFECT_URL_ENV = "EDGETUNE_EMBEDDED_PREFECT_URL"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Private working folders of stages: ``edgetune-scratch-<pid>-<name>-<random>``.
SCRATCH_PREFIX = "edgetune-scratch-"


def scratch_folder(name: str) -> Path:
    """A new private folder under the temporary directory, named with this process's id.

    A process killed (SIGKILL, power loss) never removes its folders; the next one made on
    this host removes those of processes that are gone (``sweep_scratch``).
    """
    sweep_scratch()
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{name}-"))


def sweep_scratch() -> list[Path]:
    """Remove this user's scratch folders whose process is gone; the folders removed."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        owner = folder.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        try:
            mine = folder.is_dir() and folder.stat().st_uid == os.getuid()
        except OSError:  # removed meanwhile by its owner or another sweep
            continue
        if mine and owner.isdigit() and not pid_alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created when missing) among this host's processes,
    released by the kernel when its holder dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: The folder of edgetune's per-host caches, when set (each cache says where it sits in it).
CACHE_ENV = "EDGETUNE_CACHE_DIR"


def user_cache_home() -> Path:
    """Where a user's caches go without ``$EDGETUNE_CACHE_DIR``: ``$XDG_CACHE_HOME/edgetune``,
    else ``~/.cache/edgetune``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgetune"
