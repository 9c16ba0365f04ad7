"""Statements handed straight to asyncpg inside a transaction SQLAlchemy has begun.

The usage writer settles a batch with a handful of statements on owners and leases, and a few
bulk inserts (`store/bulk.py`). SQLAlchemy spends about 250 µs of the interpreter on each
statement it runs through asyncpg (its cache key, cursor and result); asyncpg alone spends
about 60. So once a transaction is open on PostgreSQL (SQLAlchemy begins it with the first
statement it runs itself), these statements go to asyncpg's own connection, with their values
checked and converted by their SQLAlchemy types as before, and asyncpg's errors come back as
SQLAlchemy's: a broken unique or foreign key as `IntegrityError`, anything else the database
or the connection says as `DBAPIError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, NoResultFound, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import ClauseElement

# The dialect the statements are compiled for, once, when they are made.
ASYNCPG = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]


async def open_driver(conn: AsyncConnection) -> Any:
    """asyncpg's connection under `conn` when it has a transaction open, else None (SQLite,
    or no statement run yet)."""
    if conn.dialect.driver != "asyncpg":
        return None
    driver: Any = (await conn.get_raw_connection()).driver_connection
    return driver if driver.is_in_transaction() else None


@contextmanager
def sqlalchemy_errors(sql: str) -> Iterator[None]:
    """asyncpg's errors from running `sql`, raised as SQLAlchemy's."""
    try:
        yield
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(sql, None, exc) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DBAPIError(sql, None, exc) from exc


class DriverStatement:
    """One statement with named parameters (`bindparam`), run by asyncpg itself where it can
    be. Its values, those given by name and those written into the statement, go through
    their columns' types as SQLAlchemy would send them (money must be a Decimal)."""

    def __init__(self, clause: Executable):
        assert isinstance(clause, ClauseElement)
        self.clause = clause
        compiled: Any = clause.compile(dialect=ASYNCPG)
        self.sql = str(compiled)
        # Per `$n`: the parameter's name, whether the caller gives it, the value written
        # into the statement otherwise, and its type's conversion.
        self._parameters: list[tuple[str, bool, Any, Callable[[Any], Any] | None]] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            convert = bind.type.dialect_impl(ASYNCPG).bind_processor(ASYNCPG)
            self._parameters.append((name, bind.required, bind.effective_value, convert))

    def arguments(self, values: dict[str, Any]) -> list[Any]:
        """The values for asyncpg in the order of the statement's `$n`; a value its type
        refuses fails as SQLAlchemy would fail it (`StatementError`)."""
        found = []
        for name, required, written, convert in self._parameters:
            value = values[name] if required else written
            try:
                found.append(value if convert is None else convert(value))
            except Exception as exc:
                raise StatementError(str(exc), self.sql, values, exc) from exc
        return found

    async def rows(self, conn: AsyncConnection, **values: Any) -> Sequence[Sequence[Any]]:
        driver = await open_driver(conn)
        if driver is None:
            return (await conn.execute(self.clause, values)).all()
        arguments = self.arguments(values)
        with sqlalchemy_errors(self.sql):
            found: Sequence[Sequence[Any]] = await driver.fetch(self.sql, *arguments)
        return found

    async def one(self, conn: AsyncConnection, **values: Any) -> Sequence[Any]:
        """The statement's only row; `NoResultFound` without one, as SQLAlchemy's `one()`."""
        found = await self.rows(conn, **values)
        if len(found) != 1:
            raise NoResultFound(f"expected one row, found {len(found)}")
        return found[0]

    async def run(self, conn: AsyncConnection, **values: Any) -> None:
        """Run a statement that returns no rows."""
        driver = await open_driver(conn)
        if driver is None:
            await conn.execute(self.clause, values)
            return
        arguments = self.arguments(values)
        with sqlalchemy_errors(self.sql):
            await driver.execute(self.sql, *arguments)
