"""The quota book: readings in, marks on the pool and throttled writes out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any, cast

import orjson

from codex_gateway.relay.chatgpt import quota_from_event
from codex_gateway.relay.sse import parse_events
from codex_gateway.store.credentials import AccountState
from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.pool import AccountPool
from codex_gateway.upstream.quota import QuotaBook
from tests.conftest import fixture_path

ACCOUNT = AccountRecord(7, "plus", "chatgpt", "http://127.0.0.1:9/backend-api", "", 100, True)
WALL = {"error": {"type": "usage_limit_reached", "plan_type": "plus", "resets_in_seconds": 600}}


class Recorder:
    """Stands in for the store and the credential store: keeps what would be written."""

    def __init__(self, stored: dict[str, Any] | None = None) -> None:
        self.marks: list[tuple[str, str | None]] = []
        self.quotas: list[dict[str, Any]] = []
        self.stored = stored  # the quota JSON of ACCOUNT from before a restart

    async def states(self) -> dict[int, AccountState]:
        quota = orjson.dumps(self.stored).decode() if self.stored else None
        return {ACCOUNT.id: AccountState("ready", None, quota, None)}

    async def mark_account(
        self, account_id: int, state: str, reason: str | None, until: Any
    ) -> int:
        self.marks.append((state, reason))
        return len(self.marks)

    async def save_quota(self, account_id: int, quota_json: str) -> None:
        self.quotas.append(orjson.loads(quota_json))


def book(recorder: Recorder, interval: float = 0.05) -> tuple[QuotaBook, AccountPool]:
    pool = AccountPool(cast(Any, recorder), lambda: [ACCOUNT], lambda: 0)
    return QuotaBook(pool, cast(Any, recorder), interval), pool


def windows(used: str) -> dict[str, str]:
    return {"x-codex-primary-used-percent": used, "x-codex-primary-window-minutes": "300"}


async def test_a_wall_rests_the_account_until_its_reset_and_a_served_request_ends_it() -> None:
    recorder = Recorder()
    quotas, pool = book(recorder)

    assert quotas.limit_reached(ACCOUNT, WALL) is True
    health = pool.health(ACCOUNT)
    assert health.state == "quota_limited"
    assert abs(health.until - (time.time() + 600)) < 5
    assert quotas.limit_reached(ACCOUNT, WALL) is True  # the same wall marks only once
    quotas.answered(ACCOUNT, 200, windows("3"))
    await asyncio.sleep(0.2)

    assert [state for state, _ in recorder.marks] == ["quota_limited"]
    assert recorder.marks[0][1] is not None and recorder.marks[0][1].startswith(
        "usage limit reached (plan plus); resets at "
    )
    assert recorder.quotas[-1]["limit_reached_until"] is None
    assert recorder.quotas[-1]["primary"]["used_percent"] == 3.0


async def test_other_errors_are_not_walls() -> None:
    quotas, pool = book(Recorder())

    assert quotas.limit_reached(ACCOUNT, {"error": {"type": "usage_not_included"}}) is False
    assert quotas.limit_reached(ACCOUNT, {"type": "error", "code": "server_error"}) is False
    assert pool.health(ACCOUNT).state == "ready"


async def test_readings_are_written_at_most_once_per_interval_and_the_last_one_wins() -> None:
    recorder = Recorder()
    quotas, _ = book(recorder, interval=0.3)

    quotas.answered(ACCOUNT, 200, windows("1"))
    await asyncio.sleep(0.05)  # the first reading is written at once
    for used in range(2, 11):
        quotas.answered(ACCOUNT, 200, windows(str(used)))
    await asyncio.sleep(0.1)
    written_at_once = len(recorder.quotas)
    await asyncio.sleep(0.4)
    await quotas.drain()

    assert written_at_once == 1
    assert [q["primary"]["used_percent"] for q in recorder.quotas] == [1.0, 10.0]
    quotas.answered(ACCOUNT, 200, {"content-type": "text/event-stream"})  # no windows: no write
    await quotas.drain()
    assert len(recorder.quotas) == 2


# The backend's in-stream report: primary 87.5 %, secondary 40 %, plan pro.
RATE_LIMITS = parse_events(fixture_path("upstream", "chatgpt-rate-limits.sse").read_bytes())[0]


async def test_a_rate_limits_event_is_read_like_the_headers() -> None:
    recorder = Recorder()
    quotas, pool = book(recorder)
    quotas.answered(ACCOUNT, 200, windows("12.5"))

    quotas.reported(ACCOUNT, quota_from_event(RATE_LIMITS), served=True)
    await quotas.drain()

    quota = quotas.get(ACCOUNT.id)
    assert quota is not None and quota.plan_type == "pro"
    assert quota.primary is not None and quota.primary.used_percent == 87.5
    assert quota.secondary is not None and quota.secondary.resets_at == 1765238400
    assert recorder.quotas[-1]["primary"]["used_percent"] == 87.5
    assert pool.health(ACCOUNT).state == "ready"


async def test_an_event_showing_a_full_window_rests_the_account_until_its_reset() -> None:
    quotas, pool = book(Recorder())
    full = {"used_percent": 100, "window_minutes": 300, "reset_at": int(time.time()) + 900}
    event = {**RATE_LIMITS, "rate_limits": {"primary": full}}

    quotas.reported(ACCOUNT, quota_from_event(event), served=False)

    health = pool.health(ACCOUNT)
    assert health.state == "quota_limited" and abs(health.until - (time.time() + 900)) < 5


async def test_windows_stored_before_a_restart_are_kept_and_added_to() -> None:
    stored = {
        "primary": {"used_percent": 30.0, "window_minutes": 300, "resets_at": 1764824400},
        "secondary": {"used_percent": 61.5, "window_minutes": 10080, "resets_at": 1765238400},
        "limit_reached_until": None,
        "plan_type": "plus",
    }
    recorder = Recorder(stored)
    quotas, _ = book(recorder)

    await quotas.load([ACCOUNT])
    quotas.answered(ACCOUNT, 200, windows("31"))  # only the primary window, as a header
    await quotas.drain()

    assert recorder.quotas == [
        {**stored, "primary": {"used_percent": 31.0, "window_minutes": 300, "resets_at": None}}
    ]


async def test_a_wall_stored_before_a_restart_still_rests_the_account() -> None:
    until = int(time.time()) + 1200
    recorder = Recorder({"limit_reached_until": until, "plan_type": "plus"})
    quotas, pool = book(recorder)

    await quotas.load([ACCOUNT])
    await asyncio.sleep(0.05)

    health = pool.health(ACCOUNT)
    assert (health.state, health.until) == ("quota_limited", until)
    assert pool.usage_limit_reset() == until
    assert recorder.marks[0][1] is not None and recorder.marks[0][1].startswith(
        "usage limit reached (plan plus)"
    )


async def test_an_account_enabled_elsewhere_loses_its_wall_here_for_good() -> None:
    """The operator's `accounts enable` reaches this process as a new `ready` snapshot; a later
    reading from an answer that served nothing must not bring the wall back, nor store it."""
    recorder = Recorder()
    revision = [0]
    accounts = [ACCOUNT]
    pool = AccountPool(cast(Any, recorder), lambda: accounts, lambda: revision[0])
    quotas = QuotaBook(pool, cast(Any, recorder), 0.05)
    pool.on_ready = quotas.lift  # as the gateway wires them
    assert quotas.limit_reached(ACCOUNT, WALL) is True
    await pool.drain()  # the mark and the walled quota are written
    await quotas.drain()
    assert pool.health(ACCOUNT).state == "quota_limited"
    assert recorder.quotas[-1]["limit_reached_until"] is not None

    revision[0] = 10**6  # the operator enables the account: a newer snapshot, ready again
    enabled = replace(ACCOUNT, state="ready", state_reason=None, state_until=None)
    assert pool.health(enabled).state == "ready"
    await quotas.drain()
    assert recorder.quotas[-1]["limit_reached_until"] is None  # stored without the wall
    quotas.answered(enabled, 429, windows("40"))  # served nothing, reports windows
    await quotas.drain()

    assert pool.health(enabled).state == "ready"
    assert recorder.quotas[-1]["limit_reached_until"] is None
    assert recorder.quotas[-1]["primary"]["used_percent"] == 40.0
