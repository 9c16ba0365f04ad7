"""uvicorn's httptools protocol, with each response's writes sent in as few system calls as
the event loop allows.

uvicorn writes a response's status line and headers to the socket as soon as the app sends
`http.response.start`, and the body with the next message: two system calls, and on
loopback two passes through the kernel's TCP stack, for every JSON answer. Here the head
waits in the transport until the body's first write joins it, and at most one turn of the
event loop. Writes made while the loop is busy wait until early in the next turn and go out
together with the turn's other writes (`coalescer.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from codex_gateway.coalescer import WriteCoalescer

# How every final response head begins: the status line of a status from 200 to 599. An
# interim answer (100 Continue) is not held for a body, since the client waits for it before
# it sends its own. Body bytes that happen to begin the same way are held no longer than a
# head is, and still go out in order.
_HEAD = b"HTTP/1.1 "
_FINAL_STATUS = frozenset(b"2345")
# Held bytes past this go out at once: uvicorn's flow control only sees what reached the
# socket's transport, so an app that writes without waiting must not pile up bytes here.
HOLD_LIMIT = 64 * 1024


class HeadHoldingTransport:
    """A transport that keeps a response head back until the next write, or one loop turn,
    and the writes of a busy turn until the next turn."""

    __slots__ = (
        "_coalescer",
        "_held",
        "_held_bytes",
        "_transport",
        "_until_next_turn",
        "client_lost",
    )

    def __init__(self, transport: asyncio.Transport, coalescer: WriteCoalescer):
        self._transport = transport
        self._coalescer = coalescer
        # Who to tell when the client goes while the request is being answered, if anyone
        # (`on_client_lost`).
        self.client_lost: tuple[RequestResponseCycle, Callable[[], None]] | None = None
        # Bytes not written yet, in order; None when nothing is held.
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        # Whether the held bytes wait for the next turn, or only a head for its body.
        self._until_next_turn = False

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            if data:
                held.append(data)
                self._held_bytes += len(data)
            if self._held_bytes > HOLD_LIMIT:
                self.flush()
            elif not self._until_next_turn:  # the body of a held head: now, or next turn
                self._until_next_turn = True
                if self._coalescer.may_write_now():
                    self.flush()
            return
        if not data:
            return
        if data[:9] == _HEAD and len(data) > 9 and data[9] in _FINAL_STATUS:
            self._hold(data, until_next_turn=False)
        elif len(data) > HOLD_LIMIT or self._coalescer.may_write_now():
            self._transport.write(data)
        else:
            self._hold(data, until_next_turn=True)

    def _hold(self, data: bytes, until_next_turn: bool) -> None:
        self._held, self._held_bytes = [data], len(data)
        self._until_next_turn = until_next_turn
        self._coalescer.hold(self)

    def writelines(self, lines: Iterable[bytes]) -> None:
        self.flush()
        self._transport.writelines(lines)

    def flush(self) -> bool:
        """Send what is held, in one system call, unless the connection has closed meanwhile
        (a client that reset it), as uvicorn drops what is written to a closed connection.
        Whether anything was sent."""
        held = self._held
        if held is None:
            return False
        self._held, self._held_bytes = None, 0
        if self._transport.is_closing():
            return False
        if len(held) == 1:
            self._transport.write(held[0])
        else:
            self._transport.writelines(held)
        return True

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._held_bytes = None, 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def request_cycle(send: Any) -> RequestResponseCycle | None:
    """The uvicorn request whose ASGI `send` this is (the bound method of its cycle); None
    under another server, or a `send` wrapped by middleware."""
    cycle = getattr(send, "__self__", None)
    return cycle if isinstance(cycle, RequestResponseCycle) else None


def on_client_lost(cycle: RequestResponseCycle, callback: Callable[[], None] | None) -> bool:
    """Have the connection call `callback` once it sees the client of `cycle` go (None: no
    longer). False when the request did not come through `CoalescingProtocol`, whose
    connections tell; the caller then has to watch `receive` instead. Told by the connection,
    a stream needs no task of its own to learn that its client left."""
    transport = cycle.transport
    if not isinstance(transport, HeadHoldingTransport):
        return False
    if callback is not None:
        transport.client_lost = (cycle, callback)
    elif transport.client_lost is not None and transport.client_lost[0] is cycle:
        transport.client_lost = None  # a request answered after it keeps its own
    return True


def read_on(cycle: RequestResponseCycle) -> None:
    """Let the server read the connection again after a request's whole body, so that it sees
    the client close it. uvicorn stops reading while more than 64 KiB of body wait for the app,
    and starts again only when the app asks for more; an app that has the whole body asks for
    nothing, and the connection's end would go unseen until the answer was sent."""
    if not cycle.disconnected and not cycle.response_complete:
        cycle.flow.resume_reading()


