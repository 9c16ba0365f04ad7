"""A store on a thread of its own, for the usage writer.

Settling a batch takes several statements, each waiting for its answer. On a busy request
loop every such wait lasts until the loop has been round all its ready requests, so bills
can be queued faster than they are written. Here the statements run on a second event loop
with an engine of its own, and the request loop waits once per batch. On SQLite that engine's
connections make their calls on this thread (`same_thread.py`).

A writer made with `lowered` runs at the lowest CPU priority (`_run`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import uvloop

from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import Settled, Store

log = logging.getLogger(__name__)

T = TypeVar("T")
# The writer takes one connection at a time, and one more when a batch falls back to
# settling its rows one by one.
POOL_SIZE = 1
MAX_OVERFLOW = 1
START_TIMEOUT_SECONDS = 30.0
# The writer's nice value: the lowest priority there is.
WRITER_NICENESS = 19


class StoreThread:
    """`settle_many` of a `Store` on its own engine and event loop, on a daemon thread."""

    def __init__(
        self,
        database_url: str,
        name: str = "usage-writer",
        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
        lowered: bool = False,
    ):
        self._url = database_url
        self._lowered = lowered
        self._name = name
        self._new_loop = new_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: Store | None = None

    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("the store thread has already started")
        loop = self._new_loop()
        thread = threading.Thread(
            target=_run, args=(loop, self._lowered), name=self._name, daemon=True
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
            self._url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, same_thread=True
        )
        return Store(engine)

    def _call(self, make: Callable[[], Awaitable[T]]) -> Future[T]:
        if self._loop is None:
            raise RuntimeError("the store thread has not started")

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    async def settle_many(
        self, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]:
        store = self._store
        if store is None:
            raise RuntimeError("the store thread has not started")
        return await asyncio.wrap_future(self._call(lambda: store.settle_many(records, holder)))

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


def _run(loop: asyncio.AbstractEventLoop, lowered: bool) -> None:
    """Run `loop` on this thread, first lowering the thread's priority if asked, where a
    priority applies to one thread (Linux; elsewhere it would lower the whole process).

    SQLite does much of a batch's work without the interpreter lock. Sharing a core with the
    request loop at the same priority, that work runs out its time slice, a few milliseconds,
    before the loop wakes to an answer that has come in; lowered, it gives way at once and
    has the time the loop leaves idle (`Settler.keep_up` makes the loop leave some). A
    lowered thread that holds the interpreter lock while other processes keep the core busy
    holds up its own request loop, so only the single worker of a `serve` lowers it.
    """
    if lowered and sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        except OSError as exc:
            log.warning("the usage writer keeps its priority: %s", exc)
    loop.run_forever()
