"""Chat Completions <-> Responses: requests in, chunks and completions out, read by the SDK."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from codex_gateway.errors import InvalidRequest, UpstreamProtocolError
from codex_gateway.relay.chat import (
    DONE,
    ChatStreamTranslator,
    chat_completion,
    chat_usage,
    parse_chat_request,
    response_events,
)
from codex_gateway.relay.sse import iter_events, parse_events
from codex_gateway.relay.usage import MappedUsage, map_usage
from tests.conftest import fixture_path

UPSTREAM = fixture_path("upstream", "responses-text.sse").parent


def events_of(name: str) -> list[dict[str, Any]]:
    """The JSON data of every event in an upstream fixture."""
    return parse_events((UPSTREAM / name).read_bytes())


def translate(events: list[dict[str, Any]], include_usage: bool = True) -> list[bytes]:
    translator = ChatStreamTranslator("gpt-5.1-codex", include_usage)
    lines = [line for event in events for line in translator.feed(event)]
    return lines + translator.finish()


def payloads(lines: list[bytes]) -> list[dict[str, Any]]:
    """Every data line but [DONE], as JSON, checking the framing on the way."""
    assert lines[-1] == DONE
    for line in lines:
        assert line.startswith(b"data: ") and line.endswith(b"\n\n") and b"\nevent:" not in line
    return [orjson.loads(line[6:]) for line in lines[:-1]]


def request(**fields: Any) -> dict[str, Any]:
    body = {"model": "gpt-5.1-codex", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return parse_chat_request(orjson.dumps(body)).responses


# -- requests -----------------------------------------------------------------------------


def test_a_conversation_with_tools_becomes_responses_input_with_matching_call_ids() -> None:
    body = {
        "model": "gpt-5.1-codex",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Be terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "look", "arguments": '{"zoom": 2}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "assistant", "content": "A cat."},
        ],
    }
    chat = parse_chat_request(orjson.dumps(body))

    assert (chat.model, chat.stream, chat.include_usage) == ("gpt-5.1-codex", True, True)
    assert chat.responses["stream"] is True
    assert chat.responses["input"] == [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Be terse."}],
        },
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in this picture?"},
                {
                    "type": "input_image",
                    "image_url": "data:image/png;base64,AAAA",
                    "detail": "auto",
                },
            ],
        },
        {"type": "function_call", "call_id": "call_1", "name": "look", "arguments": '{"zoom": 2}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "a cat"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "A cat."}],
        },
    ]
    assert orjson.loads(chat.responses_body()) == chat.responses


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # tools lose their wrapper object; a named tool choice too
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "shell",
                            "parameters": {"type": "object"},
                            "strict": True,
                        },
                    }
                ],
                "tool_choice": {"type": "function", "function": {"name": "shell"}},
            },
            {
                "tools": [
                    {
                        "type": "function",
                        "name": "shell",
                        "parameters": {"type": "object"},
                        "strict": True,
                    }
                ],
                "tool_choice": {"type": "function", "name": "shell"},
            },
        ),
        ({"tool_choice": "required"}, {"tool_choice": "required"}),
        # output limits: the newer name wins over the older one
        ({"max_tokens": 64}, {"max_output_tokens": 64}),
        ({"max_tokens": 64, "max_completion_tokens": 32}, {"max_output_tokens": 32}),
        # reasoning effort and output format
        ({"reasoning_effort": "high"}, {"reasoning": {"effort": "high"}}),
        (
            {"response_format": {"type": "json_object"}},
            {"text": {"format": {"type": "json_object"}}},
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
                },
                "verbosity": "low",
            },
            {
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "answer",
                        "schema": {"type": "object"},
                        "strict": True,
                    },
                    "verbosity": "low",
                }
            },
        ),
        # parameters with the same meaning pass unchanged; neutral values of others are dropped
        (
            {"temperature": 0.2, "user": "u1", "parallel_tool_calls": False, "n": 1, "stop": None},
            {"temperature": 0.2, "user": "u1", "parallel_tool_calls": False},
        ),
    ],
)
def test_chat_parameters_translate_to_responses_fields(
    fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    responses = request(**fields)

    assert {name: responses[name] for name in expected} == expected
    assert not set(responses) - {"model", "input", "stream", "store", *expected}


@pytest.mark.parametrize(
    ("fields", "store"),
    [
        # nothing said: not stored, as Chat Completions does (Responses would store it)
        ({}, False),
        # the client asked for it
        ({"store": True}, True),
    ],
)
def test_a_chat_request_is_stored_upstream_only_when_asked(
    fields: dict[str, Any], store: bool
) -> None:
    assert request(**fields)["store"] is store


def test_without_stream_options_a_stream_carries_no_usage_chunk_request() -> None:
    chat = parse_chat_request(
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
    )

    assert chat.stream and not chat.include_usage


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        # the conversation itself
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages"),
        ({"model": ""}, "model"),
        ({"stream": "yes"}, "stream"),
        # tools and choices the gateway cannot express
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools[0].function.name",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        # output caps the Responses API would refuse, under either name
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -100}, "max_tokens"),
        ({"max_tokens": 15}, "max_tokens"),
        ({"max_tokens": 64.0}, "max_tokens"),
        ({"max_completion_tokens": "64"}, "max_completion_tokens"),
        ({"max_completion_tokens": -1, "max_tokens": 64}, "max_completion_tokens"),
        ({"max_completion_tokens": 64, "max_tokens": -1}, "max_tokens"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        # parameters Responses has no equivalent for, unless they ask for nothing
        ({"n": 2}, "n"),
        ({"stop": ["END"]}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_chat_requests_are_refused_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        request(**fields)

    assert caught.value.param == param
    assert caught.value.message.endswith(".")


def test_every_argument_that_cannot_be_honoured_is_named_at_once() -> None:
    with pytest.raises(InvalidRequest) as caught:
        request(n=2, stop=["END"], temperature=0.5)

    assert caught.value.param == "n"
    assert caught.value.message.startswith("n, stop are not supported")
    assert "Leave them out." in caught.value.message


# -- streams ------------------------------------------------------------------------------


def chat_fixture_lines(name: str) -> list[bytes]:
    return [block for block in iter_events(fixture_path("upstream", name).read_bytes())]


def hello_world_events() -> list[dict[str, Any]]:
    """The Responses stream behind the chat fixtures: same id, time, model, text and usage."""
    usage = {
        "input_tokens": 1200,
        "input_tokens_details": {"cached_tokens": 1024},
        "output_tokens": 210,
        "output_tokens_details": {"reasoning_tokens": 192},
        "total_tokens": 1410,
    }
    response = {
        "id": "resp_fx1",
        "created_at": 1764806400,
        "model": "gpt-5-mini-2025-08-07",
        "service_tier": "default",
        "status": "in_progress",
    }
    return [
        {"type": "response.created", "response": response},
        {"type": "response.output_text.delta", "delta": "Hello"},
        {"type": "response.output_text.delta", "delta": ", world!"},
        {
            "type": "response.completed",
            "response": {**response, "status": "completed", "usage": usage},
        },
    ]


@pytest.mark.parametrize(
    ("include_usage", "fixture"),
    [
        # with stream_options.include_usage: a usage chunk with choices [] before [DONE]
        (True, "chat-stream-usage.sse"),
        # without it: the same stream, no usage chunk
        (False, "chat-stream-no-usage.sse"),
    ],
)
def test_a_text_stream_translates_to_the_chat_fixture_byte_for_byte(
    include_usage: bool, fixture: str
) -> None:
    lines = translate(hello_world_events(), include_usage)

    assert lines == chat_fixture_lines(fixture)


RESPONSES_FIXTURES = [
    # (fixture, text, tool calls, finish_reason, usage (prompt, cached, completion, reasoning))
    ("responses-text.sse", "Here is an iterative", [], "stop", (1252, 0, 11273, 10944)),
    ("responses-cached.sse", "Sure - updated the test.", [], "stop", (11771, 11465, 306, 192)),
    (
        "responses-reasoning-tool.sse",
        "",
        [("call_fx_1", "exec_command", '{"cmd": "ls -la"}')],
        "tool_calls",
        (5120, 4864, 180, 128),
    ),
    ("responses-incomplete.sse", "The first part of a long ans", [], "length", (120, 0, 64, 40)),
]


def what_a_client_reads(lines: list[bytes]) -> tuple[Any, ...]:
    """The text, tool calls, finish reason and usage a chat stream's chunks add up to."""
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads(lines)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, [call.id or "", "", ""])
            entry[1] += (call.function.name or "") if call.function else ""
            entry[2] += (call.function.arguments or "") if call.function else ""
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    usage = [c.usage.model_dump() for c in chunks if c.usage is not None]
    return chunks[0].id, text, calls, reasons, usage


