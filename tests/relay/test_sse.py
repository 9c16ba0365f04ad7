"""StreamScanner finds the event that ends a Responses stream, however the bytes arrive."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import orjson
import pytest

from codex_gateway.relay.sse import (
    EventSplitter,
    StreamScanner,
    error_event,
    iter_events,
    parse_events,
)
from tests.conftest import FIXTURES

UPSTREAM = FIXTURES / "upstream"

Feeder = Callable[[bytes], Iterator[bytes]]

TRANSCRIPTS = [
    # Responses streams that end with a terminal event: (file, terminal type, events)
    ("responses-text.sse", "response.completed", 17),
    ("responses-lone-surrogate.sse", "response.completed", 17),
    # the same answer, its usage null or with a count that is not a count
    ("responses-usage-missing.sse", "response.completed", 17),
    ("responses-usage-invalid.sse", "response.completed", 17),
    ("responses-cached.sse", "response.completed", 12),
    ("responses-reasoning-tool.sse", "response.completed", 14),
    ("responses-incomplete.sse", "response.incomplete", 11),
    ("responses-failed.sse", "response.failed", 3),
    ("responses-error-event.sse", "error", 2),
    # Codex's remote compaction answered with one compaction item
    ("responses-compaction.sse", "response.completed", 5),
    # the ChatGPT backend's usage wall inside a stream: a nested `error` event
    ("chatgpt-usage-limit-event.sse", "error", 2),
    ("chatgpt-rate-limits.sse", "response.completed", 18),
    # a Responses stream cut off before any terminal event
    ("responses-no-terminal.sse", None, 7),
    # Chat Completions streams carry no Responses terminal event
    ("chat-stream-usage.sse", None, 6),
    ("chat-stream-no-usage.sse", None, 5),
]


def whole(raw: bytes) -> Iterator[bytes]:
    yield raw


def byte_by_byte(raw: bytes) -> Iterator[bytes]:
    for index in range(len(raw)):
        yield raw[index : index + 1]


def random_chunks(raw: bytes) -> Iterator[bytes]:
    rng = random.Random(20261204)
    start = 0
    while start < len(raw):
        size = rng.randint(1, 97)
        yield raw[start : start + size]
        start += size


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\n", b"\r\n")


def lf(raw: bytes) -> bytes:
    return raw


def scan(raw: bytes, feeder: Feeder = whole) -> StreamScanner:
    """Feed `raw` without calling finish(): what the scanner knows when the last byte is in."""
    scanner = StreamScanner()
    for chunk in feeder(raw):
        scanner.feed(chunk)
    return scanner


def last_data(raw: bytes) -> object:
    """The last event's data, a lone surrogate escape read as U+FFFD (as the scanner reads
    it in `responses-lone-surrogate.sse`)."""
    block = iter_events(raw)[-1]
    line = next(line for line in block.split(b"\n") if line.startswith(b"data:"))
    return orjson.loads(line[len(b"data:") :].replace(rb"\ud800", "\ufffd".encode()))


def test_the_table_covers_every_upstream_transcript() -> None:
    assert sorted(path.name for path in UPSTREAM.glob("*.sse")) == sorted(
        name for name, *_ in TRANSCRIPTS
    )


@pytest.mark.parametrize("line_ending", [lf, crlf])
@pytest.mark.parametrize("feeder", [whole, byte_by_byte, random_chunks])
@pytest.mark.parametrize(("name", "terminal_type", "events"), TRANSCRIPTS)
def test_terminal_event_is_known_when_its_blank_line_arrives(
    name: str,
    terminal_type: str | None,
    events: int,
    feeder: Feeder,
    line_ending: Callable[[bytes], bytes],
) -> None:
    raw = line_ending((UPSTREAM / name).read_bytes())

    scanner = scan(raw, feeder)

    assert scanner.terminal_type == terminal_type
    assert scanner.events == events
    assert scanner.bytes_seen == len(raw)
    if terminal_type is not None:
        assert scanner.terminal == last_data((UPSTREAM / name).read_bytes())


@pytest.mark.parametrize("line_ending", [lf, crlf])
@pytest.mark.parametrize(("name", "terminal_type", "events"), TRANSCRIPTS)
def test_finish_after_a_complete_stream_changes_nothing(
    name: str, terminal_type: str | None, events: int, line_ending: Callable[[bytes], bytes]
) -> None:
    scanner = scan(line_ending((UPSTREAM / name).read_bytes()), random_chunks)

    scanner.finish()

    assert (scanner.terminal_type, scanner.events) == (terminal_type, events)


def test_crlf_blank_line_split_between_cr_and_lf_still_ends_the_event() -> None:
    scanner = StreamScanner()

    scanner.feed(b'event: response.completed\r\ndata: {"type":"response.completed"}\r\n\r')
    scanner.feed(b"\n")

    assert scanner.terminal_type == "response.completed"


def test_event_without_event_line_is_named_by_its_leading_type() -> None:
    scanner = scan(
        b'data: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
        b'data: {"type":"response.completed","response":{"id":"resp_1"}}\n\n'
    )

    assert scanner.terminal_type == "response.completed"
    assert scanner.terminal == {"type": "response.completed", "response": {"id": "resp_1"}}


def test_event_without_event_line_is_named_by_a_type_that_is_not_first() -> None:
    scanner = scan(
        b'data: {"sequence_number":7,"type":"response.incomplete","response":{"id":"r"}}\n\n'
    )

    assert scanner.terminal_type == "response.incomplete"
    assert scanner.terminal == {
        "sequence_number": 7,
        "type": "response.incomplete",
        "response": {"id": "r"},
    }


@pytest.mark.parametrize(
    "delta_event",
    [
        # named by an event line
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"then response.completed"}\n\n',
        # named by the leading type, no event line
        b'data: {"type":"response.output_text.delta","delta":"response.completed"}\n\n',
        # type after another field, no event line
        b'data: {"sequence_number":4,"type":"response.output_text.delta",'
        b'"delta":"{\\"type\\":\\"response.completed\\"}"}\n\n',
        # text that looks like an SSE event line, escaped inside the JSON string
        b'data: {"sequence_number":4,"type":"response.output_text.delta",'
        b'"delta":"\\nevent: response.completed\\n"}\n\n',
        # a delta that mentions a top-level error
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"{\\"error\\": 1}"}\n\n',
    ],
)
def test_delta_whose_text_names_a_terminal_event_is_not_terminal(delta_event: bytes) -> None:
    scanner = scan(delta_event)

    assert scanner.terminal is None
    assert scanner.terminal_type is None
    assert scanner.events == 1


def test_real_terminal_after_a_misleading_delta_is_still_found() -> None:
    scanner = scan(
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"response.completed"}\n\n'
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"id":"resp_real"}}\n\n'
    )

    assert scanner.terminal == {"type": "response.completed", "response": {"id": "resp_real"}}


@pytest.mark.parametrize(
    "event",
    [
        # named by an event line, data over three lines
        b"event: response.completed\n"
        b'data: {"type":"response.completed",\n'
        b'data: "response":{"id":"resp_split",\n'
        b'data: "usage":{"input_tokens":3,"output_tokens":2}}}\n\n',
        # no event line, the type on the second data line
        b"data: {\n"
        b'data: "type":"response.completed",\n'
        b'data: "response":{"id":"resp_split","usage":{"input_tokens":3,"output_tokens":2}}}\n\n',
        # no space after the colons
        b"event:response.completed\n"
        b'data:{"type":"response.completed",\n'
        b'data:"response":{"id":"resp_split","usage":{"input_tokens":3,"output_tokens":2}}}\n\n',
    ],
)
def test_data_split_over_several_lines_is_joined(event: bytes) -> None:
    for feeder in (whole, byte_by_byte):
        scanner = scan(event, feeder)

        assert scanner.terminal_type == "response.completed"
        assert scanner.terminal == {
            "type": "response.completed",
            "response": {"id": "resp_split", "usage": {"input_tokens": 3, "output_tokens": 2}},
        }


def test_first_terminal_event_wins() -> None:
    scanner = scan(
        b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'
        b'event: error\ndata: {"type":"error","code":"late","message":"m","param":null}\n\n'
    )

    assert scanner.terminal_type == "response.completed"
    assert scanner.terminal == {"type": "response.completed", "response": {}}


def test_terminal_event_whose_data_is_not_json_is_terminal_with_empty_data() -> None:
    scanner = scan(b"event: response.failed\ndata: not json\n\n")

    assert scanner.terminal_type == "response.failed"
    assert scanner.terminal == {}


def test_a_terminal_event_with_a_lone_surrogate_escape_still_gives_its_usage() -> None:
    """Valid JSON that orjson refuses: the usage is read, the lone surrogate becomes U+FFFD
    (a whole pair stays the character it encodes)."""
    scanner = scan(
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"id":"resp_\\ud800x","model":"m \\ud83d\\ude80","usage":{"input_tokens":1000,'
        b'"output_tokens":500}}}\n\n'
    )

    assert scanner.terminal_type == "response.completed"
    response = scanner.terminal["response"]
    assert response["id"] == "resp_\ufffdx"
    assert response["model"] == "m \U0001f680"
    assert response["usage"] == {"input_tokens": 1000, "output_tokens": 500}


@pytest.mark.parametrize(
    ("escape", "text"),
    [
        (b"\\uD800", "\ufffd"),  # written in capitals
        (b"\\udc00", "\ufffd"),  # a low surrogate alone
        (b"\\udc00\\ud800", "\ufffd\ufffd"),  # a pair in the wrong order
    ],
)
def test_every_kind_of_lone_surrogate_becomes_a_replacement_character(
    escape: bytes, text: str
) -> None:
    scanner = scan(
        b'event: response.failed\ndata: {"type":"response.failed","m":"' + escape + b'"}\n\n'
    )

    assert scanner.terminal == {"type": "response.failed", "m": text}


@pytest.mark.parametrize(
    "data",
    [
        # what Python's parser takes and orjson does not: still no JSON
        b'{"type":"response.completed","id":"\\ud800","usage":{"input_tokens":NaN}}',
        b'{"type":"response.completed","id":"\\ud800","n":123456789012345678901234567890}',
        b'{"type":"response.completed","id":"\\ud800",',
    ],
)
def test_a_lone_surrogate_does_not_let_in_what_orjson_refuses(data: bytes) -> None:
    scanner = scan(b"event: response.completed\ndata: " + data + b"\n\n")

    assert scanner.terminal_type == "response.completed"
    assert scanner.terminal == {}


def test_comments_and_unknown_events_are_not_terminal() -> None:
    scanner = scan(
        b": keep-alive\n\n"
        b'event: codex.rate_limits\ndata: {"type":"codex.rate_limits"}\n\n'
        b"data: [DONE]\n\n"
    )

    assert scanner.terminal is None


def test_the_last_rate_limits_event_is_kept_for_the_quota_book() -> None:
    first = b'{"type":"codex.rate_limits","rate_limits":{"primary":{"used_percent":10}}}'
    last = b'{"type":"codex.rate_limits","rate_limits":{"primary":{"used_percent":11}}}'
    scanner = scan(
        b"event: codex.rate_limits\ndata: " + first + b"\n\n"
        b'event: response.created\ndata: {"type":"response.created"}\n\n'
        b"data: " + last + b"\n\n"  # named by its data alone
    )

    assert scanner.rate_limits == orjson.loads(last)
    created = b'event: response.created\ndata: {"type":"response.created"}\n\n'
    assert scan(created).rate_limits is None


def test_last_event_without_blank_line_counts_only_after_finish() -> None:
    scanner = scan(b'event: response.completed\ndata: {"type":"response.completed"}\n')
    assert scanner.terminal is None

    scanner.finish()

    assert scanner.terminal_type == "response.completed"
    assert scanner.terminal == {"type": "response.completed"}


def test_finish_on_an_empty_stream_finds_nothing() -> None:
    scanner = StreamScanner()

    scanner.finish()

    assert (scanner.terminal, scanner.events, scanner.bytes_seen) == (None, 0, 0)


def test_iter_events_splits_a_transcript_into_its_events() -> None:
    raw = (UPSTREAM / "responses-text.sse").read_bytes()

    events = iter_events(raw)

    assert len(events) == 17
    assert all(event.endswith(b"\n\n") and event.startswith(b"event: ") for event in events)
    assert b"".join(events) == raw


def test_iter_events_normalises_crlf_and_drops_empty_blocks() -> None:
    raw = b"\r\n\r\nevent: a\r\ndata: 1\r\n\r\n\r\n\r\nevent: b\r\ndata: 2\r\n\r\n"

    assert iter_events(raw) == [b"event: a\ndata: 1\n\n", b"event: b\ndata: 2\n\n"]


def test_error_event_is_one_top_level_error_in_openai_shape() -> None:
    event = error_event("stream_incomplete", 'The upstream "closed"\nearly.')

    assert event == (
        b"event: error\n"
        b'data: {"type":"error","code":"stream_incomplete",'
        b'"message":"The upstream \\"closed\\"\\nearly.","param":null}\n\n'
    )


def test_error_event_is_terminal_to_a_scanner() -> None:
    scanner = scan(error_event("upstream_timeout", "The upstream did not answer in time."))

    assert scanner.terminal_type == "error"
    assert scanner.terminal == {
        "type": "error",
        "code": "upstream_timeout",
        "message": "The upstream did not answer in time.",
        "param": None,
    }


def test_parse_events_gives_each_events_json_and_none_for_what_is_not_json() -> None:
    raw = b'event: a\ndata: {"type":"a"}\n\ndata: not json\n\r\ndata: {"x":\ndata: 1}\n\n'

    assert parse_events(raw) == [{"type": "a"}, None, {"x": 1}]


@pytest.mark.parametrize("name", [row[0] for row in TRANSCRIPTS])
@pytest.mark.parametrize("feeder", [whole, byte_by_byte], ids=["whole", "byte_by_byte"])
def test_event_splitter_gives_every_event_once_however_the_bytes_arrive(
    name: str, feeder: Feeder
) -> None:
    raw = (UPSTREAM / name).read_bytes().replace(b"\n", b"\r\n")
    splitter = EventSplitter()

    blocks = [block for chunk in feeder(raw) for block in splitter.feed(chunk)]
    blocks += splitter.finish()

    assert [block + b"\n\n" for block in blocks] == iter_events(raw)


@pytest.mark.parametrize("feeder", [whole, byte_by_byte, random_chunks])
@pytest.mark.parametrize(
    "name", ["responses-text.sse", "responses-no-terminal.sse", "responses-error-event.sse"]
)
def test_response_created_is_kept_even_when_no_terminal_follows(name: str, feeder: Feeder) -> None:
    raw = (UPSTREAM / name).read_bytes()

    scanner = scan(raw, feeder)

    first = iter_events(raw)[0]
    assert scanner.created == orjson.loads(first.split(b"data: ", 1)[1])
    assert scanner.created is not None
    assert scanner.created["type"] == "response.created"


def test_only_the_first_response_created_is_kept() -> None:
    scanner = scan(
        b'data: {"type":"response.created","response":{"id":"resp_first"}}\n\n'
        b'event: response.created\ndata: {"type":"response.created","response":{"id":"x"}}\n\n'
    )

    assert scanner.created == {"type": "response.created", "response": {"id": "resp_first"}}


@pytest.mark.parametrize("name", ["chat-stream-usage.sse", "chat-stream-no-usage.sse"])
def test_chat_stream_has_no_response_created(name: str) -> None:
    assert scan((UPSTREAM / name).read_bytes()).created is None
