"""The one application object: settings, database, in-memory catalog, upstream client."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from codex_gateway import __version__
from codex_gateway.billing.settlement import Outcome, bill
from codex_gateway.catalog import Catalog
from codex_gateway.config import Settings
from codex_gateway.relay.estimate import TokenCounter
from codex_gateway.store.db import create_engine, migrate
from codex_gateway.store.queries import Store
from codex_gateway.upstream.client import UpstreamClient
from codex_gateway.upstream.pool import AccountPool
from codex_gateway.upstream.router import Router
from codex_gateway.upstream.stickiness import build_stickiness

log = logging.getLogger(__name__)

ASGIApp = Any


class Gateway:
    def __init__(self, settings: Settings, sandbox: ASGIApp | None = None):
        self.settings = settings
        self.version = __version__
        self.engine = create_engine(settings.database_url)
        self.store = Store(self.engine)
        self.catalog = Catalog(self.store)
        self.client = UpstreamClient(
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            pool_size=settings.upstream_pool_size,
        )
        self.pool = AccountPool(
            self.store, self.catalog.usable_accounts, lambda: self.catalog.revision
        )
        self.router = Router(
            self.client,
            self.pool,
            build_stickiness(
                settings.redis_url, settings.redis_prefix, settings.sticky_ttl_seconds
            ),
            settings,
        )
        self.tokens = TokenCounter()
        self.sandbox = sandbox
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await migrate(self.engine)
        await self.catalog.refresh()
        await asyncio.to_thread(self.tokens.load)
        self._poller = asyncio.create_task(self.catalog.poll(self.settings.catalog_refresh_seconds))

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.pool.drain()
        await self.router.stickiness.close()
        await self.client.close()
        await self.engine.dispose()

    async def settle(self, outcome: Outcome) -> None:
        """Write the usage row and debit the cost; a failure is logged with the whole row."""
        row = bill(outcome, self.catalog.prices)
        try:
            balance = await self.store.settle(row)
        except Exception:
            log.error(
                "could not write usage row %s: %r",
                outcome.request_id,
                row,
                exc_info=True,
                extra={"request_id": outcome.request_id},
            )
            return
        if balance is not None and outcome.user_id is not None:
            self.catalog.balances[outcome.user_id] = balance
