"""One HTTP exchange at the ASGI edge: read the body within a limit, send JSON or a stream."""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from codex_gateway.errors import BodyTooLarge, UnsupportedEncoding
from codex_gateway.http.protocol import on_client_lost, read_on, request_cycle

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = (b"content-type", b"application/json")


# Random bytes fetched from the operating system at a time: request ids for 400 requests.
RANDOM_BATCH = 4000


class RequestIds:
    """`req_` and 128 bits in hex, as a uuid4's hex would be: the time in milliseconds (48
    bits), then 80 random bits.

    The time first makes ids sort by the millisecond their requests came in (across machines,
    as far as their clocks agree), so the usage rows' and ledger entries' indexes on the id
    grow at one end instead of at random pages; the random bits keep ids unique (two ids of
    one millisecond share 80 random bits one time in 2**80) and not guessable from the ones
    a client has seen. They come from a batch of RANDOM_BATCH bytes fetched from the system
    at a time rather than for each request: each fetch lets the usage writer's thread take the
    interpreter, and the request then waits for it to let go. A forked child drops the batch
    it inherited as it starts (told by the interpreter's fork hook, rather than by reading
    the process id, a system call, for each request), so parent and child never hand out the
    same bytes. Made and used on the event loop's thread only.
    """

    def __init__(self) -> None:
        self._batch = b""
        self._at = 0
        os.register_at_fork(after_in_child=partial(_drop_batch, weakref.ref(self)))

    def __call__(self) -> str:
        at = self._at
        if at + 10 > len(self._batch):
            self._batch, at = os.urandom(RANDOM_BATCH), 0
        self._at = at + 10
        return f"req_{time.time_ns() // 1_000_000:012x}{self._batch[at : at + 10].hex()}"


def _drop_batch(ids: weakref.ref[RequestIds]) -> None:
    """In a forked child: forget the random bytes the parent may hand out too."""
    request_ids = ids()
    if request_ids is not None:
        request_ids._batch, request_ids._at = b"", 0


class Exchange:
    """The request side as the handlers need it, and the response side with its bookkeeping."""

    __slots__ = (
        "_answered",
        "_on_disconnect",
        "_send",
        "_told_by",
        "_watcher",
        "bytes_sent",
        "disconnected",
        "finished",
        "headers",
        "key_display",
        "model",
        "receive",
        "request_id",
        "response_started",
        "scope",
        "started",
        "status",
        "unsent",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, request_id: str):
        self.scope = scope
        self.receive = receive
        self._send = send
        self.request_id = request_id
        self.started = time.perf_counter()
        self.status = 0
        self.response_started = False
        self.bytes_sent = 0
        self.unsent = b""
        self.finished: float | None = None
        self.headers: dict[str, str] = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        self.model: str | None = None
        self.key_display: str | None = None
        self.disconnected = False
        self._watcher: asyncio.Task[None] | None = None
        # The request whose connection tells this exchange that its client left.
        self._told_by: RequestResponseCycle | None = None
        self._on_disconnect: Callable[[], None] | None = None
        self._answered: Callable[[], bool] | None = None

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    def query(self, name: str) -> str | None:
        """The first value of one query parameter, or None."""
        values = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get(name)
        return values[0] if values else None

    async def body(self, limit: int) -> bytes:
        self._refuse_compressed_body()
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks = bytearray()
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
            chunks += message.get("body", b"")
            if len(chunks) > limit:
                raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
            if not message.get("more_body", False):
                break
        cycle = request_cycle(self._send)
        if cycle is not None:
            read_on(cycle)
        return bytes(chunks)

    def _refuse_compressed_body(self) -> None:
        """The body is checked, priced and relayed as the JSON text it is, so a compressed
        one is refused by its header before it is read."""
        encoding = self.headers.get("content-encoding", "").strip()
        if encoding.lower() in ("", "identity"):
            return
        raise UnsupportedEncoding(
            f"The Content-Encoding header says {encoding[:40]!r}, but the gateway does not "
            "accept compressed request bodies; send the JSON uncompressed and leave the "
            "header out."
        )

    def watch_disconnect(
        self,
        on_disconnect: Callable[[], None] | None = None,
        answered: Callable[[], bool] | None = None,
    ) -> None:
        """Notice the client leaving before its answer's last byte (the body must be read
        first), and call `on_disconnect` when it does.

        The server's `send` returns quietly once the client is gone, so only `receive` tells.
        A stream's relay watches from the moment the body is read, since a client may leave
        while the upstream is still working, and names what to do about it once its upstream
        has answered (called at once if the client has already gone). An answer sent whole
        asks `client_gone` instead. A relay whose client may have the whole answer before the
        stream is closed (a chat stream's `[DONE]` comes with the upstream's final event, and
        the upstream may take a while to close) says so with `answered`: a client that
        leaves once that holds and the write has returned did not leave early.
        """
        self._on_disconnect = on_disconnect
        self._answered = answered
        if self.disconnected:
            if on_disconnect is not None:
                on_disconnect()
            return
        if self._watcher is not None or self._told_by is not None:
            return
        cycle = request_cycle(self._send)
        if cycle is not None and on_client_lost(cycle, self._client_lost):
            self._told_by = cycle
            if cycle.disconnected:  # gone before the watch began
                self.stop_watching()
                self._client_lost()
            return

        async def watch() -> None:
            while (await self.receive())["type"] != "http.disconnect":
                pass
            self._client_lost()

        self._watcher = asyncio.get_running_loop().create_task(watch())

    def _client_lost(self) -> None:
        if self.finished is None and not self._has_whole_answer():
            self.disconnected = True
            if self._on_disconnect is not None:
                self._on_disconnect()

    def _has_whole_answer(self) -> bool:
        """Whether the relay's last lines were handed to the server, though the stream is
        not closed yet (`watch_disconnect`'s `answered`)."""
        return self._answered is not None and not self.unsent and self._answered()

    def client_gone(self) -> bool:
        """Whether the client is known to have left before its answer's last byte, asked
        without a watcher: uvicorn marks its request cycle disconnected once it sees the
        connection close (`body` has it read on after the body for that), so an answer sent
        whole needs no task per request to learn it. Under another server only a watcher
        tells."""
        if not self.disconnected and self.finished is None:
            cycle = request_cycle(self._send)
            self.disconnected = cycle is not None and cycle.disconnected
        return self.disconnected

    def stop_watching(self) -> None:
        if self._told_by is not None:
            on_client_lost(self._told_by, None)
            self._told_by = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.response_started = True
        headers.append((b"x-request-id", self.request_id.encode()))
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, chunk: bytes, more: bool = True) -> None:
        if not more:
            # When the last byte went to the server, which sends it within a turn of the
            # loop (set first, so that a client closing the connection right after it is
            # not taken for one that left early).
            self.finished = time.perf_counter()
        # The server's send waits for a slow client before it writes anything, so a chunk
        # whose send was cancelled never left; `unsent` keeps it for whoever ends the stream.
        self.unsent = chunk
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})
        self.unsent = b""
        self.bytes_sent += len(chunk)

    async def send_json(
        self, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        await self.send_body(status, body, headers=headers)

    async def send_body(
        self,
        status: int,
        body: bytes,
        content_type: bytes = JSON_TYPE[1],
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Send an answer held whole. A client known to have gone gets its head alone, as a
        stream's client does (the server drops both), so `bytes_sent` counts no byte it
        never had."""
        length = (b"content-length", str(len(body)).encode())
        await self.start(status, [(b"content-type", content_type), length, *(headers or [])])
        if not self.client_gone():
            await self.write(body, more=False)
