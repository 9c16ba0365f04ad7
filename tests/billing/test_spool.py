"""The spool keeps usage rows the database could not take, exactly, until they are replayed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from codex_gateway.billing import spool as spool_module
from codex_gateway.billing.settlement import Outcome, bill
from codex_gateway.billing.spool import Spool
from codex_gateway.store.db import create_engine, migrate
from codex_gateway.store.queries import Store
from tests.billing.cases import LIST_TABLE as PRICES

USAGE = {
    "input_tokens": 11771,
    "input_tokens_details": {"cached_tokens": 11465},
    "output_tokens": 306,
    "output_tokens_details": {"reasoning_tokens": 192},
}


def usage_row(request_id: str, user_id: int | None = None) -> dict[str, Any]:
    price = PRICES.resolve("gpt-5.1-codex")
    assert price is not None
    outcome = Outcome(
        request_id=request_id,
        started_at=datetime(2026, 12, 4, 16, 0, 0, 123456, tzinfo=UTC),
        started=0.0,
        endpoint="responses",
        model="gpt-5.1-codex",
        stream=True,
        price=price,
        user_id=user_id,
        usage=USAGE,
        usage_reported=True,
    )
    return bill(outcome, PRICES)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    engine = create_engine(f"sqlite:///{tmp_path}/gateway.db")
    try:
        await migrate(engine)
        yield Store(engine)
    finally:
        await engine.dispose()


def test_a_spooled_row_reads_back_equal_with_exact_money_and_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool" / "unsettled.jsonl")
    row = usage_row("req_a")

    spool.append(row)

    assert spool.rows() == [row]
    assert isinstance(spool.rows()[0]["cost_usd"], Decimal)
    assert spool.rows()[0]["cost_usd"] == Decimal("0.004875625")


def test_a_line_cut_off_by_a_crash_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "unsettled.jsonl")
    spool.append(usage_row("req_a"))
    with spool.path.open("ab") as handle:
        handle.write(b'{"request_id": "req_cut", "cost_')
    with spool.path.open("ab") as handle:
        handle.write(b"\n")
    spool.append(usage_row("req_b"))

    assert [row["request_id"] for row in spool.rows()] == ["req_a", "req_b"]


async def test_a_line_that_is_not_a_row_is_kept_beside_the_spool_after_replay(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "unsettled.jsonl")
    spool.append(usage_row("req_a"))
    with spool.path.open("ab") as handle:
        handle.write(b'{"request_id": "req_cut", "cost_\n')
    settled: list[str] = []

    async def record(rows: list[dict[str, Any]]) -> None:
        settled.extend(row["request_id"] for row in rows)

    assert await spool.replay(record) == 1
    assert settled == ["req_a"]
    assert not spool.path.exists()
    rejected = tmp_path / "unsettled.jsonl.rejected"
    assert rejected.read_bytes() == b'{"request_id": "req_cut", "cost_\n'


async def test_replay_settles_each_row_once_and_empties_the_spool(
    tmp_path: Path, store: Store
) -> None:
    await store.create_user("alice", Decimal("1"))
    user_id = (await store.list_users())[0]["id"]
    spool = Spool(tmp_path / "unsettled.jsonl")
    already = usage_row("req_settled_before", user_id)
    await store.settle(already)
    spool.append(already)
    spool.append(usage_row("req_only_spooled", user_id))

    replayed = await spool.replay(store.settle_many)
    again = await spool.replay(store.settle_many)

    assert (replayed, again) == (2, 0)
    assert not spool.path.exists()
    assert await store.count_usage() == 2
    assert (await store.balances())[user_id] == Decimal("1") - 2 * Decimal("0.004875625")


async def test_a_replay_settles_its_own_database_rows_and_keeps_the_others(
    tmp_path: Path, store: Store
) -> None:
    """Gateways of two databases sharing a spool file: each replays only its own rows."""
    await store.create_user("carol", Decimal("1"))
    user_id = (await store.list_users())[0]["id"]
    path = tmp_path / "unsettled.jsonl"
    Spool(path, "a83d1c07e6f24b95").append(usage_row("req_of_the_other", user_id))
    ours = Spool(path, "5f0c3a9e2b7d4e61")
    ours.append(usage_row("req_of_ours", user_id))

    assert await ours.replay(store.settle_many) == 1

    assert await store.usage("req_of_ours") is not None
    assert await store.usage("req_of_the_other") is None
    assert (await store.balances())[user_id] == Decimal("1") - Decimal("0.004875625")
    theirs = Spool(path, "a83d1c07e6f24b95")
    assert [row["request_id"] for row in theirs.rows()] == ["req_of_the_other"]
    assert ours.rows() == []


async def test_a_row_spooled_before_rows_named_their_database_is_replayed_and_kept_as_written(
    tmp_path: Path, store: Store
) -> None:
    await store.create_user("dan", Decimal("1"))
    user_id = (await store.list_users())[0]["id"]
    path = tmp_path / "unsettled.jsonl"
    ours = Spool(path, "5f0c3a9e2b7d4e61")
    Spool(path).append(usage_row("req_untagged_good", user_id))
    Spool(path).append(usage_row("req_untagged_refused", user_id + 1000))
    ours.append(usage_row("req_ours_refused", user_id + 1000))
    refused = path.read_bytes().splitlines()[1:]

    assert await ours.replay(store.settle_many) == 1

    assert await store.usage("req_untagged_good") is not None
    # Refused rows stay as they were written: an untagged one may be another database's, and
    # ours keeps its name.
    assert path.read_bytes().splitlines() == refused
    assert b"5f0c3a9e2b7d4e61" in refused[1]


async def test_a_replay_that_settles_nothing_leaves_the_file_untouched(
    tmp_path: Path, store: Store
) -> None:
    path = tmp_path / "unsettled.jsonl"
    Spool(path, "a83d1c07e6f24b95").append(usage_row("req_of_theirs"))
    before = path.stat()

    assert await Spool(path, "5f0c3a9e2b7d4e61").replay(store.settle_many) == 0

    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


async def test_a_row_the_database_refuses_stays_spooled_and_the_rest_are_settled(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await store.create_user("bob", Decimal("1"))
    user_id = (await store.list_users())[0]["id"]
    spool = Spool(tmp_path / "unsettled.jsonl")
    spool.append(usage_row("req_for_a_missing_user", user_id + 1000))
    spool.append(usage_row("req_good", user_id))

    with caplog.at_level(logging.INFO, logger="codex_gateway.billing.spool"):
        replayed = await spool.replay(store.settle_many)

    assert replayed == 1
    assert [row["request_id"] for row in spool.rows()] == ["req_for_a_missing_user"]
    assert await store.usage("req_good") is not None
    # One line each, naming what the database said; the traceback only at DEBUG.
    kept = [record for record in caplog.records if "still not settled" in record.getMessage()]
    assert [record.levelno for record in kept] == [logging.ERROR]
    assert "(NoResultFound: " in kept[0].getMessage()  # the user it names is not there
    assert all(record.exc_info is None for record in caplog.records)


async def test_a_second_replay_leaves_the_spool_to_the_first_and_appends_go_on(
    tmp_path: Path,
) -> None:
    # Two workers share one spool: while one replays (waiting on the database), the other's
    # replay finds it busy, and a row the other spools meanwhile is kept for the next replay.
    first, second = Spool(tmp_path / "unsettled.jsonl"), Spool(tmp_path / "unsettled.jsonl")
    first.append(usage_row("req_spooled_first"))
    settling = asyncio.Event()
    release = asyncio.Event()
    settled: list[str] = []

    async def slow_settle(rows: list[dict[str, Any]]) -> None:
        settling.set()
        await release.wait()
        settled.extend(row["request_id"] for row in rows)

    async def record(rows: list[dict[str, Any]]) -> None:
        settled.extend(row["request_id"] for row in rows)

    replay = asyncio.create_task(first.replay(slow_settle))
    await settling.wait()
    busy = await second.replay(record)
    second.append(usage_row("req_spooled_during_replay"))
    release.set()

    assert (await replay, busy) == (1, 0)
    assert settled == ["req_spooled_first"]
    assert [row["request_id"] for row in first.rows()] == ["req_spooled_during_replay"]
    assert await second.replay(record) == 1
    assert not first.path.exists()


async def _small_batches(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, Spool]:
    """A user with $1 and an empty spool that replays four rows a batch."""
    monkeypatch.setattr(spool_module, "REPLAY_BATCH", 4)
    await store.create_user("alice", Decimal("1"))
    user_id: int = (await store.list_users())[0]["id"]
    return user_id, Spool(tmp_path / "unsettled.jsonl")


async def test_a_large_spool_is_replayed_a_batch_a_transaction_each_row_once(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id, spool = await _small_batches(tmp_path, store, monkeypatch)
    already = usage_row("req_0", user_id)
    await store.settle(already)
    for number in range(10):
        spool.append(usage_row(f"req_{number}", user_id))
    batches: list[int] = []

    async def settle_many(rows: list[dict[str, Any]]) -> object:
        batches.append(len(rows))
        return await store.settle_many(rows)

    replayed = await spool.replay(settle_many)

    assert replayed == 10
    assert batches == [4, 4, 2]
    assert not spool.path.exists()
    assert await store.count_usage() == 10
    assert (await store.balances())[user_id] == Decimal("1") - 10 * Decimal("0.004875625")


async def test_a_batch_the_database_refuses_is_settled_row_by_row_and_only_the_bad_row_kept(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id, spool = await _small_batches(tmp_path, store, monkeypatch)
    for number in range(6):
        # The third row's user is not in the database: its foreign key refuses it.
        spool.append(usage_row(f"req_{number}", user_id if number != 2 else user_id + 1000))

    replayed = await spool.replay(store.settle_many)

    assert replayed == 5
    assert [row["request_id"] for row in spool.rows()] == ["req_2"]
    assert await store.count_usage() == 5
    assert (await store.balances())[user_id] == Decimal("1") - 5 * Decimal("0.004875625")
