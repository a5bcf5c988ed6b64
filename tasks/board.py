"""The board's slot: one evaluation at a time on each board, whoever asks.

Studies, ``detect train``, benchmarks and manual runs all take it through ``hold_board``.
"""

from __future__ import annotations

import contextvars
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.settings import PREFECT_API_URL

from tasks.config import DeviceConfig
from tasks.host import EMBEDDED_PREFECT_URL_ENV

#: How long the board stays locked after its holder dies (the lease is renewed while it lives).
DEVICE_LEASE_S = 60.0
#: How often a held lease is renewed: three times in its duration, so that failed renewals
#: are tried again well before it ends.
RENEW_EVERY_S = DEVICE_LEASE_S / 3
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


class BoardLimitMissing(RuntimeError):
    """The board's concurrency limit is not on the Prefect server."""


class BoardLeaseLost(RuntimeError):
    """The lease on the board's slot ended while the evaluation held it."""


logger = logging.getLogger(__name__)
#: The API client ``prepare_board`` opened for this process's next ``hold_board``.
_prepared: SyncPrefectClient | None = None


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
    With a server, the end of the block raises ``BoardLeaseLost`` when the slot's lease
    could not be renewed while the block ran (another run may have used the board).
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

    Each try is one request that fails at once when the slot is taken, so the wait is ours
    rather than the server's Retry-After. The slot is leased for DEVICE_LEASE_S, renewed
    in a thread while the block runs, and released before that thread is stopped: the
    next evaluation can take the board as soon as this one leaves it.
    """
    name = config.device.concurrency_limit
    deadline = time.monotonic() + config.device.wait_timeout_s
    with _api_client() as client:
        while (lease := _try_lease(client, name)) is None:
            if time.monotonic() >= deadline:
                raise BoardBusyError(
                    f"board {config.device.name!r} stayed busy for "
                    f"{config.device.wait_timeout_s:g} s (limit {name}): another study holds "
                    f"it, or a run killed while evaluating left it taken; if no study uses "
                    f"it, free it with: edgetune device release CONFIG"
                )
            time.sleep(PREFECT_POLL_S)
        renewal = _Renewal(lease, name)
        try:
            yield
        finally:
            renewal.stop.set()
            _release(client, lease, name)
            renewal.thread.join(timeout=5)
        if renewal.lost:
            raise BoardLeaseLost(renewal.lost)


def prepare_board(config: UsesBoard) -> None:
    """Ready this process to take the board's slot with a single request: its API client
    opened and connected ahead (a stage process runs this while its run is made RUNNING;
    the next ``hold_board`` uses that client). Nothing to do in embedded mode."""
    global _prepared
    if embedded() or _prepared is not None:
        return
    client = get_client(sync_client=True)
    client.__enter__()
    client.api_healthcheck()  # connects; an unreachable server is the stage's error later
    _prepared = client


@contextmanager
def _api_client() -> Iterator[SyncPrefectClient]:
    """The client ``prepare_board`` opened (once), else a new one; closed on exit."""
    global _prepared
    client, _prepared = _prepared, None
    if client is None:
        with get_client(sync_client=True) as client:
            yield client
        return
    try:
        yield client
    finally:
        client.__exit__(None, None, None)


def _try_lease(client: SyncPrefectClient, name: str) -> UUID | None:
    """The lease on the board's slot, or None when the slot is taken."""
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=DEVICE_LEASE_S
        )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == _LOCKED:
            return None
        raise
    granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
    if not granted.limits:
        raise BoardLimitMissing(
            f"the board's concurrency limit {name!r} does not exist on the Prefect server; "
            f"a study creates it when it starts: start the study again, or create it with: "
            f"prefect gcl create {name} --limit 1"
        )
    return granted.lease_id


def _release(client: SyncPrefectClient, lease: UUID, name: str) -> None:
    try:
        client.release_concurrency_slots_with_lease(lease)
    except Exception as exc:  # the evaluation is done; the lease frees the slot later
        logger.warning(
            "the board's slot (limit %s) was not released (%s); it frees itself when "
            "its lease ends, within %g s",
            name,
            _reason(exc),
            DEVICE_LEASE_S,
        )


class _Renewal:
    """A thread that renews a held lease every RENEW_EVERY_S until ``stop`` is set; retried
    every second after a failure. ``lost`` says why when the lease ran out anyway."""

    def __init__(self, lease: UUID, name: str) -> None:
        self.lease, self.name = lease, name
        self.stop = threading.Event()
        self.lost = ""
        context = contextvars.copy_context()  # the settings (the API's URL) with it
        self.thread = threading.Thread(
            target=context.run, args=(self._run,), name="board-lease", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        with ExitStack() as stack:
            client: SyncPrefectClient | None = None
            renewed = time.monotonic()
            wait = RENEW_EVERY_S
            while not self.stop.wait(wait):
                try:
                    if client is None:
                        client = stack.enter_context(get_client(sync_client=True))
                    client.renew_concurrency_lease(self.lease, DEVICE_LEASE_S)
                    renewed, wait = time.monotonic(), RENEW_EVERY_S
                except Exception as exc:
                    if self.stop.is_set():
                        return
                    if time.monotonic() - renewed >= DEVICE_LEASE_S or _gone(exc):
                        self.lost = (
                            f"the board's slot (limit {self.name}) was lost during the "
                            f"evaluation: its lease could not be renewed ({_reason(exc)}), so "
                            f"another run may have used the board meanwhile; the result is "
                            f"discarded"
                        )
                        logger.error(self.lost)
                        return
                    wait = 1.0


def _reason(exc: BaseException) -> str:
    """An API error in a few words: its status and the server's detail."""
    response = getattr(exc, "response", None)
    if response is None:
        return f"{type(exc).__name__}: {exc}"
    try:
        detail = response.json().get("detail", "")
    except Exception:
        detail = response.text[:200]
    return f"HTTP {response.status_code}: {detail}"


def _gone(exc: BaseException) -> bool:
    """The server no longer has the lease (it expired or was released): 404 or 410 Gone."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) in (404, 410)


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
