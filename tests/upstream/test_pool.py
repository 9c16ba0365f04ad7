"""Account selection and health, without a server: which account a request gets, and why."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.pool import (
    COOLING_DOWN,
    NEEDS_RELOGIN,
    QUOTA_LIMITED,
    USAGE_LIMIT_REASON,
    AccountPool,
    quota_reset,
)


class FakeStore:
    """Records the marks the pool writes; the revision goes up with each, like the real one."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, str]] = []

    async def mark_account(
        self, account_id: int, state: str, reason: str | None, until: datetime | None
    ) -> int:
        self.marks.append((account_id, state))
        return 100 + len(self.marks)


def account(account_id: int, **fields: Any) -> AccountRecord:
    values: dict[str, Any] = {
        "id": account_id,
        "name": f"a{account_id}",
        "kind": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "api_key": "sk-x",
        "priority": 100,
        "enabled": True,
    }
    values.update(fields)
    return AccountRecord(**values)


def make_pool(
    *accounts: AccountRecord, left_out: str | None = None
) -> tuple[AccountPool, FakeStore, list[AccountRecord]]:
    """A pool of `accounts`; `left_out` says why others never reached it."""
    store = FakeStore()
    records = list(accounts)
    pool = AccountPool(store, lambda: records, lambda: 0, lambda: left_out)  # type: ignore[arg-type]
    return pool, store, records


def picks(pool: AccountPool, count: int) -> list[int]:
    """Account ids chosen by `count` requests made one after another."""
    chosen = []
    for _ in range(count):
        lease = pool.choose(set())
        assert lease is not None
        chosen.append(lease.account.id)
        lease.release()
    return chosen


def test_lower_priority_number_is_always_tried_first() -> None:
    pool, _, _ = make_pool(account(1, priority=20), account(2, priority=10))
    assert picks(pool, 3) == [2, 2, 2]


def test_equal_accounts_take_turns_least_recently_used_first() -> None:
    pool, _, _ = make_pool(account(1), account(2), account(3))
    assert picks(pool, 6) == [1, 2, 3, 1, 2, 3]


def test_weights_share_traffic_in_proportion() -> None:
    pool, _, _ = make_pool(account(1, weight=2), account(2, weight=1))
    chosen = picks(pool, 30)
    assert chosen.count(1) == 20
    assert chosen.count(2) == 10


def test_fewest_in_flight_wins_over_turn_order() -> None:
    pool, _, _ = make_pool(account(1), account(2))
    held = pool.choose(set())
    assert held is not None and held.account.id == 1
    assert picks(pool, 2) == [2, 2]
    held.release()


def test_concurrency_cap_skips_a_full_account_and_frees_on_release() -> None:
    pool, _, _ = make_pool(account(1, priority=1, max_concurrency=1), account(2, priority=2))
    first = pool.choose(set())
    second = pool.choose(set())
    assert (first and first.account.id, second and second.account.id) == (1, 2)
    assert first is not None
    first.release()
    first.release()  # a second release gives nothing back twice
    again = pool.choose(set())
    assert again is not None and again.account.id == 1


def test_no_account_when_every_one_is_excluded_or_full() -> None:
    pool, _, _ = make_pool(account(1, max_concurrency=1), account(2, enabled=False))
    held = pool.choose(set())
    assert held is not None
    assert pool.choose(set()) is None
    assert "at its concurrency limit" in pool.why_none(set())
    assert "disabled" in pool.why_none(set())


LEFT_OUT = (
    "1 account(s) are left out because their API keys do not open with this gateway's secret key"
)


def test_the_answer_when_none_can_serve_says_why_accounts_were_left_out() -> None:
    """Accounts whose sealed keys do not open never reach the pool; the answer still counts
    them, beside the pool's own accounts or alone."""
    pool, _, _ = make_pool(account(1, enabled=False), left_out=LEFT_OUT)
    alone, _, _ = make_pool(left_out=LEFT_OUT)

    assert pool.choose(set()) is None and alone.choose(set()) is None
    assert pool.why_none(set()) == (
        f"No upstream account can serve this request now (accounts are disabled); {LEFT_OUT}."
    )
    assert alone.why_none(set()) == (
        f"No upstream account is available to serve this request: {LEFT_OUT}."
    )
    assert make_pool()[0].why_none(set()) == (
        "No upstream account is available to serve this request."
    )


async def test_quota_and_relogin_marks_skip_the_account_until_cleared() -> None:
    pool, store, records = make_pool(account(1, priority=1), account(2, priority=2))
    pool.quota_limited(records[0], "429", time.time() + 60)
    assert picks(pool, 2) == [2, 2]
    pool.needs_relogin(records[1], "401")
    assert pool.choose(set()) is None
    assert "needs relogin" in pool.why_none(set())
    assert "quota limited" in pool.why_none(set())
    await pool.drain()
    assert store.marks == [(1, QUOTA_LIMITED), (2, NEEDS_RELOGIN)]


async def test_quota_mark_ends_by_itself_at_the_reset_time() -> None:
    pool, _, records = make_pool(account(1, priority=1), account(2, priority=2))
    pool.quota_limited(records[0], "429", time.time() - 1)
    assert picks(pool, 1) == [1]
    await pool.drain()


