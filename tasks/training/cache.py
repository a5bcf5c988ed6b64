"""Training images decoded once per host: a uint8 NCHW array keyed by the images' content.

Every epoch of every trial used to open, decode and resize each image again. Here the
training set is decoded once, at the model's input size, into ``<key>.npy`` in the cache
folder, and every later trial on the host (in this process or another) maps that file.
The key is a hash of the images' bytes, in order, and the size: a changed, added or
re-ordered image makes a new entry; a moved dataset or another host with the same files
finds the same one. Labels are not part of it (they travel beside, in the items).

The cached pixels are exactly ``tasks.data.load_rgb``'s, so a trial trains on the same
tensors, draws the same augmentations and reaches the same metrics with or without the
cache. A file is written under another name and renamed when complete, under a lock, so
trials starting together decode once and nobody reads half a file.

Folder: ``$EDGETUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgetune/decoded``, else
``~/.cache/edgetune/decoded``. Removing it is always safe.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.data import DataError, load_rgb
from tasks.host import CACHE_ENV, file_lock, user_cache_home

#: Bumped when the decoding changes, so old entries are never read as new ones.
FORMAT = 1
_CHUNK = 1 << 20

#: Arrays this process has opened, by key: trials in one process share one mapping.
_OPENED: dict[str, np.ndarray] = {}
_LOCK = threading.Lock()


class CacheError(RuntimeError):
    """The cache folder cannot be written or holds an unreadable entry; the message says how
    to choose another folder or go without the cache."""


def cache_dir() -> Path:
    """The folder of decoded datasets on this host (see the module docstring)."""
    chosen = os.environ.get(CACHE_ENV)
    return Path(chosen) if chosen else user_cache_home() / "decoded"


def dataset_key(items: Sequence[tuple[Path, int]], image_size: int) -> str:
    """A hash of the images' bytes in order, the input size and the cache's format."""
    digest = hashlib.sha256(f"edgetune-decoded/{FORMAT}/{image_size}/{len(items)}".encode())
    for path, _ in items:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(size.to_bytes(8, "little"))
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return f"{digest.hexdigest()[:32]}-{image_size}px"


def decoded_images(items: Sequence[tuple[Path, int]], image_size: int) -> np.ndarray:
    """The images of ``items`` as a read-only uint8 array (N, 3, size, size), decoded once.

    Raises ``tasks.data.DataError`` for an image that cannot be read, leaving no entry.
    """
    key = dataset_key(items, image_size)
    with _LOCK:
        if key in _OPENED:
            return _OPENED[key]
    folder = cache_dir()
    path = folder / f"{key}.npy"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / f"{key}.lock"):
            if not path.exists():
                _write(items, image_size, path)
            images = np.load(path, mmap_mode="r")
    except DataError:
        raise  # an unreadable image: its own message
    except (OSError, ValueError) as exc:  # no room, no write access, a damaged entry
        raise CacheError(
            f"the decoded-image cache {path} cannot be used ({type(exc).__name__}: {exc}); "
            f"remove it, set {CACHE_ENV} to a writable folder with room, or set data.cache: false"
        ) from exc
    if images.shape != (len(items), 3, image_size, image_size) or images.dtype != np.uint8:
        raise CacheError(
            f"the decoded-image cache {path} holds {images.dtype}{list(images.shape)}, not "
            f"{len(items)} images of {image_size} px; remove it and run again"
        )
    with _LOCK:
        return _OPENED.setdefault(key, images)


def _write(items: Sequence[tuple[Path, int]], image_size: int, path: Path) -> None:
    fd, part = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(
            part, mode="w+", dtype=np.uint8, shape=(len(items), 3, image_size, image_size)
        )
        _fill(array, items, image_size)
        array.flush()
        del array
        os.replace(part, path)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise


def decode_images(items: Sequence[tuple[Path, int]], image_size: int) -> np.ndarray:
    """The images of ``items`` decoded in memory, as the cache holds them (no file)."""
    array = np.empty((len(items), 3, image_size, image_size), dtype=np.uint8)
    _fill(array, items, image_size)
    return array


def _fill(array: np.ndarray, items: Sequence[tuple[Path, int]], image_size: int) -> None:
    for index, (path, _) in enumerate(items):
        array[index] = np.asarray(load_rgb(path, image_size), dtype=np.uint8).transpose(2, 0, 1)
