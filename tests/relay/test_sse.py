"""StreamScanner finds the event that ends a Responses stream, however the bytes arrive."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator

import orjson
import pytest

from codex_gateway.relay import sse
from codex_gateway.relay.redaction import redact_event
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


# an event with more than one `event` line -> its type as a client reads it (the last one)
RENAMED = [
    (
        b'event: response.output_text.delta\nevent: error\ndata: {"type":"error","message":"m"}',
        "error",
    ),
    (b'event: response.created\nevent:response.failed\ndata: {"type":"x"}', "response.failed"),
    # a bare `event` line names it nothing: then it is named by its data
    (b'event: response.completed\nevent\ndata: {"type":"error","message":"m"}', "error"),
    (b'event: response.completed\nevent: \ndata: {"type":"error","message":"m"}', "error"),
    # the last one names something else
    (
        b'event: error\nevent: response.output_text.delta\ndata: {"type":"error"}',
        "response.output_text.delta",
    ),
    # a field that only begins like one names nothing
    (b'event: response.failed\nevents: x\ndata: {"type":"x"}', "response.failed"),
]


@pytest.mark.parametrize(("event", "name"), RENAMED)
def test_an_event_is_named_by_its_last_event_line(event: bytes, name: str) -> None:
    for line_ending in (lf, crlf):
        scanner = scan(line_ending(event + b"\n\n"))

        assert scanner.terminal_type == (name if name in sse.TERMINAL_TYPES else None)
        assert len(scanner.deltas) == (name == "response.output_text.delta")


@pytest.mark.parametrize(("event", "name"), RENAMED)
def test_an_event_renamed_a_failure_by_a_later_line_is_rewritten_however_it_arrives(
    event: bytes, name: str
) -> None:
    opening = b'event: response.created\ndata: {"type":"response.created"}\n\n'
    raw = opening + event + b"\n\n"
    first_line = len(opening) + event.index(b"\n") + 1
    failed = name in sse.ERROR_TYPES
    expected = opening + (mark(event) if failed else event) + b"\n\n"

    for feeder in (whole, byte_by_byte, random_chunks, split_at(first_line)):
        assert b"".join(relayed(raw, feeder)) == expected


def test_a_failure_split_over_data_lines_is_read_as_its_upstream_wrote_it() -> None:
    scanner = scan(
        b'event: error\ndata: {"type":"error","message":"Incorrect API key provided: up\n'
        b'data: -LEAKED-KEY"}\n\n'
    )

    assert scanner.terminal == {
        "type": "error",
        "message": "Incorrect API key provided: up-LEAKED-KEY",
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


def mark(block: bytes) -> bytes:
    """A rewrite that shows which events went through it."""
    return b"<" + block + b">"


def relayed(raw: bytes, feeder: Feeder, rewrite: Callable[[bytes], bytes] = mark) -> list[bytes]:
    """What the relay sends for `raw` arriving in the feeder's chunks: each chunk as it came,
    or what the scanner releases of it, then what it still held when the stream closed."""
    scanner = StreamScanner()
    sent = []
    for chunk in feeder(raw):
        scanner.feed(chunk)
        sent.append(scanner.release(chunk, rewrite) if scanner.rewriting else chunk)
    scanner.finish()
    sent.append(scanner.release_rest(rewrite))
    return sent


def each_event(raw: bytes) -> Iterator[bytes]:
    yield from iter_events(raw)


def split_at(*points: int) -> Feeder:
    def feeder(raw: bytes) -> Iterator[bytes]:
        bounds = [0, *points, len(raw)]
        for start, end in itertools.pairwise(bounds):
            yield raw[start:end]

    return feeder


def marked(raw: bytes) -> bytes:
    """`raw` with its `error` and `response.failed` events marked, as the relay should send it
    however its bytes arrive."""
    names = (b"event: error\n", b"event: response.failed\n")
    blocks = [block[:-2] for block in iter_events(raw)]
    return b"".join(
        (mark(block) if block.startswith(names) else block) + b"\n\n" for block in blocks
    )


FINISHED = [name for name, terminal, _ in TRANSCRIPTS if terminal == "response.completed"]
FAILING = ["responses-failed.sse", "responses-error-event.sse", "chatgpt-usage-limit-event.sse"]


@pytest.mark.parametrize("feeder", [whole, each_event])
@pytest.mark.parametrize("name", [*FINISHED, "responses-incomplete.sse"])
def test_a_stream_that_reports_no_failure_goes_out_chunk_for_chunk_as_it_came(
    name: str, feeder: Feeder
) -> None:
    raw = (UPSTREAM / name).read_bytes()

    assert relayed(raw, feeder) == [*feeder(raw), b""]


@pytest.mark.parametrize("line_ending", [lf, crlf])
@pytest.mark.parametrize("feeder", [byte_by_byte, random_chunks])
@pytest.mark.parametrize("name", [*FINISHED, "responses-no-terminal.sse"])
def test_a_stream_that_reports_no_failure_goes_out_byte_for_byte_however_it_arrives(
    name: str, feeder: Feeder, line_ending: Callable[[bytes], bytes]
) -> None:
    raw = line_ending((UPSTREAM / name).read_bytes())

    assert b"".join(relayed(raw, feeder)) == raw


@pytest.mark.parametrize("line_ending", [lf, crlf])
@pytest.mark.parametrize("feeder", [whole, byte_by_byte, random_chunks])
@pytest.mark.parametrize("name", ["chat-stream-usage.sse", "chat-stream-no-usage.sse"])
def test_events_with_no_name_that_quote_no_secret_go_out_byte_for_byte(
    name: str, feeder: Feeder, line_ending: Callable[[bytes], bytes]
) -> None:
    """They pass through the redaction, which leaves every byte of them as it came."""
    raw = line_ending((UPSTREAM / name).read_bytes())

    assert b"".join(relayed(raw, feeder, redact_event)) == raw


@pytest.mark.parametrize("feeder", [whole, each_event, byte_by_byte, random_chunks])
@pytest.mark.parametrize("name", FAILING)
def test_an_event_reporting_a_failure_is_rewritten_whole_however_it_arrives(
    name: str, feeder: Feeder
) -> None:
    raw = (UPSTREAM / name).read_bytes()

    assert b"".join(relayed(raw, feeder)) == marked(raw)


@pytest.mark.parametrize("line_ending", [lf, crlf])
@pytest.mark.parametrize("name", FAILING)
def test_an_event_reporting_a_failure_is_rewritten_whole_wherever_one_split_falls(
    name: str, line_ending: Callable[[bytes], bytes]
) -> None:
    raw = line_ending((UPSTREAM / name).read_bytes())
    blank = line_ending(b"\n\n")
    # the marks sit around the event's lines, inside their line endings
    expected = line_ending(marked((UPSTREAM / name).read_bytes()))

    for point in range(len(raw)):
        sent = relayed(raw, split_at(point))

        assert b"".join(sent) == expected, point
        # every event whole in the first chunk goes out with it
        whole_events = raw.rfind(blank, 0, point)
        if 0 <= whole_events < raw.rindex(line_ending(b"\nevent: ")):
            assert sent[0].startswith(raw[: whole_events + len(blank)]), point


def test_a_second_failure_after_the_first_terminal_event_is_rewritten_too() -> None:
    failed = b'event: response.failed\ndata: {"type":"response.failed","response":{}}'
    error = b'event: error\ndata: {"type":"error","message":"m"}'
    raw = failed + b"\n\n" + error + b"\n\n"

    for feeder in (whole, byte_by_byte, split_at(len(failed) + 2)):
        assert b"".join(relayed(raw, feeder)) == mark(failed) + b"\n\n" + mark(error) + b"\n\n"


@pytest.mark.parametrize(
    "event",
    [
        # no event line: named by the leading type, or by a type further on
        b'data: {"type":"error","message":"m"}',
        b'data: {"sequence_number":3,"type":"response.failed","response":{}}',
        # no space after the colon
        b'event:error\ndata: {"type":"error","message":"m"}',
        # no name at all: a client reads an `error` in its data as a failure
        b'data: {"error":{"message":"m"}}',
        b"data: not JSON",
    ],
)
def test_a_failure_named_otherwise_is_rewritten_whole(event: bytes) -> None:
    delta = b'event: response.output_text.delta\ndata: {"delta":"x"}\n\n'
    raw = delta + event + b"\n\n"

    for feeder in (whole, byte_by_byte, random_chunks):
        assert b"".join(relayed(raw, feeder)) == delta + mark(event) + b"\n\n"


UNFINISHED_ERROR = b'event: error\ndata: {"type":"error","message":"m'
UNFINISHED_COMPLETED = b'event: response.completed\ndata: {"type":"response.completed"}'


@pytest.mark.parametrize(
    ("last", "sent"),
    [
        # a failure the upstream never finished: rewritten all the same
        (UNFINISHED_ERROR, mark(UNFINISHED_ERROR)),
        # a completed event without its blank line: as it came
        (UNFINISHED_COMPLETED, UNFINISHED_COMPLETED),
    ],
)
def test_what_is_still_held_when_the_stream_closes_is_sent_as_its_last_event(
    last: bytes, sent: bytes
) -> None:
    assert b"".join(relayed(last, byte_by_byte)) == sent


DELTA = b'event: response.output_text.delta\ndata: {"delta":"x"}\n\n'
SECRET = b"sk-proj-UPSTREAMSECRET0123456789"
QUOTING_NO_NAME = b'data: {"error":{"message":"bad key ' + SECRET + b'"}}'


@pytest.mark.parametrize("feeder", [whole, each_event, byte_by_byte, random_chunks])
def test_an_event_with_no_name_that_quotes_a_key_goes_out_redacted(feeder: Feeder) -> None:
    raw = DELTA + QUOTING_NO_NAME + b"\n\n"

    sent = b"".join(relayed(raw, feeder, redact_event))

    assert sent == DELTA + b'data: {"error":{"message":"bad key [redacted]"}}\n\n'


# a failure whose lines end in a CR alone, which the scanner does not split into events
CR_ONLY = [
    b'event: error\rdata: {"type":"error","message":"' + SECRET + b'"}\r\r',
    # after an event that names something else, framed the same way
    b'event: response.created\rdata: {"type":"response.created"}\r\r'
    b'event: error\rdata: {"type":"error","message":"' + SECRET + b'"}\r\r',
    # with events framed by LF after it
    b'event: error\rdata: {"type":"error","message":"' + SECRET + b'"}\r\r' + DELTA,
    # after an event framed by LF
    DELTA + b'data: {"type":"error","message":"' + SECRET + b'"}\r\r',
    # inside an event whose name line ends in LF, with events framed by LF after it
    b'event: response.created\ndata: {"type":"response.created"}\r\r'
    b'event: error\rdata: {"type":"error","message":"' + SECRET + b'"}\r\r' + DELTA,
]


def after_first_line_and_in_the_key(raw: bytes) -> Iterator[bytes]:
    """The first line whole, so that the event's start goes out; then the key cut in two."""
    first_line = re.search(rb"\r|\n", raw)
    assert first_line is not None
    yield from split_at(first_line.end(), raw.index(SECRET) + 8)(raw)


