"""A store on a thread of its own, for the usage writer and for growing balance leases.

Settling a batch takes several statements, each waiting for its answer. On a busy request
loop every such wait lasts until the loop has been round all its ready requests, so bills
can be queued faster than they are written. Here the statements run on a second event loop
with an engine of its own, and the request loop waits once per batch. On SQLite that engine's
connections make their calls on this thread (`same_thread.py`).

A lease grant is half a dozen statements too, and the requests that found their lease empty
wait for it; a gateway grows its leases on a thread of its own (`Gateway`), at ordinary
priority, so that the request loop waits once per grant, not once per statement.

A writer made with `lowered` runs at the lowest priority: where it may, only when its core has
nothing else to do, and at the lowest ordinary priority while it is behind (`_run`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from decimal import Decimal
from typing import Any, TypeVar

import uvloop

from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import LeaseScope, Settled, Store

log = logging.getLogger(__name__)

T = TypeVar("T")
# The writer takes one connection at a time, and one more when a batch falls back to
# settling its rows one by one.
POOL_SIZE = 1
MAX_OVERFLOW = 1
# Grants for different users and keys run side by side on a server database.
GRANTS_POOL_SIZE = 4
START_TIMEOUT_SECONDS = 30.0
# The writer's nice value: the lowest priority of the ordinary policy, which a lowered
# writer has while it is behind.
WRITER_NICENESS = 19


class StoreThread:
    """`settle_many` and `acquire_lease` of a `Store` on its own engine and event loop, on a
    daemon thread; `pool_size` connections on a server database, and one more at a pinch."""

    def __init__(
        self,
        database_url: str,
        name: str = "usage-writer",
        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
        lowered: bool = False,
        pool_size: int = POOL_SIZE,
    ):
        self._url = database_url
        self._pool_size = pool_size
        self._lowered = lowered
        # Whether the writer has the idle policy while it keeps up (set by `start`).
        self._idle = False
        self._name = name
        self._new_loop = new_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: Store | None = None

    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("the store thread has already started")
        self._idle = self._lowered and may_leave_idle()
        loop = self._new_loop()
        thread = threading.Thread(
            target=_run, args=(loop, self._lowered, self._idle), name=self._name, daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._store = self._call(self._open).result(START_TIMEOUT_SECONDS)
        except BaseException:
            self._stop_loop()
            raise

    async def _open(self) -> Store:
        engine = create_engine(
            self._url, pool_size=self._pool_size, max_overflow=MAX_OVERFLOW, same_thread=True
        )
        return Store(engine)

    def _call(self, make: Callable[[], Awaitable[T]]) -> Future[T]:
        if self._loop is None:
            raise RuntimeError("the store thread has not started")

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def behind(self, behind: bool) -> None:
        """A lowered writer that is behind (`Settler.keep_up` makes requests wait for it) takes
        its turns like any other thread, at the lowest priority, until it has caught up."""
        thread = self._thread
        if self._idle and thread is not None and thread.native_id is not None:
            # A policy that could not be changed (logged once) is left as it is from then on.
            self._idle = _lower(thread.native_id, idle=not behind)

    async def settle_many(
        self, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]:
        return await self._on_thread(lambda store: store.settle_many(records, holder))

    async def acquire_lease(
        self,
        owner_id: int,
        holder: str,
        needed: Decimal,
        wanted: Decimal,
        scope: LeaseScope | None = None,
    ) -> Decimal:
        """`Store.acquire_lease`, its statements run on this thread."""
        return await self._on_thread(
            lambda store: store.acquire_lease(owner_id, holder, needed, wanted, scope)
        )

    async def _on_thread(self, call: Callable[[Store], Awaitable[T]]) -> T:
        store = self._store
        if store is None:
            raise RuntimeError("the store thread has not started")
        return await asyncio.wrap_future(self._call(lambda: call(store)))

    async def close(self) -> None:
        """Close the engine, stop the loop and wait for the thread."""
        store, self._store = self._store, None
        try:
            if store is not None:
                await asyncio.wrap_future(self._call(store.engine.dispose))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        """Stop the loop and wait for its thread, which ends as soon as the loop does."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join()
        loop.close()


def _run(loop: asyncio.AbstractEventLoop, lowered: bool, idle: bool) -> None:
    """Run `loop` on this thread, lowered first if asked: to the lowest nice value, and with
    `idle` to the idle policy too.

    SQLite does much of a batch's work without the interpreter lock. On a core it shares with
    the request loop, that work would keep the core for the rest of its time slice, a few
    milliseconds, while an answer that has come in waits for the loop. Under the idle policy
    the scheduler hands the core to the loop the moment it wakes, and the writer has the time
    the loop leaves idle; `Settler.keep_up` makes a loop that never idles leave some, and the
    writer meanwhile takes ordinary turns at the lowest nice value (`StoreThread.behind`).
    A lowered thread that holds the interpreter lock while other processes keep the core busy
    holds up its own request loop, and more so under the idle policy (about a fifth of the
    share a thread at nice 19 gets), so only the single worker of a `serve` lowers it.
    """
    if lowered:
        _lower(threading.get_native_id(), idle=idle)
    loop.run_forever()


def may_leave_idle() -> bool:
    """Whether a thread at WRITER_NICENESS under the idle policy may take the ordinary policy
    back, as the writer does when it falls behind: tried on a short-lived thread of its own.
    An unprivileged user whose RLIMIT_NICE is 0 (the container image's) may not."""
    if sys.platform != "linux":
        return False
    allowed: list[bool] = []

    def probe() -> None:
        native_id = threading.get_native_id()
        try:
            _set_policy(native_id, idle=True)
            _set_policy(native_id, idle=False)
        except OSError:
            allowed.append(False)
        else:
            allowed.append(True)

    thread = threading.Thread(target=probe, name="usage-writer-probe", daemon=True)
    thread.start()
    thread.join()
    return allowed == [True]


def _lower(native_id: int, idle: bool) -> bool:
    """Lower one thread to WRITER_NICENESS, under the idle policy or the ordinary one, where
    these apply to one thread (Linux; elsewhere they would apply to the whole process).
    Whether that could be done."""
    if sys.platform != "linux":
        return False
    try:
        _set_policy(native_id, idle)
    except OSError as exc:
        log.warning("the usage writer keeps its priority: %s", exc)
        return False
    return True


def _set_policy(native_id: int, idle: bool) -> None:
    """WRITER_NICENESS under the idle policy or the ordinary one; OSError where not allowed."""
    if idle:
        os.setpriority(os.PRIO_PROCESS, native_id, WRITER_NICENESS)
        os.sched_setscheduler(native_id, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.sched_setscheduler(native_id, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, native_id, WRITER_NICENESS)
