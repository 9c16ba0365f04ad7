"""Admission: a request goes upstream only if the user's balance covers its largest cost.

Each request holds an estimate of its maximum cost until it is settled. The holds are checked
against a lease: a slice of the user's balance this process has set aside in the database.
While the lease covers a request, admitting it costs no database round trip; when it does
not, the process asks for a larger slice, which the database grants only from what no other
process has set aside. So all processes together never admit more than the balance, and an
unused lease is handed back after a short idle time. A lease running low is grown in the
background while what is left still admits requests, so a steady stream of requests seldom
waits for the database (which may be busy writing bills). A key with a USD cap is admitted the
same way against a second lease, a slice of the cap.

When a limit moves under a lease (a cap lowered, a key revoked or its expiry changed, a
correction that lowers a balance), the catalog tells admission, which hands back the unused
part of those leases at once; the next request leases again against the new limit. A capped
key is also checked in memory against the spending the catalog last loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, NamedTuple, Protocol

from sqlalchemy.exc import SQLAlchemyError

from codex_gateway.billing.pricing import MILLION, MONEY, ZERO, Price, plain
from codex_gateway.errors import InsufficientQuota, StorageUnavailable
from codex_gateway.store.queries import (
    EVERYTHING,
    KEY_LEASES,
    USER_LEASES,
    KeyRecord,
    LeaseScope,
    Settled,
    Store,
)

log = logging.getLogger(__name__)

# Tokens of input the upstream may add to what the request carries (its own system text).
INPUT_ALLOWANCE_TOKENS = 1_000
# Top-level fields that make the upstream read input the body does not carry.
STORED_INPUT_FIELDS = ("previous_response_id", "conversation", "prompt")
# Tools the upstream runs itself, whose results become input the body does not carry: chunks
# of stored files, an MCP server's answers, the output of code or of a shell it runs in a
# container. Tools the client runs (function, custom, local_shell, computer use) come back
# in the next request's body, and a web search is left out: Codex CLI offers one with every
# request, and its results are far smaller than a context window.
STORED_INPUT_TOOLS = frozenset({"file_search", "mcp", "code_interpreter"})
HOSTED_SHELLS = frozenset({"container_auto", "container_reference"})
# Byte hints of input items that point elsewhere (files or images by URL, stored items);
# checked before any walk of the input.
_POINTER_HINTS = (b'"file_id"', b'"file_url"', b'"image_url"', b'"item_reference"')
# A new lease covers up to this many requests like the one asking (and at most half of what
# is unreserved), so most requests find room without asking the database again.
LEASE_REQUESTS = 16
# A lease is grown in the background once what is left covers fewer requests than this, or
# less than half of what is held, whichever is more.
REFILL_REQUESTS = LEASE_REQUESTS // 4
# After a background refill got nothing (everything left is set aside, or the database cannot
# be reached), none is tried for this long; a request that finds the lease empty still asks.
REFILL_PAUSE_SECONDS = 1.0


class Hold(NamedTuple):
    """What one request holds: against its user's balance, and against its key's cap (0 for
    a key without one)."""

    user: Decimal
    key: Decimal = ZERO


NO_HOLD = Hold(ZERO)


def estimate_hold(
    price: Price,
    body_bytes: int,
    max_output_tokens: object,
    default_output_tokens: int,
    context_tokens: int = 0,
) -> Decimal:
    """The most a request can cost: every body byte a token, plus the largest output.

    A token is at least one byte of text, so the body's length bounds its input tokens,
    unless the request makes the upstream read input it does not carry; then the caller
    passes the model's context window as `context_tokens`, which bounds the input instead.
    Output is bounded by the request's `max_output_tokens`, else by the default cap.
    """
    output = (
        max_output_tokens
        if isinstance(max_output_tokens, int)
        and not isinstance(max_output_tokens, bool)
        and max_output_tokens > 0
        else default_output_tokens
    )
    return cost_at_most(price, held_input_tokens(body_bytes, context_tokens), output)


def held_input_tokens(body_bytes: int, context_tokens: int = 0) -> int:
    """The input tokens a hold is made for (see `estimate_hold`)."""
    return max(body_bytes + INPUT_ALLOWANCE_TOKENS, context_tokens)


def cost_at_most(price: Price, input_tokens: int, output_tokens: int) -> Decimal:
    """What `input_tokens` and `output_tokens` cost at `price`, none of them cached."""
    input_cost = MONEY.multiply(Decimal(input_tokens), price.input)
    output_cost = MONEY.multiply(Decimal(output_tokens), price.output)
    total = MONEY.divide(MONEY.add(input_cost, output_cost), MILLION)
    return MONEY.multiply(total, price.markup)


class LargestCost(NamedTuple):
    """What a request holds, and the input tokens that hold is made for."""

    cost: Decimal
    input_tokens: int


def largest_cost(
    price: Price,
    document: dict[str, Any],
    body: bytes,
    default_output_tokens: int,
    context_tokens: int,
) -> LargestCost:
    """What a request holds: `estimate_hold` of its body, with the context window of
    `context_tokens` as its input when it makes the upstream read input it does not carry."""
    context = context_tokens if reads_stored_input(document, body) else 0
    cost = estimate_hold(
        price, len(body), document.get("max_output_tokens"), default_output_tokens, context
    )
    return LargestCost(cost, held_input_tokens(len(body), context))


def reads_stored_input(document: dict[str, Any], body: bytes) -> bool:
    """Whether the upstream may bill input the body does not carry: an earlier response or
    conversation, a stored prompt, a file by id or URL, an image by URL, a stored item, or
    the results of a tool it runs itself (STORED_INPUT_TOOLS)."""
    if any(document.get(name) for name in STORED_INPUT_FIELDS):
        return True
    if _runs_input_tools(document.get("tools")):  # a few entries, read without a byte scan
        return True
    # A key spelled with JSON escapes (`"image\u005furl"`) hides from the byte hints, so a
    # body with any escape is walked in full.
    if not any(hint in body for hint in _POINTER_HINTS) and b"\\u" not in body:
        return False
    return _points_elsewhere(document.get("input"))


def _runs_input_tools(tools: object) -> bool:
    if not isinstance(tools, list):
        return False
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind in STORED_INPUT_TOOLS:
            return True
        if kind == "shell" and _hosted(tool.get("environment")):
            return True
        if kind == "namespace" and _runs_input_tools(tool.get("tools")):
            return True
    return False


def _hosted(environment: object) -> bool:
    """Whether a shell tool's commands run in the upstream's container, not the client's."""
    return isinstance(environment, dict) and environment.get("type") in HOSTED_SHELLS