@pytest.mark.parametrize(("name", "text", "calls", "reason", "usage"), RESPONSES_FIXTURES)
def test_every_finished_responses_fixture_streams_as_sdk_valid_chunks(
    name: str, text: str, calls: list[tuple[str, str, str]], reason: str, usage: tuple[int, ...]
) -> None:
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads(translate(events_of(name)))]

    assert chunks[0].choices[0].delta.role == "assistant"
    _, read, streamed, _, _ = what_a_client_reads(translate(events_of(name)))
    assert read.startswith(text)
    assert [tuple(entry) for entry in streamed.values()] == calls
    finish, last = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == reason and finish.choices[0].delta.content is None
    assert last.choices == [] and last.usage is not None
    assert (
        last.usage.prompt_tokens,
        last.usage.prompt_tokens_details.cached_tokens
        if last.usage.prompt_tokens_details
        else None,
        last.usage.completion_tokens,
        last.usage.completion_tokens_details.reasoning_tokens
        if last.usage.completion_tokens_details
        else None,
    ) == usage
    assert last.usage.total_tokens == usage[0] + usage[2]
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("name", [name for name, *_ in RESPONSES_FIXTURES])
def test_a_whole_response_streams_to_a_chat_client_as_its_stream_would(name: str) -> None:
    """An upstream that ignored `stream`: the events of its response object give the client
    the text, tool calls, finish reason and usage the upstream's own stream gives."""
    streamed = events_of(name)
    final = streamed[-1]["response"]

    assert what_a_client_reads(translate(response_events(final))) == what_a_client_reads(
        translate(streamed)
    )


