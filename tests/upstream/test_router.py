"""Failover end to end: a gateway with several accounts in front of a misbehaving upstream.

Before the first byte a failing account is marked and the request moves on, so the client
sees one clean response, or one clear error when every account fails. After the first byte
nothing is retried: the client gets the events it already had, then an `error` event, and
the row bills what the upstream reported or, failing that, the gateway's estimate.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from codex_gateway.errors import UpstreamProtocolError
from codex_gateway.http.responses import MISSING_TERMINAL_MESSAGE
from codex_gateway.relay.sse import error_event, parse_events
from codex_gateway.upstream.router import _first_chunk
from tests.conftest import Gateway, Sandbox, estimated_counts, fixture_path
from tests.http.test_disconnect import STREAMED, read_then_hang_up
from tests.http.test_responses import expected_cost, transcript_events
from tests.upstream.pool_helpers import (
    CHAT,
    FAULT_TIMEOUTS,
    PROMPT,
    LoopbackUpstream,
    account_state,
    failing_first,
    fresh_accounts,
    pool_gateway,
    served_by,
    serving,
    set_fault,
    start_second_process,
    stream_events,
)

BODY = {"model": "gpt-5.1-codex", "input": PROMPT}
TEXT_USAGE = (1252, 0, 11273, 10944)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    yield from pool_gateway(request.param, tmp_path_factory, FAULT_TIMEOUTS)


# fault on the first account -> (attempt error kind, the account's state afterwards)
BEFORE_FIRST_BYTE = [
    # the connection is refused, or the upstream never answers
    ("refused", "connect", "cooling_down"),
    ("hang-before", "timeout_first_byte", "cooling_down"),
    # a stream's head, and then no event within the first-byte timeout
    ("hang-middle:0", "timeout_first_byte", "cooling_down"),
    # HTTP statuses that are about the account, not the request
    ("500", "http_500", "cooling_down"),
    ("503", "http_503", "cooling_down"),
    ("429", "http_429", "quota_limited"),
    ("401", "http_401", "needs_relogin"),
    ("403", "http_403", "needs_relogin"),
    # a 200 whose body is not an event stream, or that ends before its first event
    ("garbage", "garbage", "cooling_down"),
    ("cut-after:0", "cut", "cooling_down"),
]


@pytest.mark.parametrize(("fault", "kind", "state"), BEFORE_FIRST_BYTE)
def test_failure_before_the_first_byte_moves_to_the_next_account_unnoticed(
    gateway: Gateway, sandbox: Sandbox, fault: str, kind: str, state: str
) -> None:
    failing, healthy = fresh_accounts(
        gateway,
        sandbox,
        [{"name": "first", "priority": 1, "refused": fault == "refused"}, {"priority": 2}],
    )
    if fault != "refused":
        set_fault(sandbox, failing, fault)
    user, key = gateway.new_user("10")
    sandbox.clear()
    response, events = stream_events(gateway, key, BODY)
    assert response.status_code == 200
    assert events == transcript_events("responses-text")
    row = gateway.usage_row(response.headers["x-request-id"])
    assert row["status"] == "completed"
    assert row["account"] == healthy.name
    assert [(a["account"], a["outcome"], a["error"]) for a in row["attempts"]] == [
        (failing.name, "failed", kind),
        (healthy.name, "ok", None),
    ]
    assert Decimal(row["cost_usd"]) == expected_cost(TEXT_USAGE)
    assert Decimal(gateway.balance(user)) == Decimal(10) - expected_cost(TEXT_USAGE)
    marked = account_state(gateway, failing)
    assert marked["state"] == state
    assert marked["why"]
    assert "sk-up-" not in gateway.log_text()


def test_a_quota_limited_account_rests_until_the_reset_the_upstream_gave(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    limited, healthy = failing_first(gateway, sandbox, "429")
    _, key = gateway.new_user("10")
    for _ in range(3):
        response, _ = stream_events(gateway, key, BODY)
        assert response.status_code == 200
    # The 429 body and headers say 120 s; until then the account is not tried again.
    assert served_by(sandbox, [limited, healthy]) == [limited.name] + [healthy.name] * 3
    until = account_state(gateway, limited)["until"]
    assert until is not None
    assert datetime.fromisoformat(until).timestamp() > time.time() + 60


def test_every_account_failing_gives_one_clear_error_and_costs_nothing(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    first, second = fresh_accounts(gateway, sandbox, [{"priority": 1}, {"priority": 2}])
    set_fault(sandbox, first, "500")
    set_fault(sandbox, second, "502")
    user, key = gateway.new_user("10")
    response, _ = stream_events(gateway, key, BODY)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert "No upstream account could serve this request (2 tried)" in error["message"]
    row = gateway.usage_row(response.headers["x-request-id"])
    assert row["status"] == "upstream_error"
    assert [a["error"] for a in row["attempts"]] == ["http_500", "http_502"]
    assert Decimal(row["cost_usd"]) == 0
    assert gateway.balance(user) == "10"
    explained = gateway.cli("explain", response.headers["x-request-id"]).stdout
    assert f"1. {first.name}: failed (http_500)" in explained


def test_no_usable_account_is_a_503_that_says_why(gateway: Gateway, sandbox: Sandbox) -> None:
    (only,) = fresh_accounts(gateway, sandbox, [{"priority": 1}])
    set_fault(sandbox, only, "401")
    _, key = gateway.new_user("10")
    assert stream_events(gateway, key, BODY)[0].status_code == 502
    response, _ = stream_events(gateway, key, BODY)
    assert response.status_code == 503
    assert "needs relogin" in response.json()["error"]["message"]
    # The operator re-enables the account once its credentials are fixed.
    set_fault(sandbox, only, None)
    gateway.cli("accounts", "enable", only.name)
    assert account_state(gateway, only)["state"] == "ready"
    time.sleep(0.8)
    assert stream_events(gateway, key, BODY)[0].status_code == 200


# fault after some events -> (row flag, error event code, events the client gets first)
AFTER_FIRST_BYTE = [
    # the upstream goes silent, or drops the connection, part way through
    ("hang-middle:8", "timeout_idle", "upstream_timeout", 8),
    ("cut-after:8", "cut", "upstream_protocol_error", 8),
    # a drip slower than the total time limit allows
    ("drip:300", "timeout_total", "upstream_timeout", None),
]


@pytest.mark.parametrize(("fault", "flag", "code", "delivered"), AFTER_FIRST_BYTE)
def test_failure_after_the_first_byte_is_an_error_event_and_an_estimated_bill(
    gateway: Gateway, sandbox: Sandbox, fault: str, flag: str, code: str, delivered: int | None
) -> None:
    failing, spare = fresh_accounts(gateway, sandbox, [{"priority": 1}, {"priority": 2}])
    set_fault(sandbox, failing, fault)
    user, key = gateway.new_user("10")
    sandbox.clear()
    response, events = stream_events(gateway, key, BODY)
    assert response.status_code == 200
    relayed, last = events[:-1], events[-1]
    if delivered is not None:
        assert len(relayed) == delivered
    assert relayed == transcript_events("responses-text")[: len(relayed)]
    assert last["type"] == "error"
    assert last["code"] == code
    # Never retried: the spare account never saw the request, so no output was duplicated.
    assert served_by(sandbox, [failing, spare]) == [failing.name]
    row = gateway.usage_row(response.headers["x-request-id"])
    assert row["status"] == "upstream_error"
    assert {"stream_interrupted", flag, "estimated"} <= set(row["flags"])
    counts = estimated_counts(PROMPT, relayed)
    assert_counts(row, counts)
    assert Decimal(row["cost_usd"]) == expected_cost(counts) > 0
    assert Decimal(gateway.balance(user)) == Decimal(10) - expected_cost(counts)


def assert_counts(row: dict[str, Any], counts: tuple[int, int, int, int]) -> None:
    assert (
        row["input_tokens"],
        row["cached_tokens"],
        row["output_tokens"],
        row["reasoning_tokens"],
    ) == counts


def test_a_slow_drip_within_the_limits_is_relayed_whole(gateway: Gateway, sandbox: Sandbox) -> None:
    (slow,) = fresh_accounts(gateway, sandbox, [{}])
    set_fault(sandbox, slow, "drip:100")  # gaps well under the idle limit, total under 4 s
    _, key = gateway.new_user("10")
    response, events = stream_events(gateway, key, BODY)
    assert events == transcript_events("responses-text")
    row = gateway.usage_row(response.headers["x-request-id"])
    assert row["status"] == "completed"
    assert Decimal(row["cost_usd"]) == expected_cost(TEXT_USAGE)


def test_a_mark_made_by_one_process_is_honoured_by_another(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    limited, healthy = fresh_accounts(gateway, sandbox, [{"priority": 1}, {"priority": 2}])
    set_fault(sandbox, limited, "429")
    _, key = gateway.new_user("10")
    second = start_second_process(gateway)
    sandbox.clear()
    assert stream_events(gateway, key, BODY)[0].status_code == 200
    time.sleep(0.8)  # one catalog poll carries the mark to the other process
    first_url, gateway.url = gateway.url, second
    try:
        assert stream_events(gateway, key, BODY)[0].status_code == 200
    finally:
        gateway.url = first_url
    assert served_by(sandbox, [limited, healthy]) == [limited.name, healthy.name, healthy.name]


# how the upstream's stream breaks -> (row flags, status and code the chat client gets)
CHAT_STREAM_BROKEN = [
    # it goes silent, or drops the connection, after some events
    pytest.param(
        {"x-sandbox-fault": "hang-middle:8"}, {"timeout_idle", "stream_interrupted"}, 504,
        id="idle",
    ),
    pytest.param(
        {"x-sandbox-fault": "cut-after:8"}, {"cut", "stream_interrupted"}, 502, id="cut"
    ),
    # it ends without its final event
    pytest.param(
        {"x-sandbox-transcript": "responses-no-terminal"}, {"no_terminal_event", "protocol"},
        502, id="no-terminal",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "flags", "status"), CHAT_STREAM_BROKEN)
def test_a_chat_completion_whose_upstream_stream_breaks_is_an_error_billed_as_the_stream(
    gateway: Gateway, sandbox: Sandbox, headers: dict[str, str], flags: set[str], status: int
) -> None:
    """A client that did not stream gets an error, yet its row bills the same estimate of
    what the upstream sent as the same request streamed: the upstream did that work."""
    fresh_accounts(gateway, sandbox, [{}])
    user, key = gateway.new_user("10")
    auth = {"Authorization": f"Bearer {key}", **headers}
    url = gateway.url + "/v1/chat/completions"

    whole = httpx.post(url, json=CHAT, headers=auth, timeout=30)
    streamed = httpx.post(url, json={**CHAT, "stream": True}, headers=auth, timeout=30)

    assert whole.status_code == status
    assert whole.json()["error"]["type"] == "upstream_error"
    row = gateway.usage_row(whole.headers["x-request-id"])
    like = gateway.usage_row(streamed.headers["x-request-id"])
    assert row["status"] == "upstream_error" and row["http_status"] == status
    assert flags | {"estimated"} <= set(row["flags"])
    assert "usage_missing" not in row["flags"]
    assert row["output_tokens"] > 0
    assert "estimated" in like["flags"]
    counts = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cost_usd")
    assert [row[name] for name in counts] == [like[name] for name in counts]
    spent = Decimal(row["cost_usd"]) + Decimal(like["cost_usd"])
    assert Decimal(gateway.balance(user)) == Decimal(10) - spent


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_chat_completion_slower_than_the_total_time_limit_is_cut_and_billed_its_estimate(
    gateway: Gateway, sandbox: Sandbox, stream: bool
) -> None:
    """An upstream whose events come within the idle limit but whose whole answer takes
    longer than the total limit (17 events 300 ms apart, against 4 s) is cut on the chat
    route as on /v1/responses, and billed the estimate of what it sent."""
    fresh_accounts(gateway, sandbox, [{}])
    user, key = gateway.new_user("10")
    auth = {"Authorization": f"Bearer {key}", "x-sandbox-fault": "drip:300"}
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={**CHAT, "stream": stream},
        headers=auth,
        timeout=30,
    )

    row = gateway.usage_row(response.headers["x-request-id"])
    if stream:
        assert response.status_code == 200
        data = [line for line in response.text.split("\n\n") if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert "error" in json.loads(data[-2].removeprefix("data: "))
    else:
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert row["http_status"] == 504
    assert row["status"] == "upstream_error"
    assert {"timeout_total", "stream_interrupted", "estimated"} <= set(row["flags"])
    assert row["output_tokens"] > 0
    assert Decimal(gateway.balance(user)) == Decimal(10) - Decimal(row["cost_usd"])
    assert Decimal(row["cost_usd"]) > 0


@pytest.mark.parametrize("path", list(STREAMED))
def test_a_stream_its_client_left_and_the_total_time_limit_ended_says_both(
    gateway: Gateway, sandbox: Sandbox, path: str
) -> None:
    """The gateway reads on an upstream whose client left, to bill what it did; a drip slower
    than the total time limit (17 events 300 ms apart, against 4 s) is then ended by that
    limit, and the row says so beside the client's leaving, as it does for a client still
    there."""
    (dripping,) = fresh_accounts(gateway, sandbox, [{}])
    set_fault(sandbox, dripping, "drip:300")
    user, key = gateway.new_user("10")

    request_id, _ = read_then_hang_up(gateway, key, 2, path=path)

    row = gateway.usage_row(request_id)
    assert row["status"] == "client_disconnected"
    assert {"client_disconnected", "timeout_total", "estimated"} <= set(row["flags"])
    assert "total time limit" in row["error"]
    assert row["output_tokens"] > 0
    assert Decimal(gateway.balance(user)) == Decimal(10) - Decimal(row["cost_usd"]) < 10


ACCOUNT_KEY = "upstream-account-key-0123456789"
QUOTING = {
    "error": {
        "message": (
            "bad thing with key sk-UPSTREAMSECRET-0123456789abcdef, sent as "
            f"'Bearer tok_0123456789abcdef' for account key {ACCOUNT_KEY}"
        ),
        "type": "invalid_request_error",
        "param": "input",
        "code": "bad_thing",
    }
}


@pytest.fixture
def quoting_upstream() -> Iterator[LoopbackUpstream]:
    with serving(LoopbackUpstream(status=422, body=QUOTING)) as server:
        yield server


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions"])
def test_credentials_an_upstream_4xx_quotes_reach_neither_the_client_nor_the_row(
    gateway: Gateway, sandbox: Sandbox, quoting_upstream: LoopbackUpstream, path: str
) -> None:
    spec = {"base_url": quoting_upstream.base_url, "api_key": ACCOUNT_KEY}
    fresh_accounts(gateway, sandbox, [spec])
    _, key = gateway.new_user("10")
    body = CHAT if path.endswith("completions") else BODY

    response = httpx.post(
        gateway.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )

    assert response.status_code == 422
    expected = (
        "bad thing with key [redacted], sent as 'Bearer [redacted]' for account key [redacted]"
    )
    assert response.json() == {"error": {**QUOTING["error"], "message": expected}}
    row = gateway.usage_row(response.headers["x-request-id"])
    assert row["status"] == "upstream_error" and "upstream_http_422" in row["flags"]
    assert expected in row["error"]
    for secret in ("sk-UPSTREAMSECRET", "tok_0123456789abcdef", ACCOUNT_KEY):
        assert secret not in response.text and secret not in json.dumps(row)


# What a failed response says, quoting a key and the account's key (the token it was sent).
QUOTED = "bad thing with key sk-UPSTREAMSECRET-0123456789abcdef, for account key {token}"
QUOTED_REDACTED = "bad thing with key [redacted], for account key [redacted]"
FAILED = {
    "id": "resp_quoting",
    "object": "response",
    "status": "failed",
    "model": "gpt-5.1-codex",
    "output": [],
    "usage": None,
    "error": {"code": "server_error", "message": QUOTED},
}


def sse(*events: dict[str, Any]) -> list[bytes]:
    return [
        b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events
    ]


# the route, whether the client streams, and whether the upstream streams its failure
FAILED_ANSWERS = [
    # a /v1/responses stream, its failure event rewritten
    pytest.param("/v1/responses", True, True, id="responses-stream"),
    # a failed response sent whole, gathered from a stream or as the upstream sent it
    pytest.param("/v1/responses", False, True, id="responses-gathered"),
    pytest.param("/v1/responses", False, False, id="responses-json"),
    # a chat client's error chunk, or its 502
    pytest.param("/v1/chat/completions", True, True, id="chat-stream"),
    pytest.param("/v1/chat/completions", True, False, id="chat-stream-of-json"),
    pytest.param("/v1/chat/completions", False, True, id="chat-whole"),
]


# A failure that quotes a key and the account's key, in each of the two events that report
# one, after the event that opens the stream.
QUOTED_KEYS = (
    f"bad thing with key sk-UPSTREAMSECRET-0123456789abcdef, for account key {ACCOUNT_KEY}"
)
QUOTED_KEYS_REDACTED = "bad thing with key [redacted], for account key [redacted]"
CREATED = {
    "type": "response.created",
    "response": {**FAILED, "status": "in_progress", "error": None},
}
FAILURES = {
    "response.failed": {"type": "response.failed", "response": {**FAILED, "error": {
        "code": "server_error", "message": QUOTED_KEYS}}},
    "error": {"type": "error", "code": "server_error", "message": QUOTED_KEYS, "param": None},
}  # fmt: skip


def cut_at(raw: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *points, len(raw)]
    return [raw[start:end] for start, end in itertools.pairwise(bounds)]


@contextmanager
def writing(gateway: Gateway, sandbox: Sandbox, chunks: list[bytes]) -> Iterator[str]:
    """The gateway's only account an upstream that writes a stream as `chunks`, one every
    50 ms; a new user's key."""
    with serving(LoopbackUpstream(events=chunks, pace=0.05)) as upstream:
        fresh_accounts(gateway, sandbox, [{"base_url": upstream.base_url, "api_key": ACCOUNT_KEY}])
        _, key = gateway.new_user("10")
        yield key