def _points_elsewhere(value: object) -> bool:
    if isinstance(value, list):
        return any(_points_elsewhere(item) for item in value)
    if not isinstance(value, dict):
        return False
    if value.get("file_id") or value.get("file_url") or value.get("type") == "item_reference":
        return True
    image = value.get("image_url")
    if isinstance(image, dict):
        image = image.get("url")
    if isinstance(image, str) and not image.startswith("data:"):
        return True
    return _points_elsewhere(value.get("content"))


class _Gate:
    """A lease's lock, and a wait for its holder to be done that every waiting request shares.

    Requests that find their lease without room wait for the grant under way together, and
    all try the grown lease in the same turn of the loop, instead of queueing for the lock and
    taking it one per turn (at c=128 after a start, a turn took about a millisecond and the
    last of them waited 200 ms for a grant that had come in 12).
    """

    __slots__ = ("_done", "_lock")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._done: asyncio.Future[None] | None = None

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
        done, self._done = self._done, None
        if done is not None:
            done.set_result(None)

    async def released(self) -> None:
        """Wait until the holder of the lock lets it go (at once when nobody holds it)."""
        if not self._lock.locked():
            return
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        # Shielded: one waiter cancelled (by a shutdown) does not cancel the others' wait.
        await asyncio.shield(self._done)


@dataclass
class _Lease:
    leased: Decimal = ZERO
    held: Decimal = ZERO
    idle_since: float = field(default_factory=time.monotonic)
    lock: _Gate = field(default_factory=_Gate)
    refill: asyncio.Task[None] | None = None
    refill_paused_until: float = 0.0
    # Grants so far: maintenance leaves alone a lease granted more after its reading.
    grants: int = 0
    # The spare part was handed back (a limit moved, or the lease sat idle): the lease admits
    # nothing from its own room until the database grants it more, and what its requests in
    # flight leave over when they settle (a hold less the cost) goes back before it asks.
    needs_grant: bool = False
    # Requests waiting for the lock's holder, to be admitted by the grant it asks for (see
    # `_wanted`).
    waiting: int = 0