@pytest.mark.parametrize(
    "feeder", [whole, each_event, byte_by_byte, random_chunks, after_first_line_and_in_the_key]
)
@pytest.mark.parametrize("raw", CR_ONLY)
def test_a_failure_framed_by_cr_alone_goes_out_redacted(raw: bytes, feeder: Feeder) -> None:
    sent = b"".join(relayed(raw, feeder, redact_event))

    assert SECRET[:12] not in sent and SECRET[8:] not in sent
    assert b"[redacted]" in sent


def test_an_event_named_a_delta_is_held_until_no_later_line_can_rename_it() -> None:
    start = b'event: response.output_text.delta\ndata: {"delta":"x"}'
    rest = b'\ndata: {"type":"error"}\n\n'
    error = b'event: error\ndata: {"type":"error","message":"m"}'
    raw = start + rest + error + b"\n\n"

    sent = relayed(raw, split_at(len(start)))

    assert sent == [b"", start + rest + mark(error) + b"\n\n", b""]


# what of a stream has come -> what must end it before an event the gateway adds
CLOSINGS = [
    # nothing, or whole events
    pytest.param(b"", b"", id="nothing"),
    pytest.param(DELTA, b"", id="whole"),
    # an event begun: one with no name, one named by its first line, one cut in its blank
    # line
    pytest.param(
        DELTA + b'data: {"type":"response.output_text.delta","delta":"par', b"\n\n", id="held"
    ),
    pytest.param(
        DELTA + b'event: response.output_text.delta\ndata: {"delta":"par', b"\n\n", id="named"
    ),
    pytest.param(DELTA[:-1], b"\n\n", id="blank-line"),
]