def stream_raw(gateway: Gateway, key: str) -> list[bytes]:
    """The pieces a streaming /v1/responses client reads, as they reach it."""
    return read_stream(gateway, key)[0]


def read_stream(gateway: Gateway, key: str) -> tuple[list[bytes], str]:
    """`stream_raw`, and the request's id."""
    with httpx.stream(
        "POST",
        gateway.url + "/v1/responses",
        json={**BODY, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ) as response:
        return [bytes(piece) for piece in response.iter_raw()], response.headers["x-request-id"]


def failure_cuts(raw: bytes, failure: int, names: tuple[str, ...]) -> list[int]:
    """Where the upstream's writes cut a stream whose failure event starts at `failure`."""
    points = {
        "start": failure,
        "name": failure + len("event: ") + 3,
        "line": raw.index(b"\ndata: ", failure) + 1,
        "key": raw.index(b"EAMSECRET", failure),
        "account-key": raw.index(ACCOUNT_KEY.encode(), failure) + 9,
        "blank-line": len(raw) - 1,
    }
    return [points[name] for name in names]


# where the upstream's writes cut the stream: before and inside the failure event
FAILURE_CUTS = [
    # inside the event's name, then inside the key it quotes
    pytest.param(("start", "name", "key"), id="name-and-key"),
    # with the event before it, just after its event line; then inside the account's key
    pytest.param(("line", "account-key"), id="line-and-account-key"),
    # between the two line ends of its blank line
    pytest.param(("start", "blank-line"), id="blank-line"),
    # in one write with the event before it
    pytest.param((), id="whole"),
]


@pytest.mark.parametrize("cuts", FAILURE_CUTS)
@pytest.mark.parametrize("kind", list(FAILURES))
def test_a_streamed_failure_reaches_the_client_without_the_keys_it_quotes(
    gateway: Gateway,
    sandbox: Sandbox,
    sdk: Callable[[str], openai.OpenAI],
    kind: str,
    cuts: tuple[str, ...],
) -> None:
    opening, failure = sse(CREATED, FAILURES[kind])
    raw = opening + failure
    chunks = cut_at(raw, failure_cuts(raw, len(opening), cuts))
    redacted = json.loads(failure.split(b"data: ", 1)[1])
    if kind == "error":
        redacted["message"] = QUOTED_KEYS_REDACTED
    else:
        redacted["response"]["error"]["message"] = QUOTED_KEYS_REDACTED
    # the event as the client gets it: its data written anew, every other byte as it came
    expected = opening + b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps(redacted))
    with writing(gateway, sandbox, chunks) as key:
        received = stream_raw(gateway, key)
        events = list(sdk(key).responses.create(model="gpt-5.1-codex", input="hi", stream=True))

    assert b"".join(received) == expected
    for secret in (b"UPSTREAMSECRET", ACCOUNT_KEY.encode()):
        assert not any(secret in piece for piece in received)
    assert [event.type for event in events] == ["response.created", kind]
    last = events[-1].to_dict()
    error = last if kind == "error" else last["response"]["error"]
    assert (error["code"], error["message"]) == ("server_error", QUOTED_KEYS_REDACTED)


