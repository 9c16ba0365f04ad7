"""The upstream client turns every transport failure into a gateway error with no secrets."""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from codex_gateway.coalescer import Holder, WriteCoalescer
from codex_gateway.errors import (
    DeadlinePassed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
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
    upstream = UpstreamClient(connect_timeout=2, read_timeout=2, pool_size=4, keepalive=60)
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


class KeepAliveServer:
    """A loopback server that answers request after request on one connection, in turn from
    `replies`, each `delay` seconds after its request, then stays silent until the client
    hangs up."""

    def __init__(self, replies: list[bytes], delay: float = 0.0):
        self.replies = replies
        self.delay = delay
        self.seen: list[bytes] = []
        self.connections = 0
        # Connections the client closed once it had its answers.
        self.hung_up = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> KeepAliveServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/responses"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.append(task)
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.seen.append(head + await reader.readexactly(length))
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(self.replies.pop(0))
                await writer.drain()
            await reader.read()
            self.hung_up += 1
        except asyncio.IncompleteReadError:
            self.hung_up += 1
        except ConnectionError:
            pass
        finally:
            writer.close()


OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def test_requests_reuse_one_keep_alive_connection(client: UpstreamClient) -> None:
    async with KeepAliveServer([OK_JSON] * 3) as server:
        for _ in range(3):
            response = await client.post(server.url, {"x-test": "1"}, b'{"a":1}')
            assert response.status == 200
            assert response.headers["CONTENT-TYPE"] == "application/json"
            assert response.content_type == "application/json"
            assert await response.read() == b"{}"
            response.release()
        await client.close()
    assert server.connections == 1
    assert server.seen[0].startswith(b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"\r\nx-test: 1\r\ncontent-length: 7\r\n\r\n" in server.seen[0]


class CountingCoalescer(WriteCoalescer):
    """A coalescer that counts the writes it was asked to hold."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0

    def hold(self, holder: Holder) -> None:
        self.held += 1
        super().hold(holder)


async def test_a_request_of_a_busy_turn_goes_out_when_the_next_turn_starts() -> None:
    coalescer = CountingCoalescer()
    client = UpstreamClient(
        connect_timeout=2, read_timeout=2, pool_size=4, keepalive=60, coalescer=coalescer
    )
    async with KeepAliveServer([OK_JSON] * 2) as server:
        first = await client.post(server.url, {}, b"{}")  # the first write of its turn
        await first.read()
        first.release()
        assert coalescer.held == 0

        assert coalescer.may_write_now()  # an answer to a client went out at once this turn
        second = await client.post(server.url, {}, b'{"n":2}')

        assert coalescer.held == 1
        assert second.status == 200
        assert await second.read() == b"{}"
        second.release()
        await client.close()
    assert server.connections == 1
    assert server.seen[1].endswith(b'\r\n\r\n{"n":2}')


async def _ok(client: UpstreamClient, url: str) -> None:
    response = await client.post(url, {}, b"{}")
    assert await response.read() == b"{}"
    response.release()


async def _until(condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


async def test_a_connection_idle_past_the_keepalive_is_closed_not_reused() -> None:
    client = UpstreamClient(connect_timeout=2, read_timeout=2, pool_size=4, keepalive=0.5)
    async with KeepAliveServer([OK_JSON] * 3) as server:
        await _ok(client, server.url)
        await _ok(client, server.url)  # at once: the same connection
        assert (server.connections, server.hung_up) == (1, 0)

        await asyncio.sleep(0.5)
        await _until(lambda: server.hung_up == 1)  # closed with no request to prompt it
        await _ok(client, server.url)

        assert server.connections == 2
        await client.close()


async def _burst(client: UpstreamClient, server: KeepAliveServer, size: int) -> None:
    """`size` requests at once, so on as many connections, all kept once answered."""
    responses = [await client.post(server.url, {}, b"{}") for _ in range(size)]
    for response in responses:
        assert await response.read() == b"{}"
        response.release()
    assert server.connections == size


async def test_the_connections_of_a_burst_are_closed_once_idle_past_the_keepalive() -> None:
    client = UpstreamClient(connect_timeout=2, read_timeout=2, pool_size=8, keepalive=1.0)
    async with KeepAliveServer([OK_JSON] * 3) as server:
        await _burst(client, server, 3)
        assert server.hung_up == 0

        await _until(lambda: server.hung_up == 3)
        await client.close()


async def test_connections_a_burst_left_over_are_closed_while_one_stays_in_use() -> None:
    client = UpstreamClient(connect_timeout=2, read_timeout=2, pool_size=8, keepalive=1.0)
    async with KeepAliveServer([OK_JSON] * 20) as server:
        await _burst(client, server, 3)
        for _ in range(6):  # then one at a time, for longer than the keepalive
            await asyncio.sleep(0.25)
            await _ok(client, server.url)

        assert server.connections == 3  # the newest kept serving
        await _until(lambda: server.hung_up == 2)
        await client.close()


async def test_a_connection_released_after_the_client_closed_is_not_kept() -> None:
    client = UpstreamClient(connect_timeout=2, read_timeout=2, pool_size=4, keepalive=60)
    async with KeepAliveServer([OK_JSON]) as server:
        response = await client.post(server.url, {}, b"{}")
        await client.close()
        assert await response.read() == b"{}"
        response.release()

        await _until(lambda: server.hung_up == 1)


async def test_a_stream_arrives_chunk_by_chunk(client: UpstreamClient) -> None:
    reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        b"6\r\ndata: \r\n3\r\n1\n\n\r\n0\r\n\r\n"
    )
    async with KeepAliveServer([reply]) as server:
        response = await client.post(server.url, {}, b"{}")
        assert response.content_type == "text/event-stream"
        assert b"".join([chunk async for chunk in response.chunks()]) == b"data: 1\n\n"
        response.release()
        await client.close()


async def test_bytes_that_came_can_be_taken_without_waiting_for_more(
    client: UpstreamClient,
) -> None:
    """What a relay cut by the shutdown still gets: the body so far, once, and no wait."""
    reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        b"6\r\ndata: \r\n3\r\n1\n\n\r\n"
    )
    async with KeepAliveServer([reply]) as server:
        response = await client.post(server.url, {}, b"{}")
        deadline = asyncio.get_running_loop().time() + 5
        taken = b""
        while taken != b"data: 1\n\n":  # the chunks come in their own time
            assert asyncio.get_running_loop().time() < deadline, taken
            await asyncio.sleep(0.01)
            taken += response.buffered()
        assert response.buffered() == b""
        response.close()
        await client.close()


async def test_a_connection_the_server_dropped_is_not_reused(client: UpstreamClient) -> None:
    # The first answer says the connection closes after it; the next request needs another.
    closing = OK_JSON.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
    async with KeepAliveServer([closing, OK_JSON]) as server:
        for _ in range(2):
            response = await client.post(server.url, {}, b"{}")
            assert await response.read() == b"{}"
            response.release()
        await client.close()
    assert server.connections == 2


async def test_an_upstream_that_goes_silent_is_an_idle_timeout() -> None:
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n"
    upstream = UpstreamClient(connect_timeout=2, read_timeout=0.3, pool_size=4, keepalive=60)
    async with KeepAliveServer([reply]) as server:
        response = await upstream.post(server.url, {}, b"{}")
        with pytest.raises(UpstreamTimeout) as caught:
            await response.read()
        assert caught.value.kind == "timeout_idle"
        response.close()


async def test_a_reused_connection_that_goes_silent_times_out_counted_from_its_own_request() -> (
    None
):
    """The read timer set for a connection's first request is still set when the second is
    sent: it must fire for the second, and not before that request's own time is up."""
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n"
    upstream = UpstreamClient(connect_timeout=2, read_timeout=0.4, pool_size=4, keepalive=60)
    loop = asyncio.get_running_loop()
    async with KeepAliveServer([OK_JSON, reply]) as server:
        await _ok(upstream, server.url)
        await asyncio.sleep(0.25)  # the first request's timer is now due in 0.15 s
        sent = loop.time()
        second = await upstream.post(server.url, {}, b"{}")
        with pytest.raises(UpstreamTimeout) as caught:
            await asyncio.wait_for(second.read(), 3)  # a timer that never fires fails here
        waited = loop.time() - sent
        second.close()
        await upstream.close()
    assert server.connections == 1
    assert caught.value.kind == "timeout_idle"
    assert 0.35 <= waited < 2


SILENT_STREAM = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n"


async def test_a_head_that_does_not_come_in_the_time_given_fails_the_request() -> None:
    upstream = UpstreamClient(connect_timeout=2, read_timeout=5, pool_size=4, keepalive=60)
    loop = asyncio.get_running_loop()
    async with KeepAliveServer([]) as server:  # reads the request, never answers
        sent = loop.time()
        with pytest.raises(DeadlinePassed):
            await asyncio.wait_for(upstream.post(server.url, {}, b"{}", 0.3), 3)
        waited = loop.time() - sent
        await _until(lambda: server.hung_up == 1)  # the connection is not kept
        await upstream.close()
    assert 0.25 <= waited < 2


async def test_the_time_given_holds_on_a_connection_whose_timer_was_set_for_later() -> None:
    """A reused connection's timer, set by an earlier request for its read timeout, is due
    long after this request's own limit: the limit still fires on time."""
    upstream = UpstreamClient(connect_timeout=2, read_timeout=30, pool_size=4, keepalive=60)
    loop = asyncio.get_running_loop()
    async with KeepAliveServer([OK_JSON, SILENT_STREAM]) as server:
        await _ok(upstream, server.url)  # sets the timer for its read timeout
        sent = loop.time()
        second = await upstream.post(server.url, {}, b"{}", 0.3)  # its head comes at once
        with pytest.raises(DeadlinePassed):
            await asyncio.wait_for(second.read(), 3)
        waited = loop.time() - sent
        second.close()
        await upstream.close()
    assert server.connections == 1
    assert 0.25 <= waited < 2


async def test_a_response_let_go_of_its_limit_is_timed_by_the_read_timeout() -> None:
    upstream = UpstreamClient(connect_timeout=2, read_timeout=0.6, pool_size=4, keepalive=60)
    loop = asyncio.get_running_loop()
    async with KeepAliveServer([SILENT_STREAM]) as server:
        response = await upstream.post(server.url, {}, b"{}", 0.3)
        response.limit(math.inf)
        sent = loop.time()
        with pytest.raises(UpstreamTimeout) as caught:
            await asyncio.wait_for(response.read(), 3)
        waited = loop.time() - sent
        response.close()
        await upstream.close()
    assert caught.value.kind == "timeout_idle"  # not the limit of 0.3 s given at first
    assert 0.5 <= waited < 2


async def test_an_answer_slower_than_the_read_timeout_is_awaited_for_the_time_given() -> None:
    """The read timeout is for an upstream that falls silent mid-answer; one that takes its
    time before it answers has the time its caller gave it."""
    upstream = UpstreamClient(connect_timeout=2, read_timeout=0.3, pool_size=4, keepalive=60)
    async with KeepAliveServer([OK_JSON], delay=0.6) as server:
        response = await asyncio.wait_for(upstream.post(server.url, {}, b"{}", 2), 3)
        assert await response.read() == b"{}"
        response.release()
        await upstream.close()


async def test_a_wait_for_a_free_connection_counts_against_the_time_given() -> None:
    upstream = UpstreamClient(connect_timeout=2, read_timeout=5, pool_size=1, keepalive=60)
    async with KeepAliveServer([SILENT_STREAM, OK_JSON]) as server:
        busy = await upstream.post(server.url, {}, b"{}")  # holds the one connection
        with pytest.raises(DeadlinePassed):
            await asyncio.wait_for(upstream.post(server.url, {}, b"{}", 0.3), 3)
        busy.close()
        # The request that gave up holds no connection: the next one gets one.
        response = await asyncio.wait_for(upstream.post(server.url, {}, b"{}", 2), 3)
        assert await response.read() == b"{}"
        response.release()
        await upstream.close()


async def test_a_request_given_no_time_is_never_sent(client: UpstreamClient) -> None:
    async with KeepAliveServer([OK_JSON, OK_JSON]) as server:
        with pytest.raises(DeadlinePassed):
            await client.post(server.url, {}, b"{}", 0)
        assert server.connections == 0  # not even connected
        await _ok(client, server.url)
        with pytest.raises(DeadlinePassed):  # nor sent on the connection kept idle
            await client.post(server.url, {}, b"{}", 0)
        await _ok(client, server.url)
        await client.close()
    assert server.connections == 1
    assert len(server.seen) == 2


async def test_a_response_whose_limit_passed_says_so_when_given_another() -> None:
    """A limit can pass in the turn that brought the bytes its caller goes on to read; the
    caller learns it when it moves the limit, not later from the rest of the answer."""
    upstream = UpstreamClient(connect_timeout=2, read_timeout=5, pool_size=4, keepalive=60)
    async with KeepAliveServer([SILENT_STREAM]) as server:
        response = await upstream.post(server.url, {}, b"{}", 0.2)
        await asyncio.sleep(0.5)
        with pytest.raises(DeadlinePassed):
            response.limit(math.inf)
        response.close()
        await upstream.close()


async def test_a_header_with_a_line_break_is_never_sent(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamProtocolError) as caught:
        await client.post(
            "http://127.0.0.1:9/v1/responses", {"x-a": f"1\r\nauthorization: {SECRET}"}, b"{}"
        )
    assert SECRET not in f"{caught.value.message} {caught.value.detail}"


async def test_https_upstreams_are_reached_over_tls(tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificate, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(OK_JSON)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(certificate))
    upstream = UpstreamClient(
        connect_timeout=2, read_timeout=2, pool_size=4, keepalive=60, ssl_context=trusting
    )
    try:
        response = await upstream.post(f"https://localhost:{port}/v1/responses", {}, b"{}")
        assert response.status == 200
        assert await response.read() == b"{}"
        response.release()
        # The system's trust store does not know this certificate: the handshake fails.
        untrusting = UpstreamClient(connect_timeout=2, read_timeout=2, pool_size=4, keepalive=60)
        with pytest.raises(UpstreamConnectError) as caught:
            await untrusting.post(f"https://localhost:{port}/v1/responses", {}, b"{}")
        assert "TLS" in (caught.value.detail or "")
        await untrusting.close()
    finally:
        await upstream.close()
        server.close()
        await server.wait_closed()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost signed by its own key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
