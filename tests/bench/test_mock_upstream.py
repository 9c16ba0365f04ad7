"""The mock upstream answers the three ways the benchmark needs, in the real event shapes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from bench import mock_upstream
from codex_gateway.relay.sse import parse_events
from tests.conftest import free_port


@pytest.fixture
async def mock() -> AsyncIterator[str]:
    port = free_port()
    ready = asyncio.Event()
    server = asyncio.create_task(mock_upstream.serve("127.0.0.1", port, ready))
    await ready.wait()
    yield f"http://127.0.0.1:{port}/v1"
    server.cancel()


async def test_a_plain_request_gets_a_json_response_with_usage(mock: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(mock + "/responses", json={"model": "m", "input": "hi"})
    assert response.status_code == 200
    assert response.json()["usage"]["output_tokens"] == mock_upstream.DELTAS


@pytest.mark.parametrize("model", ["bench-model", "bench-paced"])
async def test_a_stream_has_64_deltas_then_completed_with_usage(mock: str, model: str) -> None:
    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        response = await client.post(
            mock + "/responses", json={"model": model, "input": "hi", "stream": True}
        )
    elapsed = time.monotonic() - started
    events = parse_events(response.content)
    types = [event["type"] for event in events]
    assert types.count("response.output_text.delta") == 64
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert events[-1]["response"]["usage"]["output_tokens"] == 64
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    if model == "bench-paced":
        assert elapsed >= 65 * mock_upstream.PACING_SECONDS
    else:
        assert elapsed < 1.0
