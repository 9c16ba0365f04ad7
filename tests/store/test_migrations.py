"""Migrations on both backends: 0004 adds the ChatGPT account columns and takes them away
again; 0007 opens the books of reservations so an older database still verifies; 0009's
identity survives a downgrade; 0010 keeps keys in clear as they were and is undone only
while no key is sealed; 0011 keeps accounts and the rows naming them, and gives no removed
account's id to another."""

from __future__ import annotations

from decimal import Decimal

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from codex_gateway.store.db import alembic_config, create_engine, migrate
from codex_gateway.store.queries import Store

CHATGPT_COLUMNS = {
    "chatgpt_account_id",
    "access_token_sealed",
    "refresh_token_sealed",
    "id_token_sealed",
    "token_expires_at",
    "last_refresh_at",
    "state",
    "state_reason",
    "quota",
}


def _columns(connection: Connection) -> set[str]:
    return {column["name"] for column in inspect(connection).get_columns("upstream_accounts")}


def _downgrade(connection: Connection, revision: str = "0003") -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def test_0004_upgrades_and_downgrades_cleanly(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        identity = await Store(engine).database_id()
        async with engine.connect() as conn:
            assert await conn.run_sync(_columns) >= CHATGPT_COLUMNS
            await conn.run_sync(_downgrade)
            await conn.commit()
            assert not CHATGPT_COLUMNS & await conn.run_sync(_columns)
        await migrate(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_columns) >= CHATGPT_COLUMNS
        # 0009's identity outlives the downgrade: journals and the spool still name it.
        assert await Store(engine).database_id() == identity
    finally:
        await engine.dispose()


# What a database held before 0007: a user with a lease, a charged request and a free one.
BEFORE_0007 = [
    "INSERT INTO users (id, name, balance, reserved, created_at)"
    " VALUES (1, 'alice', '0.9', '0.4', '2026-12-01 00:00:00')",
    "INSERT INTO api_keys (id, user_id, key_hash, display, created_at)"
    " VALUES (1, 1, 'h', 'sk-cg-...abcd', '2026-12-01 00:00:00')",
    "INSERT INTO balance_leases (user_id, holder, amount, renewed_at)"
    " VALUES (1, 'host:1:a', '0.4', '2026-12-01 00:00:00')",
    "INSERT INTO ledger_entries (user_id, kind, amount, balance_after, created_at)"
    " VALUES (1, 'topup', '1', '1', '2026-12-01 00:00:00')",
    "INSERT INTO ledger_entries (user_id, kind, amount, balance_after, request_id, created_at)"
    " VALUES (1, 'charge', '-0.1', '0.9', 'req_1', '2026-12-01 00:00:00')",
    *(
        "INSERT INTO usage_records (request_id, started_at, user_id, key_id, endpoint, model,"
        " stream, status, http_status, input_tokens, cached_tokens, uncached_input_tokens,"
        " output_tokens, reasoning_tokens, cost_uncached_input, cost_cached_input, cost_output,"
        " cost_before_markup, cost_usd, flags, duration_ms, client_bytes)"
        f" VALUES ('{request_id}', '2026-12-01 00:00:00', 1, 1, 'responses', 'm', false,"
        f" 'completed', 200, 0, 0, 0, 0, 0, '0', '0', '{cost}', '{cost}', '{cost}', '[]', 1, 0)"
        for request_id, cost in (("req_1", "0.1"), ("req_2", "0"))
    ),
]


def _fill_at(connection: Connection, revision: str, statements: list[str]) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
    for statement in statements:
        connection.exec_driver_sql(statement)


async def _migrated_after(engine: AsyncEngine, revision: str, statements: list[str]) -> Store:
    """A database that held what `statements` write at `revision`, migrated to the newest."""
    async with engine.connect() as conn:
        await conn.run_sync(_fill_at, revision, statements)
        await conn.commit()
    await migrate(engine)
    return Store(engine)


async def test_0007_keeps_existing_books_verifiable(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        store = await _migrated_after(engine, "0006", BEFORE_0007)

        problems, _ = await store.verify_ledger()
        ledger = await store.ledger("alice")
        keys = await store.list_keys()
    finally:
        await engine.dispose()
    assert problems == []
    assert [(e["kind"], e["request_id"]) for e in ledger] == [
        ("topup", None),
        ("settle", "req_1"),
        ("hold", None),
        ("settle", "req_2"),
    ]
    assert ledger[2]["reserved_change"] == Decimal("0.4")
    assert (keys[0]["spent"], keys[0]["held"], keys[0]["cap"]) == (Decimal("0.1"), 0, None)


# An account whose key a version before 0010 stored, in clear.
BEFORE_0010 = [
    "INSERT INTO upstream_accounts (name, kind, base_url, api_key, priority, enabled,"
    " created_at, weight, state) VALUES ('before', 'openai', 'http://127.0.0.1:9/v1',"
    " 'sk-in-clear-0001', 100, true, '2026-12-01 00:00:00', 1, 'ready')"
]


async def test_0010_keeps_keys_in_clear_and_downgrades_only_without_sealed_ones(
    empty_database_url: str,
) -> None:
    engine = create_engine(empty_database_url)
    try:
        store = await _migrated_after(engine, "0009", BEFORE_0010)
        [before] = await store.accounts()
        assert (before.api_key, before.api_key_sealed) == ("sk-in-clear-0001", None)

        await store.add_account("after", "openai", "http://127.0.0.1:9/v1", "SEALED", sealed=True)
        async with engine.connect() as conn:
            with pytest.raises(RuntimeError, match="upstream accounts after are sealed"):
                await conn.run_sync(_downgrade, "0009")
            await conn.rollback()
        await store.remove_account("after")
        async with engine.connect() as conn:
            await conn.run_sync(_downgrade, "0009")
            await conn.commit()
            assert "api_key_sealed" not in await conn.run_sync(_columns)
    finally:
        await engine.dispose()


# Two accounts at 0010; a usage row names the first.
BEFORE_0011 = [
    *(
        "INSERT INTO upstream_accounts (name, kind, base_url, api_key, priority, enabled,"
        f" created_at, weight, state) VALUES ('{name}', 'openai', 'http://127.0.0.1:9/v1', 'k',"
        " 100, true, '2026-12-01 00:00:00', 1, 'ready')"
        for name in ("served", "idle")
    ),
    "INSERT INTO usage_records (request_id, started_at, account_id, endpoint, model, stream,"
    " status, http_status, input_tokens, cached_tokens, uncached_input_tokens, output_tokens,"
    " reasoning_tokens, cost_uncached_input, cost_cached_input, cost_output,"
    " cost_before_markup, cost_usd, flags, duration_ms, client_bytes) VALUES ('req_1',"
    " '2026-12-01 00:00:00', (SELECT id FROM upstream_accounts WHERE name = 'served'),"
    " 'responses', 'm', false, 'completed', 200, 0, 0, 0, 0, 0, '0', '0', '0', '0', '0', '[]',"
    " 1, 0)",
]


async def test_0011_keeps_accounts_and_their_rows_and_never_gives_a_removed_ones_id_again(
    empty_database_url: str,
) -> None:
    engine = create_engine(empty_database_url)
    try:
        store = await _migrated_after(engine, "0010", BEFORE_0011)
        served, idle = await store.accounts()
        assert (served.name, idle.name) == ("served", "idle") and idle.id > served.id
        assert (await store.usage("req_1") or {})["account_id"] == served.id

        await store.remove_account("idle")  # the account with the highest id
        added = await store.add_account("added", "openai", "http://127.0.0.1:9/v1", "k")

        assert added > idle.id
    finally:
        await engine.dispose()


async def test_a_migrated_database_still_refuses_a_row_naming_no_account(
    empty_database_url: str,
) -> None:
    # SQLite's migrations run with its foreign keys off; the connections that serve after
    # them have them on.
    engine = create_engine(empty_database_url)
    try:
        await migrate(engine)
        async with engine.begin() as conn:
            with pytest.raises(IntegrityError):
                await conn.exec_driver_sql(
                    BEFORE_0011[-1].replace(
                        "(SELECT id FROM upstream_accounts WHERE name = 'served')", "999"
                    )
                )
    finally:
        await engine.dispose()


async def test_at_head_account_ids_come_from_a_counter_that_never_goes_back(
    empty_database_url: str,
) -> None:
    # A later migration that builds the table anew on SQLite must keep AUTOINCREMENT.
    engine = create_engine(empty_database_url)
    try:
        await migrate(engine)
        async with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                counter = await conn.scalar(
                    text("SELECT sql FROM sqlite_master WHERE name = 'upstream_accounts'")
                )
                assert "PRIMARY KEY AUTOINCREMENT" in counter
            else:
                counter = await conn.scalar(
                    text("SELECT pg_get_serial_sequence('upstream_accounts', 'id')")
                )
                assert counter == "public.upstream_accounts_id_seq"
    finally:
        await engine.dispose()
