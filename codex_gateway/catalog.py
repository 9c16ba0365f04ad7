"""What the relay needs per request, held in memory: keys, balances, prices, accounts.

Every administrative write bumps one revision number; each gateway process polls it and
reloads when it moves, so a revoked key or a new price reaches every process within one poll
interval without a database round trip per request. Balances are reloaded on every poll and
updated locally after each settlement.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

from codex_gateway.billing.pricing import PriceTable
from codex_gateway.store.queries import AccountRecord, KeyRecord, Store

log = logging.getLogger(__name__)

RELAYED_KINDS = frozenset({"openai"})


class Catalog:
    def __init__(self, store: Store):
        self._store = store
        self.revision = -1
        self.keys: dict[str, KeyRecord] = {}
        self.balances: dict[int, Decimal] = {}
        self.prices = PriceTable()
        self.accounts: list[AccountRecord] = []
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Reload everything if the revision moved; always reload balances."""
        async with self._lock:
            revision = await self._store.revision()
            if revision != self.revision:
                self.keys = await self._store.active_keys()
                self.prices = PriceTable(await self._store.prices())
                self.accounts = await self._store.accounts()
                self.revision = revision
                log.debug("catalog reloaded at revision %d", revision)
            self.balances = await self._store.balances()

    async def key(self, key_hash: str) -> KeyRecord | None:
        """The active key with this hash; a key created since the last poll is looked up."""
        record = self.keys.get(key_hash)
        if record is not None:
            return record
        found = await self._store.find_key(key_hash)
        if found is None or found.revoked:
            return None
        self.keys[key_hash] = found
        if found.user_id not in self.balances:
            self.balances.update(await self._store.balances())
        return found

    def usable_accounts(self) -> list[AccountRecord]:
        # ChatGPT accounts need their own backend shaping, which this relay does not do yet
        return [a for a in self.accounts if a.enabled and a.kind in RELAYED_KINDS]

    async def poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # the next poll retries; requests keep the last good snapshot
                log.warning("catalog refresh failed", exc_info=True)