class LeaseGrants(Protocol):
    """Where grants are asked for: the store itself, or the store on a thread of its own
    (`StoreThread`), whose statements do not each wait for a turn of a busy request loop."""

    async def acquire_lease(
        self,
        owner_id: int,
        holder: str,
        needed: Decimal,
        wanted: Decimal,
        scope: LeaseScope | None = None,
    ) -> Decimal: ...


class _Leases:
    """This process's leases of one scope: users' balances, or capped keys' caps."""

    def __init__(self, store: Store, scope: LeaseScope, holder: str, grants: LeaseGrants):
        self._store = store
        self._grants = grants
        # Grants still running whose askers were cancelled (`_acquire`).
        self._late: set[asyncio.Future[Decimal]] = set()
        self.scope = scope
        self._holder = holder
        self.leases: dict[int, _Lease] = {}

    async def take(self, owner_id: int, estimate: Decimal) -> bool:
        """Hold `estimate` against the owner's lease, growing the lease if it must."""
        lease = self.leases.setdefault(owner_id, _Lease())
        if _take(lease, estimate):
            if (
                lease.refill is None
                and _running_low(lease, estimate)
                and time.monotonic() >= lease.refill_paused_until
            ):
                lease.refill = asyncio.create_task(self._refill(owner_id, lease, estimate))
            return True
        lease.waiting += 1
        try:
            while lease.lock.locked():
                await lease.lock.released()
                if _take(lease, estimate):
                    return True
        finally:
            lease.waiting -= 1
        async with lease.lock:
            return await self._take_granted(owner_id, lease, estimate)

    async def _take_granted(self, owner_id: int, lease: _Lease, estimate: Decimal) -> bool:
        """`take` for a request the lease had no room for, with the lease's lock held: grown
        by a grant that also makes room for the requests waiting behind it, so that a burst
        which finds the lease empty waits for one grant, not for one after another."""
        if _take(lease, estimate):
            return True
        if lease.needs_grant:
            await self._storage(self._hand_back_spare(owner_id, lease))
        shortfall = MONEY.subtract(estimate, MONEY.subtract(lease.leased, lease.held))
        granted = await self._acquire(owner_id, shortfall, _wanted(lease, estimate, shortfall))
        if granted > 0:
            _grow(lease, granted)
            return _take(lease, estimate)
        return False

    async def _refill(self, owner_id: int, lease: _Lease, estimate: Decimal) -> None:
        """Grow a lease running low before a request has to wait for it. When that gets
        nothing, the next background try waits REFILL_PAUSE_SECONDS; a failure is left to
        the request that finds the lease empty, which reports it."""
        try:
            async with lease.lock:
                if _running_low(lease, estimate):
                    wanted = _wanted(lease, estimate, estimate)
                    granted = await self._acquire(owner_id, estimate, wanted)
                    if granted > 0:
                        _grow(lease, granted)
                    else:
                        _pause_refills(lease)
        except StorageUnavailable:
            _pause_refills(lease)  # logged by `_acquire`
        finally:
            lease.refill = None

    async def settle_refills(self) -> None:
        """Wait for the leases being grown in the background, and for the grants whose
        askers were cancelled."""
        refills = [lease.refill for lease in self.leases.values() if lease.refill is not None]
        await asyncio.gather(*refills)
        await asyncio.gather(*self._late, return_exceptions=True)

    def grants(self) -> dict[int, int]:
        """How many grants each lease has had, for `maintain`."""
        return {owner_id: lease.grants for owner_id, lease in self.leases.items()}

    async def _acquire(self, owner_id: int, needed: Decimal, wanted: Decimal) -> Decimal:
        """A grant. One whose asker is cancelled meanwhile (by a shutdown) may still be
        committed where it runs, on the grants thread; what it grants then joins the lease
        all the same, so that this process's lease never holds less than the database's."""
        granting = asyncio.ensure_future(
            self._grants.acquire_lease(owner_id, self._holder, needed, wanted, self.scope)
        )
        try:
            return await self._storage(asyncio.shield(granting))
        except asyncio.CancelledError:
            self._late.add(granting)
            granting.add_done_callback(partial(self._granted_late, owner_id))
            raise

    def _granted_late(self, owner_id: int, granting: asyncio.Future[Decimal]) -> None:
        self._late.discard(granting)
        if granting.cancelled() or granting.exception() is not None:
            return
        lease = self.leases.get(owner_id)
        if lease is not None and granting.result() > 0:
            _grow(lease, granting.result())

    @staticmethod
    async def _storage(call: Awaitable[Decimal]) -> Decimal:
        """What a lease statement returns; StorageUnavailable when the database fails it."""
        try:
            return await call
        except (OSError, SQLAlchemyError) as exc:
            log.error("cannot place a hold: %s", exc)
            raise StorageUnavailable(
                "The gateway cannot reach its database to set aside your balance for this "
                "request, so it accepts no new requests; retry in a moment."
            ) from None

    def held(self, owner_id: int) -> Decimal:
        lease = self.leases.get(owner_id)
        return lease.held if lease else ZERO

    async def set_aside_elsewhere(self, owner_id: int, estimate: Decimal) -> bool:
        """Whether a request `take` refused would fit the owner's limit, less what this
        process holds for its requests in flight, but for what other processes' leases set
        aside: one more read, made only for a refusal, so that it can say why. A database
        that does not answer leaves the plain reason."""
        try:
            limit, others = await self._store.leased_to_others(owner_id, self._holder, self.scope)
        except (OSError, SQLAlchemyError):
            return False
        return others > 0 and MONEY.subtract(limit, self.held(owner_id)) >= estimate

    async def return_spare(self, owner_id: int) -> Decimal:
        """Hand back what the owner's lease holds beyond its requests in flight.

        The lease shrinks in memory before the database is asked, so no request admitted
        meanwhile can use money that is on its way back; and it admits nothing more until
        the database grants it more (`_Lease.needs_grant`), so what its requests in flight
        leave over as they settle is not spent against a limit that moved either.
        """
        lease = self.leases.get(owner_id)
        if lease is None:
            return ZERO
        async with lease.lock:
            lease.needs_grant = True
            return await self._hand_back_spare(owner_id, lease)

    async def _hand_back_spare(self, owner_id: int, lease: _Lease) -> Decimal:
        """Under the lease's lock: hand back what it holds beyond its requests in flight."""
        spare = MONEY.subtract(lease.leased, lease.held)
        if spare <= 0:
            return ZERO
        lease.leased = lease.held
        return await self._store.release_lease(owner_id, self._holder, spare, self.scope)

    def hold_cost(self, owner_id: int, held: Decimal, cost: Decimal) -> bool:
        """Hold `cost` instead of `held` for a billed request; False when the owner has no
        lease (the request keeps what it held)."""
        lease = self.leases.get(owner_id)
        if lease is None:
            return False
        lease.held = max(ZERO, MONEY.add(MONEY.subtract(lease.held, held), cost))
        return True

    def settled(self, owner_id: int, estimate: Decimal, consumed: Decimal) -> None:
        """A hold ends, and `consumed` of the request's cost left the lease."""
        lease = self.leases.get(owner_id)
        if lease is None:
            return
        lease.held = max(ZERO, MONEY.subtract(lease.held, estimate))
        lease.leased = max(ZERO, MONEY.subtract(lease.leased, consumed))
        if lease.held == 0:
            lease.idle_since = time.monotonic()

    async def maintain(
        self,
        stored: dict[tuple[str, int], Decimal],
        idle_seconds: float,
        grants_before: dict[int, int],
    ) -> None:
        """Bring the leases in line with `stored`, read after `grants_before` (`grants`)."""
        for owner_id, lease in list(self.leases.items()):
            async with lease.lock:
                # The database is the truth: a lease taken away from a stalled process is gone.
                # A lease granted more since the reading is newer than it, and stays.
                if lease.grants == grants_before.get(owner_id):
                    stored_amount = stored.get((self.scope.name, owner_id), ZERO)
                    lease.leased = min(lease.leased, stored_amount)
                idle = time.monotonic() - lease.idle_since > idle_seconds
            # A lease waiting for a grant hands back what settled requests left over each
            # round, so that it reserves no more than its requests in flight hold.
            if (idle and lease.held == 0) or lease.needs_grant:
                await self.return_spare(owner_id)

    async def close(self) -> None:
        await self.settle_refills()
        for owner_id, lease in self.leases.items():
            # Everything stored: a spooled row's share is replayed by the next start, not here.
            await self._store.release_lease(owner_id, self._holder, EVERYTHING, self.scope)
            lease.leased = ZERO


