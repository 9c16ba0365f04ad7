"""uvicorn's httptools protocol, sending each response's head and first body bytes together.

uvicorn writes a response's status line and headers to the socket as soon as the app sends
`http.response.start`, and the body with the next message: two system calls, and on
loopback two passes through the kernel's TCP stack, for every JSON answer. Here the head
waits in the transport until the body's first write joins it, and at most one turn of the
event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# How every final response head begins: the status line of a status from 200 to 599. An
# interim answer (100 Continue) goes out at once, since the client waits for it before it
# sends the body. Body bytes that happen to begin the same way are only held for the same
# turn of the loop, and still go out in order.
_HEAD = b"HTTP/1.1 "
_FINAL_STATUS = frozenset(b"2345")


class HeadHoldingTransport:
    """A transport that keeps a response head back until the next write, or one loop turn."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            # One system call for both, without copying the body onto the head.
            self._transport.writelines((held, data))
            return
        if data[:9] == _HEAD and len(data) > 9 and data[9] in _FINAL_STATUS:
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        self.flush()
        self._transport.writelines(lines)

    def flush(self) -> None:
        """Send a held head, unless the connection has closed meanwhile (a client that reset
        it), as uvicorn drops what is written to a closed connection."""
        held = self._held
        if held is None:
            return
        self._held = None
        if not self._transport.is_closing():
            self._transport.write(held)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
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


class CoalescingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `HeadHoldingTransport`: give it to uvicorn.Config
    as `http`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadHoldingTransport(transport, self.loop))  # type: ignore[arg-type]
