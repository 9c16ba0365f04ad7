"""A store on a thread of its own, for the usage writer.

A batch of usage rows takes several statements, and each waits for its answer. On the
request loop every one of those waits lasts until the loop comes round again, which under
load is a whole pass over every busy request: a batch took a hundred milliseconds at 3,500
requests a second and the rows queued faster than they were written. Here the statements
run on a second event loop, with an engine of its own, and the request loop waits once per
batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import uvloop

from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import Settled, Store

T = TypeVar("T")


class StoreThread:
    """`settle_many` of a `Store` on its own engine and event loop, on a daemon thread."""

    def __init__(self, database_url: str, name: str = "usage-writer"):
        self._url = database_url
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: Store | None = None

    def start(self) -> None:
        loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
        self._thread.start()
        self._loop = loop
        self._store = self._call(self._open).result()

    async def _open(self) -> Store:
        return Store(create_engine(self._url))

    def _call(self, make: Callable[[], Awaitable[T]]) -> Future[T]:
        assert self._loop is not None, "the store thread has not started"

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    async def settle_many(
        self, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]:
        store = self._store
        assert store is not None, "the store thread has not started"
        return await asyncio.wrap_future(self._call(lambda: store.settle_many(records, holder)))

    async def close(self) -> None:
        """Close the engine, stop the loop and wait for the thread."""
        if self._loop is None or self._store is None:
            return
        store, loop, thread = self._store, self._loop, self._thread
        self._store = None
        await asyncio.wrap_future(self._call(store.engine.dispose))
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            await asyncio.to_thread(thread.join)
        loop.close()
        self._loop = None
