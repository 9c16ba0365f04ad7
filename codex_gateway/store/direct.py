"""Statements the usage writer runs for every batch, handed straight to asyncpg on PostgreSQL.

SQLAlchemy spends about 250 µs of the interpreter on each statement it runs through asyncpg
(its cache key, cursor and result), where asyncpg alone spends about 60; settling a batch
runs eight such statements, which at a few thousand requests a second was a tenth of a core.
A `Direct` statement is written with SQLAlchemy, compiled once, and run by the driver with its
values in order once a transaction is open; on SQLite, or as a transaction's first statement
(SQLAlchemy begins the transaction with the first statement it runs itself), it runs through
SQLAlchemy as written. Errors of the driver's own calls come back as asyncpg's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import NoResultFound
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import ClauseElement


class Direct:
    """One statement with named parameters (`bindparam`), run as cheaply as the driver
    allows."""

    def __init__(self, clause: Executable):
        self.clause = clause
        self._compiled: tuple[str, tuple[str, ...]] | None = None

    def asyncpg_form(self, dialect: Dialect) -> tuple[str, tuple[str, ...]]:
        """The SQL asyncpg takes, and the parameter names in the order of its `$n`."""
        if self._compiled is None:
            assert isinstance(self.clause, ClauseElement)
            compiled: Any = self.clause.compile(dialect=dialect)
            self._compiled = (str(compiled), tuple(compiled.positiontup or ()))
        return self._compiled

    async def _driver(self, conn: AsyncConnection) -> Any:
        """asyncpg's connection when it is in a transaction, else None."""
        if conn.dialect.driver != "asyncpg":
            return None
        driver: Any = (await conn.get_raw_connection()).driver_connection
        return driver if driver.is_in_transaction() else None

    async def rows(self, conn: AsyncConnection, **values: Any) -> Sequence[Sequence[Any]]:
        driver = await self._driver(conn)
        if driver is None:
            return (await conn.execute(self.clause, values)).all()
        sql, names = self.asyncpg_form(conn.dialect)
        found: Sequence[Sequence[Any]] = await driver.fetch(sql, *[values[n] for n in names])
        return found

    async def one(self, conn: AsyncConnection, **values: Any) -> Sequence[Any]:
        """The statement's only row; `NoResultFound` without one, as SQLAlchemy's `one()`."""
        found = await self.rows(conn, **values)
        if len(found) != 1:
            raise NoResultFound(f"expected one row, found {len(found)}")
        return found[0]

    async def run(self, conn: AsyncConnection, **values: Any) -> None:
        """Run a statement that returns no rows."""
        driver = await self._driver(conn)
        if driver is None:
            await conn.execute(self.clause, values)
            return
        sql, names = self.asyncpg_form(conn.dialect)
        await driver.execute(sql, *[values[n] for n in names])
