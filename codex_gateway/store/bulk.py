"""Many rows into one table with a few driver calls, for the usage writer's batches.

SQLAlchemy binds an executemany value by value through each column type's processors; for a
batch of usage rows and their ledger entries that costs more than the database's own work.
`BulkInsert` writes the statement once per table and checks each value as the column's type
would (`Money` must be a Decimal, `UTCDateTime` must carry its zone). A repeated request id
comes back as SQLAlchemy's `IntegrityError`.

On SQLite the rows go as INSERTs with many VALUES lists each, not one statement a row: the
driver lets go of the interpreter for every statement it steps, and a writer thread beside a
busy request loop waits to get it back each time. Money is stored there as its exact
decimal text, and times as UTC text.

On PostgreSQL the rows of a statement go as one JSON document that the server reads into
rows (`json_populate_recordset`, each field as its column's type: money from its exact
decimal text, times with their zone). orjson writes a usage row in about 3 µs, where asyncpg
takes about 16 to bind the same values as parameters. The statements go straight to asyncpg
in the transaction SQLAlchemy began (`store/direct.py`). A float that is not a number is
written as NULL, as SQLite stores it; a NUL character in text (an upstream may send one in
an error message or a model name) as U+FFFD, since PostgreSQL's text cannot hold it and would
refuse the row, and with it the bill.

How many rows a PostgreSQL statement carries follows the batch (`postgresql_rows`). The server
spends about 20 µs on each usage row, all at once for a statement; where it shares its cores
with the gateway, that burst holds up the request loop, so a quiet gateway (small batches)
sends small statements: with 32 rows a statement its slowest 1 % of requests at c=1 took
about 2 ms, with 8 to 16 about 1.6. Each statement is also a round trip, which a busy
gateway (large batches) pays for in the writer and in the loop it takes turns with: with 8
rows a statement it served 3,500 requests a second at c=64, with 32 about 4,400.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from itertools import chain
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import Float, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from codex_gateway.store.direct import open_driver, sqlalchemy_errors
from codex_gateway.store.types import (
    Money,
    UTCDateTime,
    bind_money,
    bind_utc,
    decimal_text,
    json_decimal,
)

Converter = Callable[[Any], Any]
# Rows per SQLite statement at most. A batch's rows go in statements of this many, and the
# rest in statements of powers of two, so only a handful of statement texts are ever built.
SQLITE_ROWS = 512
# Rows per PostgreSQL statement (one JSON document): a quarter of the batch, within these.
POSTGRESQL_ROWS = (8, 64)


@functools.cache
def _sqlite_parameter_limit() -> int:
    """How many parameters one statement may carry with the SQLite this Python links."""
    with sqlite3.connect(":memory:") as probe:
        return probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)


def _unchanged(value: Any) -> Any:
    return value


def _money_text(value: Any) -> str | None:
    if value.__class__ is Decimal:  # nearly every value: one check instead of bind_money's
        return decimal_text(value)
    money = bind_money(value)
    return None if money is None else decimal_text(money)


def _utc_text(value: Any) -> str | None:
    """The text SQLAlchemy's SQLite DATETIME stores, so that reads parse it back the same:
    `YYYY-MM-DD HH:MM:SS.ffffff` in UTC, which is what the ISO form of a UTC time starts with."""
    moment = bind_utc(value)
    if moment is None:
        return None
    return moment.isoformat(" ", "microseconds")[:26]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _without_nul(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with each NUL character in its text replaced by U+FFFD."""
    return {
        name: value.replace("\x00", "\ufffd") if isinstance(value, str) else value
        for name, value in record.items()
    }


def _sqlite_converter(column_type: object) -> Converter:
    if isinstance(column_type, Money):
        return _money_text
    if isinstance(column_type, UTCDateTime):
        return _utc_text
    if isinstance(column_type, Float):
        return _float
    return _unchanged


def _check(column_type: object) -> Converter | None:
    """What a value of the column must pass before it is written into a JSON document."""
    if isinstance(column_type, Money):
        return bind_money
    if isinstance(column_type, UTCDateTime):
        return bind_utc
    return None


