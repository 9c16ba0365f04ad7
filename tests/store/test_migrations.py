"""Migration 0004 adds the ChatGPT account columns and takes them away again, on both backends."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from codex_gateway.store.db import alembic_config, create_engine, migrate

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


def _downgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, "0003")


async def test_0004_upgrades_and_downgrades_cleanly(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_columns) >= CHATGPT_COLUMNS
            await conn.run_sync(_downgrade)
            await conn.commit()
            assert not CHATGPT_COLUMNS & await conn.run_sync(_columns)
        await migrate(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_columns) >= CHATGPT_COLUMNS
    finally:
        await engine.dispose()