# An `error` event framed so that a key it quotes, or the one the upstream was sent
# (`{token}`), escaped redaction -> the event as the client gets it
KEY_PROVIDED = b'data: {"type":"error","code":"invalid_api_key","message":"Incorrect API key'
KEY_REDACTED = KEY_PROVIDED + b' provided: [redacted]"}'
REFRAMED_FAILURES = [
    # named by a delta's event line, then by `error` (the last one wins)
    pytest.param(
        b"event: response.output_text.delta\nevent: error\n"
        + KEY_PROVIDED
        + b' provided: {token}"}',
        b"event: response.output_text.delta\nevent: error\n" + KEY_REDACTED,
        id="second-event-line",
    ),
    # the account's key cut across two data lines
    pytest.param(
        b"event: error\n" + KEY_PROVIDED + b' provided: upstream\ndata: -account-key-0123456789"}',
        b"event: error\n" + KEY_REDACTED,
        id="key-across-data-lines",
    ),
    # the key sent in its id line
    pytest.param(
        b"event: error\nid: {token}\n" + KEY_PROVIDED + b'"}',
        b"event: error\nid: [redacted]\n" + KEY_PROVIDED + b'"}',
        id="id-line",
    ),
]


@pytest.mark.parametrize("cut", ["whole", "after-first-line"])
@pytest.mark.parametrize(("failure", "expected"), REFRAMED_FAILURES)
def test_a_streamed_failure_framed_otherwise_reaches_neither_client_nor_row_with_a_key(
    gateway: Gateway, sandbox: Sandbox, failure: bytes, expected: bytes, cut: str
) -> None:
    opening = b"".join(sse(CREATED))
    raw = opening + failure + b"\n\n"
    cuts = [len(opening) + failure.index(b"\n") + 1] if cut == "after-first-line" else []
    with writing(gateway, sandbox, cut_at(raw, cuts)) as key:
        received, request_id = read_stream(gateway, key)
        row = gateway.usage_row(request_id)

    sent = b"".join(received)
    assert sent == opening + expected + b"\n\n"
    assert ACCOUNT_KEY.encode() not in sent.replace(b"\n", b"").replace(b"data: ", b"")
    assert parse_events(sent)[-1]["type"] == "error"
    told = parse_events(expected + b"\n\n")[0]["message"]
    assert (row["status"], row["error"]) == ("error", f"invalid_api_key: {told}")
    assert ACCOUNT_KEY not in json.dumps(row)