def _wanted(lease: _Lease, estimate: Decimal, shortfall: Decimal) -> Decimal:
    """How much to ask for: room for LEASE_REQUESTS more like this one, or for twice the load
    in flight and waiting for the lease (each waiting request counted like this one), and at
    least the shortfall."""
    waiting = MONEY.multiply(estimate, Decimal(lease.waiting))
    return max(
        shortfall,
        MONEY.multiply(estimate, Decimal(LEASE_REQUESTS)),
        MONEY.multiply(MONEY.add(lease.held, waiting), Decimal(2)),
    )


def _grow(lease: _Lease, granted: Decimal) -> None:
    lease.leased = MONEY.add(lease.leased, granted)
    lease.grants += 1
    lease.needs_grant = False


def _pause_refills(lease: _Lease) -> None:
    lease.refill_paused_until = time.monotonic() + REFILL_PAUSE_SECONDS


def _running_low(lease: _Lease, estimate: Decimal) -> bool:
    room = MONEY.subtract(lease.leased, lease.held)
    return room < max(
        MONEY.multiply(estimate, Decimal(REFILL_REQUESTS)), MONEY.divide(lease.held, Decimal(2))
    )


def _take(lease: _Lease, estimate: Decimal) -> bool:
    if lease.needs_grant or MONEY.subtract(lease.leased, lease.held) < estimate:
        return False
    lease.held = MONEY.add(lease.held, estimate)
    return True


