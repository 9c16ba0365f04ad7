"""On PostgreSQL, statements settling runs for every batch go to asyncpg itself once a
transaction is open, and its errors come back as SQLAlchemy's (`store/direct.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Integer, String, bindparam, cast, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from codex_gateway.store.direct import DriverStatement
from codex_gateway.store.queries import Store, now
from codex_gateway.store.tables import User
from tests.store.test_direct import BALANCE, SET_BALANCE
from tests.store.test_queries import new_user, unique


@pytest.fixture(scope="module")
def backend() -> str:
    return "postgresql"


@pytest.fixture
def driver_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The SQL of every `fetch` and `execute` called on an asyncpg connection."""
    calls: list[str] = []
    for name in ("fetch", "execute"):
        original = getattr(asyncpg.Connection, name)

        async def spy(self: Any, query: str, *args: Any, _original: Any = original) -> Any:
            calls.append(query)
            return await _original(self, query, *args)

        monkeypatch.setattr(asyncpg.Connection, name, spy)
    yield calls


async def test_every_statement_but_the_first_goes_to_the_driver(
    store: Store, driver_calls: list[str]
) -> None:
    """SQLAlchemy runs the transaction's first statement, and so begins the transaction."""
    _, user_id = await new_user(store, "5")
    driver_calls.clear()

    async with store.engine.begin() as conn:
        await BALANCE.one(conn, owner=user_id)
        before = list(driver_calls)
        await SET_BALANCE.run(conn, owner=user_id, new_balance=Decimal("4.5"))
        await BALANCE.one(conn, owner=user_id)
        after = driver_calls[len(before) :]

    assert not {SET_BALANCE.sql, BALANCE.sql} & set(before)
    assert after == [SET_BALANCE.sql, BALANCE.sql]
    assert (await store.balances())[user_id] == Decimal("4.5")


async def test_values_written_into_a_statement_are_sent_too(
    store: Store, driver_calls: list[str]
) -> None:
    _, user_id = await new_user(store, "5")
    add_one = DriverStatement(
        update(User).where(User.id == bindparam("owner")).values(balance=User.balance + Decimal(1))
    )

    async with store.engine.begin() as conn:
        await BALANCE.one(conn, owner=user_id)
        await add_one.run(conn, owner=user_id)

    assert add_one.sql in driver_calls
    assert (await store.balances())[user_id] == Decimal("6")


async def test_a_database_error_comes_back_as_sqlalchemys(store: Store) -> None:
    """What admission and the usage writer catch: SQLAlchemy's errors, not asyncpg's."""
    _, user_id = await new_user(store, "5")
    as_number = DriverStatement(select(cast(bindparam("text", type_=String), Integer)))

    with pytest.raises(DBAPIError) as caught:
        async with store.engine.begin() as conn:
            await BALANCE.one(conn, owner=user_id)
            await as_number.rows(conn, text="not a number")

    assert isinstance(caught.value, SQLAlchemyError)
    assert isinstance(caught.value.orig, asyncpg.InvalidTextRepresentationError)


async def test_a_repeated_key_comes_back_as_integrity_error(store: Store) -> None:
    name, user_id = await new_user(store, "5")
    add_user = DriverStatement(
        insert(User).values(
            name=bindparam("name"), balance=Decimal(0), reserved=Decimal(0), created_at=now()
        )
    )

    with pytest.raises(IntegrityError):
        async with store.engine.begin() as conn:
            await BALANCE.one(conn, owner=user_id)
            await add_user.run(conn, name=unique("user"))
            await add_user.run(conn, name=name)
