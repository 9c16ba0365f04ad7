"""Bulk inserts store each value as the column's type would, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from codex_gateway.store.bulk import (
    POSTGRESQL_ROWS,
    SQLITE_ROWS,
    BulkInsert,
    _chunks,
    _utc_text,
    postgresql_rows,
)
from codex_gateway.store.queries import SETTLEMENT_COLUMNS, Store
from codex_gateway.store.tables import LedgerEntry, UsageRecord
from tests.store.test_queries import as_utc, new_user, usage_row

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
    assert as_utc(second["started_at"]) == datetime(2026, 12, 4, 16, 30, 5, 123456, tzinfo=UTC)
    assert third["duration_ms"] == 7.0


@pytest.mark.parametrize(
    ("others", "begun"),
    [
        # the insert begins the transaction: on PostgreSQL its first call goes through
        # SQLAlchemy, which begins it, and the later ones straight to the driver; with 41
        # others (43 rows, statements of 10) the repeat lands in the fifth statement
        (0, False),
        (41, False),
        # a statement began it, as in settlement: every call goes straight to the driver
        (0, True),
        (41, True),
    ],
)
async def test_a_repeated_request_id_fails_the_whole_insert(
    store: Store, others: int, begun: bool
) -> None:
    """Still SQLAlchemy's error, in whichever call the repeat lands, and the calls before it
    are rolled back with the transaction."""
    _, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    rows = [row] + [usage_row(user_id) for _ in range(others)] + [dict(row)]
    insert = bulk(store, UsageRecord.__tablename__)

    with pytest.raises(IntegrityError):
        async with store.engine.begin() as conn:
            if begun:
                await conn.execute(select(1))
            await insert.run(conn, rows)

    assert all([await store.usage(each["request_id"]) is None for each in rows])


async def test_text_and_amounts_of_every_shape_read_back_unchanged(store: Store) -> None:
    """Quotes, backslashes, control and non-ASCII characters in text, and amounts written
    with an exponent, a sign or many digits (PostgreSQL reads them out of a JSON document)."""
    _, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    row["error"] = 'a "quoted" \\ back\\slash, tab\t, newline\n, \u2028, é, 🚀, {"x": [1]}'
    row["attempts"] = "[]"
    row["flags"] = ""
    row["cost_usd"] = Decimal("1E-18")
    row["cost_output"] = Decimal("5E+3")
    row["cost_cached_input"] = Decimal("-0.000000000000000001")
    row["price_input"] = Decimal("123456789012345678.123456789012345678")
    row["ttfb_ms"] = 0.1 + 0.2  # a float that needs every digit to come back the same

    async with store.engine.begin() as conn:
        await bulk(store, UsageRecord.__tablename__).run(conn, [row])

    stored = await store.usage(row["request_id"])
    assert stored is not None
    for column in ("error", "attempts", "flags", "ttfb_ms"):
        assert stored[column] == row[column], column
    for column in ("cost_usd", "cost_output", "cost_cached_input", "price_input"):
        assert Decimal(str(stored[column])) == row[column], column


async def test_a_nul_character_in_text_does_not_cost_the_row(store: Store) -> None:
    """An upstream may put one in an error or a model name: SQLite keeps it, and PostgreSQL,
    whose text cannot hold it, stores U+FFFD in its place instead of refusing the row."""
    _, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    row["error"] = "upstream_error: a\x00b"
    row["upstream_model"] = "gpt-5.1-codex\x00x"
    other = usage_row(user_id)

    async with store.engine.begin() as conn:
        await bulk(store, UsageRecord.__tablename__).run(conn, [row, other])

    stored = await store.usage(row["request_id"])
    assert stored is not None and await store.usage(other["request_id"]) is not None
    kept = "\x00" if store.is_sqlite else "\ufffd"
    assert stored["error"] == "upstream_error: a" + kept + "b"
    assert stored["upstream_model"] == "gpt-5.1-codex" + kept + "x"
    assert stored["cost_usd"] == row["cost_usd"]


def test_the_postgresql_document_has_no_nul_and_keeps_json_text_as_it_is() -> None:
    """Without a database: a NUL becomes U+FFFD, and text that is itself JSON with an escaped
    NUL (`raw_usage`) is kept to the character."""
    insert = BulkInsert(USAGE, tuple(USAGE.columns.keys()), postgresql.asyncpg.dialect())
    row = usage_row(1)
    row["error"] = "a\x00b"
    row["raw_usage"] = '{"model":"m\\u0000"}'

    (stored,) = orjson.loads(insert.document([row]))

    assert stored["error"] == "a\ufffdb"
    assert stored["raw_usage"] == '{"model":"m\\u0000"}'
    assert stored["cost_usd"] == format(row["cost_usd"], "f")


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
    ("column", "value", "complaint"),
    [
        # money must arrive as a Decimal, never a float or a string
        ("cost_usd", 0.25, "money must be a Decimal"),
        ("cost_usd", "0.25", "money must be a Decimal"),
        # timestamps must carry their zone
        ("started_at", datetime(2026, 12, 4, 16, 0), "timezone-aware"),
    ],
)
async def test_values_of_the_wrong_kind_are_refused(
    store: Store, column: str, value: object, complaint: str
) -> None:
    _, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    row[column] = value

    with pytest.raises(TypeError, match=complaint):
        async with store.engine.begin() as conn:
            await bulk(store, UsageRecord.__tablename__).run(conn, [row])


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


def test_a_driver_other_than_sqlite_and_asyncpg_is_refused(store: Store) -> None:
    class Dialect:
        name = "postgresql"
        driver = "psycopg"
        identifier_preparer = store.engine.dialect.identifier_preparer

    with pytest.raises(ValueError, match="psycopg"):
        BulkInsert(USAGE, ("request_id",), Dialect())  # type: ignore[arg-type]


async def test_more_rows_than_one_statement_carries_all_arrive(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    rows = [usage_row(user_id) for _ in range(max(SQLITE_ROWS, POSTGRESQL_ROWS[1] * 4) * 2 + 7)]

    async with store.engine.begin() as conn:
        await bulk(store, UsageRecord.__tablename__).run(conn, rows)
        stored = (
            await conn.execute(select(UsageRecord.request_id).where(UsageRecord.user_id == user_id))
        ).scalars()

    assert sorted(stored) == sorted(row["request_id"] for row in rows)


async def test_a_key_that_is_no_column_is_refused_not_dropped(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    row["ttfb_msec"] = 3.0

    with pytest.raises(ValueError, match="ttfb_msec"):
        async with store.engine.begin() as conn:
            await bulk(store, UsageRecord.__tablename__).run(conn, [row])


async def test_one_column_is_enough(store: Store) -> None:
    insert = bulk(store, UsageRecord.__tablename__, ("request_id",))

    assert insert.values([{"request_id": "req_one"}]) == [("req_one",)]


@pytest.mark.parametrize(
    ("count", "rows"),
    [
        # a small batch (a quiet gateway): short statements
        (1, 8),
        (50, 12),
        # a large one (a busy gateway): few round trips, up to 64 rows each
        (140, 35),
        (1_000, 64),
    ],
)
def test_postgresql_statements_carry_a_quarter_of_the_batch_within_limits(
    count: int, rows: int
) -> None:
    assert postgresql_rows(count) == rows


@pytest.mark.parametrize(
    ("count", "largest", "sizes"),
    [
        # whole statements of the largest size, then powers of two for the rest
        (1_031, 512, [512, 512, 4, 2, 1]),
        (7, 512, [4, 2, 1]),
        (512, 512, [512]),
        # a largest size that is no power of two (a SQLite with a low parameter limit)
        (70, 29, [29, 29, 8, 4]),
        (0, 512, []),
    ],
)
def test_rows_are_cut_into_a_handful_of_statement_sizes(
    count: int, largest: int, sizes: list[int]
) -> None:
    assert _chunks(count, largest) == sizes


@pytest.mark.parametrize(
    "moment",
    [
        # a whole second: the microseconds are written out all the same
        datetime(2026, 12, 4, 16, 0, 0, tzinfo=UTC),
        # another zone, and a year of three digits
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2))),
    ],
)
def test_times_go_to_sqlite_as_sqlalchemys_datetime_text_in_utc(moment: datetime) -> None:
    as_sqlalchemy = sqlite.DATETIME().bind_processor(sqlite.dialect())
    assert as_sqlalchemy is not None

    assert _utc_text(moment) == as_sqlalchemy(moment.astimezone(UTC).replace(tzinfo=None))
