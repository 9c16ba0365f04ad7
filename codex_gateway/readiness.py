"""What `/readyz` checks: the database, its migrations, Redis, and something to serve with.

Each check is bounded by a short timeout so a load balancer's probe never hangs, and each
failure is reported as one line naming what is wrong, without credentials.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from codex_gateway.catalog import Catalog
from codex_gateway.store.db import schema_state

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0


class Readiness:
    def __init__(self, engine: AsyncEngine, catalog: Catalog, redis_url: str | None):
        self._engine = engine
        self._catalog = catalog
        self._redis: aioredis.Redis | None = None
        if redis_url:
            # Imported here: a gateway without Redis never loads the client.
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(redis_url, socket_connect_timeout=CHECK_TIMEOUT)

    async def problems(self) -> dict[str, str]:
        """Each failing check by name with the reason; empty when ready."""
        results = {
            "database": await _bounded(self._database()),
            "redis": await _bounded(_ping(self._redis)) if self._redis is not None else None,
            "upstream": self._servable(),
        }
        return {name: reason for name, reason in results.items() if reason is not None}

    async def _database(self) -> str | None:
        async with self._engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            await connection.rollback()
        if await schema_state(self._engine) == "behind":
            return "the schema is not at the newest migration; run `codex-gateway migrate`"
        return None

    def _servable(self) -> str | None:
        if not self._catalog.usable_accounts():
            shut = self._catalog.shut_accounts
            if shut:
                return (
                    f"the sealed API keys of upstream accounts {', '.join(shut)} do not open "
                    "here (the log says why), and no other account can serve"
                )
            return "no enabled upstream account"
        if len(self._catalog.prices) == 0:
            return "no model has a price"
        return None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


async def _ping(client: aioredis.Redis) -> str | None:
    await client.ping()
    return None


async def _bounded(check: Awaitable[str | None]) -> str | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await check
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:  # any driver error means not ready; the reason is what matters
        log.debug("readiness check failed", exc_info=True)
        return f"unreachable ({type(exc).__name__})"
