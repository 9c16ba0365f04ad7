"""Statements settling runs once per batch: the same rows on SQLite and PostgreSQL, and on
PostgreSQL straight through asyncpg once a transaction is open."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import NoResultFound

from codex_gateway.store.direct import Direct
from codex_gateway.store.queries import Store
from codex_gateway.store.tables import User
from tests.store.test_queries import new_user

BALANCE = Direct(select(User.balance, User.name).where(User.id == bindparam("owner")))
SET_BALANCE = Direct(
    update(User).where(User.id == bindparam("owner")).values(balance=bindparam("new_balance"))
)


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


async def test_rows_one_and_run_agree_on_both_databases(store: Store) -> None:
    name, user_id = await new_user(store, "12.345678901234567890")

    async with store.engine.begin() as conn:
        first = await BALANCE.one(conn, owner=user_id)
        await SET_BALANCE.run(conn, owner=user_id, new_balance=Decimal("0.000000000000000001"))
        after = await BALANCE.one(conn, owner=user_id)
        missing = await BALANCE.rows(conn, owner=user_id + 1_000_000)

    assert (Decimal(str(first[0])), first[1]) == (Decimal("12.345678901234567890"), name)
    assert Decimal(str(after[0])) == Decimal("0.000000000000000001")
    assert missing == []
    assert (await store.balances())[user_id] == Decimal("0.000000000000000001")


async def test_one_without_a_row_fails_as_sqlalchemy_would(store: Store) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(select(1))
        with pytest.raises(NoResultFound):
            await BALANCE.one(conn, owner=-1)


async def test_once_a_transaction_is_open_postgresql_goes_to_the_driver(
    store: Store, driver_calls: list[str]
) -> None:
    """SQLite never touches asyncpg; PostgreSQL hands asyncpg every statement but the
    transaction's first, which SQLAlchemy runs and so begins the transaction."""
    _, user_id = await new_user(store, "5")
    driver_calls.clear()

    async with store.engine.begin() as conn:
        await BALANCE.one(conn, owner=user_id)
        before = len(driver_calls)
        await SET_BALANCE.run(conn, owner=user_id, new_balance=Decimal("4.5"))
        await BALANCE.one(conn, owner=user_id)
        after = driver_calls[before:]

    assert (await store.balances())[user_id] == Decimal("4.5")
    if store.is_sqlite:
        assert driver_calls == []
        return
    dialect = store.engine.dialect
    ours = [SET_BALANCE.asyncpg_form(dialect)[0], BALANCE.asyncpg_form(dialect)[0]]
    assert not set(driver_calls[:before]) & set(ours)
    assert after == ours


async def test_a_rolled_back_transaction_undoes_the_drivers_statements(store: Store) -> None:
    _, user_id = await new_user(store, "5")

    with pytest.raises(RuntimeError, match="undo"):
        async with store.engine.begin() as conn:
            await BALANCE.one(conn, owner=user_id)
            await SET_BALANCE.run(conn, owner=user_id, new_balance=Decimal("1"))
            raise RuntimeError("undo")

    assert (await store.balances())[user_id] == Decimal("5")
