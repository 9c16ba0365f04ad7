"""Database URLs, engines and migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from codex_gateway.billing.pricing import LIST_PRICES, Price
from codex_gateway.store.db import (
    Migration,
    alembic_config,
    create_engine,
    driver_url,
    is_current,
    migrate,
    redact_url,
    schema_state,
)
from codex_gateway.store.queries import Store
from tests.store.dump import dump


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        # SQLite files, relative and absolute
        ("sqlite:///gateway.db", "sqlite+aiosqlite:///gateway.db"),
        ("sqlite:////var/lib/cg/gateway.db", "sqlite+aiosqlite:////var/lib/cg/gateway.db"),
        # PostgreSQL under either scheme name
        ("postgresql://u@127.0.0.1:5432/cg", "postgresql+asyncpg://u@127.0.0.1:5432/cg"),
        ("postgres://u:pw@127.0.0.1/cg", "postgresql+asyncpg://u:pw@127.0.0.1/cg"),
    ],
)
def test_driver_url_picks_the_async_driver(url: str, driver: str) -> None:
    assert driver_url(url) == driver


@pytest.mark.parametrize(
    "url", ["mysql://root:hunter2@127.0.0.1/cg", "sqlite://gateway.db", "gateway.db", ""]
)
def test_unsupported_url_is_refused_without_showing_a_password(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported database URL") as caught:
        create_engine(url)

    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # a password is replaced
        ("postgresql://cg:hunter2@127.0.0.1:5432/cg", "postgresql://cg:***@127.0.0.1:5432/cg"),
        ("postgresql://cg:p@ss@127.0.0.1/cg", "postgresql://cg:***@127.0.0.1/cg"),
        # nothing to hide
        ("postgresql://cg@127.0.0.1/cg", "postgresql://cg@127.0.0.1/cg"),
        ("sqlite:///gateway.db", "sqlite:///gateway.db"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def test_migrating_twice_changes_nothing_the_second_time(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        assert not await is_current(engine)

        created = await migrate(engine)
        assert await is_current(engine)
        first = await dump(engine)
        again = await migrate(engine)
        second = await dump(engine)
    finally:
        await engine.dispose()

    assert second == first
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert (created, again) == (Migration(None, head), Migration(head, head))
    assert first["alembic_version"] == [(head,)]
    assert first["revision"] == [(1, 1)]
    assert len(first["model_pricings"]) == len(LIST_PRICES)


async def test_migration_seeds_the_list_prices(store: Store) -> None:
    prices = await store.prices()

    assert prices == [
        Price(model, Decimal(input_), Decimal(cached), Decimal(output), Decimal(1))
        for model, (input_, cached, output) in sorted(LIST_PRICES.items())
    ]


async def test_schema_state_tells_behind_current_and_ahead(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        before = await schema_state(engine)
        await migrate(engine)
        migrated = await schema_state(engine)
        # what a newer version's migration leaves behind, as seen by this one after a rollback
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        newer = await schema_state(engine)
    finally:
        await engine.dispose()

    assert (before, migrated, newer) == ("behind", "current", "ahead")


async def test_sqlite_reads_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/lock.db")
    await migrate(engine)
    store = Store(engine)
    try:
        async with engine.begin() as writer:
            await writer.execute(text("UPDATE revision SET value = value + 1"))
            # The write lock is held; a read must still answer at once.
            assert await asyncio.wait_for(store.revision(), timeout=5) >= 1
    finally:
        await engine.dispose()
