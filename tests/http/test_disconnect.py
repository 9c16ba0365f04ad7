"""Clients that leave mid-stream: exactly one usage row each, under either policy.

A raw socket client reads a paced `responses-text` stream up to each event position in turn
and hangs up. With `finish` the gateway reads the upstream to its end and bills the real
usage; with `cancel` it drops the upstream at once and bills its estimate. Either way every
request has one row marked `client_disconnected`, and the balance is the sum of the rows. A
client that hangs up while waiting for one JSON answer (or for a chat stream made from one)
is marked the same, and billed the answer's usage under either policy.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import Gateway, Sandbox, estimated_counts, fixture_path
from tests.http.test_responses import expected_cost, transcript_events
from tests.upstream.pool_helpers import (
    CHAT,
    PROMPT,
    LoopbackUpstream,
    fresh_accounts,
    pool_gateway,
    serving,
)

EVENTS = transcript_events("responses-text")
RAW_EVENTS = fixture_path("upstream", "responses-text.sse").read_bytes().split(b"\n\n")


@pytest.fixture(
    scope="module",
    params=[
        ("sqlite", "finish"),
        ("postgresql", "finish"),
        ("sqlite", "cancel"),
        ("postgresql", "cancel"),
    ],
    ids=lambda param: "-".join(param),
)
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    backend, policy = request.param
    request.param = backend
    yield from pool_gateway(backend, tmp_path_factory, {"CODEX_GATEWAY_DISCONNECT_POLICY": policy})


# What a streamed request sends, by route.
STREAMED = {
    "/v1/responses": {"model": "gpt-5.1-codex", "input": PROMPT, "stream": True},
    "/v1/chat/completions": {**CHAT, "stream": True},
}


def read_then_hang_up(
    gateway: Gateway, key: str, events: int, pipelined: bytes = b"", path: str = "/v1/responses"
) -> tuple[str, int]:
    """Stream a request to `path` (with `pipelined` sent right behind it), read `events`
    events, close the socket; (request id, bytes read)."""
    body = json.dumps(STREAMED[path]).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "x-sandbox-delay-ms: 20\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body + pipelined)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        headers, streamed = received.split(b"\r\n\r\n", 1)
        while streamed.count(b"\n\n") < events:
            chunk = sock.recv(65536)
            if not chunk:
                break
            streamed += chunk
    request_id = next(
        line.split(b":", 1)[1].strip().decode()
        for line in headers.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    return request_id, len(streamed)


def rows_for(gateway: Gateway, user: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        rows = list(gateway.cli_json("usage", "list", "--user", user, "--limit", "1000"))
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def test_a_client_leaving_at_any_event_leaves_exactly_one_row(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    policy = gateway.env["CODEX_GATEWAY_DISCONNECT_POLICY"]
    fresh_accounts(gateway, sandbox, [{}])
    user, key = gateway.new_user("10")
    left_at = {}
    for position in range(len(EVENTS)):
        request_id, _ = read_then_hang_up(gateway, key, position)
        left_at[request_id] = position
    rows = rows_for(gateway, user, len(left_at))
    time.sleep(1)  # a second row would have been written by now
    rows = rows_for(gateway, user, len(left_at))
    assert sorted(row["request_id"] for row in rows) == sorted(left_at)
    total = sum(Decimal(row["cost_usd"]) for row in rows)
    assert Decimal(gateway.balance(user)) == Decimal(10) - total
    for row in rows:
        position = left_at[row["request_id"]]
        check_row(row, policy, position)


def test_a_client_leaving_a_stream_with_a_request_pipelined_behind_it_leaves_one_row(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    """The server is told of the hang-up by the newest request it parsed, the pipelined one
    that never started; the stream being answered must learn of it all the same."""
    policy = gateway.env["CODEX_GATEWAY_DISCONNECT_POLICY"]
    fresh_accounts(gateway, sandbox, [{}])
    user, key = gateway.new_user("10")
    behind = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"

    request_id, _ = read_then_hang_up(gateway, key, 3, behind.encode())

    rows = rows_for(gateway, user, 1)
    time.sleep(1)  # a second row would have been written by now
    rows = rows_for(gateway, user, 1)
    assert [row["request_id"] for row in rows] == [request_id]
    assert "gateway_error" not in rows[0]["flags"]
    check_row(rows[0], policy, 3)
    assert Decimal(gateway.balance(user)) == Decimal(10) - Decimal(rows[0]["cost_usd"])


def check_row(row: dict[str, Any], policy: str, position: int) -> None:
    # The gateway counts the bytes it handed on: at least what this client read before leaving.
    assert row["client_bytes"] >= sum(len(event) + 2 for event in RAW_EVENTS[:position])
    if position < len(EVENTS) - 1:
        assert "client_disconnected" in row["flags"]
    if policy == "finish":
        # Read to the end: the real usage is billed.
        assert row["status"] == "completed"
        assert Decimal(row["cost_usd"]) == expected_cost((1252, 0, 11273, 10944))
        return
    if row["status"] == "completed":  # the stream ended before the hang-up was noticed
        assert position >= len(EVENTS) - 2
        return
    assert row["status"] == "client_disconnected"
    assert "estimated" in row["flags"]
    full = estimated_counts(PROMPT, EVENTS)
    assert row["input_tokens"] == full[0]
    assert row["output_tokens"] <= full[2]
    assert Decimal(row["cost_usd"]) > 0


def hang_up_on_chat(gateway: Gateway, key: str) -> str:
    """A chat stream read to its first chunk, then the socket closed; the request id."""
    body = json.dumps(
        {
            "model": "gpt-5.1-codex",
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
        }
    ).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "x-sandbox-delay-ms: 50\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        received = b""
        while b"data:" not in received:
            received += sock.recv(65536)
    headers = received.split(b"\r\n\r\n", 1)[0]
    return next(
        line.split(b":", 1)[1].strip().decode()
        for line in headers.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )


def test_a_chat_client_leaving_mid_stream_leaves_one_marked_row(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    policy = gateway.env["CODEX_GATEWAY_DISCONNECT_POLICY"]
    fresh_accounts(gateway, sandbox, [{}])
    user, key = gateway.new_user("10")
    request_id = hang_up_on_chat(gateway, key)
    (row,) = rows_for(gateway, user, 1)
    time.sleep(1)  # a second row would have been written by now
    assert [r["request_id"] for r in rows_for(gateway, user, 1)] == [request_id]
    assert "client_disconnected" in row["flags"]
    assert row["endpoint"] == "chat.completions"
    if policy == "finish":
        assert row["status"] == "completed"
        assert Decimal(row["cost_usd"]) == expected_cost((1252, 0, 11273, 10944))
    else:
        assert row["status"] == "client_disconnected"
        assert "estimated" in row["flags"]
    assert Decimal(gateway.balance(user)) == Decimal(10) - Decimal(row["cost_usd"])


def send_then_hang_up(
    gateway: Gateway, sandbox: Sandbox, key: str, path: str, body: dict[str, Any], fault: str
) -> None:
    """Send a request whose answer the sandbox holds back a little, wait until it reached
    the sandbox (a client closing at once takes its unread body with it), and close the
    socket without reading a byte of the answer."""
    raw = json.dumps(body).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
        f"x-sandbox-delay-ms: 500\r\nx-sandbox-fault: {fault}\r\n\r\n"
    ).encode()
    sandbox.clear()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        # The head first, as a client writing a large body sends it: the gateway then waits
        # for the body, which the server reads past its 64 KiB limit in one go.
        sock.sendall(head)
        time.sleep(0.1)
        sock.sendall(raw)
        deadline = time.monotonic() + 10
        while not sandbox.requests() and time.monotonic() < deadline:
            time.sleep(0.02)


WHOLE_ANSWERS = [
    # one JSON answer asked for
    ("/v1/responses", {"model": "gpt-5.1-codex", "input": PROMPT}, ""),
    # a body the server reads in one go past the 64 KiB it buffers before it stops reading
    # the connection (it reads at most about 128 KB at a time)
    ("/v1/responses", {"model": "gpt-5.1-codex", "input": "word " * 20_000}, ""),
    ("/v1/chat/completions", CHAT, ""),
    # a chat stream asked for, the upstream answering with the whole response object
    ("/v1/chat/completions", {**CHAT, "stream": True}, "json"),
]


@pytest.mark.parametrize(
    ("path", "body", "fault"),
    WHOLE_ANSWERS,
    ids=["responses", "responses-100k-body", "chat", "chat-stream-of-json"],
)
def test_a_client_leaving_before_its_whole_answer_is_billed_and_marked_as_gone(
    gateway: Gateway, sandbox: Sandbox, path: str, body: dict[str, Any], fault: str
) -> None:
    """Under either policy the upstream's answer is awaited and billed at its usage; the
    row keeps the answer's status and says the client never got it."""
    fresh_accounts(gateway, sandbox, [{}])
    user, key = gateway.new_user("10")

    send_then_hang_up(gateway, sandbox, key, path, body, fault)

    (row,) = rows_for(gateway, user, 1)
    time.sleep(1)  # a second row would have been written by now
    assert len(rows_for(gateway, user, 1)) == 1
    assert row["status"] == "completed"
    assert "client_disconnected" in row["flags"] and "estimated" not in row["flags"]
    assert row["client_bytes"] == 0
    assert Decimal(row["cost_usd"]) == expected_cost((1252, 0, 11273, 10944))
    assert Decimal(gateway.balance(user)) == Decimal(10) - Decimal(row["cost_usd"])


