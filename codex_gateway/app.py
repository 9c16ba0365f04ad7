"""The one application object: settings, database, in-memory catalog, admission, upstream."""

from __future__ import annotations

import asyncio
from typing import Any

from codex_gateway import __version__
from codex_gateway.billing.admission import Admission
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
        self.admission = Admission(
            self.store,
            lease_ttl=settings.lease_ttl_seconds,
            idle_seconds=settings.lease_idle_seconds,
        )
        self.client = UpstreamClient(
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            pool_size=settings.upstream_pool_size,
        )
        self.sandbox = sandbox
        self.settler = Settler(self.store, self.admission.holder, self.admission.settled)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await migrate(self.engine)
        await self.catalog.refresh()
        self.settler.start()
        self._tasks = [
            asyncio.create_task(self.catalog.poll(self.settings.catalog_refresh_seconds)),
            asyncio.create_task(self.admission.maintain(self.settings.lease_renew_seconds)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.settler.drain()
        await self.admission.close()
        await self.client.close()
        await self.engine.dispose()

    def settle(self, outcome: Outcome) -> None:
        """Price the request and queue its usage row and debit for the writer."""
        self.settler.submit(bill(outcome, self.catalog.prices), outcome.hold)
