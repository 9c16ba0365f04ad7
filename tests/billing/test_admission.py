"""Admission against balance leases, on SQLite and PostgreSQL.

Two Admission objects on one database stand for two gateway processes.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from codex_gateway.billing.admission import (
    INPUT_ALLOWANCE_TOKENS,
    LEASE_REQUESTS,
    REFILL_REQUESTS,
    Admission,
    Hold,
    estimate_hold,
    largest_cost,
    reads_stored_input,
)
from codex_gateway.billing.pricing import ZERO, Price
from codex_gateway.billing.settler import Settler
from codex_gateway.errors import InsufficientQuota, StorageUnavailable
from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import KEY_LEASES, KeyLimits, KeyRecord, Store, hash_key
from tests.conftest import fixture_path
from tests.store.test_queries import new_user, usage_row

CODEX = Price("gpt-5.1-codex", Decimal("1.25"), Decimal("0.125"), Decimal("10"))
EST = Decimal("0.01")


# The request after which a first lease of LEASE_REQUESTS requests is low: what is left
# covers fewer than REFILL_REQUESTS of them, or less than half of what is held.
LOW_AT = next(
    held
    for held in range(1, LEASE_REQUESTS + 1)
    if LEASE_REQUESTS - held < max(REFILL_REQUESTS, held / 2)
)


def admission(store: Store) -> Admission:
    return Admission(store, lease_ttl=60, idle_seconds=0)


# body bytes, max_output_tokens, expected hold
ESTIMATES = [
    # the default output cap when the request sets none, or sets nonsense
    (0, None, (Decimal(INPUT_ALLOWANCE_TOKENS) * Decimal("1.25") + 32768 * 10) / 10**6),
    (0, "100", (Decimal(INPUT_ALLOWANCE_TOKENS) * Decimal("1.25") + 32768 * 10) / 10**6),
    (0, True, (Decimal(INPUT_ALLOWANCE_TOKENS) * Decimal("1.25") + 32768 * 10) / 10**6),
    # the request's own cap
    (43_000, 1000, (Decimal(44_000) * Decimal("1.25") + 1000 * 10) / 10**6),
]


@pytest.mark.parametrize(("body", "cap", "expected"), ESTIMATES)
def test_hold_is_the_largest_possible_cost(body: int, cap: object, expected: Decimal) -> None:
    assert estimate_hold(CODEX, body, cap, 32768) == expected


def test_markup_scales_the_hold() -> None:
    marked = Price("m", Decimal("1"), Decimal("0.1"), Decimal("2"), Decimal("1.5"))
    assert estimate_hold(marked, 0, 10, 32768) == Decimal("0.00153")


async def test_requests_within_a_lease_take_no_new_lease(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    gate = admission(store)
    await gate.admit(user_id, EST)
    leases = await store.leases()
    # Room for LEASE_REQUESTS requests like this one (less than half the balance).
    assert [(lease["user_id"], lease["amount"]) for lease in leases] == [
        (user_id, LEASE_REQUESTS * EST)
    ]
    # Until the lease runs low, nothing more is asked for.
    for _ in range(LOW_AT - 2):
        await gate.admit(user_id, EST)
    await gate.settle_refills()
    assert [lease["amount"] for lease in await store.leases()] == [LEASE_REQUESTS * EST]
    assert gate.held(user_id) == (LOW_AT - 1) * EST
    await gate.close()


async def test_a_lease_running_low_grows_while_it_still_admits(store: Store) -> None:
    _, user_id = await new_user(store, "10")
    gate = admission(store)
    await gate.admit(user_id, EST)
    # The database stalls (busy writing bills, say) until the test lets it go on.
    go_on = asyncio.Event()
    real = store.acquire_lease

    async def stalled(*args: Any, **kwargs: Any) -> Decimal:
        await go_on.wait()
        return await real(*args, **kwargs)

    store.acquire_lease = stalled  # type: ignore[method-assign]
    for _ in range(LOW_AT - 1):
        await gate.admit(user_id, EST)
    await asyncio.sleep(0)  # the refill starts, and waits for the database
    # Every other request the first slice covers is admitted while the refill waits.
    for _ in range(LEASE_REQUESTS - LOW_AT):
        await asyncio.wait_for(gate.admit(user_id, EST), 1)
    assert [lease["amount"] for lease in await store.leases()] == [LEASE_REQUESTS * EST]
    go_on.set()
    await gate.settle_refills()
    # It grew once, by twice what was held when it was found low.
    grown = LEASE_REQUESTS * EST + 2 * LOW_AT * EST
    assert [lease["amount"] for lease in await store.leases()] == [grown]
    await gate.close()
    assert await store.leases() == []
    problems, _ = await store.verify_ledger()
    assert problems == []


async def test_a_lease_that_cannot_grow_leaves_the_error_to_the_request_that_finds_it_empty(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    _, user_id = await new_user(store, "10")
    gate = admission(store)
    await gate.admit(user_id, EST)
    real = store.acquire_lease
    calls = 0

    async def unreachable(*args: Any, **kwargs: Any) -> Decimal:
        nonlocal calls
        calls += 1
        raise OSError("connection refused")

    store.acquire_lease = unreachable  # type: ignore[method-assign]
    for _ in range(LEASE_REQUESTS - 1):
        await gate.admit(user_id, EST)
        await asyncio.sleep(0)
    # The background refill failed once, quietly for the requests, and was not tried again
    # for each of the requests after it.
    await gate.settle_refills()
    assert calls == 1
    assert caplog.text.count("cannot place a hold") == 1
    assert gate.held(user_id) == LEASE_REQUESTS * EST
    # The request that finds the lease empty asks, and reports what is wrong.
    with pytest.raises(StorageUnavailable):
        await gate.admit(user_id, EST)
    assert calls == 2
    assert gate.held(user_id) == LEASE_REQUESTS * EST
    store.acquire_lease = real  # type: ignore[method-assign]
    await gate.admit(user_id, EST)
    await gate.close()
    assert await store.leases() == []


async def test_a_lease_granted_more_while_maintenance_reads_the_database_keeps_the_grant(
    store: Store,
) -> None:
    _, user_id = await new_user(store, "10")
    gate = admission(store)
    await gate.admit(user_id, EST)
    real_renew = store.renew_leases
    real_acquire = store.acquire_lease

    async def renew_then_grant(holder: str) -> dict[tuple[str, int], Decimal]:
        stored = await real_renew(holder)
        # A grant lands after the reading, before maintenance looks at the lease.
        for _ in range(LEASE_REQUESTS):
            await gate.admit(user_id, EST)
        await gate.settle_refills()
        return stored

    store.renew_leases = renew_then_grant  # type: ignore[method-assign]
    await gate._maintain_once()
    # The database stalls now: a request admitted at all was admitted from the grant.
    go_on = asyncio.Event()

    async def stalled(*args: Any, **kwargs: Any) -> Decimal:
        await go_on.wait()
        return await real_acquire(*args, **kwargs)

    store.acquire_lease = stalled  # type: ignore[method-assign]
    await asyncio.wait_for(gate.admit(user_id, EST), 1)
    go_on.set()
    await gate.close()
    assert await store.leases() == []
    problems, _ = await store.verify_ledger()
    assert problems == []


async def test_a_burst_that_finds_the_lease_empty_waits_for_one_grant_after_the_first(
    store: Store,
) -> None:
    """Requests queued behind a grant are counted into the next one, so a burst of 200 that
    finds the lease empty waits for two grants, not for one doubling after another."""
    _, user_id = await new_user(store, "100")
    gate = admission(store)
    go_on = asyncio.Event()
    real = store.acquire_lease
    wanted: list[Decimal] = []

    async def stalled(owner_id: int, holder: str, needed: Decimal, want: Decimal, *rest: Any):
        wanted.append(want)
        await go_on.wait()
        return await real(owner_id, holder, needed, want, *rest)

    store.acquire_lease = stalled  # type: ignore[method-assign]
    burst = [asyncio.create_task(gate.admit(user_id, EST)) for _ in range(200)]
    await asyncio.sleep(0.01)  # every request is waiting for the first grant
    go_on.set()
    holds = await asyncio.wait_for(asyncio.gather(*burst), 30)
    assert holds == [Hold(EST)] * 200
    # The first grant was asked for before the others came. The second, asked for by the
    # first request it did not cover, makes room for twice what the first covered and what
    # still waited: 199 requests in all, each like this one.
    assert wanted == [LEASE_REQUESTS * EST, 2 * 199 * EST]
    assert gate.held(user_id) == 200 * EST
    await gate.close()
    problems, _ = await store.verify_ledger()
    assert problems == []


class HeldUp:
    """Grants of what is wanted, each given once the test lets it go, with no database."""

    def __init__(self) -> None:
        self.go_on = asyncio.Event()
        self.wanted: list[Decimal] = []

    async def acquire_lease(self, *args: Any) -> Decimal:
        _, _, _, wanted, *_ = args
        self.wanted.append(wanted)
        await self.go_on.wait()
        return Decimal(wanted)


async def test_requests_waiting_for_a_grant_all_try_the_grown_lease_in_one_turn(
    store: Store,
) -> None:
    """The requests that found the lease without room wait for the grant under way together,
    and try the grown lease in the same turn of the loop, not one per turn."""
    _, user_id = await new_user(store, "100")
    grants = HeldUp()
    gate = Admission(store, lease_ttl=60, idle_seconds=0, grants=grants)
    burst = [asyncio.create_task(gate.admit(user_id, EST)) for _ in range(200)]
    await asyncio.sleep(0.01)  # the first asked for a grant; the others wait for it
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counting = asyncio.create_task(count_turns())
    grants.go_on.set()
    holds = await asyncio.wait_for(asyncio.gather(*burst), 10)
    counting.cancel()
    assert holds == [Hold(EST)] * 200
    assert grants.wanted == [LEASE_REQUESTS * EST, 2 * 199 * EST]
    # Two grants, each taken by all the requests it covers at once: a few turns, where a
    # queue for the lock took one turn for each of the 200.
    assert turns < 20
    await gate.settle_refills()


class CommittedElsewhere:
    """Grants whose statements run where the asker cannot stop them (as on the grants
    thread): once begun, each is committed whatever becomes of the request that asked."""

    def __init__(self, store: Store):
        self.store = store
        self.go_on = asyncio.Event()
        self.begun = asyncio.Event()
        self.running: list[asyncio.Task[Decimal]] = []

    async def acquire_lease(self, *args: Any) -> Decimal:
        self.running.append(asyncio.ensure_future(self._grant(*args)))
        return await asyncio.shield(self.running[-1])

    async def _grant(self, *args: Any) -> Decimal:
        self.begun.set()
        await self.go_on.wait()
        return await self.store.acquire_lease(*args)


async def test_a_grant_committed_after_its_request_was_cancelled_joins_the_lease(
    store: Store,
) -> None:
    _, user_id = await new_user(store, "10")
    grants = CommittedElsewhere(store)
    gate = Admission(store, lease_ttl=60, idle_seconds=0, grants=grants)
    asking = asyncio.create_task(gate.admit(user_id, EST))
    await grants.begun.wait()
    asking.cancel()  # a shutdown cancels the request while its grant runs
    with pytest.raises(asyncio.CancelledError):
        await asking
    grants.go_on.set()
    await asyncio.gather(*grants.running)
    await asyncio.sleep(0)
    # The grant is in the database, and in the lease, which admits against it at once.
    assert [lease["amount"] for lease in await store.leases()] == [LEASE_REQUESTS * EST]
    await gate.admit(user_id, EST)
    assert len(grants.running) == 1
    await gate.close()
    assert await store.leases() == []
    problems, _ = await store.verify_ledger()
    assert problems == []


async def test_close_waits_for_a_lease_being_grown(store: Store) -> None:
    _, user_id = await new_user(store, "10")
    gate = admission(store)
    for _ in range(LOW_AT):
        await gate.admit(user_id, EST)
    await gate.close()
    # The grant that came in during close went back with the rest.
    assert await store.leases() == []
    problems, _ = await store.verify_ledger()
    assert problems == []
    assert (await store.balances())[user_id] == Decimal("10")


async def try_admit(gate: Admission, user_id: int) -> bool:
    try:
        await gate.admit(user_id, EST)
    except InsufficientQuota:
        return False
    return True


async def test_one_process_admits_exactly_what_the_balance_covers(store: Store) -> None:
    _, user_id = await new_user(store, str(10 * EST))
    gate = admission(store)
    results = await asyncio.gather(*(try_admit(gate, user_id) for _ in range(50)))
    assert sum(results) == 10
    assert gate.held(user_id) == 10 * EST
    await gate.close()
    assert await store.leases() == []


async def test_two_processes_never_admit_more_than_the_balance(store: Store) -> None:
    _, user_id = await new_user(store, str(10 * EST))
    first, second = admission(store), admission(store)
    gates = (first, second)
    results = await asyncio.gather(*(try_admit(gates[i % 2], user_id) for i in range(50)))
    # Never more than the balance; a little may sit unused in the other process's lease.
    assert 8 <= sum(results) <= 10
    assert first.held(user_id) + second.held(user_id) == sum(results) * EST
    await first.close()
    await second.close()
    assert await store.leases() == []
    problems, _ = await store.verify_ledger()
    assert problems == []


async def test_settling_takes_the_cost_out_of_the_lease_and_close_returns_the_rest(
    store: Store,
) -> None:
    _, user_id = await new_user(store, "1")
    gate = admission(store)
    hold = Decimal("0.2")
    await gate.admit(user_id, hold)
    settler = Settler(store, gate.holder, gate.settled)
    settler.start()
    row = usage_row(user_id)
    settler.submit(row, Hold(hold))
    await settler.drain()

    cost = Decimal("0.114295")
    assert gate.held(user_id) == 0
    (lease,) = await store.leases()
    # Half the balance (less than LEASE_REQUESTS holds), less the cost the settlement took.
    assert lease["amount"] == Decimal("0.5") - cost
    await gate.close()
    assert await store.leases() == []
    problems, _ = await store.verify_ledger()
    assert problems == []
    assert (await store.balances())[user_id] == Decimal("1") - cost


HELD_BEFORE_LOWERING = Decimal("0.2")


async def hold_then_lower_the_balance(store: Store, gate: Admission, adjustment: Decimal) -> int:
    """A user with $1 holds HELD_BEFORE_LOWERING for a request; a correction of
    `adjustment` lowers the balance and admission is told. Returns the user's id."""
    name, user_id = await new_user(store, "1")
    await gate.admit(user_id, HELD_BEFORE_LOWERING)
    await store.correct(name, "adjustment", adjustment, "test", "operator")
    await gate.limits_changed({user_id}, set())
    return user_id


