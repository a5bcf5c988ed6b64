"""The board's slot: one evaluation at a time on each board, whoever asks.

Studies, ``detect train``, benchmarks and manual runs all take it through ``hold_board``.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL

from tasks.config import DeviceConfig
from tasks.host import EMBEDDED_PREFECT_URL_ENV

#: How long the board stays locked after its holder dies (the lease is renewed while it lives).
DEVICE_LEASE_S = 60.0
#: Embedded mode: how often a waiter tries the board's file lock. The board idles at most
#: this long between one evaluation's release and the next one's start; a try is one
#: non-blocking flock call, so polling often costs nothing measurable.
FILE_POLL_S = 0.01
#: With a Prefect server: how often a waiter asks for the slot again. Left to itself,
#: Prefect's client sleeps the server's Retry-After between tries, which grows with the
#: slot's average occupancy up to 30 s (server.concurrency.maximum_concurrency_slot_wait_
#: seconds), and one process's waiters queue behind each other's sleeps.
PREFECT_POLL_S = 0.25
#: HTTP status of a slot that is taken (Prefect's 423 Locked).
_LOCKED = 423


#: Called once the board's slot is held. The study loop sets it for the evaluation it
#: submits: from then on the model is on the board, no longer waiting for it.
ON_BOARD: ContextVar[Callable[[], None] | None] = ContextVar("on_board", default=None)


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
                time.sleep(FILE_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def hold_board(config: UsesBoard) -> Iterator[None]:
    """Take the board's slot (limit 1, strict, leased) for the duration of the block.

    With a Prefect server the slot is its global concurrency limit, shared by every host;
    in embedded mode (one machine, no server) it is a file lock on this machine. Either
    way a waiter takes the board within a few hundredths of a second of its release.
    """
    if embedded():
        with _hold_board_file(config):
            _held()
            yield
        return
    with _hold_board_prefect(config):
        _held()
        yield


@contextmanager
def _hold_board_prefect(config: UsesBoard) -> Iterator[None]:
    """The Prefect slot, asked for every PREFECT_POLL_S until device.wait_timeout_s.

    Each try is one request that fails at once when the slot is taken (Prefect's public
    ``max_retries=0``), so the wait is ours rather than the server's Retry-After.
    """
    name = config.device.concurrency_limit
    deadline = time.monotonic() + config.device.wait_timeout_s
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(
                    concurrency(
                        name,
                        occupy=1,
                        strict=True,
                        max_retries=0,
                        timeout_seconds=max(deadline - time.monotonic(), PREFECT_POLL_S),
                        # Renewed while this run lives; a server frees a crashed holder's
                        # slot after it.
                        lease_duration=DEVICE_LEASE_S,
                    )
                )
                break
            except ConcurrencySlotAcquisitionError as exc:
                if not _locked(exc):
                    raise
            except TimeoutError:
                pass
            if time.monotonic() >= deadline:
                raise BoardBusyError(
                    f"board {config.device.name!r} stayed busy for "
                    f"{config.device.wait_timeout_s:g} s (limit {name}): another study holds "
                    f"it, or a run killed while evaluating left it taken; if no study uses "
                    f"it, free it with: edgetune device release CONFIG"
                )
            time.sleep(PREFECT_POLL_S)
        yield


def _locked(exc: BaseException) -> bool:
    """The acquisition failed because the slot is taken (not a missing limit or a fault)."""
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    return getattr(response, "status_code", None) == _LOCKED


def _held() -> None:
    hook = ON_BOARD.get()
    if hook is not None:
        hook()


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
