"""Chat Completions through the official SDK against both account kinds.

The same chat request served by an OpenAI-API account and by a ChatGPT account must reach
the SDK as the same chunks (or the same completion), carry the same usage with its cached
and reasoning details, and cost the same. The ChatGPT backend must receive it shaped to its
rules: the system message as `instructions`, `store: false`, `stream: true`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.conftest import Gateway, Sandbox
from tests.http.test_chat import FINISH, FINISHED, MESSAGES
from tests.http.test_responses import TRANSCRIPTS, assert_billed, expected_cost
from tests.upstream.chatgpt_helpers import (
    backend_requests,
    chatgpt_gateway_on_each_backend,
    only_chatgpt_accounts,
)
from tests.upstream.pool_helpers import fresh_accounts

KINDS = ["openai", "chatgpt"]

__all__ = ["chatgpt_gateway_on_each_backend"]  # the module's `gateway` fixture


def serve_with(gateway: Gateway, sandbox: Sandbox, kind: str, name: str) -> dict[str, str]:
    """Make one account of `kind` the only one, replaying transcript `name`; the headers that
    pick that transcript (a ChatGPT account's base URL names it instead)."""
    if kind == "chatgpt":
        only_chatgpt_accounts(gateway, sandbox, [{"transcript": name}])
        return {}
    fresh_accounts(gateway, sandbox, [{}])
    return {"x-sandbox-transcript": name}


def usage_counts(usage: Any) -> tuple[int, int, int, int]:
    assert usage.prompt_tokens_details is not None and usage.completion_tokens_details is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    return (
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens,
        usage.completion_tokens,
        usage.completion_tokens_details.reasoning_tokens,
    )


def assert_shaped_for_the_backend(sandbox: Sandbox, kind: str) -> None:
    if kind != "chatgpt":
        return
    (sent,) = backend_requests(sandbox)
    body = json.loads(sent["body"])
    assert body["instructions"] == "Be terse."
    assert (body["store"], body["stream"]) == (False, True)
    assert [item["role"] for item in body["input"]] == ["user"]


def comparable(chunk: Any) -> dict[str, Any]:
    """A chunk without what differs from one request to the next (its id and time)."""
    return {k: v for k, v in chunk.to_dict().items() if k not in ("id", "created")}


@pytest.mark.parametrize("name", FINISHED)
def test_a_chat_stream_with_usage_is_the_same_from_either_kind_of_account(
    gateway: Gateway, sandbox: Sandbox, sdk: Callable[[str], openai.OpenAI], name: str
) -> None:
    user, key = gateway.new_user("10")
    received: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        headers = serve_with(gateway, sandbox, kind, name)
        sandbox.clear()
        raw = sdk(key).chat.completions.with_raw_response.create(
            model="gpt-5.1-codex",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        chunks = list(raw.parse())

        status, counts = TRANSCRIPTS[name]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == FINISH[name]
        assert chunks[-1].choices == [] and usage_counts(chunks[-1].usage) == counts
        assert_billed(gateway.usage_row(raw.headers["x-request-id"]), status, counts)
        assert_shaped_for_the_backend(sandbox, kind)
        received[kind] = [comparable(chunk) for chunk in chunks]

    assert received["openai"] == received["chatgpt"]
    charged = 2 * expected_cost(TRANSCRIPTS[name][1])
    assert Decimal(gateway.balance(user)) == Decimal(10) - charged


@pytest.mark.parametrize("name", ["responses-cached", "responses-reasoning-tool"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_whole_chat_completion_carries_the_usage_details_from_either_kind(
    gateway: Gateway,
    sandbox: Sandbox,
    sdk: Callable[[str], openai.OpenAI],
    kind: str,
    name: str,
) -> None:
    headers = serve_with(gateway, sandbox, kind, name)
    user, key = gateway.new_user("5")
    sandbox.clear()

    raw = sdk(key).chat.completions.with_raw_response.create(
        model="gpt-5.1-codex",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers=headers,
    )
    completion = raw.parse()

    status, counts = TRANSCRIPTS[name]
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == FINISH[name]
    assert usage_counts(completion.usage) == counts
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert_billed(row, status, counts)
    assert (row["endpoint"], row["stream"]) == ("chat.completions", False)
    assert Decimal(gateway.balance(user)) == Decimal(5) - expected_cost(counts)
    assert_shaped_for_the_backend(sandbox, kind)
