"""The usage windows each ChatGPT account reports, and what they mean for rotation.

The Codex backend announces an account's windows (`x-codex-primary-*`, `x-codex-secondary-*`)
on its answers, and a wall as a `usage_limit_reached` error, in a 429 body or in an `error`
event inside a stream. The latest reading is kept in memory. An account at its limit is marked
quota-limited until the reset, which every process honours; the windows are written to the
database in the background, at most once a second per account, for `accounts list`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from codex_gateway.relay.chatgpt import Quota, quota_from_headers, usage_limit
from codex_gateway.store.credentials import CredentialStore
from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.pool import QUOTA_LIMITED, USAGE_LIMIT_REASON, AccountPool

log = logging.getLogger(__name__)


class QuotaBook:
    def __init__(
        self,
        pool: AccountPool,
        credentials: CredentialStore,
        write_interval: float = 1.0,
        advises: bool = True,
    ):
        """`advises`: say which stored windows are not JSON; false in every worker of a
        `serve` but the first, which says it for them all."""
        self._pool = pool
        self._advises = advises
        self._credentials = credentials
        self._interval = write_interval
        self._quotas: dict[int, Quota] = {}
        self._dirty: set[int] = set()
        self._writers: dict[int, asyncio.Task[None]] = {}
        self._written: dict[int, float] = {}  # loop time of each account's last write

    def get(self, account_id: int) -> Quota | None:
        return self._quotas.get(account_id)

    async def load(self, accounts: list[AccountRecord]) -> None:
        """Take up the windows stored before a restart, so that later readings add to them
        and a wall still in force keeps resting its account."""
        stored = await self._credentials.states()
        for account in accounts:
            document = stored[account.id].quota if account.id in stored else None
            if not document or account.id in self._quotas:
                continue
            try:
                quota = Quota.from_json(orjson.loads(document))
            except orjson.JSONDecodeError:
                if self._advises:
                    log.warning("account %s has stored quota that is not JSON", account.name)
                continue
            self._quotas[account.id] = quota
            self._block(account, quota)

    def answered(self, account: AccountRecord, status: int, headers: Mapping[str, str]) -> None:
        """An upstream answer's headers; one with no windows costs a dictionary look-up."""
        self.reported(account, quota_from_headers(headers), served=status == 200)

    def reported(self, account: AccountRecord, reading: Quota | None, served: bool) -> None:
        """Windows the backend reported (headers or a `codex.rate_limits` event); an answer
        that served the request ends any wall the account was behind."""
        if reading is None:
            return
        current = self._quotas.get(account.id) or Quota()
        self._record(
            account,
            Quota(
                reading.primary or current.primary,
                reading.secondary or current.secondary,
                None if served else current.limit_reached_until,
                reading.plan_type or current.plan_type,
            ),
        )

    def lift(self, account: AccountRecord) -> None:
        """The account was put back into rotation elsewhere (`accounts enable`): forget the
        walls this process knew of, so that a later reading cannot bring them back, and store
        the quota without them (after any write of the walled one already under way)."""
        quota = self._quotas.get(account.id)
        if quota is None:
            return
        lifted = quota.without_walls(time.time())
        if lifted != quota:
            self._quotas[account.id] = lifted
            self._save(account.id)

    def limit_reached(self, account: AccountRecord, payload: Any) -> bool:
        """A 429 body or a stream's `error` event: True when a usage wall now blocks the
        account (until a reset time that lies ahead)."""
        reading = usage_limit(payload, time.time())
        if reading is None:
            return False
        current = self._quotas.get(account.id) or Quota()
        return self._record(account, current.updated(reading))

    def _record(self, account: AccountRecord, quota: Quota) -> bool:
        """Keep the reading; True when it puts the account behind a wall."""
        if quota != self._quotas.get(account.id):
            self._quotas[account.id] = quota
            self._save(account.id)
        return self._block(account, quota)

    def _block(self, account: AccountRecord, quota: Quota) -> bool:
        blocked = quota.blocked_until(time.time())
        if blocked is None:
            return False
        health = self._pool.health(account)
        if health.state == QUOTA_LIMITED and health.until >= blocked:
            return True
        plan = f" (plan {quota.plan_type})" if quota.plan_type else ""
        resets = datetime.fromtimestamp(blocked, UTC).strftime("%Y-%m-%d %H:%M UTC")
        reason = f"{USAGE_LIMIT_REASON}{plan}; resets at {resets}"
        self._pool.quota_limited(account, reason, blocked)
        return True

    def _save(self, account_id: int) -> None:
        self._dirty.add(account_id)
        if account_id in self._writers:
            return
        task = asyncio.get_running_loop().create_task(self._write(account_id))
        self._writers[account_id] = task
        task.add_done_callback(lambda _: self._writers.pop(account_id, None))

    async def _write(self, account_id: int) -> None:
        """Write the latest windows, an interval after the last write at the soonest."""
        loop = asyncio.get_running_loop()
        while account_id in self._dirty:
            wait = self._written.get(account_id, -self._interval) + self._interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._dirty.discard(account_id)
            document = orjson.dumps(self._quotas[account_id].to_json()).decode()
            self._written[account_id] = loop.time()
            try:
                await self._credentials.save_quota(account_id, document)
            except Exception:  # display only: the next reading writes again
                log.warning("could not record the quota of account %d", account_id, exc_info=True)
                return

    async def drain(self) -> None:
        """Wait for pending writes (at shutdown)."""
        if self._writers:
            await asyncio.gather(*self._writers.values(), return_exceptions=True)
