"""What the relay needs per request, held in memory: keys, prices, accounts.

Every administrative write bumps one revision number; each gateway process polls it and
reloads when it moves, so a revoked key or a new price reaches every process within one poll
interval without a database round trip per request. Balances are not cached here: admission
holds requests against balance leases (billing/admission.py). When a reload shows a key's cap,
expiry or revocation changed, or a correction lowered a user's balance, `on_limits` hears of
those keys and users, so admission hands their unused leases back at once. Sealed upstream
API keys are opened as the accounts are loaded; an account whose key does not open keeps the
key this process last held for it, or is left out if it held none (`upstream/sealing.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import SQLAlchemyError

from codex_gateway.billing.pricing import PriceTable
from codex_gateway.errors import StorageUnavailable
from codex_gateway.store.queries import AccountRecord, KeyRecord, Store
from codex_gateway.upstream.sealing import ApiKeyOpener

log = logging.getLogger(__name__)

# Hashes of keys that matched nothing, so a flood of bad keys costs no database round trips.
# A key created later is new random text, so it can never be in this set.
MAX_UNKNOWN_KEYS = 10_000
# Account kinds the relay can send to; a gateway without a secret key leaves out `chatgpt`.
RELAYED_KINDS = frozenset({"openai", "chatgpt"})

# Told the users and keys whose limits moved: (user ids, key ids).
OnLimits = Callable[[set[int], set[int]], Awaitable[None]]


class Catalog:
    def __init__(
        self,
        store: Store,
        kinds: frozenset[str] = RELAYED_KINDS,
        api_keys: ApiKeyOpener | None = None,
    ):
        self._store = store
        self._kinds = kinds
        self._api_keys = api_keys or ApiKeyOpener(None)
        self.revision = -1
        self.keys: dict[str, KeyRecord] = {}
        self.prices = PriceTable()
        self.accounts: list[AccountRecord] = []
        # Enabled accounts left out because their sealed API keys do not open here, and
        # why, as a client may be told it.
        self.shut_accounts: list[str] = []
        self.left_out: str | None = None
        self._unknown_keys: set[str] = set()
        self.traced_keys: frozenset[int] = frozenset()
        self._lock = asyncio.Lock()
        self.on_limits: OnLimits | None = None

    async def refresh(self) -> None:
        """Reload everything if the revision moved; read first, then swap in together."""
        async with self._lock:
            revision = await self._store.revision()
            if revision == self.revision:
                return
            keys = await self._store.active_keys()
            prices = PriceTable(await self._store.prices())
            accounts, shut = self._api_keys.open(await self._store.accounts())
            traced_keys = await self._store.traced_keys()
            first, previous = self.revision < 0, self.revision
            lowered = set() if first else await self._store.lowered_since(previous)
            changed = _changed_keys(self.keys, keys)
            self.keys, self.prices, self.accounts = keys, prices, accounts
            self.shut_accounts = shut
            self.left_out = self._api_keys.left_out(shut)
            self.traced_keys = traced_keys
            self._unknown_keys.clear()
            self.revision = revision
            log.debug("catalog reloaded at revision %d", revision)
        if (lowered or changed) and self.on_limits is not None:
            await self.on_limits(lowered, changed)

    async def key(self, key_hash: str) -> KeyRecord | None:
        """The active key with this hash; a key created since the last poll is looked up."""
        record = self.keys.get(key_hash)
        if record is not None:
            return record
        if key_hash in self._unknown_keys:
            return None
        try:
            found = await self._store.find_key(key_hash)
        except (OSError, SQLAlchemyError) as exc:
            log.error("cannot look up a key: %s", exc)
            raise StorageUnavailable(
                "The gateway cannot check this API key right now; retry in a moment."
            ) from None
        if found is None or found.revoked:
            if len(self._unknown_keys) >= MAX_UNKNOWN_KEYS:
                self._unknown_keys.clear()
            self._unknown_keys.add(key_hash)
            return None
        self.keys[key_hash] = found
        return found

    def usable_accounts(self) -> list[AccountRecord]:
        return [a for a in self.accounts if a.enabled and a.kind in self._kinds]

    def account_name(self, account_id: int | None) -> str | None:
        return next((a.name for a in self.accounts if a.id == account_id), None)

    async def poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # the next poll retries; requests keep the last good snapshot
                log.warning("catalog refresh failed", exc_info=True)


def _changed_keys(old: dict[str, KeyRecord], new: dict[str, KeyRecord]) -> set[int]:
    """Keys whose cap, expiry or revocation changed, or that are no longer active."""
    now = {record.id: record.limits() for record in new.values()}
    return {record.id for record in old.values() if now.get(record.id) != record.limits()}