async def test_after_a_balance_is_lowered_what_settling_frees_admits_nothing_more(
    store: Store,
) -> None:
    """A correction takes the balance below what the lease reserved; the lease hands back its
    spare part, and the hold a request in flight leaves over when it settles (its hold less
    its cost) does not admit another request: the database, asked again, has nothing."""
    gate = admission(store)
    user_id = await hold_then_lower_the_balance(store, gate, Decimal("-0.9"))

    row = usage_row(user_id)  # costs 0.114295, well under its hold
    gate.settled(row, Hold(HELD_BEFORE_LOWERING), None)

    with pytest.raises(InsufficientQuota):
        await gate.admit(user_id, EST)
    assert gate.held(user_id) == 0
    await gate.close()


async def test_after_a_lowered_balance_a_request_it_still_covers_is_admitted(
    store: Store,
) -> None:
    """What settling left over goes back to the database first, which then grants the
    request out of the new balance: $1, a $0.20 hold, a $0.60 correction, the request
    settles for $0.114295, and $0.25 of the $0.285705 left is still admitted."""
    gate = admission(store)
    user_id = await hold_then_lower_the_balance(store, gate, Decimal("-0.6"))
    row = usage_row(user_id)
    settler = Settler(store, gate.holder, gate.settled)
    settler.start()
    settler.submit(row, Hold(HELD_BEFORE_LOWERING))
    await settler.drain()

    assert await gate.admit(user_id, Decimal("0.25")) == Hold(Decimal("0.25"), Decimal(0))
    with pytest.raises(InsufficientQuota):
        await gate.admit(user_id, Decimal("0.05"))
    await gate.close()
    assert (await store.balances())[user_id] == Decimal("0.285705")
    problems, _ = await store.verify_ledger()
    assert problems == []


