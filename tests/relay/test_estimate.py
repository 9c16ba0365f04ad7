"""The gateway's own token count, for answers billed without the upstream's usage."""

from __future__ import annotations

from typing import Any

import pytest

from codex_gateway.relay.estimate import TokenCounter, answer_texts, delta_texts, request_texts
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


def final_response(name: str) -> dict[str, Any]:
    terminal = scanned(name).terminal
    assert terminal is not None
    response: dict[str, Any] = terminal["response"]
    return response


@pytest.mark.parametrize(
    "name",
    ["responses-text", "responses-cached", "responses-reasoning-tool", "responses-incomplete"],
)
def test_a_json_answer_counts_what_its_stream_carried_as_deltas(name: str) -> None:
    """The same answer costs the same whether it came whole or streamed."""
    streamed = "".join(delta_texts(scanned(name).deltas))

    assert "".join(answer_texts(final_response(name)["output"])) == streamed != ""


def test_a_json_answer_counts_no_ids_logprobs_annotations_or_opaque_data() -> None:
    output = [
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "A"}],
            "encrypted_content": "gAAAA",
        },
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": "B",
                    "annotations": [{"type": "url_citation", "url": "https://x", "title": "T"}],
                    "logprobs": [{"token": "B", "logprob": -0.1, "top_logprobs": []}],
                },
                {"type": "refusal", "refusal": "C"},
            ],
        },
        {"type": "function_call", "call_id": "c", "name": "exec_command", "arguments": "D"},
        {"type": "custom_tool_call", "call_id": "e", "name": "apply_patch", "input": "E"},
        # what no stream sends as deltas: a shell call's action, an image's data
        {"type": "local_shell_call", "action": {"command": ["ls"], "env": {}}},
        {"type": "image_generation_call", "result": "iVBORw0KGgo="},
        "not an item",
    ]

    assert list(answer_texts(output)) == ["A", "B", "C", "D", "E"]
    assert list(answer_texts(None)) == []


def test_estimate_of_a_json_answer_counts_the_request_and_its_output(
    counter: TokenCounter,
) -> None:
    answer = final_response("responses-text")

    usage = counter.estimate_answer({"input": "hello world"}, answer)

    assert usage["input_tokens"] == 2
    assert usage["output_tokens"] == counter.count("".join(answer_texts(answer["output"]))) > 100


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
