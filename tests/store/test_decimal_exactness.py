"""A million tiny costs, stored as usage rows with their settle entries, add up exactly.

Rows go in with one bulk statement (COPY on PostgreSQL, executemany on SQLite), not through
HTTP; every cost has up to 18 decimals, and the stored sums must equal the Decimal sum to the
last digit on NUMERIC (PostgreSQL) and on decimal text (SQLite).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from codex_gateway.billing.pricing import MONEY
from codex_gateway.store.queries import Store
from codex_gateway.store.tables import LedgerEntry, UsageRecord, User
from tests.store.test_queries import new_user

ROWS = 1_000_000
TOPUP = Decimal(1000)
STARTED = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
USAGE_COLUMNS = [column.name for column in UsageRecord.__table__.columns]
LEDGER_COLUMNS = ["user_id", "kind", "amount", "balance_after", "request_id", "created_at"]


def tiny_cost(number: int) -> Decimal:
    """Scattered costs below a millionth of a dollar, with up to 18 decimals."""
    return Decimal((number * 2_654_435_761) % 10**12 + 1).scaleb(-18)


def usage(user_id: int, request_id: str, cost: Decimal) -> dict[str, Any]:
    return {
        **dict.fromkeys(USAGE_COLUMNS),
        "request_id": request_id,
        "started_at": STARTED,
        "user_id": user_id,
        "endpoint": "responses",
        "model": "gpt-5.1-codex",
        "stream": True,
        "status": "completed",
        "http_status": 200,
        **dict.fromkeys(
            ["input_tokens", "cached_tokens", "uncached_input_tokens", "reasoning_tokens"], 0
        ),
        "output_tokens": 1,
        **dict.fromkeys(["cost_uncached_input", "cost_cached_input"], Decimal(0)),
        **dict.fromkeys(["cost_output", "cost_before_markup", "cost_usd"], cost),
        "flags": "[]",
        "duration_ms": 1.0,
        "client_bytes": 0,
    }


def generate(user_id: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], Decimal]:
    usage_rows, ledger_rows = [], []
    balance, total = TOPUP, Decimal(0)
    for number in range(ROWS):
        cost = tiny_cost(number)
        request_id = f"req_exact_{number:07d}"
        total = MONEY.add(total, cost)
        balance = MONEY.subtract(balance, cost)
        usage_rows.append(tuple(usage(user_id, request_id, cost).values()))
        ledger_rows.append((user_id, "settle", -cost, balance, request_id, STARTED))
    return usage_rows, ledger_rows, total


async def bulk_insert(engine: AsyncEngine, usage_rows: list[Any], ledger_rows: list[Any]) -> None:
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            await raw.copy_records_to_table(
                "usage_records", records=usage_rows, columns=USAGE_COLUMNS
            )
            await raw.copy_records_to_table(
                "ledger_entries", records=ledger_rows, columns=LEDGER_COLUMNS
            )
        return
    path = engine.url.database
    assert path is not None
    db = sqlite3.connect(path)
    try:
        with db:
            db.executemany(
                f"INSERT INTO usage_records ({','.join(USAGE_COLUMNS)}) "
                f"VALUES ({','.join('?' * len(USAGE_COLUMNS))})",
                (tuple(_sqlite(value) for value in row) for row in usage_rows),
            )
            db.executemany(
                f"INSERT INTO ledger_entries ({','.join(LEDGER_COLUMNS)}, reserved_change) "
                "VALUES (?, ?, ?, ?, ?, ?, '0')",
                (tuple(_sqlite(value) for value in row) for row in ledger_rows),
            )
    finally:
        db.close()


def _sqlite(value: Any) -> Any:
    """What the Money and UTCDateTime columns store on SQLite."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat(" ", "microseconds")
    return value


async def test_a_million_tiny_costs_sum_exactly_to_the_ledger(
    store: Store, engine: AsyncEngine
) -> None:
    _, user_id = await new_user(store, str(TOPUP))
    usage_rows, ledger_rows, total = generate(user_id)
    await bulk_insert(engine, usage_rows, ledger_rows)
    async with engine.begin() as conn:
        await conn.execute(update(User).where(User.id == user_id).values(balance=TOPUP - total))

    async with engine.connect() as conn:
        costs = (await conn.execute(select(UsageRecord.cost_usd))).scalars()
        settled = (
            await conn.execute(select(LedgerEntry.amount).where(LedgerEntry.kind == "settle"))
        ).scalars()
        stored_costs = sum(costs, Decimal(0))
        stored_settled = sum(settled, Decimal(0))
        if engine.dialect.name == "postgresql":
            assert (
                Decimal(await conn.scalar(text("SELECT SUM(cost_usd) FROM usage_records"))) == total
            )
    assert total.as_tuple().exponent == -18
    assert stored_costs == total
    assert stored_settled == -total
    problems, counts = await store.verify_ledger()
    assert problems == []
    assert counts["usage rows"] == ROWS