async def capped_key(store: Store, balance: str, cap: str) -> tuple[int, KeyRecord]:
    """A new user with `balance`, and a key of theirs capped at `cap`."""
    name, user_id = await new_user(store, balance)
    raw, _ = await store.create_key(name, limits=KeyLimits(cap=Decimal(cap)))
    key = await store.find_key(hash_key(raw))
    assert key is not None
    return user_id, key


async def request_billed_past_a_lowered_cap(
    store: Store, gate: Admission
) -> tuple[int, KeyRecord, KeyRecord]:
    """A key capped at $1 holds $0.20 for a request; the cap drops to $0.10 and admission is
    told; the request is billed $0.114295, past the new cap and under its hold. Returns the
    user's id and the key as loaded before and after the bill."""
    name, user_id = await new_user(store, "10")
    raw, _ = await store.create_key(name, limits=KeyLimits(cap=Decimal("1")))
    key = await store.find_key(hash_key(raw))
    assert key is not None
    hold = Hold(Decimal("0.2"), Decimal("0.2"))
    assert await gate.admit(user_id, hold.user, key) == hold
    await store.update_key(key.id, {"cap_usd": Decimal("0.1")})
    before = await store.find_key(hash_key(raw))
    assert before is not None
    await gate.limits_changed(set(), {key.id})
    row = usage_row(user_id)
    row["key_id"] = key.id
    settler = Settler(store, gate.holder, gate.settled)
    settler.start()
    settler.submit(row, hold)
    await settler.drain()
    after = await store.find_key(hash_key(raw))
    assert after is not None
    return user_id, before, after