def test_tool_calls_of_a_whole_response_without_item_ids_stay_apart() -> None:
    calls = [
        {"type": "function_call", "call_id": f"call_{n}", "name": "f", "arguments": str(n)}
        for n in (1, 2)
    ]
    final = {"id": "resp_1", "status": "completed", "output": calls, "usage": None}

    _, _, streamed, reasons, _ = what_a_client_reads(translate(response_events(final)))

    assert list(streamed.values()) == [["call_1", "f", "1"], ["call_2", "f", "2"]]
    assert reasons == ["tool_calls"]


@pytest.mark.parametrize(
    ("status", "code"),
    [
        # the upstream said it failed: its own error
        ("failed", "server_error"),
        # no final status: a stream that never finished
        ("queued", "stream_incomplete"),
        (None, "stream_incomplete"),
    ],
)
def test_a_whole_response_without_a_good_end_streams_an_error_chunk(
    status: str | None, code: str
) -> None:
    final = {
        "id": "resp_1",
        "status": status,
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "Part"}]}],
        "error": {"code": "server_error", "message": "boom"} if status == "failed" else None,
    }

    chunks = payloads(translate(response_events(final)))

    assert chunks[1]["choices"][0]["delta"]["content"] == "Part"
    assert chunks[-1]["error"]["code"] == code


