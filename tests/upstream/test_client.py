"""The upstream client turns every transport failure into a gateway error with no secrets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from codex_gateway.errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError
from codex_gateway.upstream.client import UpstreamClient

SECRET = "sk-upstream-secret-do-not-show-0001"


async def raw_server(reply: bytes) -> tuple[asyncio.Server, int]:
    """A loopback server that answers every connection with `reply`, then closes it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(connect_timeout=2, read_timeout=2, pool_size=4)
    yield upstream
    await upstream.close()


# what the upstream sends back, the error the gateway raises
BROKEN_REPLIES = [
    # not HTTP at all
    (b"garbage garbage garbage\r\n\r\n", UpstreamConnectError),
    # a status line that is not one
    (b"HTTP/1.1 abc\r\n\r\n", UpstreamConnectError),
    # a redirect: a relay never follows one with the account's credentials
    (
        b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:9/x\r\n"
        b"content-length: 0\r\n\r\n",
        None,
    ),
    # a body shorter than it said
    (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
        UpstreamProtocolError,
    ),
]


@pytest.mark.parametrize(("reply", "error"), BROKEN_REPLIES)
async def test_broken_upstream_replies_never_carry_the_credentials(
    client: UpstreamClient, reply: bytes, error: type[UpstreamError] | None
) -> None:
    server, port = await raw_server(reply)
    try:
        headers = {"authorization": f"Bearer {SECRET}", "content-type": "application/json"}
        url = f"http://127.0.0.1:{port}/v1/responses"
        if error is None:
            response = await client.post(url, headers, b"{}")
            assert response.status == 307
            response.release()
            return
        with pytest.raises(error) as caught:
            response = await client.post(url, headers, b"{}")
            try:
                await response.read(1 << 20)
            finally:
                response.release()
        text = f"{caught.value.message} {caught.value.detail} {caught.value!r}"
        assert SECRET not in text
        assert caught.value.message.endswith(".")
    finally:
        server.close()
        await server.wait_closed()


async def test_refused_connection_is_a_connect_error(client: UpstreamClient) -> None:
    server, port = await raw_server(b"")
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamConnectError) as caught:
        await client.post(f"http://127.0.0.1:{port}/v1/responses", {}, b"{}")
    assert caught.value.message == "Could not connect to the upstream."
    assert str(port) in (caught.value.detail or "")


async def test_a_body_over_the_limit_is_refused(client: UpstreamClient) -> None:
    body = b"x" * 5000
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + body
    server, port = await raw_server(reply)
    try:
        response = await client.post(f"http://127.0.0.1:{port}/v1/responses", {}, b"{}")
        with pytest.raises(UpstreamProtocolError):
            await response.read(1000)
        response.release()
    finally:
        server.close()
        await server.wait_closed()