async def test_a_lowered_key_cap_admits_nothing_its_settled_requests_leave_over(
    store: Store,
) -> None:
    """The same for a capped key's lease on its cap: what the settled request left of its
    hold on the cap does not admit another request past the lowered cap."""
    gate = admission(store)
    user_id, key, _ = await request_billed_past_a_lowered_cap(store, gate)

    # With the spending loaded before the request was billed, the lease is asked: it hands
    # back what the request left over, and the database has nothing for the new cap.
    with pytest.raises(InsufficientQuota, match="cap"):
        await gate.admit(user_id, EST, key)
    assert await store.leases(KEY_LEASES) == []
    await gate.close()
    problems, _ = await store.verify_ledger()
    assert problems == []


async def test_maintenance_hands_back_what_a_lowered_lease_was_left(store: Store) -> None:
    """Requests refused in memory (the key's spending as loaded is past its new cap) never
    ask the lease; maintenance hands back what the settled request left of its hold, so the
    key is not shown holding money for nothing."""
    gate = Admission(store, lease_ttl=60, idle_seconds=3600)  # never idle here
    user_id, _, key = await request_billed_past_a_lowered_cap(store, gate)

    with pytest.raises(InsufficientQuota, match="cap"):
        await gate.admit(user_id, EST, key)
    (lease,) = await store.leases(KEY_LEASES)
    assert lease["amount"] == Decimal("0.2") - Decimal("0.114295")
    await gate._maintain_once()
    assert await store.leases(KEY_LEASES) == []
    await gate.close()
    problems, _ = await store.verify_ledger()
    assert problems == []


