"""The one application object: settings, database, in-memory catalog, upstream client."""

from __future__ import annotations

import asyncio
from typing import Any

from codex_gateway import __version__
from codex_gateway.billing.settlement import Outcome, bill
from codex_gateway.billing.settler import Settler
from codex_gateway.catalog import Catalog
from codex_gateway.config import Settings
from codex_gateway.store.db import create_engine, migrate
from codex_gateway.store.queries import Store
from codex_gateway.upstream.client import UpstreamClient

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
        self.sandbox = sandbox
        self.settler = Settler(self.store, self.catalog.balances.__setitem__)
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await migrate(self.engine)
        await self.catalog.refresh()
        self.settler.start()
        self._poller = asyncio.create_task(self.catalog.poll(self.settings.catalog_refresh_seconds))

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.settler.drain()
        await self.client.close()
        await self.engine.dispose()

    def settle(self, outcome: Outcome) -> None:
        """Price the request and queue its usage row and debit for the writer."""
        self.settler.submit(bill(outcome, self.catalog.prices))
