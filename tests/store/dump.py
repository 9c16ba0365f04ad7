"""Every row of every table in a database, for tests that look at the whole of it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData, select
from sqlalchemy.ext.asyncio import AsyncEngine


async def dump(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    """Table name -> its rows, each as a tuple, in a stable order."""
    metadata = MetaData()
    async with engine.connect() as conn:
        await conn.run_sync(metadata.reflect)
        tables = {
            table.name: sorted((await conn.execute(select(table))).all(), key=repr)
            for table in metadata.sorted_tables
        }
        await conn.rollback()
    return {name: [tuple(row) for row in rows] for name, rows in tables.items()}
