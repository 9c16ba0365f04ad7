"""The settlement writer: rows queued by requests are written in batches, each exactly once."""

from __future__ import annotations

import asyncio
import logging
import threading
from decimal import Decimal
from typing import Any

import pytest

from codex_gateway.billing import settler as settler_module
from codex_gateway.billing.settler import PACE_EVERY, PACE_SECONDS, Settler
from codex_gateway.store.queries import Settled, Store
from codex_gateway.store.thread import StoreThread
from tests.store.test_queries import new_user, usage_row

SEED_COST = Decimal("0.114295")


async def test_a_burst_of_rows_is_written_and_debited_exactly(store: Store) -> None:
    name, user_id = await new_user(store, "10")
    seen: list[tuple[str, Decimal | None]] = []
    settler = Settler(
        store,
        None,
        lambda row, _hold, result: seen.append((row["request_id"], result and result.consumed)),
    )
    settler.start()
    rows = [usage_row(user_id) for _ in range(25)]
    for row in rows:
        settler.submit(row)
    await settler.drain()

    for row in rows:
        assert await store.usage(row["request_id"]) is not None
    expected = Decimal("10") - 25 * SEED_COST
    assert seen == [(row["request_id"], Decimal(0)) for row in rows]
    assert (await store.balances())[user_id] == expected
    charges = [e for e in await store.ledger(name) if e["kind"] == "settle"]
    assert len(charges) == 25


async def test_a_request_settled_before_is_not_charged_again_and_the_batch_survives(
    store: Store,
) -> None:
    _, user_id = await new_user(store, "1")
    settled_before = usage_row(user_id)
    await store.settle(settled_before)
    fresh = usage_row(user_id)
    settler = Settler(store, None, lambda *_: None)
    settler.start()
    settler.submit(fresh)
    settler.submit(settled_before)
    await settler.drain()

    assert await store.usage(fresh["request_id"]) is not None
    assert (await store.balances())[user_id] == Decimal("1") - 2 * SEED_COST


async def test_drain_waits_for_rows_submitted_while_writing(store: Store) -> None:
    _, user_id = await new_user(store, "5")
    settler = Settler(store, None, lambda *_: None)
    settler.start()
    rows = [usage_row(user_id) for _ in range(3)]
    settler.submit(rows[0])
    await asyncio.sleep(0)
    settler.submit(rows[1])
    settler.submit(rows[2])
    await settler.drain()

    assert settler.pending == 0
    for row in rows:
        assert await store.usage(row["request_id"]) is not None


async def test_rows_the_database_refuses_are_handed_on_not_dropped(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settler_module, "RETRY_DELAYS", ())
    _, user_id = await new_user(store, "5")
    refused: list[str] = []
    settler = Settler(
        store, None, lambda *_settled: None, lambda row: refused.append(row["request_id"])
    )
    settler.start()
    orphan = usage_row(user_id + 10_000)  # no such user: the database refuses the debit
    settler.submit(orphan)
    await settler.drain()

    assert refused == [orphan["request_id"]]
    assert await store.usage(orphan["request_id"]) is None


async def test_abandon_hands_over_every_row_not_yet_written(store: Store) -> None:
    _, user_id = await new_user(store, "5")
    settler = Settler(store, None, lambda *_settled: None)
    rows = [usage_row(user_id) for _ in range(3)]
    for row in rows:
        settler.submit(row)

    abandoned = settler.abandon()

    assert [row["request_id"] for row in abandoned] == [row["request_id"] for row in rows]
    assert settler.pending == 0


