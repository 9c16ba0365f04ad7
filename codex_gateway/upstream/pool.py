"""Which upstream account serves a request, and the health of each account.

Selection: lowest priority number first, then the fewest requests in flight per unit of
weight, then the account whose turn it is (stride scheduling: with equal weights that is the
least recently used one; an account of weight 2 gets two turns to another's one). Accounts
that are disabled, at their concurrency cap, at a quota limit or needing re-login are
skipped. An account cooling down after a transient failure is tried only when no healthy one
is left, so one flaky upstream never turns into a refusal.

Health lives in memory. Each change is also written to the database in the background, so
`accounts list` shows it and other processes pick it up through the catalog's revision
polling; the request path never waits for that write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from codex_gateway.store.queries import AccountRecord, Store

log = logging.getLogger(__name__)

READY = "ready"
COOLING_DOWN = "cooling_down"
QUOTA_LIMITED = "quota_limited"
NEEDS_RELOGIN = "needs_relogin"
# States that end by themselves when their time is up.
TIMED_STATES = frozenset({COOLING_DOWN, QUOTA_LIMITED})
# How the reason of a quota_limited mark begins when a usage wall put it there (rather than
# a plain 429); the reason travels through the database, so every process can tell.
USAGE_LIMIT_REASON = "usage limit reached"


@dataclass
class Health:
    """One account's state in this process."""

    state: str = READY
    reason: str | None = None
    until: float = 0.0  # epoch seconds; 0 when the state has no end
    in_flight: int = 0
    turn: float = 0.0  # stride-scheduling pass value
    last_used: float = 0.0
    seen: tuple[str, str | None, datetime | None] | None = None
    # A snapshot older than this revision predates this process's own last mark.
    mark_revision: float = 0.0

    def current(self, now: float) -> str:
        if self.state in TIMED_STATES and self.until <= now:
            return READY
        return self.state


class Lease:
    """An account reserved for one attempt; `release` gives its concurrency slot back."""

    __slots__ = ("_health", "account", "released")

    def __init__(self, account: AccountRecord, health: Health):
        self.account = account
        self._health = health
        self.released = False
        health.in_flight += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._health.in_flight -= 1


