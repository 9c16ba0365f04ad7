"""Every SDK client a test makes is closed when the test ends.

A client left to the garbage collector can have its sockets finalized before the client
itself, which Python reports as an unclosed socket in whatever test happens to run then.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest


@pytest.fixture(autouse=True)
def close_sdk_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    made: list[openai.OpenAI] = []
    original = openai.OpenAI.__init__

    def tracked(self: openai.OpenAI, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(openai.OpenAI, "__init__", tracked)
    yield
    for client in made:
        client.close()