@pytest.mark.parametrize("finished", [False, True], ids=["broken", "ended"])
@pytest.mark.parametrize(("raw", "closing"), CLOSINGS)
def test_an_event_the_stream_stopped_inside_is_ended_before_the_gateways_own(
    raw: bytes, closing: bytes, finished: bool
) -> None:
    """A stream that breaks is not finished; one that ends without its final event is."""
    scanner = StreamScanner()
    sent = []
    for chunk in random_chunks(raw):
        scanner.feed(chunk)
        sent.append(scanner.release(chunk, mark) if scanner.rewriting else chunk)
    if finished:
        scanner.finish()
    sent.append(scanner.release_rest(mark))
    gateways = error_event("stream_incomplete", "The stream ended early.")

    assert scanner.closing() == closing
    events = parse_events(b"".join(sent) + scanner.closing() + gateways)
    assert events[-1] == {
        "type": "error",
        "code": "stream_incomplete",
        "message": "The stream ended early.",
        "param": None,
    }


class CountingPattern:
    """A compiled pattern that counts the bytes it is asked to search."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.searched = 0

    def search(self, string: bytes, pos: int = 0) -> re.Match[bytes] | None:
        self.searched += len(string) - pos
        return self.pattern.search(string, pos)

    def finditer(self, string: bytes, pos: int = 0) -> Iterator[re.Match[bytes]]:
        self.searched += len(string) - pos
        return self.pattern.finditer(string, pos)


@pytest.mark.parametrize("line_ending", [lf, crlf])
def test_an_event_held_back_is_searched_once_however_many_chunks_it_takes(
    monkeypatch: pytest.MonkeyPatch, line_ending: Callable[[bytes], bytes]
) -> None:
    """A 1 MB event with no `event:` line, held back in 4 KB chunks: each byte is searched
    for a blank line about once, not once for every chunk that comes after it."""
    blank_lines = CountingPattern(sse._RAW_BLANK_LINE)
    monkeypatch.setattr(sse, "_RAW_BLANK_LINE", blank_lines)
    event = b'data: {"type":"error","message":"' + b"x" * 1_000_000 + b'"}'
    raw = line_ending(DELTA + event + b"\n\n" + DELTA)
    chunks = range(0, len(raw), 4096)

    sent = relayed(raw, split_at(*chunks[1:]))

    assert b"".join(sent) == line_ending(DELTA + mark(event) + b"\n\n" + DELTA)
    assert blank_lines.searched < 2 * len(raw)
