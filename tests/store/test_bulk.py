"""Bulk inserts store each value as the column's type would, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from codex_gateway.store.bulk import SQLITE_ROWS, BulkInsert
from codex_gateway.store.queries import SETTLEMENT_COLUMNS, Store
from codex_gateway.store.tables import LedgerEntry, UsageRecord
from tests.store.test_queries import new_user, usage_row

TABLES = UsageRecord.metadata.tables
USAGE = TABLES[UsageRecord.__tablename__]


def bulk(store: Store, table: str, columns: tuple[str, ...] | None = None) -> BulkInsert:
    found = TABLES[table]
    return BulkInsert(found, columns or tuple(found.columns.keys()), store.engine.dialect)


async def test_usage_rows_read_back_exactly_as_written(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    rows = [usage_row(user_id) for _ in range(3)]
    # An amount with every digit the column keeps, and a start time given in another zone.
    rows[0]["cost_usd"] = Decimal("0.000000000000000001")
    rows[1]["started_at"] = datetime(
        2026, 12, 4, 18, 30, 5, 123456, tzinfo=timezone(timedelta(hours=2))
    )
    rows[2]["duration_ms"] = 7  # an int where the column holds floats

    async with store.engine.begin() as conn:
        await bulk(store, UsageRecord.__tablename__).run(conn, rows)

    first = await store.usage(rows[0]["request_id"])
    second = await store.usage(rows[1]["request_id"])
    third = await store.usage(rows[2]["request_id"])
    assert first is not None and second is not None and third is not None
    assert first["cost_usd"] == Decimal("0.000000000000000001")
    assert first["price_input"] == rows[0]["price_input"]
    assert first["raw_usage"] == rows[0]["raw_usage"]
    assert first["stream"] is True
    started = second["started_at"]
    assert started.replace(tzinfo=started.tzinfo or UTC) == datetime(
        2026, 12, 4, 16, 30, 5, 123456, tzinfo=UTC
    )
    assert third["duration_ms"] == 7.0


async def test_a_repeated_request_id_fails_the_whole_insert(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    insert = bulk(store, UsageRecord.__tablename__)

    with pytest.raises(IntegrityError):
        async with store.engine.begin() as conn:
            await insert.run(conn, [row, dict(row)])

    assert await store.usage(row["request_id"]) is None


async def test_a_column_a_record_lacks_is_null(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    del row["attempts"], row["ttfb_ms"]

    async with store.engine.begin() as conn:
        await bulk(store, UsageRecord.__tablename__).run(conn, [row])

    stored = await store.usage(row["request_id"])
    assert stored is not None
    assert stored["attempts"] is None and stored["ttfb_ms"] is None


@pytest.mark.parametrize(
    ("column", "value"),
    [
        # money must arrive as a Decimal, never a float or a string
        ("cost_usd", 0.25),
        ("cost_usd", "0.25"),
        # timestamps must carry their zone
        ("started_at", datetime(2026, 12, 4, 16, 0)),
    ],
)
async def test_values_of_the_wrong_kind_are_refused(
    store: Store, column: str, value: object
) -> None:
    _, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    row[column] = value

    with pytest.raises(TypeError):
        bulk(store, UsageRecord.__tablename__).values([row])


async def test_ledger_entries_keep_amounts_and_default_columns(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    entry = {
        "user_id": user_id,
        "kind": "settle",
        "amount": Decimal("-0.114295"),
        "reserved_change": Decimal("0"),
        "balance_after": Decimal("0.885705"),
        "request_id": "req_bulk_ledger",
        "note": None,
        "lease_id": None,
        "created_at": datetime(2026, 12, 4, 16, 0, tzinfo=UTC),
    }

    async with store.engine.begin() as conn:
        await bulk(store, LedgerEntry.__tablename__, SETTLEMENT_COLUMNS).run(conn, [entry])
        stored = (
            await conn.execute(
                select(LedgerEntry).where(LedgerEntry.request_id == "req_bulk_ledger")
            )
        ).one()

    assert stored.amount == Decimal("-0.114295")
    assert stored.balance_after == Decimal("0.885705")
    assert stored.operator is None and stored.refers_to is None


def test_an_unknown_parameter_style_is_refused(store: Store) -> None:
    class Dialect:
        name = "other"
        paramstyle = "named"
        identifier_preparer = store.engine.dialect.identifier_preparer

    with pytest.raises(ValueError, match="named"):
        BulkInsert(USAGE, ("request_id",), Dialect())  # type: ignore[arg-type]


async def test_more_rows_than_one_statement_carries_all_arrive(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    rows = [usage_row(user_id) for _ in range(SQLITE_ROWS * 2 + 7)]

    async with store.engine.begin() as conn:
        await bulk(store, UsageRecord.__tablename__).run(conn, rows)
        stored = (
            await conn.execute(select(UsageRecord.request_id).where(UsageRecord.user_id == user_id))
        ).scalars()

    assert sorted(stored) == sorted(row["request_id"] for row in rows)
