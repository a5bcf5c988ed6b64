"""GPU slots: several trainings at once on one GPU, each pinned to its device.

``gpu.slots_per_device`` says how many trainings share one GPU (a small model leaves most
of an H100 idle). A training holds a slot for its whole length (``gpu_slot``):

- in a study's own process (``orchestration.mode: local``) the ``study.parallel``
  trainings are threads; each takes the lowest free slot index and trains on visible GPU
  ``index // slots_per_device`` (``torch.cuda.set_device`` in its thread), so slots fill
  the GPUs in turn; ``auto`` spreads ``study.parallel`` evenly over the visible GPUs;
- a worker of the ``gpu`` pool is one slot: ``infra/workers.sh`` starts
  ``EDGETUNE_GPU_SLOTS_PER_DEVICE`` workers per GPU of ``EDGETUNE_GPU_DEVICES``, each with
  ``CUDA_VISIBLE_DEVICES`` naming its GPU and that count in its environment (the host's
  own layout wins over the study's config there; ``auto`` on a worker is 1).

What a slot may use of its GPU's memory (``device_budget``) is the GPU's total divided by
the slots sharing it: ``batch_size: auto`` probes within it and the batched data path
takes the GPU only when the decoded set fits in it. torch loads only when a GPU is asked
about, so the study's process imports this module for free.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.config import AUTO, ConfigError

if TYPE_CHECKING:
    import torch

#: Trainings sharing one GPU on this host (set by ``infra/workers.sh`` for its gpu workers).
SLOTS_ENV = "EDGETUNE_GPU_SLOTS_PER_DEVICE"


@dataclass(frozen=True)
class GpuSlot:
    """One training's place: its index among this process's trainings, and how many
    trainings share each GPU."""

    index: int
    per_device: int

    def device_index(self, visible: int) -> int:
        """The visible GPU this slot trains on (slots fill the GPUs in turn)."""
        return (self.index // self.per_device) % max(visible, 1)


_SLOT: ContextVar[GpuSlot | None] = ContextVar("edgetune_gpu_slot", default=None)
_taken: set[int] = set()
_lock = threading.Lock()


def host_slots() -> int | None:
    """``EDGETUNE_GPU_SLOTS_PER_DEVICE`` of this host, None when unset."""
    raw = os.environ.get(SLOTS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(
            f"{SLOTS_ENV}={raw!r} is not a number of trainings per GPU; set it to a whole "
            f"number >= 1 (infra/workers.sh sets it for its gpu workers) or unset it"
        )
    return int(raw)


def slots_per_device(setting: int | str, parallel: int, visible: int, *, in_process: bool) -> int:
    """Trainings that share one GPU: the host's setting, else ``gpu.slots_per_device``,
    else (``auto``) ``parallel`` spread over the ``visible`` GPUs in this process, 1 on a
    worker of the gpu pool."""
    host = host_slots()
    if host is not None:
        return host
    if setting != AUTO:
        return int(setting)
    if not in_process:
        return 1
    return max(1, math.ceil(parallel / max(visible, 1)))


def capacity_error(setting: int | str, parallel: int, visible: int) -> str | None:
    """Why ``parallel`` trainings in one process do not fit its GPU slots, or None."""
    if visible == 0 or setting == AUTO:
        return None
    capacity = visible * int(setting)
    if parallel <= capacity:
        return None
    return (
        f"study.parallel is {parallel} but this host has {visible} GPU(s) x "
        f"gpu.slots_per_device {setting} = {capacity} slot(s); raise gpu.slots_per_device "
        f"to {math.ceil(parallel / visible)} or lower study.parallel"
    )


def visible_gpus() -> int:
    """GPUs this process sees (0 without CUDA); loads torch."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextmanager
def gpu_slot(setting: int | str, parallel: int, *, in_process: bool) -> Iterator[GpuSlot]:
    """Hold the lowest free slot of this process while a training runs in this context."""
    per_device = slots_per_device(setting, parallel, visible_gpus(), in_process=in_process)
    with _lock:
        index = next(i for i in range(len(_taken) + 1) if i not in _taken)
        _taken.add(index)
    slot = GpuSlot(index, per_device)
    token = _SLOT.set(slot)
    try:
        yield slot
    finally:
        _SLOT.reset(token)
        with _lock:
            _taken.discard(index)


def current_slot() -> GpuSlot | None:
    return _SLOT.get()


def pinned_gpu() -> int:
    """The visible GPU index this context trains on (the current device outside a slot);
    made the thread's current device."""
    import torch

    slot = current_slot()
    index = slot.device_index(torch.cuda.device_count()) if slot else torch.cuda.current_device()
    torch.cuda.set_device(index)
    return index


def sharing() -> int:
    """Trainings sharing this context's GPU (outside a slot: the host's setting, else 1)."""
    slot = current_slot()
    if slot is not None:
        return slot.per_device
    return host_slots() or 1


def device_budget(device: torch.device) -> int:
    """Bytes of ``device``'s memory one training may use: a GPU's total over the slots
    sharing it (never more than is free now), or the host's available memory."""
    if device.type != "cuda":
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(min(free, total // sharing()))
