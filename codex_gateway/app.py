"""The one application object: settings, database, in-memory catalog, upstream client.

It also owns what operations need: the metrics registry, the readiness checks, the spool of
usage rows the database could not take, and the count of bills still to settle, which a
graceful shutdown waits for.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from codex_gateway.billing.settlement import Outcome, bill
from codex_gateway.billing.spool import Spool
from codex_gateway.catalog import Catalog
from codex_gateway.config import Settings
from codex_gateway.metrics import Metrics
from codex_gateway.readiness import Readiness
from codex_gateway.store.db import create_engine, migrate, schema_state
from codex_gateway.store.queries import Store
from codex_gateway.upstream.client import UpstreamClient
from codex_gateway.version import build_info

log = logging.getLogger(__name__)

FLAG_CANCELLED = "cancelled"

ASGIApp = Any


class Gateway:
    def __init__(self, settings: Settings, sandbox: ASGIApp | None = None):
        self.settings = settings
        self.build = build_info()
        self.version = self.build.version
        self.engine = create_engine(settings.database_url)
        self.store = Store(self.engine)
        self.catalog = Catalog(self.store)
        self.client = UpstreamClient(
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            pool_size=settings.upstream_pool_size,
        )
        self.sandbox = sandbox
        self.metrics = Metrics()
        self.spool = Spool(Path(settings.spool_path))
        self.readiness = Readiness(self.engine, self.catalog, settings.redis_url)
        # Relay requests from arrival until their bill is settled, and bills being written.
        self.in_flight = 0
        self.settling = 0
        self.metrics.track(lambda: self.in_flight, lambda: self.settling)
        # Set by a second SIGTERM: bills go straight to the spool instead of the database.
        self.forced = False
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if await schema_state(self.engine) == "ahead":
            log.warning("the database was migrated by a newer version; serving it as it is")
        else:
            await migrate(self.engine)
        await self.spool.replay(self.store.settle)
        await self.catalog.refresh()
        self._poller = asyncio.create_task(self.catalog.poll(self.settings.catalog_refresh_seconds))

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self._relays_done()
        await self.readiness.close()
        await self.client.close()
        await self.engine.dispose()

    async def _relays_done(self, limit: float = 10.0) -> None:
        """Give relays still settling (e.g. streams cancelled at the grace limit) time to land."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def settle(self, outcome: Outcome) -> None:
        """Write the usage row and debit the cost; a row the database cannot take is spooled."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cut by a shutdown (the grace period ran out, or a second SIGTERM), not finished.
            outcome.flag(FLAG_CANCELLED)
            if not outcome.usage_reported:
                outcome.status = FLAG_CANCELLED
        trace = outcome.key_id is not None and outcome.key_id in self.catalog.traced_keys
        row = bill(outcome, self.catalog.prices, trace)
        self.settling += 1
        try:
            balance = await self._write(row)
        finally:
            self.settling -= 1
        self.metrics.settled(
            row, self.catalog.account_name(outcome.account_id), outcome.overhead_ms
        )
        if balance is not None and outcome.user_id is not None:
            self.catalog.balances[outcome.user_id] = balance

    async def _write(self, row: dict[str, Any]) -> Any:
        if self.forced:
            self._spool(row)
            return None
        try:
            balance = await self.store.settle(row)
        except asyncio.CancelledError:
            self._spool(row)
            raise
        except Exception:
            log.error(
                "could not write usage row; spooling it",
                exc_info=True,
                extra={"request_id": row["request_id"]},
            )
            self._spool(row)
            return None
        self.metrics.settlements.labels("written").inc()
        return balance

    def _spool(self, row: dict[str, Any]) -> None:
        self.spool.append(row)
        self.metrics.settlements.labels("spooled").inc()
