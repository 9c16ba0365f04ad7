"""Many rows into one table with a few driver calls, for the usage writer's batches.

SQLAlchemy binds an executemany value by value through each column type's processors; for a
batch of usage rows and their ledger entries that costs more than the database's own work.
`BulkInsert` writes the statement once per table and checks and converts each value as the
column's type would (`Money` must be a Decimal and `UTCDateTime` must carry its zone). A
repeated request id comes back as SQLAlchemy's `IntegrityError`; other errors of asyncpg's
own calls (below) as asyncpg's, which the usage writer retries like any other.

On SQLite the rows go as INSERTs with many VALUES lists each, not one statement a row: the
driver lets go of the interpreter for every statement it steps, and a writer thread beside a
busy request loop waits to get it back each time. Money is stored there as its exact
decimal text, and times as UTC text.

On PostgreSQL the rows of a statement go as one JSON document, which the server turns into
rows (`json_populate_recordset`, each field read as its column's type: money from its exact
decimal text). orjson writes a usage row in about 3 µs; asyncpg spent about 16 on the same
row as parameters, whether one message a row (`executemany`) or one array a column (it
checks every element of an array for being an array itself). A statement carries a few
dozen rows, so that writing its document takes a request's interpreter for well under a
millisecond (with one statement for a batch of hundreds, the slowest 1 % of requests at c=1
waited about 3 ms).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from itertools import chain
from operator import itemgetter
from typing import Any

import asyncpg
import orjson
from sqlalchemy import Float, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from codex_gateway.store.types import Money, UTCDateTime, bind_money, bind_utc

Converter = Callable[[Any], Any]
# Rows per SQLite statement at most. A batch's rows go in statements of this many, and the
# rest in statements of powers of two, so only a handful of statement texts are ever built.
SQLITE_ROWS = 512
# Rows per PostgreSQL statement at most: small enough that encoding them takes a request's
# interpreter for well under a millisecond.
ASYNCPG_ROWS = 32


@functools.cache
def _sqlite_parameter_limit() -> int:
    """How many parameters one statement may carry with the SQLite this Python links."""
    with sqlite3.connect(":memory:") as probe:
        return probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)


def _unchanged(value: Any) -> Any:
    return value


def _money_text(value: Any) -> str | None:
    if value.__class__ is Decimal:  # nearly every value: one check instead of bind_money's
        return format(value, "f")
    money = bind_money(value)
    return None if money is None else format(money, "f")


def _utc_text(value: Any) -> str | None:
    """The text SQLAlchemy's SQLite DATETIME stores, so that reads parse it back the same:
    `YYYY-MM-DD HH:MM:SS.ffffff` in UTC, which is what the ISO form of a UTC time starts with."""
    moment = bind_utc(value)
    if moment is None:
        return None
    return moment.isoformat(" ", "microseconds")[:26]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _placeholders(paramstyle: str, count: int) -> str:
    if paramstyle == "qmark":
        return ", ".join("?" * count)
    if paramstyle == "numeric_dollar":
        return ", ".join(f"${number}" for number in range(1, count + 1))
    if paramstyle in ("format", "pyformat"):
        return ", ".join(["%s"] * count)
    raise ValueError(f"no bulk insert for the parameter style {paramstyle!r}")


def _json_money(value: Any) -> str:
    """orjson's fallback: money as its exact decimal text (a Decimal is the only value of
    a row orjson does not write itself)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"no JSON form for {type(value).__name__}")


def _converter(column_type: object, as_text: bool) -> Converter:
    if isinstance(column_type, Money):
        return _money_text if as_text else bind_money
    if isinstance(column_type, UTCDateTime):
        return _utc_text if as_text else bind_utc
    if isinstance(column_type, Float):
        return _float
    return _unchanged


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
    """INSERT of the named columns of `table`, many rows a call."""

    def __init__(self, table: Table, columns: Sequence[str], dialect: Dialect):
        if not columns:
            raise ValueError("a bulk insert needs at least one column")
        self.columns = tuple(columns)
        self._known = frozenset(self.columns)
        on_sqlite = dialect.name == "sqlite"
        converters = [_converter(table.columns[name].type, on_sqlite) for name in self.columns]
        # Only the columns whose values change on the way in are visited one by one.
        self._converters = [
            (index, convert)
            for index, convert in enumerate(converters)
            if convert is not _unchanged
        ]
        take = itemgetter(*self.columns)
        self._take: Callable[[Mapping[str, Any]], tuple[Any, ...]] = (
            take if len(self.columns) > 1 else lambda record: (take(record),)
        )
        preparer = dialect.identifier_preparer
        names = ", ".join(preparer.quote(name) for name in self.columns)
        self._row = f"({_placeholders(dialect.paramstyle, len(self.columns))})"
        self.sql = f"INSERT INTO {preparer.format_table(table)} ({names}) VALUES "
        # Rows per statement on SQLite; None: one statement a row, sent with executemany.
        self._per_statement = (
            min(SQLITE_ROWS, _sqlite_parameter_limit() // len(self.columns)) if on_sqlite else None
        )
        self._statements: dict[int, str] = {}
        self._on_asyncpg = dialect.driver == "asyncpg"
        # PostgreSQL: the columns whose values are checked (money, times) before orjson
        # writes them, and the INSERT that reads the rows out of one JSON document.
        self._checks = [
            (name, convert)
            for name, convert in zip(self.columns, converters, strict=True)
            if convert in (bind_money, bind_utc)
        ]
        table_name = preparer.format_table(table)
        self.from_json = (
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
        """Each record's values in column order; a column a record lacks is NULL."""
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
        """The INSERT text for `rows` rows in one statement."""
        text = self._statements.get(rows)
        if text is None:
            text = self._statements[rows] = self.sql + ", ".join([self._row] * rows)
        return text

    def document(self, records: Sequence[Mapping[str, Any]]) -> str:
        """The records as the JSON document `from_json` reads, once their values pass the
        columns' checks; a column a record lacks is NULL."""
        self._refuse_unknown(records)
        for record in records:
            for name, check in self._checks:
                check(record.get(name))
        return orjson.dumps(records, default=_json_money).decode()

    async def run(self, conn: AsyncConnection, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        if self._on_asyncpg:
            await self._asyncpg_documents(conn, records)
            return
        values = self.values(records)
        if self._per_statement is None:
            await conn.exec_driver_sql(self.statement(1), values)
            return
        start = 0
        for size in _chunks(len(values), self._per_statement):
            chunk = values[start : start + size]
            start += size
            flat = tuple(chain.from_iterable(chunk))
            await conn.exec_driver_sql(self.statement(size), flat)

    async def _asyncpg_documents(
        self, conn: AsyncConnection, records: Sequence[Mapping[str, Any]]
    ) -> None:
        """ASYNCPG_ROWS rows a statement, in the connection's transaction. SQLAlchemy's
        cursor would cost more per call than the call's rows do; a repeated key still comes
        back as SQLAlchemy's `IntegrityError`."""
        driver: Any = (await conn.get_raw_connection()).driver_connection
        for start in range(0, len(records), ASYNCPG_ROWS):
            document = self.document(records[start : start + ASYNCPG_ROWS])
            if not driver.is_in_transaction():
                # SQLAlchemy begins the transaction with the first statement it runs itself.
                await conn.exec_driver_sql(self.from_json, (document,))
                continue
            try:
                await driver.execute(self.from_json, document)
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise IntegrityError(self.from_json, None, exc) from exc