@pytest.mark.parametrize(
    ("name", "code"),
    [
        # the upstream said it failed, in a terminal event or a top-level error event
        ("responses-failed.sse", "server_error"),
        ("responses-error-event.sse", "server_error"),
        # the upstream went away before its final event
        ("responses-no-terminal.sse", "stream_incomplete"),
    ],
)
def test_a_failed_stream_ends_with_an_error_chunk_then_done(name: str, code: str) -> None:
    body = payloads(translate(events_of(name)))

    error = body[-1]["error"]
    assert error["code"] == code and error["message"]
    assert all("finish_reason" not in orjson.dumps(p).decode() for p in body[-1:])
    for chunk in body[:-1]:
        ChatCompletionChunk.model_validate(chunk)


def test_a_usage_wall_inside_the_stream_reaches_the_client_as_its_error() -> None:
    wall = {
        "type": "error",
        "status": 429,
        "error": {"type": "usage_limit_reached", "message": "The usage limit has been reached"},
    }
    body = payloads(translate([wall]))

    assert body == [
        {
            "error": {
                "message": "The usage limit has been reached",
                "type": "usage_limit_reached",
                "param": None,
                "code": "usage_limit_reached",
            }
        }
    ]


def test_a_call_announced_only_when_done_is_sent_whole() -> None:
    item = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "f",
        "arguments": "{}",
    }
    events = [
        {"type": "response.output_item.done", "item": item},
        {"type": "response.completed", "response": {"status": "completed"}},
    ]
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads(translate(events, False))]

    call = chunks[1].choices[0].delta.tool_calls[0]  # type: ignore[index]
    assert (call.index, call.id, call.function.name, call.function.arguments) == (
        0,
        "call_1",
        "f",
        "{}",
    )  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


