"""The one application object: settings, database, in-memory catalog, admission, upstream.

It also owns what operations need: the metrics registry, the readiness checks, and the spool
of usage rows the database could not take, which the next start replays.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from codex_gateway.billing.admission import Admission
from codex_gateway.billing.settlement import Outcome, bill
from codex_gateway.billing.settler import Settler
from codex_gateway.billing.spool import Spool
from codex_gateway.catalog import Catalog
from codex_gateway.config import Settings
from codex_gateway.metrics import Metrics
from codex_gateway.readiness import Readiness
from codex_gateway.relay.estimate import TokenCounter
from codex_gateway.store.db import create_engine, migrate, schema_state
from codex_gateway.store.queries import Store
from codex_gateway.upstream.client import UpstreamClient
from codex_gateway.upstream.pool import AccountPool
from codex_gateway.upstream.router import Router
from codex_gateway.upstream.stickiness import build_stickiness
from codex_gateway.version import build_info

log = logging.getLogger(__name__)

ASGIApp = Any
FLAG_CANCELLED = "cancelled"


class Gateway:
    def __init__(self, settings: Settings, sandbox: ASGIApp | None = None):
        self.settings = settings
        self.build = build_info()
        self.version = self.build.version
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
        self.pool = AccountPool(
            self.store, self.catalog.usable_accounts, lambda: self.catalog.revision
        )
        self.metrics = Metrics()
        self.router = Router(
            self.client,
            self.pool,
            build_stickiness(
                settings.redis_url or "", settings.redis_prefix, settings.sticky_ttl_seconds
            ),
            settings,
            self.metrics,
        )
        self.tokens = TokenCounter()
        self.sandbox = sandbox
        self.spool = Spool(Path(settings.spool_path))
        self.settler = Settler(
            self.store, self.admission.holder, self.admission.settled, self._spool
        )
        self.readiness = Readiness(self.engine, self.catalog, settings.redis_url)
        # Relay requests being served; a graceful stop waits for them. Each holds part of a
        # balance until its row is written, so open holds are these plus the queued rows.
        self.in_flight = 0
        self.metrics.track(lambda: self.in_flight, lambda: self.in_flight + self.settler.pending)
        # Set by a second SIGTERM: bills go straight to the spool instead of the database.
        self.forced = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if await schema_state(self.engine) == "ahead":
            log.warning("the database was migrated by a newer version; serving it as it is")
        else:
            await migrate(self.engine)
        await self.spool.replay(self.store.settle)
        await self.catalog.refresh()
        self.settler.start()
        self._tasks = [
            asyncio.create_task(self.catalog.poll(self.settings.catalog_refresh_seconds)),
            asyncio.create_task(self.admission.maintain(self.settings.lease_renew_seconds)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Let a catalog poll or lease renewal caught mid-query unwind while the database is
        # still there: one left to the loop's final cancel waits on a disposed pool for ever.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._relays_done()
        await self.settler.drain()
        await self.admission.close()
        await self.pool.drain()
        await self.router.stickiness.close()
        await self.readiness.close()
        await self.client.close()
        await self.engine.dispose()

    async def _relays_done(self, limit: float = 10.0) -> None:
        """Give relays cancelled at the grace limit time to hand in their bills."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def settle(self, outcome: Outcome) -> None:
        """Price the request and queue its usage row and debit for the writer."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cut by a shutdown (the grace period ran out, or a second SIGTERM), not finished.
            outcome.flag(FLAG_CANCELLED)
            if not outcome.usage_reported:
                outcome.status = FLAG_CANCELLED
        trace = outcome.key_id is not None and outcome.key_id in self.catalog.traced_keys
        row = bill(outcome, self.catalog.prices, trace)
        self.metrics.settled(
            row, self.catalog.account_name(outcome.account_id), outcome.overhead_ms
        )
        if self.forced:
            self._spool(row)
            return
        self.settler.submit(row, outcome.hold)

    def force(self) -> None:
        """Exit without waiting for the database: every bill not yet written goes to the spool.

        A row the writer commits after all is skipped when the spool is replayed; the holds of
        this process's lease lapse with it.
        """
        self.forced = True
        for row in self.settler.abandon():
            self._spool(row)

    def _spool(self, row: dict[str, Any]) -> None:
        self.spool.append(row)
        self.metrics.spooled.inc()
