"""Statements settling runs for every batch give the same rows on SQLite and PostgreSQL,
whichever way they run (`store/direct.py`)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import NoResultFound, StatementError

from codex_gateway.store.direct import DriverStatement
from codex_gateway.store.queries import Store
from codex_gateway.store.tables import User
from tests.store.test_queries import new_user

BALANCE = DriverStatement(select(User.balance, User.name).where(User.id == bindparam("owner")))
SET_BALANCE = DriverStatement(
    update(User).where(User.id == bindparam("owner")).values(balance=bindparam("new_balance"))
)


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


async def test_money_that_is_no_decimal_is_refused_either_way(store: Store) -> None:
    """As the first statement (SQLAlchemy) and after it (asyncpg on PostgreSQL)."""
    _, user_id = await new_user(store, "5")

    async with store.engine.begin() as conn:
        with pytest.raises(StatementError, match="money must be a Decimal"):
            await SET_BALANCE.run(conn, owner=user_id, new_balance=0.1)
    async with store.engine.begin() as conn:
        await BALANCE.one(conn, owner=user_id)
        with pytest.raises(StatementError, match="money must be a Decimal"):
            await SET_BALANCE.run(conn, owner=user_id, new_balance=0.1)

    assert (await store.balances())[user_id] == Decimal("5")


async def test_a_rolled_back_transaction_undoes_every_statement(store: Store) -> None:
    _, user_id = await new_user(store, "5")

    with pytest.raises(RuntimeError, match="undo"):
        async with store.engine.begin() as conn:
            await BALANCE.one(conn, owner=user_id)
            await SET_BALANCE.run(conn, owner=user_id, new_balance=Decimal("1"))
            raise RuntimeError("undo")

    assert (await store.balances())[user_id] == Decimal("5")
