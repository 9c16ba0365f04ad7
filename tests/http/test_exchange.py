"""Request ids: the shape clients and the usage rows see, unique across worker processes; a
request body is read only when it is not compressed; a chunk whose send was cut is kept; a
client leaving is noticed from the moment its body was read."""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import pytest

from codex_gateway.errors import UnsupportedEncoding
from codex_gateway.http.exchange import Exchange, RequestIds


def test_a_request_id_is_req_and_128_bits_in_hex() -> None:
    new_request_id = RequestIds()
    ids = [new_request_id() for _ in range(10_000)]

    assert all(re.fullmatch(r"req_[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)


def test_request_ids_sort_in_the_order_they_were_made() -> None:
    """Ids begin with the time in milliseconds, so the indexes on them grow at one end."""
    new_request_id = RequestIds()
    before = time.time_ns() // 1_000_000
    first = new_request_id()
    time.sleep(0.002)
    second = new_request_id()
    after = time.time_ns() // 1_000_000

    assert first < second
    assert before <= int(first[4:16], 16) <= int(second[4:16], 16) <= after


def test_a_forked_worker_does_not_repeat_the_ids_of_its_parent() -> None:
    new_request_id = RequestIds()
    new_request_id()  # the parent's batch of random bytes exists before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, then exit at once
        os.write(write_end, " ".join(new_request_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode().split()

    parent = [new_request_id() for _ in range(5)]

    assert len(child) == 5
    # The random parts: ids of different milliseconds would differ in any case.
    assert not {i[16:] for i in child} & {i[16:] for i in parent}


def exchange_with(headers: list[tuple[bytes, bytes]], body: bytes) -> Exchange:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent while the body is read")

    scope = {"type": "http", "method": "POST", "path": "/v1/responses", "headers": headers}
    return Exchange(scope, receive, send, "req_test")


# Content-Encoding values a body is read under, and those it is refused under
@pytest.mark.parametrize("encoding", [None, b"identity", b" Identity ", b""])
async def test_an_uncompressed_body_is_read(encoding: bytes | None) -> None:
    headers = [] if encoding is None else [(b"content-encoding", encoding)]

    assert await exchange_with(headers, b"{}").body(100) == b"{}"


@pytest.mark.parametrize("encoding", [b"gzip", b"br", b"deflate, gzip", b"x-gzip"])
async def test_a_compressed_body_is_refused_by_its_header(encoding: bytes) -> None:
    exchange = exchange_with([(b"content-encoding", encoding)], b"\x1f\x8b\x08\x00")

    with pytest.raises(UnsupportedEncoding) as caught:
        await exchange.body(100)

    assert caught.value.status == 415
    assert encoding.decode() in caught.value.message
    assert "does not accept compressed request bodies" in caught.value.message


async def test_a_chunk_whose_send_was_cancelled_is_kept_as_unsent() -> None:
    """The server's send waits for a slow client before writing; a chunk cut there never left,
    and whoever ends the stream must still send it."""
    client_reads = asyncio.Event()
    sent: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        await client_reads.wait()
        sent.append(message["body"])

    scope: dict[str, Any] = {"method": "POST", "path": "/v1/responses", "headers": []}
    exchange = Exchange(scope, receive, send, "req_test")
    writing = asyncio.create_task(exchange.write(b"event: response.completed\n\n"))
    await asyncio.sleep(0)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing

    assert exchange.unsent == b"event: response.completed\n\n"
    assert exchange.bytes_sent == 0
    client_reads.set()
    await exchange.write(b"data: 1\n\n")
    assert (exchange.unsent, exchange.bytes_sent, sent) == (b"", 9, [b"data: 1\n\n"])


async def test_a_client_that_left_while_the_upstream_worked_is_acted_on_once_it_answered() -> None:
    """The relay watches from the moment the body is read; a stream names what to do about
    a client leaving only once its upstream answered, and it is done then if the client
    had already gone, and only once."""
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    scope: dict[str, Any] = {"method": "POST", "path": "/v1/responses", "headers": []}
    exchange = Exchange(scope, receive, send, "req_test")
    exchange.watch_disconnect()
    gone.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert exchange.disconnected

    acted: list[str] = []
    exchange.watch_disconnect(lambda: acted.append("close the upstream"))
    for _ in range(3):
        await asyncio.sleep(0)
    exchange.stop_watching()

    assert acted == ["close the upstream"]
