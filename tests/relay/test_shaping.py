"""A Responses request passes through untouched; Chat-style messages become input items."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from codex_gateway.errors import InvalidRequest
from codex_gateway.relay.shaping import (
    MAX_PATH_SHOWN,
    parse_json_object,
    parse_responses_request,
)
from tests.conftest import FIXTURES

REQUESTS = FIXTURES / "requests"
CODEX_BODIES = sorted(REQUESTS.glob("*.body.json"))


def convert(messages: list[Any]) -> list[dict[str, Any]]:
    raw = orjson.dumps({"model": "gpt-5.1-codex", "messages": messages})
    return list(parse_responses_request(raw).document["input"])


def test_real_codex_bodies_are_present() -> None:
    assert len(CODEX_BODIES) == 3


@pytest.mark.parametrize("path", CODEX_BODIES, ids=lambda path: path.name)
def test_codex_body_passes_through_byte_identical(path: Path) -> None:
    raw = path.read_bytes()

    request = parse_responses_request(raw)

    assert request.body == raw
    assert request.document == json.loads(raw)
    assert (request.model, request.stream, request.converted_messages) == (
        "gpt-5.1-codex",
        True,
        False,
    )


def test_input_body_keeps_its_exact_bytes_whatever_its_formatting() -> None:
    raw = b'{ "input" : "caf\\u00e9",\n  "model":"gpt-5.1-codex", "extra": {"b":1,"a":2} }'

    request = parse_responses_request(raw)

    assert request.body == raw
    assert request.stream is False


def test_guide_request_with_messages_becomes_responses_input() -> None:
    raw = (REQUESTS / "seed-guide-request.json").read_bytes()

    request = parse_responses_request(raw)

    expected = {
        "model": "gpt-5.1-codex",
        "stream": True,
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "写一个Python函数计算斐波那契数列"}],
            }
        ],
    }
    assert (request.model, request.stream, request.converted_messages) == (
        "gpt-5.1-codex",
        True,
        True,
    )
    assert request.document == expected
    assert json.loads(request.body) == expected


@pytest.mark.parametrize(
    ("message", "items"),
    [
        # system and developer prompts become developer messages
        (
            {"role": "system", "content": "Be brief."},
            [
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "Be brief."}],
                }
            ],
        ),
        (
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            [
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "Use tools."}],
                }
            ],
        ),
        # user text and image parts
        (
            {"role": "user", "content": "Hello"},
            [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hello"}],
                }
            ],
        ),
        (
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                    },
                ],
            },
            [
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {
                            "type": "input_image",
                            "image_url": "https://x.test/a.png",
                            "detail": "auto",
                        },
                        {
                            "type": "input_image",
                            "image_url": "data:image/png;base64,AAAA",
                            "detail": "low",
                        },
                    ],
                }
            ],
        ),
        # assistant text, and assistant tool calls as function_call items
        (
            {"role": "assistant", "content": "Hi there."},
            [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi there."}],
                }
            ],
        ),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "exec_command", "arguments": '{"cmd":"ls"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "read_file", "arguments": "{}"},
                    },
                ],
            },
            [
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "exec_command",
                    "arguments": '{"cmd":"ls"}',
                },
                {
                    "type": "function_call",
                    "call_id": "call_2",
                    "name": "read_file",
                    "arguments": "{}",
                },
            ],
        ),
        (
            {
                "role": "assistant",
                "content": "Listing.",
                "tool_calls": [
                    {
                        "id": "call_3",
                        "type": "function",
                        "function": {"name": "ls", "arguments": ""},
                    }
                ],
            },
            [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Listing."}],
                },
                {"type": "function_call", "call_id": "call_3", "name": "ls", "arguments": ""},
            ],
        ),
        # a tool result becomes function_call_output with its call id
        (
            {"role": "tool", "tool_call_id": "call_1", "content": "a.txt\nb.txt"},
            [{"type": "function_call_output", "call_id": "call_1", "output": "a.txt\nb.txt"}],
        ),
        (
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [
                    {"type": "text", "text": "part 1, "},
                    {"type": "text", "text": "part 2"},
                ],
            },
            [{"type": "function_call_output", "call_id": "call_2", "output": "part 1, part 2"}],
        ),
    ],
)
def test_chat_message_becomes_input_items(message: dict[str, Any], items: list[Any]) -> None:
    assert convert([message]) == items


def test_converted_messages_keep_their_order_and_the_other_fields() -> None:
    raw = orjson.dumps(
        {
            "model": "gpt-5.1-codex",
            "stream": False,
            "temperature": 0.2,
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "U"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "R"},
            ],
        }
    )

    request = parse_responses_request(raw)

    assert [item.get("role", item["type"]) for item in request.document["input"]] == [
        "developer",
        "user",
        "function_call",
        "function_call_output",
    ]
    assert "messages" not in request.document
    assert request.document["temperature"] == 0.2
    assert orjson.loads(request.body) == request.document


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        # a body that is not a JSON object
        (b"", None, "empty"),
        (b"  \n", None, "empty"),
        (b'{"model": "gpt-5.1-codex", "input": ', None, "not valid JSON"),
        (b"{'model': 'gpt-5.1-codex'}", None, "not valid JSON"),
        (b'{"model": "\xff\xfe", "input": "hi"}', None, "not valid UTF-8 text"),
        # bytes that are not JSON text at all: compressed, or behind a byte-order mark
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00", None, "gzip-compressed"),
        (b'\xef\xbb\xbf{"model": "m", "input": "hi"}', None, "byte-order mark"),
        (b"[]", None, "must be a JSON object"),
        (b'"hello"', None, "must be a JSON object"),
        (b"null", None, "must be a JSON object"),
        (b"42", None, "must be a JSON object"),
        # a missing, empty or non-string model
        (b'{"input": "hi"}', "model", "provide a model"),
        (b'{"model": null, "input": "hi"}', "model", "provide a model"),
        (b'{"model": "", "input": "hi"}', "model", "non-empty string"),
        (b'{"model": "   ", "input": "hi"}', "model", "non-empty string"),
        (b'{"model": 5, "input": "hi"}', "model", "non-empty string"),
        (b'{"model": ["gpt-5"], "input": "hi"}', "model", "non-empty string"),
        # a stream flag that is not a boolean
        (b'{"model": "m", "input": "hi", "stream": "true"}', "stream", "true or false"),
        (b'{"model": "m", "input": "hi", "stream": 1}', "stream", "true or false"),
        (b'{"model": "m", "input": "hi", "stream": {}}', "stream", "true or false"),
        # an output cap that is not an integer, or below the upstream's least
        (b'{"model": "m", "input": "hi", "max_output_tokens": -5}', "max_output_tokens", "-5"),
        (b'{"model": "m", "input": "hi", "max_output_tokens": 0}', "max_output_tokens", "16"),
        (b'{"model": "m", "input": "hi", "max_output_tokens": 15}', "max_output_tokens", "16"),
        (
            b'{"model": "m", "input": "hi", "max_output_tokens": 64.5}',
            "max_output_tokens",
            "decimal",
        ),
        (
            b'{"model": "m", "input": "hi", "max_output_tokens": "64"}',
            "max_output_tokens",
            "string",
        ),
        (
            b'{"model": "m", "input": "hi", "max_output_tokens": true}',
            "max_output_tokens",
            "boolean",
        ),
        (
            b'{"model": "m", "input": "hi", "max_output_tokens": 18446744073709551616}',
            "max_output_tokens",
            "too large",
        ),
        # the Chat Completions name for the cap, which the Responses API refuses
        (b'{"model": "m", "input": "hi", "max_tokens": 64}', "max_tokens", "max_output_tokens"),
        # both or neither of input and messages
        (b'{"model": "m", "input": "hi", "messages": []}', "messages", "not both"),
        (b'{"model": "m"}', "input", "neither input nor messages"),
        # messages that cannot be converted
        (b'{"model": "m", "messages": []}', "messages", "non-empty array"),
        (b'{"model": "m", "messages": "hi"}', "messages", "non-empty array"),
        (b'{"model": "m", "messages": [1]}', "messages[0]", "must be an object"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role", "None"),
        (
            b'{"model": "m", "messages": [{"role": "function", "content": "x"}]}',
            "messages[0].role",
            "'function'",
        ),
        (b'{"model": "m", "messages": [{"role": "user"}]}', "messages[0].content", "string"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
            "messages[0].content",
            "string or an array",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": ["x"]}]}',
            "messages[0].content",
            "parts must be objects",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "a"},'
            b' {"role": "tool", "content": "r"}]}',
            "messages[1].tool_call_id",
            "no tool_call_id",
        ),
        (
            b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": {}}]}',
            "messages[0].tool_calls",
            "must be an array",
        ),
        # tool calls whose function is not an object
        (
            b'{"model": "m", "messages": [{"role": "assistant",'
            b' "tool_calls": [{"id": "c", "type": "function", "function": null}]}]}',
            "messages[0].tool_calls",
            "tool_calls",
        ),
        (
            b'{"model": "m", "messages": [{"role": "assistant",'
            b' "tool_calls": [{"id": "c", "type": "function", "function": "f"}]}]}',
            "messages[0].tool_calls",
            "tool_calls",
        ),
    ],
    ids=lambda value: value.decode(errors="replace") if isinstance(value, bytes) else None,
)
def test_bad_request_is_refused_naming_the_param(body: bytes, param: str | None, says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_responses_request(body)

    assert caught.value.param == param
    assert says in caught.value.message
    assert caught.value.message.endswith(".")
    assert caught.value.status == 400


# bodies whose nested objects repeat a top-level key's name: accepted as they are
NESTED_NAMES = [
    b'{"model":"gpt-5.1-codex","input":[{"model":"a"}],"tools":[{"model":{"model":1}}]}',
    b'{"model":"gpt-5.1-codex","input":"say \\"model\\": twice","text":{"model" : 1}}',
]


@pytest.mark.parametrize("body", NESTED_NAMES)
def test_a_nested_object_may_use_a_top_level_name(body: bytes) -> None:
    assert parse_json_object(body)["model"] == "gpt-5.1-codex"


@pytest.mark.parametrize("cap", [16, 64, 128_000, None])
def test_an_output_cap_the_upstream_takes_passes_untouched(cap: int | None) -> None:
    raw = orjson.dumps({"model": "gpt-5.1-codex", "input": "hi", "max_output_tokens": cap})

    assert parse_responses_request(raw).body == raw


def test_a_too_small_output_cap_carries_openais_error_code() -> None:
    body = b'{"model": "m", "input": "hi", "max_output_tokens": -1}'

    with pytest.raises(InvalidRequest) as caught:
        parse_responses_request(body)

    assert caught.value.code == "integer_below_min_value"


# a key named twice at any depth, and the path the refusal names
REPEATED_KEYS = [
    # at the top level, however the second one is spelled
    (b'{"model":"m","input":"x","model":"n"}', "model"),
    (b'{"model":"m","input":"x","mod\\u0065l":"n"}', "model"),
    (b'{"model":"m", "input":"x",\n "model" : "n"}', "model"),
    # inside input items and their content parts
    (
        b'{"model":"m","input":[{"type":"message","role":"user","content":[{"type":"input_text",'
        b'"text":"a"},{"type":"input_image","image_url":"https://a/1.png",'
        b'"image_url":"https://b/2.png"}]}]}',
        "input[0].content[1].image_url",
    ),
    (b'{"model":"m","input":[{"role":"user","role":"developer","content":"x"}]}', "input[0].role"),
    (
        b'{"model":"m","input":"x","text":{"format":{"type":"text","type":"json_object"}}}',
        "text.format.type",
    ),
    # spelled with escapes, or with a colon escaped in a string to even out the count
    (
        b'{"model":"m","input":"x","reasoning":{"effort":"low","eff\\u006frt":"high"}}',
        "reasoning.effort",
    ),
    (
        b'{"model":"m","input":"\\u003a","text":{"verbosity":"low","verbosity":"high"}}',
        "text.verbosity",
    ),
    # the first repeat in the order the body is written
    (b'{"model":"m","input":[{"a":1,"a":2},{"b":1,"b":2}]}', "input[0].a"),
]


@pytest.mark.parametrize(("body", "path"), REPEATED_KEYS)
def test_a_key_named_twice_at_any_depth_is_refused_naming_its_path(body: bytes, path: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_responses_request(body)

    assert caught.value.param == path
    assert f"`{path}` more than once" in caught.value.message


def test_a_repeated_key_too_long_to_show_is_named_by_its_end() -> None:
    name = "k" * 100_000
    body = b'{"model":"m","input":"x","text":{"%s":1,"%s":2}}' % (name.encode(), name.encode())

    with pytest.raises(InvalidRequest) as caught:
        parse_responses_request(body)

    path = caught.value.param
    assert path is not None and len(path) == MAX_PATH_SHOWN
    assert path == "…" + name[-(MAX_PATH_SHOWN - 1) :]
    assert len(caught.value.message) < 2 * MAX_PATH_SHOWN


# bodies whose strings hold colons, keys and escapes that look like a repeat but are none
LOOK_ALIKES = [
    b'{"model":"m","input":[{"a":1},{"a":2}],"text":{"a":"a: b","b":"\\":"}}',
    b'{"model":"m","input":"say \\"a\\": 1, \\"a\\": 2 and \\\\u003a","x":{"a":1}}',
    b'{"model":"m","input":"\\u00e9:\\u003A","y":"\\\\u003a"}',
]


@pytest.mark.parametrize("body", LOOK_ALIKES)
def test_a_body_that_only_looks_like_it_repeats_a_key_is_accepted(body: bytes) -> None:
    assert parse_json_object(body)["model"] == "m"


def test_a_body_nested_deeper_than_orjson_writes_is_still_checked() -> None:
    deep = b'{"a":' * 300 + b"1" + b"}" * 300
    body = b'{"model":"m","input":"x","deep":' + deep + b',"deep":1}'

    with pytest.raises(InvalidRequest) as caught:
        parse_json_object(body)

    assert caught.value.param == "deep"


def test_a_body_too_deep_to_check_for_repeats_is_refused_saying_so() -> None:
    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    body = b'{"model":"m","input":"x","deep":' + deep + b"}"

    with pytest.raises(InvalidRequest) as caught:
        parse_json_object(body)

    assert "nests objects and arrays too deeply" in caught.value.message
