"""The usage writer's store on a thread of its own: same statements, same exactness."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from codex_gateway.app import Gateway
from codex_gateway.config import Settings
from codex_gateway.http.server import SWITCH_INTERVAL_SECONDS
from codex_gateway.store.queries import Store
from codex_gateway.store.thread import WRITER_NICENESS, StoreThread
from tests.store.test_queries import new_user, usage_row

SEED_COST = Decimal("0.114295")


async def test_rows_settled_on_the_thread_are_written_and_debited_once(
    store: Store, database_url: str
) -> None:
    name, user_id = await new_user(store, "10")
    rows = [usage_row(user_id) for _ in range(20)]
    writer = StoreThread(database_url)
    writer.start()
    try:
        first = await writer.settle_many(rows[:15])
        again = await writer.settle_many(rows[10:])
    finally:
        await writer.close()

    assert [s.balance for s in first][-1] == Decimal("10") - 15 * SEED_COST
    # The five already written are not charged again; the other five are.
    assert [s.balance is None for s in again] == [True] * 5 + [False] * 5
    assert (await store.balances())[user_id] == Decimal("10") - 20 * SEED_COST
    settles = [e for e in await store.ledger(name) if e["kind"] == "settle"]
    assert len(settles) == 20


async def test_a_batch_is_written_while_the_request_loop_is_busy(
    store: Store, database_url: str
) -> None:
    """Sixty-four tasks keep this loop busy, as requests would (work, then a wait); the
    batch's statements run on the writer's own loop and the batch is written meanwhile."""
    _, user_id = await new_user(store, "100")
    # As `serve` runs it (codex_gateway/http/server.py).
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            sum(range(2_000))
            await asyncio.sleep(0.001)

    workers = [asyncio.create_task(busy()) for _ in range(64)]
    writer = StoreThread(database_url)
    writer.start()
    try:
        settled = await asyncio.wait_for(
            writer.settle_many([usage_row(user_id) for _ in range(200)]), timeout=30
        )
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await writer.close()
        sys.setswitchinterval(previous)

    assert len(settled) == 200
    assert (await store.balances())[user_id] == Decimal("100") - 200 * SEED_COST


def writer_threads(name: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == name)


async def test_closing_a_writer_that_never_started_does_nothing(database_url: str) -> None:
    writer = StoreThread(database_url, name="usage-writer-idle")

    await writer.close()

    assert writer_threads("usage-writer-idle") == 0
    with pytest.raises(RuntimeError, match="not started"):
        await writer.settle_many([])


async def test_a_writer_starts_once_and_its_thread_ends_with_close(database_url: str) -> None:
    writer = StoreThread(database_url, name="usage-writer-once")
    writer.start()
    assert writer_threads("usage-writer-once") == 1

    with pytest.raises(RuntimeError, match="already started"):
        writer.start()
    await writer.close()

    assert writer_threads("usage-writer-once") == 0


def test_a_writer_whose_database_cannot_be_opened_leaves_no_thread_behind() -> None:
    writer = StoreThread("nosuchdriver://127.0.0.1/none", name="usage-writer-broken")

    with pytest.raises(Exception, match="nosuchdriver"):
        writer.start()

    assert writer_threads("usage-writer-broken") == 0


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is Linux's")
@pytest.mark.parametrize("lowered", [True, False])
async def test_a_lowered_writer_runs_at_the_lowest_priority_and_the_requests_keep_theirs(
    database_url: str, lowered: bool
) -> None:
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if ours == WRITER_NICENESS:
        pytest.skip("the tests themselves run at the lowest priority")
    writer = StoreThread(database_url, name="usage-writer-nice", lowered=lowered)
    writer.start()
    try:
        thread = next(t for t in threading.enumerate() if t.name == "usage-writer-nice")
        assert thread.native_id is not None
        expected = WRITER_NICENESS if lowered else ours
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == expected
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ours
    finally:
        await writer.close()


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is Linux's")
@pytest.mark.parametrize("alone", [True, False])
async def test_only_the_single_worker_of_a_serve_lowers_its_sqlite_writer(
    database_url: str, tmp_path: Path, alone: bool
) -> None:
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if ours == WRITER_NICENESS:
        pytest.skip("the tests themselves run at the lowest priority")
    settings = Settings(database_url=database_url, spool_path=str(tmp_path / "spool.jsonl"))
    gateway = Gateway(settings, alone=alone)
    assert gateway.writer is not None
    gateway.writer.start()
    try:
        thread = next(t for t in threading.enumerate() if t.name == "usage-writer")
        assert thread.native_id is not None
        lowered = alone and database_url.startswith("sqlite")
        expected = WRITER_NICENESS if lowered else ours
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == expected
    finally:
        await gateway.writer.close()
        await gateway.engine.dispose()