async def test_rows_queued_for_a_store_thread_are_settled_on_that_thread(
    store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, user_id = await new_user(store, "5")
    threads: list[str] = []
    settle_many = Store.settle_many

    async def settle_many_noting_the_thread(
        self: Store, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]:
        threads.append(threading.current_thread().name)
        return await settle_many(self, records, holder)

    monkeypatch.setattr(Store, "settle_many", settle_many_noting_the_thread)
    writer = StoreThread(database_url, name="usage-writer-test")
    writer.start()
    seen: list[str] = []
    settler = Settler(writer, None, lambda row, _hold, _result: seen.append(row["request_id"]))
    settler.start()
    rows = [usage_row(user_id) for _ in range(5)]
    for row in rows:
        settler.submit(row)
    await settler.drain()
    await writer.close()

    assert threads and set(threads) == {"usage-writer-test"}
    assert seen == [row["request_id"] for row in rows]
    for row in rows:
        assert await store.usage(row["request_id"]) is not None


class GatedStore:
    """A real store whose writes wait for the test to open a gate, as a slow database's
    would, or are refused, as by a database that is away; `entered` is set once a write was
    tried."""

    def __init__(self, store: Store, refuse: bool = False):
        self.store = store
        self.refuse = refuse
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def settle_many(
        self, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]:
        self.entered.set()
        if self.refuse:
            raise OSError("the database is away")
        await self.gate.wait()
        return await self.store.settle_many(records, holder)


async def _behind(
    store: Store, rows: int, refuse: bool = False, told: list[bool] | None = None
) -> tuple[Settler, GatedStore]:
    """A settler writing one row behind a closed gate (or retrying it, with `refuse`), with
    `rows` more queued, and a limit of four rows behind; what it says of being behind goes to
    `told`."""
    _, user_id = await new_user(store, "5")
    gated = GatedStore(store, refuse)
    settler = Settler(
        gated,
        None,
        lambda *_settled: None,
        backlog_limit=4,
        on_behind=None if told is None else told.append,
    )
    settler.start()
    settler.submit(usage_row(user_id))
    await asyncio.wait_for(gated.entered.wait(), timeout=5)
    for _ in range(rows):
        settler.submit(usage_row(user_id))
    return settler, gated


async def test_keeping_up_costs_nothing_while_the_writer_is_near(store: Store) -> None:
    told: list[bool] = []
    settler, gated = await _behind(store, 4, told=told)

    assert await asyncio.wait_for(settler.keep_up(), timeout=0.01) is False
    assert told == []

    gated.gate.set()
    await settler.drain()


async def _paced(settler: Settler, calls: int) -> list[float]:
    """How long each of `calls` requests that waited a while for the writer waited."""
    loop = asyncio.get_running_loop()
    waited = []
    for _ in range(calls):
        started = loop.time()
        assert await settler.keep_up() is False  # a pause is no wait for the writer
        if loop.time() - started >= PACE_SECONDS * 0.9:
            waited.append(loop.time() - started)
    return waited


async def test_a_low_priority_writer_falling_behind_gets_a_pause_every_few_dozen_requests(
    store: Store,
) -> None:
    _, user_id = await new_user(store, "5")
    gated = GatedStore(store)
    told: list[bool] = []
    paces: list[int] = []
    settler = Settler(
        gated,
        None,
        lambda *_settled: None,
        backlog_limit=40,
        on_behind=told.append,
        on_pace=lambda: paces.append(1),
    )
    settler.start()
    settler.submit(usage_row(user_id))
    await asyncio.wait_for(gated.entered.wait(), timeout=5)
    for _ in range(10):  # a quarter of the limit behind: nobody is paced
        settler.submit(usage_row(user_id))
    assert await _paced(settler, 2 * PACE_EVERY) == []

    settler.submit(usage_row(user_id))  # one row more
    assert len(await _paced(settler, 2 * PACE_EVERY)) == 2  # one request in PACE_EVERY
    assert (len(paces), told) == (2, [])
    gated.gate.set()
    await settler.drain()


async def test_nobody_is_paced_for_a_writer_at_ordinary_priority_or_one_retrying(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settler, gated = await _behind(store, 3)  # three rows behind a limit of four
    assert await _paced(settler, 2 * PACE_EVERY) == []
    gated.gate.set()
    await settler.drain()

    monkeypatch.setattr(settler_module, "RETRY_DELAYS", (0.5,))
    _, user_id = await new_user(store, "5")
    refusing = GatedStore(store, refuse=True)
    paces: list[int] = []
    retrying = Settler(
        refusing, None, lambda *_: None, backlog_limit=4, on_pace=lambda: paces.append(1)
    )
    retrying.start()
    retrying.submit(usage_row(user_id))
    await asyncio.wait_for(refusing.entered.wait(), timeout=5)
    for _ in range(3):  # three rows behind a limit of four
        retrying.submit(usage_row(user_id))
    await asyncio.sleep(0.05)  # the first try failed: the writer waits to try again
    assert await _paced(retrying, 2 * PACE_EVERY) == [] and paces == []
    retrying.abandon()
    await retrying.drain()


async def _waiting(
    store: Store, monkeypatch: pytest.MonkeyPatch, told: list[bool] | None = None
) -> tuple[Settler, GatedStore, asyncio.Task[bool]]:
    """A request waiting for a writer ten rows too far behind, with a wait far longer than
    the test: only the writer catching up, or its rows being handed over, can end it."""
    monkeypatch.setattr(settler_module, "BACKLOG_WAIT_SECONDS", 60)
    settler, gated = await _behind(store, 10, told=told)
    waiting = asyncio.create_task(settler.keep_up())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    return settler, gated, waiting


async def test_requests_wait_while_the_writer_is_far_behind_until_it_catches_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[bool] = []
    settler, gated, waiting = await _waiting(store, monkeypatch, told)
    second = asyncio.create_task(settler.keep_up())
    await asyncio.sleep(0.05)
    assert told == [True]  # said once, however many requests wait

    gated.gate.set()

    assert await asyncio.wait_for(waiting, timeout=10) is True
    assert await asyncio.wait_for(second, timeout=10) is True
    assert settler.pending <= 2
    assert told == [True, False]
    await settler.drain()
    assert settler.pending == 0


async def test_a_writer_that_hangs_holds_requests_up_only_for_a_while(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settler_module, "BACKLOG_WAIT_SECONDS", 0.2)
    settler, gated = await _behind(store, 10)

    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(settler.keep_up(), timeout=5) is True
    waited = asyncio.get_running_loop().time() - started

    assert waited >= 0.2
    assert settler.pending == 10
    # Until the writer is done with a batch, nobody waits for it again.
    assert await asyncio.wait_for(settler.keep_up(), timeout=0.05) is False
    gated.gate.set()
    await settler.drain()


async def test_nobody_waits_for_a_writer_that_is_retrying_a_failed_write(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settler_module, "BACKLOG_WAIT_SECONDS", 60)
    monkeypatch.setattr(settler_module, "RETRY_DELAYS", (0.5,))
    settler, _ = await _behind(store, 10, refuse=True)

    assert await asyncio.wait_for(settler.keep_up(), timeout=1) is False
    assert len(settler.abandon()) == 11
    await settler.drain()  # stops the writer in its pause before the next try


async def test_waiting_requests_are_let_go_when_the_rows_are_handed_over(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settler, gated, waiting = await _waiting(store, monkeypatch)

    assert len(settler.abandon()) == 11

    assert await asyncio.wait_for(waiting, timeout=5) is True
    gated.gate.set()
    await settler.drain()


class _WritesAll:
    """A store that writes every row at once, for how the rows are reported afterwards."""

    async def settle_many(
        self, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]:
        return [Settled(record["id"], None, None) for record in records]


async def test_a_large_batch_is_reported_in_slices_with_the_loop_turning_between() -> None:
    reported: list[str] = []
    settler = Settler(_WritesAll(), None, lambda row, _hold, _result: reported.append(row["id"]))
    rows = [{"id": str(number)} for number in range(3 * settler_module.REPORT_SLICE + 5)]
    for row in rows:
        settler.submit(row)
    seen_between: list[int] = []

    def watch() -> None:
        seen_between.append(len(reported))
        if len(reported) < len(rows):
            asyncio.get_running_loop().call_soon(watch)

    settler.start()
    asyncio.get_running_loop().call_soon(watch)
    await settler.drain()

    assert reported == [row["id"] for row in rows]
    # The loop ran other callbacks after each slice, not only before and after the batch.
    slices = {count for count in seen_between if 0 < count < len(rows)}
    assert slices == {settler_module.REPORT_SLICE * n for n in (1, 2, 3)}


async def test_a_row_waiting_for_others_to_join_its_batch_is_handed_over_by_abandon(
    store: Store,
) -> None:
    _, user_id = await new_user(store, "5")
    written: list[str] = []
    settler = Settler(store, None, lambda row, _hold, _result: written.append(row["request_id"]))
    settler.start()
    row = usage_row(user_id)
    settler.submit(row)
    await asyncio.sleep(settler_module.WRITE_LINGER_SECONDS / 4)  # taken, not yet written

    assert [handed["request_id"] for handed in settler.abandon()] == [row["request_id"]]
    await settler.drain()
    # The writer still writes it; replaying the spool then finds it written and skips it.
    assert written == [row["request_id"]]
    assert await store.usage(row["request_id"]) is not None


class _DropsOnce:
    """A real store whose first write fails as when the server ends the connection, with
    a message of several lines that quotes the database URL, password and all."""

    def __init__(self, store: Store):
        self.store = store
        self.tries = 0

    async def settle_many(
        self, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]:
        self.tries += 1
        if self.tries == 1:
            raise ConnectionResetError(
                "connection to postgresql://cg:hunter2@127.0.0.1:5432/cg_usage was closed\n"
                "[SQL: INSERT INTO usage ...]"
            )
        return await self.store.settle_many(records, holder)


async def test_a_dropped_connection_is_one_warning_line_naming_the_error(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(settler_module, "RETRY_DELAYS", (0.01,))
    _, user_id = await new_user(store, "5")
    written: list[str] = []
    flaky = _DropsOnce(store)
    settler = Settler(flaky, None, lambda row, _hold, _result: written.append(row["request_id"]))
    row = usage_row(user_id)
    settler.submit(row)

    with caplog.at_level(logging.WARNING, logger=settler_module.log.name):
        settler.start()
        await settler.drain()

    assert flaky.tries == 2 and written == [row["request_id"]]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelno, r.exc_info) for r in warnings] == [(logging.WARNING, None)]
    assert warnings[0].getMessage() == (
        "usage write failed (ConnectionResetError: connection to "
        "postgresql://cg:***@127.0.0.1:5432/cg_usage was closed); retrying in 0.0s"
    )
