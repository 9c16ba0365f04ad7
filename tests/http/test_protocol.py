"""The server protocol sends a response's head together with its first body bytes, and the
writes of a busy turn of the event loop together when the next turn starts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from codex_gateway.coalescer import WriteCoalescer
from codex_gateway.http.protocol import (
    HOLD_LIMIT,
    CoalescingProtocol,
    HeadHoldingTransport,
    on_client_lost,
    request_cycle,
)

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recording:
    """A transport that keeps what it was asked to write, one entry a write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.calls = 0  # each write or writelines is one system call on a real transport
        self.closed = False

    def write(self, data: bytes) -> None:
        self.calls += 1
        self.writes.append(data)

    def writelines(self, lines: list[bytes]) -> None:
        self.calls += 1
        self.writes.append(b"".join(lines))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _holding(
    coalescer: WriteCoalescer | None = None,
) -> tuple[HeadHoldingTransport, Recording]:
    inner = Recording()
    holding = HeadHoldingTransport(inner, coalescer or WriteCoalescer())  # type: ignore[arg-type]
    return holding, inner


async def test_a_head_and_its_body_go_out_in_one_write() -> None:
    transport, inner = _holding()

    transport.write(HEAD)
    assert inner.writes == []
    transport.write(b"{}")

    assert inner.writes == [HEAD + b"{}"]
    assert inner.calls == 1
    await asyncio.sleep(0)  # the flush scheduled for the head finds nothing left
    assert inner.writes == [HEAD + b"{}"]


async def test_a_head_without_a_body_yet_goes_out_on_the_next_turn_of_the_loop() -> None:
    transport, inner = _holding()

    transport.write(HEAD)
    await asyncio.sleep(0)

    assert inner.writes == [HEAD]
    transport.write(b"{}")
    assert inner.writes == [HEAD, b"{}"]


async def test_an_interim_answer_is_not_held_for_a_body() -> None:
    transport, inner = _holding()

    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    assert inner.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]


async def test_body_bytes_that_read_like_a_status_line_are_not_held_for_more() -> None:
    transport, inner = _holding()

    transport.write(b"HTTP/1.1 is only text here")

    assert inner.writes == [b"HTTP/1.1 is only text here"]


async def test_an_empty_body_sends_its_held_head_at_once() -> None:
    transport, inner = _holding()

    transport.write(HEAD)
    transport.write(b"")

    assert inner.writes == [HEAD]


async def test_an_empty_write_leaves_the_turns_first_write_to_a_real_one() -> None:
    coalescer = WriteCoalescer()
    transport, inner = _holding(coalescer)

    transport.write(b"")

    assert inner.calls == 0
    assert coalescer.may_write_now()


async def test_one_write_past_the_limit_goes_out_at_once_even_in_a_busy_turn() -> None:
    coalescer = WriteCoalescer()
    assert coalescer.may_write_now()  # another answer went out at once in this turn
    transport, inner = _holding(coalescer)
    large = b"x" * (HOLD_LIMIT + 1)

    transport.write(large)

    assert inner.writes == [large]


async def test_in_a_busy_turn_a_body_waits_with_its_head_for_the_next_turn() -> None:
    coalescer = WriteCoalescer()
    first, first_inner = _holding(coalescer)
    second, second_inner = _holding(coalescer)
    first.write(b"event one")  # the first write of the turn goes out at once

    second.write(HEAD)
    second.write(b"{}")
    first.write(b"event two")
    assert second_inner.writes == []
    assert first_inner.writes == [b"event one"]
    await asyncio.sleep(0)

    assert second_inner.writes == [HEAD + b"{}"]
    assert second_inner.calls == 1
    assert first_inner.writes == [b"event one", b"event two"]