@pytest.fixture
def lingering_upstream() -> Iterator[LoopbackUpstream]:
    """`responses-text` streamed an event every 5 ms, held open 0.3 s after its last."""
    events = [block + b"\n\n" for block in RAW_EVENTS if block.strip()]
    with serving(LoopbackUpstream(events=events, pace=0.005, linger=0.3)) as server:
        yield server


def read_chat_to_done_and_hang_up(gateway: Gateway, key: str) -> tuple[str, bytes]:
    """A chat stream read up to its `data: [DONE]`, then the socket closed at once, as the
    openai SDK does; (request id, what was read)."""
    body = json.dumps({**CHAT, "stream": True}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        received = b""
        while b"data: [DONE]" not in received:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended before [DONE]"
            received += chunk
    headers, streamed = received.split(b"\r\n\r\n", 1)
    request_id = next(
        line.split(b":", 1)[1].strip().decode()
        for line in headers.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    return request_id, streamed


def test_a_chat_client_that_leaves_after_done_is_not_marked_as_gone(
    gateway: Gateway, sandbox: Sandbox, lingering_upstream: LoopbackUpstream
) -> None:
    """The chat stream's `[DONE]` goes out with the upstream's final event; a client that
    closes once it has it got its whole answer, however long the upstream takes to close."""
    fresh_accounts(gateway, sandbox, [{"base_url": lingering_upstream.base_url}])
    user, key = gateway.new_user("10")

    served = [read_chat_to_done_and_hang_up(gateway, key) for _ in range(3)]

    rows = {row["request_id"]: row for row in rows_for(gateway, user, len(served))}
    for request_id, streamed in served:
        row = rows[request_id]
        assert row["status"] == "completed"
        assert "client_disconnected" not in row["flags"]
        # everything up to [DONE], less the chunked framing around it
        assert len(streamed) > row["client_bytes"] > len(streamed) * 0.9
        assert Decimal(row["cost_usd"]) == expected_cost((1252, 0, 11273, 10944))
