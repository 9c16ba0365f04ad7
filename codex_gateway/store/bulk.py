"""Many rows into one table with a single driver call, for the usage writer's batches.

SQLAlchemy binds an executemany value by value through each column type's processors; for a
batch of usage rows and their ledger entries that cost more than the database's own work.
`BulkInsert` writes the statement once per table and converts each value as the column's
type would store it (`Money` as an exact decimal string on SQLite and as NUMERIC elsewhere,
`UTCDateTime` in UTC), then hands every row to the driver at once. Errors, an
`IntegrityError` for a repeated request id among them, come back as SQLAlchemy's.

On SQLite the rows go as one INSERT with many VALUES lists (as many as its limit on
parameters allows) rather than one statement a row: the driver lets go of the interpreter
for each statement it steps, and under load taking it back again is what a batch waits for.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from operator import itemgetter
from typing import Any

from sqlalchemy import Float, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from codex_gateway.store.types import Money, UTCDateTime

Convert = Callable[[Any], Any]
# Parameters one SQLite statement may carry (32,766 since SQLite 3.32, 999 before).
SQLITE_PARAMETERS = 32_766 if sqlite3.sqlite_version_info >= (3, 32) else 999
# Rows per SQLite statement at most, whatever the parameter limit allows.
SQLITE_ROWS = 500


def _same(value: Any) -> Any:
    return value


def _money(value: Any) -> Decimal | None:
    if value is None or isinstance(value, Decimal):
        return value
    raise TypeError(f"money must be a Decimal, got {type(value).__name__}")


def _money_text(value: Any) -> str | None:
    money = _money(value)
    return None if money is None else format(money, "f")


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise TypeError("timestamps must be timezone-aware datetimes")
    return value.astimezone(UTC)


def _utc_text(value: Any) -> str | None:
    """The text SQLAlchemy's SQLite DATETIME stores, so that reads parse it back the same."""
    moment = _utc(value)
    if moment is None:
        return None
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}"
    )


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


class BulkInsert:
    """INSERT of the named columns of `table`, many rows a call."""

    def __init__(self, table: Table, columns: Sequence[str], dialect: Dialect):
        self.columns = tuple(columns)
        text = dialect.name == "sqlite"
        converts = [self._converter(table.columns[name].type, text) for name in self.columns]
        # Only the columns whose values change on the way in are visited one by one.
        self._converts = [
            (index, convert) for index, convert in enumerate(converts) if convert is not _same
        ]
        self._take = itemgetter(*self.columns)
        names = ", ".join(dialect.identifier_preparer.quote(name) for name in self.columns)
        self._row = f"({_placeholders(dialect.paramstyle, len(self.columns))})"
        self.sql = f"INSERT INTO {table.name} ({names}) VALUES "
        # Rows per statement on SQLite; None: one statement a row, sent with executemany.
        self._per_statement = (
            min(SQLITE_ROWS, SQLITE_PARAMETERS // len(self.columns)) if text else None
        )
        self._statements: dict[int, str] = {}

    @staticmethod
    def _converter(column_type: object, text: bool) -> Convert:
        if isinstance(column_type, Money):
            return _money_text if text else _money
        if isinstance(column_type, UTCDateTime):
            return _utc_text if text else _utc
        if isinstance(column_type, Float):
            return _float
        return _same

    def values(self, records: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Each record's values in column order; a column a record lacks is NULL."""
        rows = []
        for record in records:
            try:
                row = list(self._take(record))
            except KeyError:
                row = [record.get(name) for name in self.columns]
            for index, convert in self._converts:
                row[index] = convert(row[index])
            rows.append(tuple(row))
        return rows

    def statement(self, rows: int) -> str:
        """The INSERT text for `rows` rows in one statement."""
        text = self._statements.get(rows)
        if text is None:
            text = self._statements[rows] = self.sql + ", ".join([self._row] * rows)
        return text

    async def run(self, conn: AsyncConnection, records: Sequence[Mapping[str, Any]]) -> None:
        values = self.values(records)
        if not values:
            return
        step = self._per_statement
        if step is None:
            await conn.exec_driver_sql(self.statement(1), values)
            return
        for start in range(0, len(values), step):
            chunk = values[start : start + step]
            flat = tuple(value for row in chunk for value in row)
            await conn.exec_driver_sql(self.statement(len(chunk)), flat)
