"""What the HTTP tests share: SDK clients that are closed after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest

from tests.conftest import Gateway


@pytest.fixture
def sdk(gateway: Gateway) -> Iterator[Callable[[str], openai.OpenAI]]:
    """Make SDK clients for a key; every client is closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