async def test_a_balance_that_covers_nothing_refuses_at_once(store: Store) -> None:
    _, user_id = await new_user(store, "0")
    with pytest.raises(InsufficientQuota):
        await admission(store).admit(user_id, EST)
    assert await store.leases() == []


async def test_leases_of_a_process_that_stopped_renewing_are_returned(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    dead = admission(store)
    await dead.admit(user_id, EST)
    assert await store.reap_leases(datetime.now(UTC) - timedelta(seconds=60)) == 0
    assert await store.reap_leases(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await store.leases() == []
    problems, _ = await store.verify_ledger()
    assert problems == []
    # The whole balance is available to a live process again.
    alive = admission(store)
    await alive.admit(user_id, Decimal("1"))
    await alive.close()


async def test_an_idle_lease_is_handed_back(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    gate = admission(store)
    await gate.admit(user_id, EST)
    gate.settled({"user_id": user_id, "cost_usd": Decimal(0)}, Hold(EST), None)
    await gate._maintain_once()
    assert await store.leases() == []


async def test_an_unreachable_database_fails_closed() -> None:
    engine = create_engine("postgresql://postgres@127.0.0.1:1/unreachable")
    try:
        gate = admission(Store(engine))
        with pytest.raises(StorageUnavailable) as caught:
            await gate.admit(1, EST)
        assert caught.value.status == 503
        assert "retry" in caught.value.message
        assert gate.held(1) == 0
    finally:
        await engine.dispose()


def test_a_request_reading_stored_input_holds_the_context_window() -> None:
    held = estimate_hold(CODEX, 100, 1000, 32768, context_tokens=400_000)
    assert held == (Decimal(400_000) * Decimal("1.25") + 1000 * 10) / 10**6


def test_a_body_larger_than_the_context_window_still_bounds_the_input() -> None:
    held = estimate_hold(CODEX, 500_000, 1000, 32768, context_tokens=400_000)
    assert held == (Decimal(501_000) * Decimal("1.25") + 1000 * 10) / 10**6


STORED_INPUT = [
    # top-level fields that make the upstream read earlier input
    ({"input": "x", "previous_response_id": "resp_1"}, True),
    ({"input": "x", "conversation": "conv_1"}, True),
    ({"prompt": {"id": "pmpt_1"}}, True),
    ({"input": "x", "previous_response_id": None}, False),
    # input items that point at files or images elsewhere
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, True),
    ({"input": [{"type": "input_file", "file_url": "https://a/b.pdf"}]}, True),
    ({"input": [{"content": [{"type": "input_image", "image_url": "https://a/i.png"}]}]}, True),
    ({"messages": [], "input": [{"content": [{"image_url": {"url": "https://a/i"}}]}]}, True),
    # everything the body carries itself
    ({"input": [{"content": [{"image_url": "data:image/png;base64,AA"}]}]}, False),
    ({"input": "the words file_id and image_url in plain text"}, False),
    ({"input": "hi", "prompt_cache_key": "k"}, False),
]  # fmt: skip


@pytest.mark.parametrize(("document", "expected"), STORED_INPUT)
def test_requests_that_read_input_they_do_not_carry(
    document: dict[str, object], expected: bool
) -> None:
    body = orjson.dumps(document)
    assert reads_stored_input(document, body) is expected


async def admitted_until_refused(
    gate: Admission, user_id: int, hold: Decimal, key: KeyRecord | None, settler: Settler
) -> int:
    """Requests one after another, each billed at the seed cost, their rows queued for a
    writer that has not written any yet; how many were admitted."""
    admitted = 0
    for _ in range(40):
        try:
            held = await gate.admit(user_id, hold, key)
        except InsufficientQuota:
            return admitted
        admitted += 1
        row = usage_row(user_id)
        row["key_id"] = key.id if key is not None else None
        settler.submit(row, gate.billed(row, held))
    return admitted


# balance, each request's hold, how many requests one after another are admitted
BACK_TO_BACK = [
    # Each costs more than its hold: 4 x 0.114295 = 0.45718 leaves room for a fifth hold,
    # and after it nothing is left (a balance is overdrawn by one excess at most).
    pytest.param("0.5", "0.0014", 5, id="costs-past-their-holds"),
    # Each costs less than its hold: seven rows waiting for the writer hold 0.800065, and an
    # eighth request's 0.2 no longer fits; with each row holding the whole 0.2, five fitted.
    pytest.param("1", "0.2", 7, id="rows-waiting-hold-their-costs"),
]


@pytest.mark.parametrize(("balance", "hold", "expected"), BACK_TO_BACK)
async def test_requests_one_after_another_are_admitted_against_what_billed_ones_cost(
    store: Store, balance: str, hold: str, expected: int
) -> None:
    _, user_id = await new_user(store, balance)
    gate = admission(store)
    settler = Settler(store, gate.holder, gate.settled)

    admitted = await admitted_until_refused(gate, user_id, Decimal(hold), None, settler)
    settler.start()
    await settler.drain()

    cost = Decimal("0.114295")
    assert admitted == expected
    assert (await store.balances())[user_id] == Decimal(balance) - expected * cost
    assert gate.held(user_id) == 0
    problems, _ = await store.verify_ledger()
    assert problems == []
    await gate.close()


async def test_a_key_cap_is_overdrawn_by_one_excess_at_most_when_costs_pass_their_holds(
    store: Store,
) -> None:
    user_id, key = await capped_key(store, "10", "0.3")
    gate = admission(store)
    settler = Settler(store, gate.holder, gate.settled)

    admitted = await admitted_until_refused(gate, user_id, Decimal("0.0014"), key, settler)
    settler.start()
    await settler.drain()

    # 2 x 0.114295 = 0.22859 leaves room for a third hold under the 0.3 cap.
    assert admitted == 3
    problems, _ = await store.verify_ledger()
    assert problems == []
    await gate.close()


async def test_a_billed_request_within_its_hold_keeps_only_its_cost_held(store: Store) -> None:
    _, user_id = await new_user(store, "1")
    gate = admission(store)
    held = await gate.admit(user_id, Decimal("0.2"))
    row = usage_row(user_id)

    assert gate.billed(row, held) == Hold(Decimal("0.114295"), ZERO)
    assert gate.held(user_id) == Decimal("0.114295")
    await gate.close()


@pytest.mark.parametrize(
    "body",
    [
        # the pointer's key spelled with JSON escapes, which the byte hints do not match
        rb'{"input":[{"content":[{"type":"input_image","image\u005furl":"http://a/i.png"}]}]}',
        rb'{"input":[{"content":[{"type":"input_file","file\u005fid":"file_1"}]}]}',
    ],
)
def test_a_pointer_spelled_with_escapes_still_reads_stored_input(body: bytes) -> None:
    assert reads_stored_input(orjson.loads(body), body) is True


def test_an_escaped_body_that_points_nowhere_reads_nothing_stored() -> None:
    body = rb'{"input":"caf\u00e9"}'
    assert reads_stored_input(orjson.loads(body), body) is False


CONTEXT_TOKENS = 400_000
# The hold of a request whose input is read from the context window: 400,000 input tokens
# and the default output cap.
CONTEXT_HOLD = (Decimal(CONTEXT_TOKENS) * Decimal("1.25") + 32768 * 10) / 10**6
FILE_SEARCH = {"type": "file_search", "vector_store_ids": ["vs_1"]}
MCP = {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example/sse"}


@pytest.mark.parametrize(
    "document",
    [
        # an input item that points at an item stored upstream
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        {"input": [{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "fc_1"}]},
        # tools the upstream runs itself, whose results it reads as input
        {"input": "hi", "tools": [FILE_SEARCH]},
        {"input": "hi", "tools": [MCP]},
        {"input": "hi", "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
        {"input": "hi", "tools": [{"type": "shell", "environment": {"type": "container_auto"}}]},
        {"input": "hi", "tools": [{"type": "namespace", "name": "n", "tools": [FILE_SEARCH]}]},
        # beside the function tools a client runs
        {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}, MCP]},
    ],
    ids=[
        "item-reference",
        "item-reference-after-a-message",
        "file-search",
        "mcp",
        "code-interpreter",
        "hosted-shell",
        "file-search-in-a-namespace",
        "mcp-beside-a-function",
    ],
)
def test_a_request_reading_stored_items_or_hosted_tool_results_holds_the_context_window(
    document: dict[str, object],
) -> None:
    body = orjson.dumps(document)
    held = largest_cost(CODEX, document, body, 32768, CONTEXT_TOKENS)
    assert held == (CONTEXT_HOLD, CONTEXT_TOKENS)  # the context window is its input


@pytest.mark.parametrize(
    "document",
    [
        # tools the client runs, whose results come back in the next request's body
        {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]},
        {"input": "hi", "tools": [{"type": "custom", "name": "apply_patch"}]},
        {"input": "hi", "tools": [{"type": "local_shell"}]},
        {"input": "hi", "tools": [{"type": "shell", "environment": {"type": "local"}}]},
        {"input": "hi", "tools": [{"type": "shell"}]},
        {"input": "hi", "tools": [{"type": "computer_use_preview", "environment": "linux"}]},
        # a web search, as Codex CLI offers one with every request
        {"input": "hi", "tools": [{"type": "web_search", "external_web_access": False}]},
        # the words alone, in text the body carries
        {"input": "use mcp and file_search on the item_reference", "tools": []},
    ],
    ids=[
        "function",
        "custom",
        "local-shell",
        "shell-local",
        "shell",
        "computer-use",
        "web-search",
        "words-in-text",
    ],
)
def test_a_request_whose_tools_the_client_runs_holds_its_body(document: dict[str, object]) -> None:
    body = orjson.dumps(document)
    expected = estimate_hold(CODEX, len(body), None, 32768)
    held = largest_cost(CODEX, document, body, 32768, CONTEXT_TOKENS)
    assert held.cost == expected < CONTEXT_HOLD
    assert held.input_tokens == len(body) + INPUT_ALLOWANCE_TOKENS


@pytest.mark.parametrize(
    "name",
    [
        "codex-exec-0.169.0-turn1",
        "codex-exec-0.169.0-tool-turn1",
        "codex-exec-0.169.0-tool-turn2",
    ],
)
def test_a_codex_cli_request_holds_its_body_not_the_context_window(name: str) -> None:
    """Codex CLI's requests carry function tools, a namespace of them, and a web search."""
    body = fixture_path("requests", f"{name}.body.json").read_bytes()
    document = orjson.loads(body)
    assert {tool["type"] for tool in document["tools"]} == {"function", "namespace", "web_search"}
    held = largest_cost(CODEX, document, body, 32768, CONTEXT_TOKENS).cost
    assert held == estimate_hold(CODEX, len(body), None, 32768) < CONTEXT_HOLD


# the other process's request, this one's, and whether the message says the balance is held
SET_ASIDE = [
    # the other process leased what this request needs for its own request in flight
    pytest.param("0.15", "0.1", True, id="held-elsewhere"),
    # the balance itself does not cover the request, whatever the other process holds
    pytest.param("0.15", "0.25", False, id="short-anyway"),
    pytest.param(None, "0.25", False, id="short-alone"),
]


@pytest.mark.parametrize(("other", "this", "held_elsewhere"), SET_ASIDE)
async def test_a_refusal_says_when_the_balance_is_held_by_another_process(
    store: Store, other: str | None, this: str, held_elsewhere: bool
) -> None:
    _, user_id = await new_user(store, "0.2")
    first, second = admission(store), admission(store)
    if other is not None:
        await first.admit(user_id, Decimal(other))

    with pytest.raises(InsufficientQuota) as caught:
        await second.admit(user_id, Decimal(this))

    message = caught.value.message
    assert caught.value.status == 429 and caught.value.code == "insufficient_quota"
    assert f"${this}" in message
    assert ("set aside in other gateway processes' leases" in message) is held_elsewhere
    assert ("0 s after its process last had a request" in message) is held_elsewhere
    assert ("or 60 s after that process stopped" in message) is held_elsewhere
    assert ("top the balance up" in message) is not held_elsewhere
    assert (await store.balances())[user_id] == Decimal("0.2")
    await first.close()
    await second.close()


# the other process's request, this one's, and whether the message says the cap is held
KEY_SET_ASIDE = [
    # the other process leased what this request needs: for its request in flight, or as
    # spare room for more like it
    pytest.param("0.15", "0.1", True, id="held-elsewhere"),
    pytest.param("0.05", "0.18", True, id="spare-room-elsewhere"),
    # the cap itself does not cover the request, whatever the other process holds
    pytest.param("0.15", "0.25", False, id="short-anyway"),
    pytest.param(None, "0.25", False, id="short-alone"),
]


@pytest.mark.parametrize(("other", "this", "held_elsewhere"), KEY_SET_ASIDE)
async def test_a_cap_refusal_says_when_the_cap_is_held_by_another_process(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    other: str | None,
    this: str,
    held_elsewhere: bool,
) -> None:
    user_id, key = await capped_key(store, "10", "0.2")
    first, second = admission(store), admission(store)
    asked = []
    real = store.leased_to_others

    async def counted(*args: Any) -> tuple[Decimal, Decimal]:
        asked.append(args)
        return await real(*args)

    monkeypatch.setattr(store, "leased_to_others", counted)
    if other is not None:
        await first.admit(user_id, Decimal(other), key)
    assert asked == []  # an admitted request reads nothing more

    with pytest.raises(InsufficientQuota) as caught:
        await second.admit(user_id, Decimal(this), key)

    message = caught.value.message
    assert caught.value.status == 429 and caught.value.code == "key_cap_reached"
    assert f"${this}" in message and "spending cap of $0.2" in message
    assert ("set aside in other gateway processes' leases" in message) is held_elsewhere
    assert ("comes back to the cap about 0 s after" in message) is held_elsewhere
    assert ("or 60 s after that process stopped" in message) is held_elsewhere
    assert ("raise the cap" in message) is not held_elsewhere
    # the refusal gave back what it held against the balance
    assert second.held(user_id) == 0
    await first.close()
    await second.close()
    assert (await store.balances())[user_id] == Decimal("10")


async def test_a_cap_refusal_gives_the_plain_reason_when_the_database_cannot_say_why(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id, key = await capped_key(store, "10", "0.2")
    first, second = admission(store), admission(store)
    await first.admit(user_id, Decimal("0.15"), key)

    async def unreachable(*args: object) -> tuple[Decimal, Decimal]:
        raise OSError("connection refused")

    monkeypatch.setattr(store, "leased_to_others", unreachable)
    with pytest.raises(InsufficientQuota) as caught:
        await second.admit(user_id, Decimal("0.1"), key)

    message = caught.value.message
    assert caught.value.code == "key_cap_reached"
    assert "raise the cap" in message and "leases" not in message
    await first.close()
    await second.close()


async def test_a_refusal_gives_the_plain_reason_when_the_database_cannot_say_why(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one more read a refusal makes to say why fails: the request still gets its 429,
    with the plain reason."""
    _, user_id = await new_user(store, "0.2")
    first, second = admission(store), admission(store)
    await first.admit(user_id, Decimal("0.15"))

    async def unreachable(*args: object) -> tuple[Decimal, Decimal]:
        raise OSError("connection refused")

    monkeypatch.setattr(store, "leased_to_others", unreachable)
    with pytest.raises(InsufficientQuota) as caught:
        await second.admit(user_id, Decimal("0.1"))

    message = caught.value.message
    assert caught.value.status == 429 and caught.value.code == "insufficient_quota"
    assert "top the balance up" in message and "leases" not in message
    await first.close()
    await second.close()
