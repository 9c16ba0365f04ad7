"""Credentials taken out of upstream error text: this goes in, that comes out."""

from __future__ import annotations

import orjson
import pytest

from codex_gateway.relay.redaction import redact_body, redact_event, redact_text

ACCOUNT_KEY = "acct-key-0123456789"

# text from the upstream -> what the client and the usage row get
TEXTS = [
    # API keys of OpenAI's shapes, and the gateway's own
    ("bad thing with key sk-UPSTREAMSECRET-abc123", "bad thing with key [redacted]"),
    ("key sk-proj-AbCdEf0123456789_xyz was revoked", "key [redacted] was revoked"),
    ("sk-cg-0123456789abcdef", "[redacted]"),
    # bearer tokens, whatever the scheme's case, and JWTs (ChatGPT access tokens)
    ("got 'Authorization: Bearer abc.def-ghi_jkl'", "got 'Authorization: Bearer [redacted]'"),
    ("bearer 0123456789abcdef", "bearer [redacted]"),
    ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-nature ok", "token [redacted] ok"),
    # the account's own key, verbatim, whatever its shape
    (f"invalid key {ACCOUNT_KEY}.", "invalid key [redacted]."),
    # text that only looks close stays as it is
    ("sk-short, a task-list, Bearer of bad news", "sk-short, a task-list, Bearer of bad news"),
    ("max_output_tokens must be at least 16", "max_output_tokens must be at least 16"),
]


@pytest.mark.parametrize(("text", "expected"), TEXTS)
def test_secrets_in_upstream_text_are_redacted(text: str, expected: str) -> None:
    assert redact_text(text, (ACCOUNT_KEY,)) == expected


def test_a_json_body_keeps_its_shape_and_the_rest_of_its_message() -> None:
    body = orjson.dumps(
        {
            "error": {
                "message": "bad thing with key sk-UPSTREAMSECRET-0123456789 in the request",
                "type": "invalid_request_error",
                "param": None,
                "code": "bad_thing",
                "details": [f"sent {ACCOUNT_KEY}", 3],
            }
        }
    )

    redacted = orjson.loads(redact_body(body, (ACCOUNT_KEY,)))

    assert redacted == {
        "error": {
            "message": "bad thing with key [redacted] in the request",
            "type": "invalid_request_error",
            "param": None,
            "code": "bad_thing",
            "details": ["sent [redacted]", 3],
        }
    }


@pytest.mark.parametrize(
    "body",
    [
        # nothing to replace: the bytes as they came, spacing and all
        b'{"error": {"message": "max_output_tokens must be at least 16"}}',
        b"plain text, no key",
    ],
)
def test_a_body_without_secrets_is_left_as_it_came(body: bytes) -> None:
    assert redact_body(body, (ACCOUNT_KEY,)) is body


def test_a_body_that_is_not_json_is_redacted_as_text() -> None:
    body = b"<html>upstream says: key sk-UPSTREAMSECRET-0123456789 is bad</html>"
    assert redact_body(body) == b"<html>upstream says: key [redacted] is bad</html>"


@pytest.mark.parametrize(
    "depth",
    [
        # deeper than orjson writes, though it reads it
        300,
        # deeper than Python's recursion limit walks
        1020,
    ],
)
def test_json_too_deep_to_encode_again_is_redacted_as_text(depth: int) -> None:
    body = b"[" * depth + b'"key sk-UPSTREAMSECRET-0123456789"' + b"]" * depth
    assert redact_body(body) == b"[" * depth + b'"key [redacted]"' + b"]" * depth