def test_a_completed_stream_cut_anywhere_reaches_the_client_byte_for_byte(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    raw = fixture_path("upstream", "responses-text.sse").read_bytes()
    delta = raw.index(b"event: response.output_text.delta")
    final = raw.rindex(b"event: ")
    # inside a delta's name and then its data; inside the final event's name, while it may
    # still turn out to be a failure
    chunks = cut_at(raw, [delta + 20, delta + 60, final + 16])
    with writing(gateway, sandbox, chunks) as key:
        received = stream_raw(gateway, key)

    assert b"".join(received) == raw


@pytest.mark.parametrize(
    ("opening", "cuts"),
    [
        pytest.param(b"", [2], id="ev"),
        pytest.param(b"", [1, 3], id="e-ve"),
        pytest.param(b"\xef\xbb\xbf", [2, 5], id="byte-order-mark"),
        pytest.param(b"\n", [1], id="blank-line"),
    ],
)
def test_a_stream_whose_first_writes_are_too_short_to_tell_is_relayed_and_billed(
    gateway: Gateway, sandbox: Sandbox, opening: bytes, cuts: list[int]
) -> None:
    """The first bytes are judged once they show what the stream is, not by its first read."""
    raw = opening + fixture_path("upstream", "responses-text.sse").read_bytes()
    with writing(gateway, sandbox, cut_at(raw, cuts)) as key:
        received, request_id = read_stream(gateway, key)
        row = gateway.usage_row(request_id)

    assert b"".join(received) == raw
    assert row["status"] == "completed"
    assert [(a["outcome"], a["error"]) for a in row["attempts"]] == [("ok", None)]
    assert (row["input_tokens"], row["output_tokens"]) == (TEXT_USAGE[0], TEXT_USAGE[2])


# the event a stream ends inside: one with no name, and one named by its first line
UNFINISHED = [
    pytest.param(b'data: {"type":"response.output_text.delta","delta":"par', id="held"),
    pytest.param(b'event: response.output_text.delta\ndata: {"delta":"par', id="named"),
]


@pytest.mark.parametrize("unfinished", UNFINISHED)
def test_the_error_after_a_stream_that_ends_inside_an_event_is_an_event_of_its_own(
    gateway: Gateway, sandbox: Sandbox, unfinished: bytes
) -> None:
    opening = b"".join(sse(CREATED))
    with writing(gateway, sandbox, [opening, unfinished]) as key:
        received = b"".join(stream_raw(gateway, key))

    missing = error_event("stream_incomplete", MISSING_TERMINAL_MESSAGE)
    assert received == opening + unfinished + b"\n\n" + missing
    assert parse_events(received)[-1]["code"] == "stream_incomplete"


async def test_a_stream_that_opens_with_blank_lines_past_the_limit_is_no_stream() -> None:
    async def blank_lines() -> AsyncIterator[bytes]:
        while True:
            yield b"\r\n" * 512

    with pytest.raises(UpstreamProtocolError) as refused:
        await asyncio.wait_for(_first_chunk(blank_lines()), 10)
    assert refused.value.kind == "garbage"


async def test_blank_lines_within_the_limit_before_the_first_field_are_a_stream() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"\n" * 4000, b"ev", b"ent: x\ndata: {}\n\n"):
            yield piece

    assert await _first_chunk(pieces()) == b"\n" * 4000 + b"event: x\ndata: {}\n\n"