class CloseDelimitedCycle(RequestResponseCycle):
    """An HTTP/1.0 request, whose answer without a Content-Length is ended by closing the
    connection. uvicorn frames such an answer (a stream) as chunked whatever the request's
    version, and HTTP/1.0 knows no chunked framing (RFC 9112 section 6.1): its client would
    read the chunk sizes as body. uvicorn already answers 1.0 with `connection: close` and
    closes the connection after the answer."""

    _close_delimited = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            if _has_body(self.scope["method"], message["status"]) and not _framed(
                message.get("headers", [])
            ):
                self._close_delimited = True
                self.chunked_encoding = False  # so uvicorn adds no Transfer-Encoding
        elif message["type"] == "http.response.body" and self._close_delimited:
            # uvicorn counts an unchunked body against a length: this write's is the length.
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


def _has_body(method: str, status: int) -> bool:
    """Whether an answer carries a body at all, as uvicorn judges before it frames one."""
    return method != "HEAD" and status not in (204, 304)


def _framed(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's headers give its framing (a length, or a transfer coding)."""
    return any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers)


class CoalescingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `HeadHoldingTransport`: give uvicorn.Config
    `http=CoalescingProtocol.through(coalescer)`, with the coalescer the upstream client
    writes through too."""

    coalescer: WriteCoalescer | None = None
    # The request whose answer is being sent; uvicorn's `cycle` is the newest one parsed,
    # which is a request pipelined behind it when there is one.
    _answering: RequestResponseCycle | None = None

    @classmethod
    def through(cls, coalescer: WriteCoalescer) -> type[CoalescingProtocol]:
        """This protocol, its connections writing through `coalescer`."""
        return type(cls.__name__, (cls,), {"coalescer": coalescer})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.coalescer is None:
            raise TypeError("serve CoalescingProtocol.through(coalescer), not the class itself")
        holding = HeadHoldingTransport(transport, self.coalescer)
        super().connection_made(holding)  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._answering = cycle
        if cycle.scope.get("http_version") == "1.0":
            # uvicorn builds the cycle itself and offers no way to choose its class.
            cycle.__class__ = CloseDelimitedCycle
            # HTTP/1.0 knows no interim answers: its `Expect: 100-continue` is ignored
            # (RFC 9110 section 10.1.1).
            cycle.waiting_for_100_continue = False
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        """uvicorn tells only its newest request that the client has gone. With a request
        pipelined behind a stream, the stream was never told, went on writing to the closed
        connection and ended in an error; it is told too. A request that asked to be told
        (`on_client_lost`) is called."""
        super().connection_lost(exc)
        answering = self._answering
        if answering not in (None, self.cycle) and not answering.response_complete:
            answering.disconnected = True
            answering.message_event.set()
        transport = self.transport
        watch = transport.client_lost if isinstance(transport, HeadHoldingTransport) else None
        if watch is not None:
            transport.client_lost = None
            cycle, callback = watch
            if cycle.disconnected:
                callback()
