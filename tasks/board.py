"""The board's slot: one evaluation at a time on each board, whoever asks.

Studies, ``detect train``, benchmarks and manual runs all take it through ``hold_board``.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL

from tasks.config import DeviceConfig
from tasks.host import EMBEDDED_PREFECT_URL_ENV

#: How long the board stays locked after its holder dies (the lease is renewed while it lives).
DEVICE_LEASE_S = 60.0


class UsesBoard(Protocol):
    """A classifier study or a detector config: anything with a device section."""

    @property
    def device(self) -> DeviceConfig: ...


class BoardBusyError(RuntimeError):
    """The board's slot stayed taken for longer than device.wait_timeout_s."""


def embedded() -> bool:
    """No Prefect server is configured: a temporary one lives and dies with this process
    (Prefect's own, or the one the ``edgetune`` command started)."""
    url = PREFECT_API_URL.value()
    return not url or url == os.environ.get(EMBEDDED_PREFECT_URL_ENV)


def board_lock_path(name: str) -> Path:
    """The lock file of a board for the studies of one machine (embedded mode)."""
    return Path(tempfile.gettempdir()) / f"edgetune-{os.getuid()}" / "boards" / f"{name}.lock"


@contextmanager
def _hold_board_file(config: UsesBoard) -> Iterator[None]:
    """Embedded mode: an OS file lock, released by the kernel when its holder dies.

    Prefect's temporary server keeps leases in memory and does not expire them, so a
    process killed on the board would keep a Prefect slot taken; a file lock cannot leak.
    """

    path = board_lock_path(config.device.concurrency_limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + config.device.wait_timeout_s
    with path.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BoardBusyError(
                        f"board {config.device.name!r} stayed busy for "
                        f"{config.device.wait_timeout_s:g} s: another study on this machine "
                        f"is evaluating on it (lock {path}); wait for it, or raise "
                        f"device.wait_timeout_s"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def hold_board(config: UsesBoard) -> Iterator[None]:
    """Take the board's slot (limit 1, strict, leased) for the duration of the block.

    With a Prefect server the slot is its global concurrency limit, shared by every host;
    in embedded mode (one machine, no server) it is a file lock on this machine.
    """
    if embedded():
        with _hold_board_file(config):
            yield
        return
    name = config.device.concurrency_limit
    try:
        with concurrency(
            name,
            occupy=1,
            strict=True,
            timeout_seconds=config.device.wait_timeout_s,
            # Renewed while this run lives; a server frees a crashed holder's slot after it.
            lease_duration=DEVICE_LEASE_S,
        ):
            yield
    except TimeoutError:
        raise BoardBusyError(
            f"board {config.device.name!r} stayed busy for {config.device.wait_timeout_s:g} s "
            f"(limit {name}): another study holds it, or a run killed while evaluating left it "
            f"taken; if no study uses it, free it with: edgetune device release CONFIG"
        ) from None


def ensure_device_limit(name: str) -> None:
    """Create (or reset to 1) the board's global concurrency limit on the Prefect server."""

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)


def release_board(name: str) -> int:
    """Free every slot of a board's limit; returns how many were taken. Manual recovery."""

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        taken = int(limit.active_slots)
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    return taken