@pytest.mark.parametrize(("path", "stream", "streamed"), FAILED_ANSWERS)
def test_credentials_a_failed_response_quotes_reach_neither_the_client_nor_the_row(
    gateway: Gateway, sandbox: Sandbox, path: str, stream: bool, streamed: bool
) -> None:
    if streamed:
        created = {**FAILED, "status": "in_progress", "error": None}
        answer = LoopbackUpstream(
            events=sse(
                {"type": "response.created", "response": created},
                {"type": "response.failed", "response": FAILED},
            )
        )
    else:
        answer = LoopbackUpstream(body=FAILED)
    with serving(answer) as upstream:
        fresh_accounts(gateway, sandbox, [{"base_url": upstream.base_url, "api_key": ACCOUNT_KEY}])
        _, key = gateway.new_user("10")
        body = CHAT if path.endswith("completions") else BODY
        response = httpx.post(
            gateway.url + path,
            json={**body, "stream": stream},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    row = gateway.usage_row(response.headers["x-request-id"])
    assert f"server_error: {QUOTED_REDACTED}" in row["error"]
    assert "UPSTREAMSECRET" not in json.dumps(row) and ACCOUNT_KEY not in json.dumps(row)
    assert response.status_code == (502 if path.endswith("completions") and not stream else 200)
    assert QUOTED_REDACTED in response.text
    assert "UPSTREAMSECRET" not in response.text and ACCOUNT_KEY not in response.text