class AccountPool:
    def __init__(
        self,
        store: Store,
        accounts: Callable[[], list[AccountRecord]],
        revision: Callable[[], int],
        left_out: Callable[[], str | None] = lambda: None,
    ):
        self._store = store
        self._accounts = accounts
        self._revision = revision
        # Why accounts not among `accounts` were left out (their sealed keys do not open).
        self._left_out = left_out
        self._health: dict[int, Health] = {}
        self._floor = 0.0
        self._writes: set[asyncio.Task[None]] = set()
        # Told when this process adopts `ready` written elsewhere (the operator enabling the
        # account, or another process it served), so that what rested it here rests it no more.
        self.on_ready: Callable[[AccountRecord], None] | None = None

    def health(self, account: AccountRecord) -> Health:
        """This process's view, adopting a state another process or the operator wrote."""
        health = self._health.get(account.id)
        if health is None:
            health = self._health[account.id] = Health()
        stored = (account.state, account.state_reason, account.state_until)
        if health.seen != stored and self._revision() >= health.mark_revision:
            # Not a first look: a state this process held gives way to `ready`.
            lifted = health.seen is not None and health.state != READY and account.state == READY
            health.seen = stored
            health.state, health.reason = account.state, account.state_reason
            health.until = _epoch(account.state_until)
            if lifted and self.on_ready is not None:
                self.on_ready(account)
        return health

    def choose(self, exclude: set[int], preferred: int | None = None) -> Lease | None:
        """Reserve the best account not in `exclude`, or None when none can be tried."""
        now = time.time()
        ready: list[tuple[AccountRecord, Health]] = []
        resting: list[tuple[AccountRecord, Health]] = []
        for account in self._accounts():
            if not account.enabled or account.id in exclude:
                continue
            health = self.health(account)
            if account.max_concurrency is not None and health.in_flight >= account.max_concurrency:
                continue
            state = health.current(now)
            if state == READY:
                ready.append((account, health))
            elif state == COOLING_DOWN:
                resting.append((account, health))
        candidates = ready or resting
        if not candidates:
            return None
        chosen = next((pair for pair in ready if pair[0].id == preferred), None)
        if chosen is None:
            chosen = min(candidates, key=self._rank)
        return self._lease(*chosen, now)

    def _rank(self, pair: tuple[AccountRecord, Health]) -> tuple[int, float, float, float, int]:
        account, health = pair
        weight = max(account.weight, 1)
        return (
            account.priority,
            health.in_flight / weight,
            max(health.turn, self._floor),
            health.last_used,
            account.id,
        )

    def _lease(self, account: AccountRecord, health: Health, now: float) -> Lease:
        start = max(health.turn, self._floor)
        self._floor = start
        health.turn = start + 1 / max(account.weight, 1)
        health.last_used = now
        return Lease(account, health)

    def why_none(self, exclude: set[int]) -> str:
        """Why `choose` found nothing, as a sentence for the client, with the accounts left
        out before the pool saw them."""
        now = time.time()
        states: list[str] = []
        for account in self._accounts():
            if account.id in exclude:
                continue
            if not account.enabled:
                states.append("disabled")
                continue
            health = self.health(account)
            if account.max_concurrency is not None and health.in_flight >= account.max_concurrency:
                states.append("at its concurrency limit")
            else:
                states.append(health.current(now).replace("_", " "))
        left_out = self._left_out()
        if not states:
            opening = "No upstream account is available to serve this request"
            return f"{opening}: {left_out}." if left_out else f"{opening}."
        summary = ", ".join(sorted(set(states)))
        opening = f"No upstream account can serve this request now (accounts are {summary})"
        return f"{opening}; {left_out}." if left_out else f"{opening}."

    def usage_limit_reset(self) -> float | None:
        """When every account able to serve is behind a usage wall, the earliest reset.

        Accounts that need a new sign-in cannot serve and do not count; one cooling down
        after a passing failure, or at a plain 429, can, so then this is None.
        """
        now = time.time()
        resets: list[float] = []
        for account in self._accounts():
            health = self.health(account)
            state = health.current(now)
            if state == NEEDS_RELOGIN:
                continue
            walled = state == QUOTA_LIMITED and (health.reason or "").startswith(USAGE_LIMIT_REASON)
            if not walled:
                return None
            resets.append(health.until)
        return min(resets) if resets else None

    # -- marks -----------------------------------------------------------------------------

    def succeeded(self, account: AccountRecord) -> None:
        health = self.health(account)
        if health.state == COOLING_DOWN:
            self._mark(account, health, READY, None, 0.0)

    def failed(self, account: AccountRecord, reason: str, seconds: float) -> None:
        """A transient failure: rest the account for `seconds`."""
        self._mark(account, self.health(account), COOLING_DOWN, reason, time.time() + seconds)

    def quota_limited(self, account: AccountRecord, reason: str, until: float) -> None:
        self._mark(account, self.health(account), QUOTA_LIMITED, reason, until)

    def needs_relogin(self, account: AccountRecord, reason: str) -> None:
        self._mark(account, self.health(account), NEEDS_RELOGIN, reason, 0.0)

    def _mark(
        self, account: AccountRecord, health: Health, state: str, reason: str | None, until: float
    ) -> None:
        changed = health.state != state or health.reason != reason
        health.state, health.reason, health.until = state, reason, until
        stamp = datetime.fromtimestamp(until, UTC) if until else None
        health.seen = (state, reason, stamp)
        if not changed and state not in TIMED_STATES:
            return
        health.mark_revision = float("inf")  # until the write says which revision holds it
        log.warning(
            "account %s is now %s%s",
            account.name,
            state,
            f": {reason}" if reason else "",
            extra={"account": account.name},
        )
        task = asyncio.get_running_loop().create_task(
            self._write(account, health, state, reason, stamp)
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(
        self,
        account: AccountRecord,
        health: Health,
        state: str,
        reason: str | None,
        until: datetime | None,
    ) -> None:
        try:
            revision = await self._store.mark_account(account.id, state, reason, until)
        except Exception:  # the in-memory mark still holds; the next change writes again
            log.warning("could not record the state of account %s", account.name, exc_info=True)
            revision = self._revision() + 1
        if health.seen == (state, reason, until):
            health.mark_revision = revision

    async def drain(self) -> None:
        """Wait for pending state writes (at shutdown)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def _epoch(stamp: datetime | None) -> float:
    if stamp is None:
        return 0.0
    if stamp.tzinfo is None:  # SQLite gives back naive UTC
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def quota_reset(headers: Mapping[str, str], body: Any, now: float, default_seconds: float) -> float:
    """When a 429'd account may be tried again, from the headers or body, else a default.

    Understood: `retry-after` (seconds), the Codex backend's `x-codex-*-reset-at` (epoch
    seconds) and its body's `error.resets_at` / `error.resets_in_seconds`.
    """
    candidates: list[float] = []
    retry_after = _number(headers.get("retry-after"))
    if retry_after is not None:
        candidates.append(now + retry_after)
    for window in ("primary", "secondary"):
        used = _number(headers.get(f"x-codex-{window}-used-percent"))
        reset_at = _number(headers.get(f"x-codex-{window}-reset-at"))
        if reset_at is not None and (used is None or used >= 100):
            candidates.append(reset_at)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        resets_at = _number(error.get("resets_at"))
        if resets_at is not None:
            candidates.append(resets_at)
        resets_in = _number(error.get("resets_in_seconds"))
        if resets_in is not None:
            candidates.append(now + resets_in)
    future = [moment for moment in candidates if moment > now]
    return max(future) if future else now + default_seconds


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
