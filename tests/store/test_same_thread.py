"""SQLite calls on the calling thread, as the usage writer's engine makes them."""

from __future__ import annotations

import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from codex_gateway.store.db import create_engine, migrate
from codex_gateway.store.queries import Store
from codex_gateway.store.same_thread import connector
from codex_gateway.store.thread import StoreThread
from tests.store.test_queries import new_user, usage_row

SEED_COST = Decimal("0.114295")


def driver_threads() -> int:
    """aiosqlite's threads, one per connection it has open."""
    return sum("_connection_worker_thread" in thread.name for thread in threading.enumerate())


async def test_statements_run_on_the_thread_that_awaits_them(tmp_path: Path) -> None:
    connection = await connector(str(tmp_path / "calls.db"))()
    try:
        await connection.create_function("caller", 0, threading.get_ident)
        async with connection.execute("SELECT caller()") as cursor:
            assert await cursor.fetchone() == (threading.get_ident(),)
        assert driver_threads() == 0
    finally:
        await connection.close()


async def test_errors_reach_the_caller_and_a_closed_connection_refuses_calls(
    tmp_path: Path,
) -> None:
    connection = await connector(str(tmp_path / "errors.db"))()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await connection.execute("SELECT * FROM missing")
    await connection.close()
    with pytest.raises(ValueError, match="no active connection"):
        await connection.execute("SELECT 1")


async def test_a_connection_left_to_another_thread_closes_there(tmp_path: Path) -> None:
    """SQLAlchemy's pool or the garbage collector may be the one to close a connection."""
    connection = await connector(str(tmp_path / "left.db"), check_same_thread=False)()
    errors: list[BaseException] = []

    def close_elsewhere() -> None:
        try:
            connection.stop()
        except BaseException as exc:
            errors.append(exc)

    closer = threading.Thread(target=close_elsewhere)
    closer.start()
    closer.join()
    assert errors == []
    with pytest.raises(ValueError, match="no active connection"):
        await connection.execute("SELECT 1")


@pytest.mark.parametrize("query", ["", "?timeout=5"])
async def test_the_writer_on_sqlite_settles_exactly_once_without_driver_threads(
    tmp_path: Path, query: str
) -> None:
    # The writer opens the file the gateway's own engine opens, options or none.
    url = f"sqlite:///{tmp_path}/gateway.db{query}"
    engine = create_engine(url)
    await migrate(engine)
    store = Store(engine)
    try:
        _, user_id = await new_user(store, "10")
        rows = [usage_row(user_id) for _ in range(12)]
        before = driver_threads()
        writer = StoreThread(url)
        writer.start()
        try:
            first = await writer.settle_many(rows[:8])
            # Four repeats roll the batch back; each row is then settled on its own.
            again = await writer.settle_many(rows[4:])
            # The writer's pooled connection is open, and started no thread of its own.
            assert driver_threads() == before
        finally:
            await writer.close()
        assert [s.balance is None for s in first] == [False] * 8
        assert [s.balance is None for s in again] == [True] * 4 + [False] * 4
        assert (await store.balances())[user_id] == Decimal("10") - 12 * SEED_COST
    finally:
        await engine.dispose()
