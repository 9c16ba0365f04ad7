"""The quota book: readings in, marks on the pool and throttled writes out."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import orjson

from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.pool import AccountPool
from codex_gateway.upstream.quota import QuotaBook

ACCOUNT = AccountRecord(7, "plus", "chatgpt", "http://127.0.0.1:9/backend-api", "", 100, True)
WALL = {"error": {"type": "usage_limit_reached", "plan_type": "plus", "resets_in_seconds": 600}}


class Recorder:
    """Stands in for the store and the credential store: keeps what would be written."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, str | None]] = []
        self.quotas: list[dict[str, Any]] = []

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