async def test_a_cooling_account_is_a_last_resort_and_recovers_on_success() -> None:
    pool, store, records = make_pool(account(1, priority=1), account(2, priority=2))
    pool.failed(records[0], "HTTP 500", 60)
    assert picks(pool, 1) == [2]
    # With the healthy one out of the running, the cooling one is still tried.
    lease = pool.choose({2})
    assert lease is not None and lease.account.id == 1
    pool.succeeded(lease.account)
    lease.release()
    assert picks(pool, 1) == [1]
    await pool.drain()
    assert store.marks == [(1, COOLING_DOWN), (1, "ready")]


async def test_the_preferred_account_wins_while_ready_and_is_dropped_when_not() -> None:
    pool, _, records = make_pool(account(1), account(2), account(3))
    for _ in range(3):
        lease = pool.choose(set(), preferred=3)
        assert lease is not None and lease.account.id == 3
        lease.release()
    pool.failed(records[2], "cut", 60)
    lease = pool.choose(set(), preferred=3)
    assert lease is not None and lease.account.id != 3
    await pool.drain()


def test_a_state_written_by_another_process_is_adopted() -> None:
    until = datetime.fromtimestamp(time.time() + 60, UTC).replace(tzinfo=None)
    pool, _, _ = make_pool(
        account(1, priority=1, state=QUOTA_LIMITED, state_reason="429", state_until=until),
        account(2, priority=2),
    )
    assert picks(pool, 1) == [2]


NOW = 1_764_800_000.0

# headers, body -> seconds from now until the account may be tried again
QUOTA_RESETS: list[tuple[dict[str, str], Any, float]] = [
    # nothing given: the configured default
    ({}, None, 60),
    ({}, {"error": {"message": "slow down"}}, 60),
    # Retry-After in seconds
    ({"retry-after": "7"}, None, 7),
    # the Codex backend's headers: only a window that is used up counts
    (
        {"x-codex-primary-used-percent": "100.0", "x-codex-primary-reset-at": str(NOW + 300)},
        None,
        300,
    ),
    ({"x-codex-primary-used-percent": "40", "x-codex-primary-reset-at": str(NOW + 300)}, None, 60),
    # the Codex backend's usage_limit_reached body
    ({}, {"error": {"type": "usage_limit_reached", "resets_in_seconds": 18000}}, 18000),
    ({}, {"error": {"resets_at": NOW + 90}}, 90),
    # several given: the latest wins; past or nonsense values are ignored
    ({"retry-after": "5"}, {"error": {"resets_in_seconds": 50}}, 50),
    ({"retry-after": "soon"}, {"error": {"resets_at": NOW - 10}}, 60),
]


@pytest.mark.parametrize(("headers", "body", "seconds"), QUOTA_RESETS)
def test_quota_reset_time_comes_from_headers_or_body(
    headers: dict[str, str], body: Any, seconds: float
) -> None:
    assert quota_reset(headers, body, NOW, 60) == NOW + seconds


def at(fields: dict[str, Any], now: float) -> dict[str, Any]:
    """Account fields whose `state_until`, given in seconds from `now`, is made a moment."""
    if "state_until" not in fields:
        return fields
    return {**fields, "state_until": datetime.fromtimestamp(now + fields["state_until"], UTC)}


# A state's `state_until` in these rows is in seconds from when the test runs.
WALLED = {"state": QUOTA_LIMITED, "state_reason": f"{USAGE_LIMIT_REASON} (plan plus); resets at"}
COOLING = {"state": COOLING_DOWN, "state_until": 5}
PLAIN_429 = {"state": QUOTA_LIMITED, "state_reason": "the upstream answered 429"}


@pytest.mark.parametrize(
    ("states", "resets_in"),
    [
        # every account able to serve is behind a wall: the earliest reset
        ([{**WALLED, "state_until": 600}], 600),
        ([{**WALLED, "state_until": 900}, {**WALLED, "state_until": 300}], 300),
        # an account needing a new sign-in cannot serve, so it does not count
        ([{**WALLED, "state_until": 600}, {"state": NEEDS_RELOGIN}], 600),
        # an account that can serve, or may soon, means no wall answer
        ([{**WALLED, "state_until": 600}, {}], None),
        ([{**WALLED, "state_until": 600}, COOLING], None),
        # a plain 429's rest is not a usage wall
        ([{**PLAIN_429, "state_until": 60}], None),
        # a wall whose time is up is over
        ([{**WALLED, "state_until": -1}], None),
        ([{"state": NEEDS_RELOGIN}], None),
    ],
)  # fmt: skip
def test_the_usage_limit_reset_is_known_only_when_every_account_able_to_serve_is_walled(
    states: list[dict[str, Any]], resets_in: float | None
) -> None:
    now = time.time()
    pool, _, _ = make_pool(*[account(n, **at(fields, now)) for n, fields in enumerate(states, 1)])

    reset = pool.usage_limit_reset()

    if resets_in is None:
        assert reset is None
    else:
        assert reset is not None and abs(reset - (time.time() + resets_in)) < 2
