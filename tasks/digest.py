"""A file's SHA-256, remembered beside it for files that are written once.

The board runner names a bundle on the board by its hash, so every staging hashed the
whole bundle again (a 224 px validation set is 150 KB an image: seconds for thousands).
A file that edgetune writes once and never changes (a study input in the host's cache,
``tasks.inputs``) keeps its hash in ``.<name>.sha256`` beside it, with the size and
modification time it was taken at; a file changed since, or without that note, is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read from end to end."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def note_path(path: Path) -> Path:
    """Where the hash of ``path`` is remembered."""
    return path.with_name(f".{path.name}.sha256")


def file_sha256(path: Path) -> str:
    """The file's SHA-256: the remembered one when the file is unchanged since, else read."""
    path = Path(path)
    stat = path.stat()
    try:
        note = json.loads(note_path(path).read_text())
        if note["size"] == stat.st_size and note["mtime_ns"] == stat.st_mtime_ns:
            return str(note["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sha256_of(path)


def remember_sha256(path: Path, sha256: str) -> None:
    """Keep ``sha256`` beside ``path`` (known to be its hash) for ``file_sha256``."""
    stat = path.stat()
    note = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    fd, part = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(note, handle)
        os.replace(part, note_path(path))
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