BILLED = MappedUsage(1252, 0, 300, 0, 0)
# The chunk a client reads for BILLED, whatever the upstream's usage said.
BILLED_CHUNK = {
    "prompt_tokens": 1252,
    "completion_tokens": 300,
    "total_tokens": 1552,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def completed_with(usage: Any) -> list[dict[str, Any]]:
    """A short answer whose final event carries `usage`."""
    response = {"id": "resp_1", "created_at": 1764806400, "model": "gpt-5.1-codex"}
    return [
        {"type": "response.created", "response": {**response, "status": "in_progress"}},
        {"type": "response.output_text.delta", "delta": "Hi"},
        {
            "type": "response.completed",
            "response": {**response, "status": "completed", "usage": usage},
        },
    ]


@pytest.mark.parametrize(
    "usage",
    [
        # none reported
        None,
        # not an object
        "1252 in, 300 out",
        # counts that are not counts: negative, fractional, a string
        {"input_tokens": 1252, "output_tokens": -300, "total_tokens": 952},
        {"input_tokens": 1252.5, "output_tokens": 300, "total_tokens": 1552},
        {"input_tokens": 1252, "output_tokens": "300", "total_tokens": 1552},
    ],
)
def test_usage_that_cannot_be_billed_waits_for_the_billed_counts(usage: Any) -> None:
    translator = ChatStreamTranslator("gpt-5.1-codex", include_usage=True)
    streamed = [line for event in completed_with(usage) for line in translator.feed(event)]

    # the answer is finished and its finish chunk is out; no usage chunk, no [DONE] yet
    assert translator.finished and translator.awaits_usage
    assert payloads([*streamed, DONE])[-1]["choices"][0]["finish_reason"] == "stop"
    end = translator.finish(BILLED)
    assert end[-1] == DONE and payloads(end)[0]["usage"] == BILLED_CHUNK
    assert not translator.awaits_usage and translator.finish(BILLED) == []


def test_a_stream_billed_nothing_it_could_read_ends_without_a_usage_chunk() -> None:
    translator = ChatStreamTranslator("gpt-5.1-codex", include_usage=True)
    for event in completed_with(None):
        translator.feed(event)

    assert translator.finish(None) == [DONE]


def test_without_include_usage_a_stream_with_unbillable_usage_ends_at_its_final_event() -> None:
    lines = translate(completed_with(None), include_usage=False)

    assert lines[-1] == DONE and all(p["usage"] is None for p in payloads(lines))


@pytest.mark.parametrize(
    "total",
    [
        # more than the parts, less, and not a count at all
        99999,
        7,
        "1552",
    ],
)
def test_the_total_a_client_reads_is_prompt_plus_completion(total: Any) -> None:
    usage = {"input_tokens": 1252, "output_tokens": 300, "total_tokens": total}

    streamed = payloads(translate(completed_with(usage)))
    completion = chat_completion(completed_with(usage)[-1]["response"], "m", map_usage(usage))

    assert streamed[-1]["usage"] == BILLED_CHUNK == completion["usage"]


def test_a_client_is_told_the_cached_tokens_billed_never_more_than_the_prompt() -> None:
    usage = {"input_tokens": 1252, "input_tokens_details": {"cached_tokens": 2000}}

    told = chat_usage(map_usage({**usage, "output_tokens": 300}))

    assert told["prompt_tokens_details"]["cached_tokens"] == told["prompt_tokens"] == 1252


def test_events_after_the_end_and_a_second_finish_add_nothing() -> None:
    translator = ChatStreamTranslator("m", False)
    translator.feed({"type": "response.completed", "response": {}})

    assert translator.finished
    assert translator.feed({"type": "response.output_text.delta", "delta": "late"}) == []
    assert translator.finish() == []


# -- whole responses ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "calls", "reason", "usage"), RESPONSES_FIXTURES)
def test_every_final_response_becomes_one_sdk_valid_chat_completion(
    name: str, text: str, calls: list[tuple[str, str, str]], reason: str, usage: tuple[int, ...]
) -> None:
    final = events_of(name)[-1]["response"]

    completion = ChatCompletion.model_validate(
        chat_completion(final, "gpt-5.1-codex", map_usage(final["usage"]))
    )

    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == final["model"]
    assert (choice.message.content or "").startswith(text)
    assert [
        (c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []
    ] == calls  # type: ignore[union-attr]
    assert choice.finish_reason == reason
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.completion_tokens_details is not None
    assert (
        completion.usage.prompt_tokens,
        completion.usage.prompt_tokens_details.cached_tokens,
        completion.usage.completion_tokens,
        completion.usage.completion_tokens_details.reasoning_tokens,
    ) == usage


def test_a_failed_final_response_is_an_upstream_error_with_its_code() -> None:
    final = events_of("responses-failed.sse")[-1]["response"]

    with pytest.raises(UpstreamProtocolError) as caught:
        chat_completion(final, "gpt-5.1-codex", None)

    assert caught.value.code == "server_error"
    assert "invalid content" in caught.value.message


def test_usage_keeps_the_nesting_of_cached_and_reasoning_counts() -> None:
    usage = chat_usage(
        map_usage({"input_tokens": 10, "output_tokens": 4, "input_tokens_details": None})
    )

    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        10,
        4,
        14,
    )
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


# A credential not shaped like one: only the secrets a translator is given name it.
PLAIN_KEY = "plain-account-key-0123456789"
QUOTING = {"code": "bad_thing", "message": f"refused key {PLAIN_KEY}, sk-UPSTREAMSECRET-0123456789"}


def test_a_failed_response_loses_the_credential_it_quotes_in_the_chunk_and_the_completion() -> None:
    failed = {"status": "failed", "error": QUOTING}
    translator = ChatStreamTranslator("gpt-5.1-codex", True, known=(PLAIN_KEY,))

    lines = translator.feed({"type": "response.failed", "response": failed})
    with pytest.raises(UpstreamProtocolError) as caught:
        chat_completion(failed, "gpt-5.1-codex", None, (PLAIN_KEY,))

    redacted = "refused key [redacted], [redacted]"
    assert payloads(lines)[0]["error"]["message"] == redacted
    assert caught.value.message.endswith(redacted)