def postgresql_rows(count: int) -> int:
    """Rows per PostgreSQL statement for a batch of `count` rows."""
    fewest, most = POSTGRESQL_ROWS
    return min(most, max(fewest, count // 4))


def _chunks(count: int, largest: int) -> list[int]:
    """`count` rows as statements of `largest` rows, then of powers of two."""
    sizes = [largest] * (count // largest)
    rest = count % largest
    size = 1 << (largest.bit_length() - 1)
    while rest:
        if size <= rest:
            sizes.append(size)
            rest -= size
        size >>= 1
    return sizes


class BulkInsert:
    """INSERT of the named columns of `table`, many rows a call, on SQLite or on PostgreSQL
    through asyncpg."""

    def __init__(self, table: Table, columns: Sequence[str], dialect: Dialect):
        if not columns:
            raise ValueError("a bulk insert needs at least one column")
        self._on_sqlite = dialect.name == "sqlite"
        if not self._on_sqlite and dialect.driver != "asyncpg":
            raise ValueError(f"no bulk insert through the driver {dialect.driver!r}")
        self.columns = tuple(columns)
        self._known = frozenset(self.columns)
        types = [table.columns[name].type for name in self.columns]
        preparer = dialect.identifier_preparer
        table_name = preparer.format_table(table)
        names = ", ".join(preparer.quote(name) for name in self.columns)
        # SQLite: the columns whose values change on the way in, and the INSERT's start.
        converters = [_sqlite_converter(column_type) for column_type in types]
        self._converters = [
            (index, convert)
            for index, convert in enumerate(converters)
            if convert is not _unchanged
        ]
        take = itemgetter(*self.columns)
        self._take: Callable[[Mapping[str, Any]], tuple[Any, ...]] = (
            take if len(self.columns) > 1 else lambda record: (take(record),)
        )
        self._row = "(" + ", ".join("?" * len(self.columns)) + ")"
        self.sql = f"INSERT INTO {table_name} ({names}) VALUES "
        self._per_statement = min(SQLITE_ROWS, _sqlite_parameter_limit() // len(self.columns))
        self._statements: dict[int, str] = {}
        # PostgreSQL: the columns whose values are checked, and the INSERT that reads the
        # rows out of one JSON document.
        checks = [
            (name, _check(column_type))
            for name, column_type in zip(self.columns, types, strict=True)
        ]
        self._checks = [(name, check) for name, check in checks if check is not None]
        self.json_sql = (
            f"INSERT INTO {table_name} ({names}) SELECT {names} "
            f"FROM json_populate_recordset(NULL::{table_name}, $1::json)"
        )

    def _refuse_unknown(self, records: Sequence[Mapping[str, Any]]) -> None:
        """A key of the first record that is no column is refused (it would be dropped
        unseen)."""
        if records:
            unknown = records[0].keys() - self._known
            if unknown:
                raise ValueError(f"no such column: {', '.join(sorted(unknown))}")

    def values(self, records: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Each record's values in column order, as SQLite stores them; a column a record
        lacks is NULL."""
        self._refuse_unknown(records)
        rows = []
        for record in records:
            try:
                row = list(self._take(record))
            except KeyError:
                row = [record.get(name) for name in self.columns]
            for index, convert in self._converters:
                row[index] = convert(row[index])
            rows.append(tuple(row))
        return rows

    def statement(self, rows: int) -> str:
        """The SQLite INSERT text for `rows` rows in one statement."""
        text = self._statements.get(rows)
        if text is None:
            text = self._statements[rows] = self.sql + ", ".join([self._row] * rows)
        return text

    def document(self, records: Sequence[Mapping[str, Any]]) -> str:
        """The records as the JSON document `json_sql` reads, once their values pass the
        columns' checks; a column a record lacks is NULL."""
        self._refuse_unknown(records)
        for record in records:
            for name, check in self._checks:
                check(record.get(name))
        document = orjson.dumps(records, default=json_decimal).decode()
        if "\\u0000" in document:
            cleaned = [_without_nul(record) for record in records]
            document = orjson.dumps(cleaned, default=json_decimal).decode()
        return document

    async def run(self, conn: AsyncConnection, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        if not self._on_sqlite:
            await self._postgresql(conn, records)
            return
        values = self.values(records)
        start = 0
        for size in _chunks(len(values), self._per_statement):
            chunk = values[start : start + size]
            start += size
            flat = tuple(chain.from_iterable(chunk))
            await conn.exec_driver_sql(self.statement(size), flat)

    async def _postgresql(
        self, conn: AsyncConnection, records: Sequence[Mapping[str, Any]]
    ) -> None:
        """`postgresql_rows` rows a statement, in the connection's transaction (begun by
        SQLAlchemy with this insert's first statement if none was run before it)."""
        size = postgresql_rows(len(records))
        for start in range(0, len(records), size):
            document = self.document(records[start : start + size])
            driver = await open_driver(conn)
            if driver is None:
                await conn.exec_driver_sql(self.json_sql, (document,))
                continue
            with sqlalchemy_errors(self.json_sql):
                await driver.execute(self.json_sql, document)
