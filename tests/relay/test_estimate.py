"""The gateway's own token count, for streams that end without reporting usage."""

from __future__ import annotations

from typing import Any

import pytest

from codex_gateway.relay.estimate import TokenCounter, delta_texts, request_texts
from codex_gateway.relay.sse import StreamScanner
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    tokens = TokenCounter()
    tokens.load()
    return tokens


# request body -> the texts the model reads from it
REQUEST_TEXTS: list[tuple[dict[str, Any], list[str]]] = [
    # a plain string input, with instructions
    ({"model": "m", "input": "hi", "instructions": "Be brief."}, ["Be brief.", "hi"]),
    # message items: text parts count, roles, types and ids do not
    (
        {
            "input": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "List files"}],
                }
            ]
        },
        ["List files"],
    ),
    # tool calls and their output count; opaque reasoning does not
    (
        {
            "input": [
                {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA" * 50},
                {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "README.md"},
            ]
        },
        ["shell", "{}", "README.md"],
    ),
    # tool definitions are part of the prompt
    (
        {"input": "x", "tools": [{"type": "function", "name": "ls", "description": "List"}]},
        ["x", "ls", "List"],
    ),
]


@pytest.mark.parametrize(("request_body", "texts"), REQUEST_TEXTS)
def test_request_texts_are_what_the_model_reads(
    request_body: dict[str, Any], texts: list[str]
) -> None:
    assert request_texts(request_body) == texts


def scanned(name: str) -> StreamScanner:
    scanner = StreamScanner()
    scanner.feed(fixture_path("upstream", f"{name}.sse").read_bytes())
    return scanner


def test_streamed_text_tool_arguments_and_summaries_are_output() -> None:
    tool = "".join(delta_texts(scanned("responses-reasoning-tool").deltas))
    assert "**Listing files**" in tool  # reasoning summary
    assert "ls -la" in tool  # function call arguments
    text = "".join(delta_texts(scanned("responses-text").deltas))
    assert text.startswith("Here is an iterative")
    assert "斐波那契数列" in text


def test_estimate_counts_o200k_tokens_of_request_and_stream(counter: TokenCounter) -> None:
    usage = counter.estimate(
        {"input": "hello world", "instructions": "<|endoftext|>"},
        scanned("responses-text").deltas,
    )
    text = "".join(delta_texts(scanned("responses-text").deltas))
    # Special-token text in a prompt is counted as ordinary text, never refused.
    assert usage["input_tokens"] == counter.count("<|endoftext|>\nhello world") > 2
    assert usage["output_tokens"] == counter.count(text) > 100
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_known_token_counts(counter: TokenCounter) -> None:
    # o200k_base: "hello world" is two tokens, and nothing is zero tokens.
    assert counter.count("hello world") == 2
    assert counter.count("") == 0


def test_a_delta_with_a_lone_surrogate_escape_still_counts() -> None:
    block = (
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"a\\ud800b"}\n\n'
    )

    assert list(delta_texts([block])) == ["a\ufffdb"]