async def test_held_bytes_past_the_limit_go_out_at_once_in_order() -> None:
    coalescer = WriteCoalescer()
    assert coalescer.may_write_now()  # another answer went out at once in this turn
    transport, inner = _holding(coalescer)
    part = b"x" * (HOLD_LIMIT // 2)

    transport.write(b"event one")
    transport.write(part)
    assert inner.writes == []
    transport.write(part)

    assert inner.writes == [b"event one" + part + part]
    transport.write(b"event two")
    await asyncio.sleep(0)
    assert inner.writes == [b"event one" + part + part, b"event two"]


def test_the_protocol_class_itself_is_refused_for_want_of_a_coalescer() -> None:
    protocol = CoalescingProtocol.__new__(CoalescingProtocol)

    with pytest.raises(TypeError, match="through"):
        protocol.connection_made(Recording())  # type: ignore[arg-type]


async def test_closing_sends_a_held_head_first() -> None:
    transport, inner = _holding()

    transport.write(HEAD)
    transport.close()

    assert inner.writes == [HEAD]
    assert inner.closed


# What `/long` saw: whether the server told it the client had gone, and any error of a write.
SEEN: dict[str, Any] = {}


async def _long(receive: Any, send: Any) -> None:
    """A stream that goes on until the server says the client has gone (or 2 s pass)."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watching = asyncio.create_task(watch())
    await send({"type": "http.response.start", "status": 200, "headers": []})
    try:
        for _ in range(200):
            if gone.is_set():
                break
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception as exc:
        SEEN["error"] = exc
    SEEN["gone"] = gone.is_set()
    watching.cancel()


async def _told(send: Any) -> None:
    """A stream that goes on until the connection tells it that the client has gone."""
    gone = asyncio.Event()
    cycle = request_cycle(send)
    SEEN["asked"] = cycle is not None and on_client_lost(cycle, gone.set)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(200):
        if gone.is_set():
            break
        await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
        await asyncio.sleep(0.01)
    SEEN["gone"] = gone.is_set()


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["path"] == "/long":
        await _long(receive, send)
        return
    if scope["path"] == "/told":
        await _told(send)
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/empty":  # no body, and no framing header
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two"):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def running() -> AsyncIterator[uvicorn.Server]:
    config = uvicorn.Config(
        _app,
        host="127.0.0.1",
        port=0,
        http=CoalescingProtocol.through(WriteCoalescer()),
        lifespan="off",
        log_config=None,
    )
    running = uvicorn.Server(config)
    serving = asyncio.create_task(running.serve())
    while not running.started:
        assert not serving.done(), "the server did not start"
        await asyncio.sleep(0.01)
    yield running
    running.should_exit = True
    await serving


@pytest.fixture
def server(running: uvicorn.Server) -> int:
    port: int = running.servers[0].sockets[0].getsockname()[1]
    return port


async def _exchange(port: int, request: bytes, until: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = b""
    while until not in answer:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, f"the connection closed after {answer!r}"
        answer += chunk
    writer.close()
    return answer


async def test_answers_on_one_connection_come_whole_and_in_order(
    running: uvicorn.Server, server: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    answers = b""
    for body in (b"first", b"second"):
        writer.write(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
            % (
                len(body),
                body,
            )
        )
        while not answers.endswith(body):
            answers += await asyncio.wait_for(reader.read(65536), 5)
    connections = list(running.server_state.connections)
    writer.close()

    assert [type(c.transport) for c in connections] == [HeadHoldingTransport]  # type: ignore[attr-defined]
    assert all(isinstance(c, CoalescingProtocol) for c in connections)
    assert answers.count(b"HTTP/1.1 200 OK") == 2
    assert answers.index(b"first") < answers.index(b"second")


async def test_a_streamed_answer_keeps_its_order_and_chunking(server: int) -> None:
    answer = await _exchange(server, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n", b"0\r\n\r\n")

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding: chunked" in head
    assert body == b"4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n"


async def _until_closed(port: int, request: bytes) -> bytes:
    """Send `request` and read the answer until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_an_http_1_0_client_gets_a_stream_unchunked_and_ended_by_the_close(
    server: int,
) -> None:
    answer = await _until_closed(server, b"GET /stream HTTP/1.0\r\n\r\n")

    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head
    assert b"connection: close" in head
    assert body == b"one two"


async def test_an_http_1_0_client_gets_an_answer_of_known_length_as_it_is(server: int) -> None:
    answer = await _until_closed(server, b"POST /echo HTTP/1.0\r\ncontent-length: 4\r\n\r\nping")

    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-length: 4" in head
    assert b"transfer-encoding" not in head
    assert body == b"ping"


async def test_an_http_1_0_client_gets_an_answer_without_a_body_as_it_is(server: int) -> None:
    answer = await _until_closed(server, b"GET /empty HTTP/1.0\r\n\r\n")

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204 ")
    assert b"transfer-encoding" not in head
    assert body == b""


async def test_an_http_1_0_client_that_expects_100_continue_gets_only_the_answer(
    server: int,
) -> None:
    answer = await _until_closed(
        server,
        b"POST /echo HTTP/1.0\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\nping",
    )

    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"100 Continue" not in answer
    assert answer.endswith(b"\r\n\r\nping")


async def test_a_client_that_waits_for_100_continue_gets_it_before_sending_the_body(
    server: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.read(1024), 5)
    writer.write(b"ping")
    answer = b""
    while not answer.endswith(b"ping"):
        answer += await asyncio.wait_for(reader.read(1024), 5)
    writer.close()

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer.startswith(b"HTTP/1.1 200 OK")


async def test_a_head_is_dropped_when_the_connection_closed_before_its_turn() -> None:
    transport, inner = _holding()

    transport.write(HEAD)
    inner.closed = True  # the client reset the connection in the same turn of the loop
    await asyncio.sleep(0)

    assert inner.writes == []


async def test_a_pipelined_head_request_and_the_next_one_are_both_answered(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(
        b"HEAD /echo HTTP/1.1\r\nhost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nping"
    )
    answers = b""
    while not answers.endswith(b"ping"):
        answers += await asyncio.wait_for(reader.read(65536), 5)
    writer.close()

    first, _, second = answers.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert second.startswith(b"HTTP/1.1 200 OK")
    assert second.endswith(b"\r\n\r\nping")


async def _leave_after_a_tick(port: int, requests: bytes) -> None:
    """Send `requests`, hang up once the first tick came, and wait for the app to be done."""
    SEEN.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(requests)
    assert b"tick" in await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    for _ in range(300):
        if "gone" in SEEN:
            break
        await asyncio.sleep(0.01)


async def test_a_stream_whose_client_left_with_a_request_pipelined_behind_it_learns_so(
    server: int,
) -> None:
    await _leave_after_a_tick(
        server,
        b"GET /long HTTP/1.1\r\nhost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nping",
    )

    assert SEEN == {"gone": True}


async def test_a_request_that_asked_is_told_by_its_connection_when_the_client_leaves(
    server: int,
) -> None:
    await _leave_after_a_tick(server, b"GET /told HTTP/1.1\r\nhost: x\r\n\r\n")

    assert SEEN["asked"] is True
    assert SEEN["gone"] is True  # told, not run out of ticks


def test_a_request_that_lets_go_leaves_the_next_ones_watch_in_place() -> None:
    holding, _ = _holding()
    # Stand-ins for uvicorn's request cycles: only their transport is read.
    first = type("Cycle", (), {"transport": holding})()
    second = type("Cycle", (), {"transport": holding})()

    def told() -> None:
        pass

    assert on_client_lost(first, told)
    on_client_lost(second, told)
    on_client_lost(first, None)  # the first request's relay ends after the second began
    assert holding.client_lost == (second, told)

    on_client_lost(second, None)
    assert holding.client_lost is None


def test_a_request_not_served_through_the_protocol_is_not_told() -> None:
    cycle = type("Cycle", (), {"transport": Recording()})()

    assert on_client_lost(cycle, lambda: None) is False