# an event's lines as they came -> as the client gets them
EVENTS = [
    # the data redacted, the event line kept
    (
        b'event: error\ndata: {"type":"error","message":"key sk-UPSTREAMSECRET-0123456789"}',
        b'event: error\ndata: {"type":"error","message":"key [redacted]"}',
    ),
    # CRLF line endings, and an id line, stay where they were
    (
        b'event: error\r\nid: 7\r\ndata: {"type":"error","message":"'
        + ACCOUNT_KEY.encode()
        + b'"}\r\nretry: 10',
        b'event: error\r\nid: 7\r\ndata: {"type":"error","message":"[redacted]"}\r\nretry: 10',
    ),
    # JSON over several data lines is read as one, and written back on one line
    (
        b'event: error\ndata: {"type":"error",\ndata: "message":"Bearer tok_0123456789"}',
        b'event: error\ndata: {"type":"error","message":"Bearer [redacted]"}',
    ),
    (
        b'event: error\r\ndata: {"type":"error",\r\ndata: "message":"Bearer tok_0123456789"}',
        b'event: error\r\ndata: {"type":"error","message":"Bearer [redacted]"}',
    ),
    # lines that end in a CR alone, as a client reads them
    (
        b'event: error\rdata: {"type":"error","message":"key sk-UPSTREAMSECRET-0123456789"}',
        b'event: error\rdata: {"type":"error","message":"key [redacted]"}',
    ),
    # a key spelled with JSON escapes is found once the JSON is read
    (
        b'data: {"type":"error","message":"sk-UPSTREAM\\u0053ECRET-0123"}',
        b'data: {"type":"error","message":"[redacted]"}',
    ),
    # data that is not JSON (an event the upstream never finished) is redacted as text
    (
        b'event: error\ndata: {"type":"error","message":"key sk-UPSTREAMSECRET-01',
        b'event: error\ndata: {"type":"error","message":"key [redacted]',
    ),
    # a secret cut across two data lines (a client reads it with a line break inside): the
    # data written anew on one line
    (
        b'event: error\ndata: {"type":"error","message":"Incorrect API key provided: acct-key'
        b'\ndata: -0123456789"}',
        b'event: error\ndata: {"type":"error","message":"Incorrect API key provided: [redacted]"}',
    ),
    (
        b'event: error\r\ndata: {"type":"error","message":"key sk-UPSTR\r\ndata\r\n'
        b'data: EAMSECRET-0123"}\r\nid: 7',
        b'event: error\r\ndata: {"type":"error","message":"key [redacted]"}\r\nid: 7',
    ),
    (
        b"event: error\ndata: token eyJhbGciOiJIUzI1NiJ9.eyJzdWIi\ndata: OiIxIn0.sig-nature",
        b"event: error\ndata: token [redacted]",
    ),
    # a secret in any other line: an id, the event line, a comment, a field no client knows
    (
        b"event: error\nid: " + ACCOUNT_KEY.encode() + b'\ndata: {"type":"error"}',
        b'event: error\nid: [redacted]\ndata: {"type":"error"}',
    ),
    (
        b"event: sk-UPSTREAMSECRET-0123456789\r: Bearer tok_0123456789\rx-key:"
        + ACCOUNT_KEY.encode()
        + b"\rsk-UPSTREAMSECRET-0123456789",
        b"event: [redacted]\r: Bearer [redacted]\rx-key:[redacted]\r[redacted]",
    ),
    # both, the bytes that are not UTF-8 in the other lines kept
    (
        b"id: \xff " + ACCOUNT_KEY.encode() + b'\ndata: {"type":"error","message":"key sk-UP'
        b'\ndata: STREAMSECRET-0123"}',
        b'id: \xff [redacted]\ndata: {"type":"error","message":"key [redacted]"}',
    ),
]


@pytest.mark.parametrize(("event", "expected"), EVENTS)
def test_an_event_reporting_a_failure_keeps_its_shape_less_its_secrets(
    event: bytes, expected: bytes
) -> None:
    assert redact_event(event, (ACCOUNT_KEY,)) == expected


@pytest.mark.parametrize(
    "event",
    [
        b'event: error\ndata: {"type":"error", "message": "no key here"}',
        b'event: error\nid: 7\n: a comment\nretry: 10\ndata: {"type":"error"}',
        # data over several lines with no secret, even once the lines are joined without breaks
        b'event: error\ndata: {"type":"error",\ndata: "message":"a line\ndata:  and the next"}',
        b"event: error",
    ],
)
def test_an_event_with_no_secret_in_its_data_is_left_as_it_came(event: bytes) -> None:
    assert redact_event(event, (ACCOUNT_KEY,)) is event
