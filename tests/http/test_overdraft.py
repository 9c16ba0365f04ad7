"""Concurrent requests through two gateway processes never overdraw a balance."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx

from tests.conftest import Gateway

BODY = b'{"model":"gpt-5.1-codex","input":"hi","stream":true}'
# The most BODY can cost: (body bytes + 1000) input tokens and 32768 output tokens.
LARGEST = (Decimal(len(BODY) + 1000) * Decimal("1.25") + 32768 * 10) / 10**6
COST = Decimal("0.114295")


async def stream(client: httpx.AsyncClient, url: str, key: str) -> tuple[int, float, float]:
    """One paced streaming request: its status, when its headers came and when it ended.

    The gateway holds a request from before its headers until after its last byte, so these
    spans lie inside the holds: if they overlap, the holds did.
    """
    async with client.stream(
        "POST",
        url + "/v1/responses",
        content=BODY,
        headers={"Authorization": f"Bearer {key}", "x-sandbox-delay-ms": "150"},
    ) as response:
        started = time.monotonic()
        async for _ in response.aiter_raw():
            pass
        return response.status_code, started, time.monotonic()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_two_hundred_concurrent_streams_never_overdraw(
    two_gateways: tuple[Gateway, str],
) -> None:
    gateway, second_url = two_gateways
    user, key = gateway.new_user(str(10 * LARGEST))

    async def fire() -> list[tuple[int, float, float]]:
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            urls = (gateway.url, second_url)
            return await asyncio.gather(*(stream(client, urls[i % 2], key) for i in range(200)))

    results = asyncio.run(fire())
    admitted = [(start, end) for status, start, end in results if status == 200]
    refused = [status for status, _, _ in results if status != 200]
    assert set(refused) <= {429}
    assert 1 <= most_at_once(admitted) <= 10

    deadline = time.monotonic() + 20
    while len(gateway.cli_json("usage", "list", "--user", user)) < len(admitted):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    balance = Decimal(gateway.balance(user))
    assert balance == 10 * LARGEST - len(admitted) * COST
    assert balance >= 0
    assert "ok:" in gateway.cli("ledger", "verify").stdout
