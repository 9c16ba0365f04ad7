"""Usage in Responses or Chat shape maps to billed token classes; bad counts are flagged."""

from __future__ import annotations

from typing import Any

import pytest

from codex_gateway.relay.sse import StreamScanner
from codex_gateway.relay.usage import (
    FLAG_CACHED_OVER_INPUT,
    FLAG_INVALID,
    FLAG_MISSING,
    FLAG_REASONING_OVER_OUTPUT,
    NO_USAGE,
    MappedUsage,
    map_usage,
    response_id_of,
    upstream_model_of,
    usage_from_terminal,
    with_estimate,
)
from tests.conftest import FIXTURES

UPSTREAM = FIXTURES / "upstream"


def responses_usage(
    input_tokens: Any, cached: Any, output_tokens: Any, reasoning: Any
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
    }


@pytest.mark.parametrize(
    ("usage", "mapped"),
    [
        # Responses field names: cached is part of input, reasoning part of output
        (
            responses_usage(1252, 0, 11273, 10944) | {"total_tokens": 12525},
            MappedUsage(1252, 0, 11273, 10944, 0),
        ),
        (responses_usage(11771, 11465, 306, 192), MappedUsage(11771, 11465, 306, 192, 11465)),
        # Chat Completions field names for the same numbers
        (
            {
                "prompt_tokens": 1200,
                "completion_tokens": 210,
                "total_tokens": 1410,
                "prompt_tokens_details": {"cached_tokens": 1024},
                "completion_tokens_details": {"reasoning_tokens": 192},
            },
            MappedUsage(1200, 1024, 210, 192, 1024),
        ),
        # details missing, null, or without the nested count mean zero
        ({"input_tokens": 10, "output_tokens": 5}, MappedUsage(10, 0, 5, 0, 0)),
        (
            {
                "input_tokens": 10,
                "input_tokens_details": None,
                "output_tokens": 5,
                "output_tokens_details": None,
            },
            MappedUsage(10, 0, 5, 0, 0),
        ),
        (
            {
                "input_tokens": 10,
                "input_tokens_details": {},
                "output_tokens": 5,
                "output_tokens_details": {"reasoning_tokens": None},
            },
            MappedUsage(10, 0, 5, 0, 0),
        ),
        ({"prompt_tokens": 7, "completion_tokens": 3}, MappedUsage(7, 0, 3, 0, 0)),
        (
            {
                "prompt_tokens": 7,
                "completion_tokens": 3,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            MappedUsage(7, 0, 3, 0, 0),
        ),
        # zero and whole-number JSON floats are counts
        (responses_usage(0, 0, 0, 0), MappedUsage(0, 0, 0, 0, 0)),
        (responses_usage(10.0, 4.0, 5.0, 2.0), MappedUsage(10, 4, 5, 2, 4)),
    ],
)
def test_valid_usage_maps_to_token_classes(usage: dict[str, Any], mapped: MappedUsage) -> None:
    result = map_usage(usage)

    assert result == mapped
    assert result.billable
    assert result.uncached_input_tokens == mapped.input_tokens - mapped.cached_tokens


@pytest.mark.parametrize(
    "usage",
    [
        # input or output count that is not a non-negative integer
        responses_usage(-1, 0, 5, 0),
        responses_usage("100", 0, 5, 0),
        responses_usage(1.5, 0, 5, 0),
        responses_usage(True, 0, 5, 0),
        responses_usage(None, 0, 5, 0),
        responses_usage(10, 0, -5, 0),
        responses_usage(10, 0, "5", 0),
        responses_usage(10, 0, 5.5, 0),
        responses_usage(10, 0, False, 0),
        {"prompt_tokens": -1, "completion_tokens": 3},
        {"prompt_tokens": 7, "completion_tokens": "3"},
        # a nested count that is not a non-negative integer
        responses_usage(10, -1, 5, 0),
        responses_usage(10, "4", 5, 0),
        responses_usage(10, 1.5, 5, 0),
        responses_usage(10, True, 5, 0),
        responses_usage(10, 0, 5, -2),
        responses_usage(10, 0, 5, "2"),
        responses_usage(10, 0, 5, 0.5),
        responses_usage(10, 0, 5, True),
        # details that are not objects
        {"input_tokens": 10, "input_tokens_details": [4], "output_tokens": 5},
        {"input_tokens": 10, "output_tokens": 5, "output_tokens_details": "2"},
        # a count missing altogether
        {"input_tokens": 10},
        {"output_tokens": 5},
        {"prompt_tokens": 7},
        {},
    ],
)
def test_invalid_counts_are_flagged_and_not_billable(usage: dict[str, Any]) -> None:
    result = map_usage(usage)

    assert result.flags == (FLAG_INVALID,)
    assert not result.billable
    assert result.billable_cached_tokens == 0


def test_invalid_usage_keeps_the_valid_counts_it_received() -> None:
    result = map_usage(responses_usage(10, 4, 5, "two"))

    assert (result.input_tokens, result.cached_tokens, result.output_tokens) == (10, 4, 5)
    assert result.reasoning_tokens == 0


@pytest.mark.parametrize(
    ("usage", "mapped"),
    [
        # more cached than input: kept as received, billed as all-cached input
        (
            responses_usage(100, 150, 10, 0),
            MappedUsage(100, 150, 10, 0, 100, (FLAG_CACHED_OVER_INPUT,)),
        ),
        # more reasoning than output: kept as received; output is what is billed
        (
            responses_usage(100, 0, 10, 40),
            MappedUsage(100, 0, 10, 40, 0, (FLAG_REASONING_OVER_OUTPUT,)),
        ),
        # both at once
        (
            responses_usage(1, 2, 3, 4),
            MappedUsage(1, 2, 3, 4, 1, (FLAG_CACHED_OVER_INPUT, FLAG_REASONING_OVER_OUTPUT)),
        ),
    ],
)
def test_counts_that_break_nesting_are_flagged_and_clamped_for_billing(
    usage: dict[str, Any], mapped: MappedUsage
) -> None:
    result = map_usage(usage)

    assert result == mapped
    assert result.billable
    assert 0 <= result.uncached_input_tokens <= result.input_tokens


@pytest.mark.parametrize("usage", [None, [], "usage", 12, 1.5, True])
def test_usage_that_is_not_an_object_is_missing(usage: Any) -> None:
    result = map_usage(usage)

    assert result is NO_USAGE
    assert result.flags == (FLAG_MISSING,)
    assert not result.billable


ESTIMATE = responses_usage(40, 0, 300, 0) | {"total_tokens": 340}


@pytest.mark.parametrize(
    ("usage", "merged"),
    [
        # a side whose counts all read keeps them; the other side is the estimate's
        (responses_usage(100, 60, "x", 5), responses_usage(100, 60, 300, 0)),
        (responses_usage(-1, 0, 50, 20), responses_usage(40, 0, 50, 20)),
        # a nested count that is not a count takes its side with it
        (responses_usage(100, "60", 50, 20), responses_usage(40, 0, 50, 20)),
        # Chat Completions names read the same, and come out with Responses names
        (
            {"prompt_tokens": 1200, "completion_tokens": None},
            responses_usage(1200, 0, 300, 0),
        ),
        # nothing readable, or no usage object: the estimate
        ({}, ESTIMATE),
        (None, ESTIMATE),
        ("usage", ESTIMATE),
    ],
)
def test_with_estimate_keeps_each_side_that_reads_and_estimates_the_other(
    usage: Any, merged: dict[str, Any]
) -> None:
    result = with_estimate(usage, ESTIMATE)

    assert {name: value for name, value in result.items() if name != "total_tokens"} == {
        name: value for name, value in merged.items() if name != "total_tokens"
    }
    assert result["total_tokens"] == result["input_tokens"] + result["output_tokens"]
    assert map_usage(result).billable


UPSTREAM_USAGE = [
    # transcripts whose terminal event carries usage: input / cached / output / reasoning
    ("responses-text.sse", MappedUsage(1252, 0, 11273, 10944, 0)),
    ("responses-cached.sse", MappedUsage(11771, 11465, 306, 192, 11465)),
    ("responses-reasoning-tool.sse", MappedUsage(5120, 4864, 180, 128, 4864)),
    ("responses-incomplete.sse", MappedUsage(120, 0, 64, 40, 0)),
    # transcripts that end without usage
    ("responses-failed.sse", NO_USAGE),
    ("responses-error-event.sse", NO_USAGE),
    ("responses-no-terminal.sse", NO_USAGE),
]


@pytest.mark.parametrize(("name", "mapped"), UPSTREAM_USAGE)
def test_usage_of_each_upstream_transcript(name: str, mapped: MappedUsage) -> None:
    scanner = StreamScanner()
    scanner.feed((UPSTREAM / name).read_bytes())
    scanner.finish()

    assert map_usage(usage_from_terminal(scanner.terminal)) == mapped


USAGE = responses_usage(3, 0, 2, 0)


@pytest.mark.parametrize(
    ("event", "usage"),
    [
        # response.* events carry usage inside `response`
        ({"type": "response.completed", "response": {"usage": USAGE}}, USAGE),
        ({"type": "response.incomplete", "response": {"usage": USAGE}}, USAGE),
        ({"type": "response.failed", "response": {"usage": None}}, None),
        ({"type": "response.failed", "response": {}}, None),
        # a Chat chunk or a body carries it at the top
        ({"object": "chat.completion.chunk", "choices": [], "usage": USAGE}, USAGE),
        # a top-level error has none
        ({"type": "error", "code": "server_error", "message": "m", "param": None}, None),
        # no event at all
        (None, None),
        ({}, None),
    ],
)
def test_usage_from_terminal(event: dict[str, Any] | None, usage: Any) -> None:
    assert usage_from_terminal(event) == usage


@pytest.mark.parametrize(
    ("document", "model", "response_id"),
    [
        # a terminal event wraps the response
        (
            {"type": "response.completed", "response": {"id": "resp_1", "model": "gpt-5.1-codex"}},
            "gpt-5.1-codex",
            "resp_1",
        ),
        # a non-streaming body or a Chat chunk is the response itself
        ({"id": "resp_2", "object": "response", "model": "gpt-5"}, "gpt-5", "resp_2"),
        (
            {"id": "chatcmpl-1", "model": "gpt-5-mini-2025-08-07"},
            "gpt-5-mini-2025-08-07",
            "chatcmpl-1",
        ),
        # values that are not strings, or no response at all
        ({"response": {"id": 7, "model": ["gpt-5"]}}, None, None),
        ({"type": "response.failed", "response": None}, None, None),
        ({"type": "error", "code": None, "message": "m", "param": None}, None, None),
        ({}, None, None),
        (None, None, None),
    ],
)
def test_upstream_model_and_response_id(
    document: dict[str, Any] | None, model: str | None, response_id: str | None
) -> None:
    assert upstream_model_of(document) == model
    assert response_id_of(document) == response_id
