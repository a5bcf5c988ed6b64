"""Folders written whole or not at all, and files placed by hard link where possible.

A command that writes a folder of results (a report, label doubts, a corrected or
re-split dataset, the example data) builds it in a hidden folder beside its destination
and moves it into place at the end: a reader never sees half of one, and a failure leaves
nothing behind. Each caller checks first whether its destination may be replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """A new folder beside ``dst`` to write into. When the block ends without an error it
    takes ``dst``'s place (an existing ``dst`` is moved aside first and removed after);
    otherwise it is removed and ``dst`` is left as it was."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent))
    try:
        yield work
        work.chmod(0o755)  # mkdtemp's folder is its owner's only
        if not dst.exists():
            work.rename(dst)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        dst.rename(old / dst.name)
        try:
            work.rename(dst)
        except BaseException:
            (old / dst.name).rename(dst)  # the earlier folder back where it was
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source``, or a copy on another filesystem or one
    without hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