def _cap_reached(cap: Decimal, estimate: Decimal) -> InsufficientQuota:
    return InsufficientQuota(
        f"This API key reached its spending cap of ${plain(cap)}: what it spent and holds "
        f"for requests in flight leaves no room for this request's largest possible cost, "
        f"${plain(estimate)}. Ask the gateway operator to raise the cap.",
        code="key_cap_reached",
    )


class Admission:
    def __init__(
        self,
        store: Store,
        *,
        lease_ttl: float,
        idle_seconds: float,
        grants: LeaseGrants | None = None,
    ):
        """`grants`: where leases are grown (the store itself by default); every other lease
        statement goes to `store`."""
        self._store = store
        self.holder = f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease_ttl = lease_ttl
        self._idle_seconds = idle_seconds
        self._users = _Leases(store, USER_LEASES, self.holder, grants or store)
        self._keys = _Leases(store, KEY_LEASES, self.holder, grants or store)

    def held(self, user_id: int) -> Decimal:
        return self._users.held(user_id)

    async def limits_changed(self, user_ids: set[int], key_ids: set[int]) -> None:
        """Hand back the unused leases of users and keys whose limits moved."""
        for leases, owners in ((self._users, user_ids), (self._keys, key_ids)):
            for owner_id in sorted(owners):
                returned = await leases.return_spare(owner_id)
                if returned:
                    log.info(
                        "returned $%s of the %s %d's lease: its limit changed",
                        plain(returned),
                        leases.scope.name,
                        owner_id,
                    )

    async def admit(self, user_id: int, estimate: Decimal, key: KeyRecord | None = None) -> Hold:
        """Hold `estimate` for a request, or refuse it with insufficient_quota.

        A key with a cap holds the same estimate against the cap as well.
        """
        if not await self._users.take(user_id, estimate):
            if await self._users.set_aside_elsewhere(user_id, estimate):
                raise InsufficientQuota(
                    "You exceeded your current quota for the moment: part of the balance is "
                    "set aside in other gateway processes' leases, so what is left does not "
                    f"cover this request's largest possible cost, ${plain(estimate)}. "
                    f"{self._lease_return('the balance')}"
                )
            raise InsufficientQuota(
                "You exceeded your current quota: the balance does not cover this request's "
                f"largest possible cost, ${plain(estimate)} (its input, and its output up to "
                "max_output_tokens or the gateway's default cap). Lower max_output_tokens, or "
                "ask the gateway operator to top the balance up."
            )
        if key is None or key.cap is None:
            return Hold(estimate, ZERO)
        if not self._within_cap(key, estimate):
            raise _cap_reached(key.cap, estimate)
        if not await self._key_take(user_id, key, estimate):
            if await self._keys.set_aside_elsewhere(key.id, estimate):
                raise InsufficientQuota(
                    f"This API key's spending cap of ${plain(key.cap)} is used up for the "
                    "moment: part of it is set aside in other gateway processes' leases, so "
                    "what is left does not cover this request's largest possible cost, "
                    f"${plain(estimate)}. {self._lease_return('the cap')}",
                    code="key_cap_reached",
                )
            raise _cap_reached(key.cap, estimate)
        return Hold(estimate, estimate)

    def _lease_return(self, limit: str) -> str:
        """When a lease another process holds comes back to `limit`, for a refusal to say."""
        return (
            f"Retry shortly: a lease comes back to {limit} about {self._idle_seconds:g} s "
            "after its process last had a request of yours in flight, or "
            f"{self._lease_ttl:g} s after that process stopped."
        )

    def _within_cap(self, key: KeyRecord, estimate: Decimal) -> bool:
        """Whether what the key spent (as last loaded), holds here, and this request fit its
        cap; a request refused here gives back its hold on the user's balance."""
        assert key.cap is not None
        known = MONEY.add(MONEY.add(key.spent, self._keys.held(key.id)), estimate)
        if known <= key.cap:
            return True
        self._users.settled(key.user_id, estimate, ZERO)
        return False

    async def _key_take(self, user_id: int, key: KeyRecord, estimate: Decimal) -> bool:
        try:
            if await self._keys.take(key.id, estimate):
                return True
        except StorageUnavailable:
            self._users.settled(user_id, estimate, ZERO)
            raise
        self._users.settled(user_id, estimate, ZERO)
        return False

    def billed(self, row: dict[str, Any], hold: Hold) -> Hold:
        """The hold a billed request keeps until its row is written: its cost.

        Held less, the lease would go on admitting requests against money the request has
        already spent, until the writer took the cost out: a run of requests each costing
        more than its hold could overdraw a balance or a key's cap many times over. Held
        more, the rows waiting for the writer would keep their largest possible costs, and a
        small balance would refuse requests it covers while one fast client keeps dozens of
        rows waiting.
        """
        cost: Decimal = row["cost_usd"]
        return self._hold_instead(row.get("user_id"), row.get("key_id"), hold, Hold(cost, cost))

    def hold_at_most(
        self, user_id: int | None, key_id: int | None, hold: Hold, most: Decimal
    ) -> Hold:
        """The hold of a request whose cost can no longer exceed `most`, lowered to it (a
        hold already lower stays): what it held beyond that is free for other requests while
        the gateway counts the request's tokens itself."""
        lowered = Hold(min(hold.user, most), min(hold.key, most))
        return self._hold_instead(user_id, key_id, hold, lowered)

    def _hold_instead(
        self, user_id: int | None, key_id: int | None, hold: Hold, instead: Hold
    ) -> Hold:
        """A request's hold, `instead` of `hold` in the leases that have its owners (a key
        without a cap holds nothing, and goes on holding nothing)."""
        user, key = hold.user, hold.key
        if user_id is not None and self._users.hold_cost(user_id, user, instead.user):
            user = instead.user
        if key_id is not None and key > 0 and self._keys.hold_cost(key_id, key, instead.key):
            key = instead.key
        return Hold(user, key)

    def settled(self, row: dict[str, Any], hold: Hold, result: Settled | None) -> None:
        """A held request was written (`result`) or spooled (None): its holds end, and what
        settling took of its cost left the leases.

        A spooled row's cost is taken off the leases in memory at once, and off the stored
        lease when this process replays the spool, so the lease never admits that money again.
        """
        cost: Decimal = row["cost_usd"]
        if row.get("user_id") is not None:
            self._users.settled(row["user_id"], hold.user, result.consumed if result else cost)
        if row.get("key_id") is not None and hold.key > 0:
            self._keys.settled(row["key_id"], hold.key, result.key_consumed if result else cost)

    async def maintain(self, interval: float) -> None:
        """Renew this process's leases, hand back idle ones, return dead processes' leases."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self._maintain_once()
            except Exception:  # the next round retries; admission keeps working from memory
                log.warning("lease maintenance failed", exc_info=True)

    async def _maintain_once(self) -> None:
        scopes = (self._users, self._keys)
        grants = [leases.grants() for leases in scopes]
        stored = await self._store.renew_leases(self.holder)
        for leases, grants_before in zip(scopes, grants, strict=True):
            await leases.maintain(stored, self._idle_seconds, grants_before)
        cutoff = datetime.now(UTC) - timedelta(seconds=self._lease_ttl)
        reaped = await self._store.reap_leases(cutoff)
        if reaped:
            log.info("returned %d leases whose holders stopped renewing them", reaped)

    async def settle_refills(self) -> None:
        """Wait for the leases being grown in the background, and for the grants whose
        askers were cancelled."""
        for leases in (self._users, self._keys):
            await leases.settle_refills()

    async def close(self) -> None:
        """Hand back every lease this process holds (after all its requests are settled)."""
        for leases in (self._users, self._keys):
            await leases.close()
