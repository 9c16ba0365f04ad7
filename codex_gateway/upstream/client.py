"""The one long-lived HTTP client every upstream call goes through.

The relay sees only `UpstreamClient.post` and `UpstreamResponse`, so the implementation
underneath can be swapped when the benchmark says so. It is a lean HTTP/1.1 client: keep-alive
connections per host (TLS through an `ssl` context for https), httptools' parser, no
redirects, and body bytes handed on as they arrive, with no per-chunk work beyond the parser.
Transport failures are turned into the gateway's own upstream errors here and nowhere else,
and no message carries a request's headers, so none carries the upstream credentials.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, ItemsView, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools

from codex_gateway.coalescer import WriteCoalescer
from codex_gateway.errors import (
    DeadlinePassed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

# The largest whole (non-streamed) upstream body the gateway accepts.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Body bytes held for a reader that has not taken them yet before the socket stops reading.
_HIGH_WATER = 1024 * 1024
# The event loop's timers keep whole milliseconds: a timer may fire up to this much before
# its time, which counts as come rather than setting the timer again for a moment.
_TIMER_GRAIN = 0.001
_Origin = tuple[str, str, int]


class Headers(Mapping[str, str]):
    """Response headers, looked up without regard to case; repeated ones joined by commas."""

    __slots__ = ("_items",)

    def __init__(self, pairs: list[tuple[bytes, bytes]]):
        items: dict[str, str] = {}
        for raw_name, raw_value in pairs:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            items[name] = f"{items[name]}, {value}" if name in items else value
        self._items = items

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def get(self, name: str, default: Any = None) -> Any:
        return self._items.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def items(self) -> ItemsView[str, str]:
        """The names (in lower case) and values, without a look-up per name."""
        return self._items.items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, the answer parsed as it arrives."""

    def __init__(self, origin: _Origin, read_timeout: float, coalescer: WriteCoalescer | None):
        self.origin = origin
        self._read_timeout = read_timeout
        self._coalescer = coalescer
        # A request waiting for the next turn of the loop to be sent (`coalescer.py`).
        self._held: bytes | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.idle_since = 0.0
        self._pending_headers: list[tuple[bytes, bytes]] = []
        self._header_name = b""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when `_timer` fires, in the loop's time
        self._last_read = 0.0
        # The loop this connection belongs to, asked for once: asking costs a system call.
        self.loop = asyncio.get_running_loop()

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing was asked: a server talking out of turn
            self.close()
            return
        self._last_read = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("The upstream switched protocols unasked."))
        except httptools.HttpParserError as exc:
            self._fail(self._broken(f"{type(exc).__name__}: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timer()
        response = self.response
        if response is not None and response.started and response.ends_with_close:
            response.finish(keep_alive=False)  # a body with neither length nor chunks ends so
        elif response is not None and not response.complete:
            detail = f"{type(exc).__name__}: {exc}" if exc else "the upstream closed the connection"
            response.fail(self._broken(detail))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._pending_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._pending_headers = []
            return
        response.head(status, Headers(self._pending_headers))
        self._pending_headers = []

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response.feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or not response.started:
            return
        # The read timer stays: the next request on this connection finds it set and moves
        # it on when it fires (`_check_idle`), instead of a timer set and cancelled each time.
        response.finish(self._parser.should_keep_alive())

    # -- used by the client ------------------------------------------------------------------

    def send(self, request: bytes, response: UpstreamResponse) -> None:
        assert self.transport is not None
        self.response = response
        self._parser = httptools.HttpResponseParser(self)
        self._last_read = self.loop.time()
        # The read timeout and the response's own limit count from here, up to one turn of
        # the loop before a held request is written (`coalescer.py`): a turn is far shorter
        # than any timeout. A timer still set for an earlier request, due sooner than either,
        # is kept: it fires early and sets itself again for the time left (`_check_idle`).
        self.watch(response.due)
        coalescer = self._coalescer
        if coalescer is None or coalescer.may_write_now():
            self.transport.write(request)
            return
        self._held = request
        coalescer.hold(self)

    def flush(self) -> bool:
        """Send the request held for this turn, unless the connection closed meanwhile."""
        request, self._held = self._held, None
        if request is None or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(request)
        return True

    def watch(self, due: float) -> None:
        """Have the timer fire by `due` (loop time) as well as by the read timeout."""
        response = self.response
        if response is not None:
            due = min(due, self._idle_due(response))
        if self._timer is None or due < self._timer_at:
            self._set_timer(due)

    def _idle_due(self, response: UpstreamResponse) -> float:
        """When the read timeout runs out. Not while the response keeps the limit it was sent
        with: the caller's time for the answer's head (and a stream's first event) stands in
        for it, so that an upstream may think for longer than it may fall silent mid-answer."""
        if response.sent_limit:
            return math.inf
        return self._last_read + self._read_timeout

    def _set_timer(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = self.loop.call_at(due, self._check_idle)

    def _check_idle(self) -> None:
        """Fail the response if its own limit has passed, or the read timeout has (no bytes
        for that long); if neither has yet, set the timer again for the sooner of the two.
        A connection with no response in hand lets the timer go: the next request sets it."""
        self._timer = None
        response = self.response
        if response is None or response.complete:
            return
        now = self.loop.time() + _TIMER_GRAIN
        if now >= response.due:
            self._fail(DeadlinePassed())
            return
        if now < self._idle_due(response):
            self.watch(response.due)
            return
        if response.paused:  # the reader is behind, not the upstream
            self._last_read = self.loop.time()
            self.watch(response.due)
            return
        if response.started:
            error = UpstreamTimeout(
                "The upstream went silent for longer than the idle timeout before the "
                "response ended.",
                kind="timeout_idle",
            )
        else:
            error = UpstreamTimeout(
                "The upstream did not answer within the read timeout.",
                kind="timeout_first_byte",
            )
        self._fail(error)

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self._cancel_timer()
        self._held = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _broken(self, detail: str) -> UpstreamError:
        response = self.response
        if response is not None and response.started:
            return UpstreamProtocolError(
                "The upstream response was cut off before it ended.", kind="cut", detail=detail
            )
        return UpstreamConnectError("The request to the upstream failed.", detail=detail)

    def _fail(self, error: UpstreamError) -> None:
        response = self.response
        if response is not None:
            response.fail(error)
        self.close()


class UpstreamResponse:
    """One answer: status and headers first, then the body as it arrives."""

    def __init__(self, client: UpstreamClient, connection: _Connection, due: float = math.inf):
        self._client = client
        self._connection: _Connection | None = connection
        self._loop = connection.loop
        self.status = 0
        self.headers: Mapping[str, str] = Headers([])
        self.started = False
        self.complete = False
        self._keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self.paused = False
        self.ends_with_close = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The loop time by which the answer must have come as far as its caller waits for
        # (`UpstreamClient.post`, `limit`); past it the response fails with `DeadlinePassed`.
        self.due = due
        # Whether `due` is still the limit the request was sent with (`_Connection._idle_due`).
        self.sent_limit = due != math.inf

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    # -- fed by the connection ---------------------------------------------------------------

    def head(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        self.started = True
        self.ends_with_close = (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )
        self._wake()

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER and not self.paused and self._connection is not None:
            self.paused = True
            self._connection.pause()
        self._wake()

    def finish(self, keep_alive: bool) -> None:
        self.complete = True
        self._keep_alive = keep_alive
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        if self._error is None and not self.complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def started_event(self) -> None:
        """Wait for the status line and headers."""
        while not self.started:
            if self._error is not None:
                raise self._error
            await self._wait()

    # -- read by the relay -------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, without waiting to fill a buffer."""
        pending = self._chunks
        while True:
            if pending:
                chunk = pending.popleft() if len(pending) == 1 else b"".join(pending)
                pending.clear()
                self._buffered = 0
                if self.paused and self._connection is not None:
                    self.paused = False
                    self._connection.resume()
                yield chunk
                continue
            if self.complete:
                return
            if self._error is not None:
                raise self._error
            await self._wait()

    def buffered(self) -> bytes:
        """The body bytes that came and were not read yet, taken without waiting for more."""
        chunk = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return chunk

    async def read(self, limit: int = MAX_BODY_BYTES) -> bytes:
        """The whole body, refusing one larger than `limit` bytes."""
        parts = bytearray()
        async for chunk in self.chunks():
            parts += chunk
            if len(parts) > limit:
                raise UpstreamProtocolError(
                    "The upstream response body is larger than the gateway accepts.",
                    detail=f"more than {limit} bytes",
                )
        return bytes(parts)

    def limit(self, seconds: float) -> None:
        """Give the rest of the answer `seconds` from now (`math.inf`: no limit of its own;
        the read timeout still holds). A response that failed meanwhile raises its error,
        its limit having passed, say, in the turn that brought the bytes its caller read."""
        if self._error is not None:
            raise self._error
        connection = self._connection
        if connection is None:
            return
        self.due = connection.loop.time() + seconds
        self.sent_limit = False
        connection.watch(self.due)

    def close(self) -> None:
        """Drop the connection now (the response will not be read to its end)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if not self.complete:
            self.fail(UpstreamConnectError("The gateway closed the upstream connection."))
        connection.response = None
        connection.close()
        self._client.returned(connection, reuse=False)

    def release(self) -> None:
        """Hand the connection back for the next request, or close it if it is not reusable."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        reuse = self.complete and self._keep_alive and self._error is None and connection.usable
        connection.response = None
        if not reuse:
            connection.close()
        self._client.returned(connection, reuse=reuse)


class UpstreamClient:
    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
        keepalive: float,
        ssl_context: ssl.SSLContext | None = None,
        coalescer: WriteCoalescer | None = None,
    ):
        """`keepalive`: seconds an idle connection is kept for the next request, then
        closed; `coalescer`: the one the server's answers go through too, so that requests
        sent while the loop is busy go out together with them; None sends each at once."""
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool_size = pool_size
        self.keepalive = keepalive
        self._ssl = ssl_context
        self._coalescer = coalescer
        # Each origin's idle connections, the longest idle on the left: the newest is reused
        # from the right, and a timer per origin closes those idle past `keepalive` from the
        # left.
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._sweeps: dict[_Origin, asyncio.TimerHandle] = {}
        self._closed = False
        self._slots: asyncio.Semaphore | None = None
        self._targets: dict[str, tuple[_Origin, bytes]] = {}

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout: float = math.inf
    ) -> UpstreamResponse:
        """Send a request; its answer once the head has come. `timeout`: seconds for the head
        to come, a wait for a free connection and a new one's connect included; past them
        the request fails with `DeadlinePassed`, and the response keeps that limit until
        `UpstreamResponse.limit` moves it. A connection keeps the limit on its read timer,
        which stays set from request to request: a request sent on a free connection sets
        no timer of its own (a wait for one has its own)."""
        origin, start = self._target(url)
        request = start + _head(headers, len(body)) + body
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._pool_size)
        if slots.locked():
            timeout = await self._wait_for_slot(slots, timeout)
        else:
            await slots.acquire()  # a free slot: taken without waiting
        try:
            return await self._exchange(origin, request, timeout)
        except BaseException:
            slots.release()
            raise

    @staticmethod
    async def _wait_for_slot(slots: asyncio.Semaphore, timeout: float) -> float:
        """Wait for a connection to be free, for up to `timeout` seconds; the seconds left."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                await slots.acquire()
        except TimeoutError:
            raise DeadlinePassed() from None
        return timeout - (loop.time() - started)

    async def _exchange(self, origin: _Origin, request: bytes, timeout: float) -> UpstreamResponse:
        """Send on an idle connection, or a new one; a reused connection that closes before
        any answer was one the server was dropping, and the request goes once more, new. A
        request with no time left is not sent: the upstream would do work nobody waits for."""
        if timeout <= 0:
            raise DeadlinePassed()
        connection = self._take_idle(origin)
        if connection is not None:
            due = connection.loop.time() + timeout
            try:
                return await self._send(connection, request, due)
            except UpstreamConnectError:
                pass
        else:
            due = asyncio.get_running_loop().time() + timeout
        return await self._send(await self._connect(origin, due), request, due)

    async def _send(self, connection: _Connection, request: bytes, due: float) -> UpstreamResponse:
        response = UpstreamResponse(self, connection, due)
        connection.send(request, response)
        try:
            await response.started_event()
        except BaseException:
            connection.response = None
            connection.close()
            raise
        return response

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            idle_for = connection.loop.time() - connection.idle_since
            if connection.usable and idle_for < self.keepalive:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: _Origin, due: float = math.inf) -> _Connection:
        """A new connection, within the connect timeout and by `due` (loop time), whichever
        comes first."""
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self._tls() if scheme == "https" else None
        left = due - loop.time()
        if left <= 0:
            raise DeadlinePassed()
        try:
            async with asyncio.timeout(min(self._connect_timeout, left)):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(origin, self._read_timeout, self._coalescer),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
        except TimeoutError:
            if left < self._connect_timeout:
                raise DeadlinePassed() from None
            raise UpstreamTimeout(
                "Connecting to the upstream took longer than the connect timeout.",
                kind="timeout_connect",
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(
                "Could not connect to the upstream.", detail=f"TLS: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            raise UpstreamConnectError(
                "Could not connect to the upstream.",
                detail=f"Cannot connect to host {host}:{port} [{exc.strerror or exc}]",
            ) from None
        return protocol

    def returned(self, connection: _Connection, *, reuse: bool) -> None:
        """A response is done with its connection: keep it for the next request or not."""
        if self._slots is not None:
            self._slots.release()
        if not reuse:
            return
        if self._closed:  # an answer that outlived the client's `close`
            connection.close()
            return
        loop = connection.loop
        connection.idle_since = loop.time()
        origin = connection.origin
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        idle.append(connection)
        if origin not in self._sweeps:
            self._sweeps[origin] = loop.call_at(
                idle[0].idle_since + self.keepalive, self._sweep, origin
            )

    def _sweep(self, origin: _Origin) -> None:
        """Close the origin's connections idle for `keepalive` or longer (those a burst left
        over, or all of them once requests stop), then wait for the next to be."""
        del self._sweeps[origin]
        idle = self._idle.get(origin)
        if not idle:
            return
        loop = asyncio.get_running_loop()
        # A sweep that came a hair early would otherwise be due again at once.
        now = loop.time() + _TIMER_GRAIN
        while idle and now - idle[0].idle_since >= self.keepalive:
            idle.popleft().close()
        if idle:
            due = idle[0].idle_since + self.keepalive
            self._sweeps[origin] = loop.call_at(due, self._sweep, origin)

    def _target(self, url: str) -> tuple[_Origin, bytes]:
        """The origin and request line of a URL, worked out once per URL."""
        known = self._targets.get(url)
        if known is not None:
            return known
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamConnectError(
                "The upstream URL is not an http or https URL.", detail=f"scheme {scheme!r}"
            )
        port = parts.port or (443 if scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = port == (443 if scheme == "https" else 80)
        host = parts.hostname if default_port else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:  # an IPv6 literal keeps its brackets in the Host header
            host = f"[{parts.hostname}]" + ("" if default_port else f":{port}")
        start = f"POST {path} HTTP/1.1\r\nhost: {host}\r\n".encode("latin-1")
        known = ((scheme, parts.hostname, port), start)
        if len(self._targets) < 1024:
            self._targets[url] = known
        return known

    async def close(self) -> None:
        self._closed = True
        for sweep in self._sweeps.values():
            sweep.cancel()
        self._sweeps.clear()
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def _head(headers: Mapping[str, str], length: int) -> bytes:
    """The header lines after the request line; refuses a name or value that could split
    the head (a CR or LF), which would let one header smuggle another."""
    lines = []
    for name, value in headers.items():
        lower = name.lower()
        if lower in ("content-length", "transfer-encoding", "host", "connection"):
            continue
        line = f"{name}: {value}\r\n"
        if line.count("\n") != 1 or line.count("\r") != 1:
            raise UpstreamProtocolError(
                "A header for the upstream has a line break in it.", detail=f"header {name}"
            )
        lines.append(line)
    lines.append(f"content-length: {length}\r\n\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise UpstreamProtocolError(
            "A header for the upstream has characters HTTP headers cannot carry."
        ) from None
