"""SQLite calls made on the calling thread, for an event loop that has nothing else to do.

SQLAlchemy's async SQLite driver, aiosqlite, hands every call (each statement, fetch, commit)
to a thread of its own and waits for the answer through the event loop: for the usage
writer's batches, eighteen such round trips each, that was a fixed cost of a few
milliseconds of CPU per batch, and the threads took turns at the interpreter with the
request loop. The usage writer runs its own event loop on a thread of its own
(`store/thread.py`), where a call that blocks holds up nothing else, so its connections make
the calls at once instead. `sqlite3` lets go of the interpreter while SQLite works, as it
does on aiosqlite's thread.

`SameThreadConnection` keeps aiosqlite's interface, which SQLAlchemy's driver adapter calls;
the adapter also queues calls on the connection's `_tx` queue directly, so that queue runs
what it is given at once too.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import aiosqlite


class _RunAtOnce:
    """Stands in for aiosqlite's queue to its thread: runs each call as it is queued."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:
            if future is not None:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)


class SameThreadConnection(aiosqlite.Connection):
    """An aiosqlite connection whose calls run on the thread that awaits them."""

    def __init__(self, connector: Callable[[], sqlite3.Connection]):
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _RunAtOnce()  # type: ignore[assignment]

    def __await__(self) -> Generator[Any, None, aiosqlite.Connection]:
        return self._connect().__await__()

    async def _connect(self) -> aiosqlite.Connection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    def stop(self) -> asyncio.Future[Any] | None:
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        return None


def connector(database: str, **options: Any) -> Callable[[], Awaitable[SameThreadConnection]]:
    """What `create_async_engine(async_creator=...)` calls for each new connection:
    `sqlite3.connect(database, **options)`, with autocommit left to SQLAlchemy's BEGIN."""

    async def connect() -> SameThreadConnection:
        opened = functools.partial(sqlite3.connect, database, **options, isolation_level=None)
        connection = SameThreadConnection(opened)
        await connection
        return connection

    return connect
