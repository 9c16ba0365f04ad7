"""A lean mock of the Responses API upstream, so that it is never what a benchmark measures.

    python bench/mock_upstream.py --port 8801

A raw asyncio protocol with httptools' parser, HTTP/1.1 keep-alive, and every answer built
once at start-up. `POST .../responses` answers by the body:

- `"stream": false` (or absent): an instant JSON response with usage;
- `"stream": true`: `response.created`, then 64 `response.output_text.delta` events and
  `response.completed` with usage, all in one write;
- `"stream": true` with the model `bench-paced`: the same events, the deltas and the final
  events paced 20 ms apart.

The events have the shapes the real upstream sends (tests/fixtures/upstream/*.sse).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections import deque

import httptools
import orjson

PACED_MODEL = "bench-paced"
DELTAS = 64
PACING_SECONDS = 0.020
RESPONSE_ID = "resp_bench"
UPSTREAM_MODEL = "gpt-5.1-codex-2025-11-13"
USAGE = {
    "input_tokens": 24,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": DELTAS,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 24 + DELTAS,
}
WORD = "word "


def _response(status: str, text: str, usage: object) -> dict[str, object]:
    output = []
    if text:
        output.append(
            {
                "id": "msg_bench",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": 1764806400,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": UPSTREAM_MODEL,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "medium", "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _event(data: dict[str, object]) -> bytes:
    return b"event: " + str(data["type"]).encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk of the transfer-encoded body."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def stream_parts() -> tuple[bytes, list[bytes], bytes]:
    """The stream as the opening events, one chunk per delta, and the closing events."""
    item = {"id": "msg_bench", "type": "message", "status": "in_progress", "role": "assistant"}
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": "msg_bench", "output_index": 0, "content_index": 0}
    opening = [
        {"type": "response.created", "response": _response("in_progress", "", None)},
        {"type": "response.in_progress", "response": _response("in_progress", "", None)},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        {"type": "response.content_part.added", **where, "part": part},
    ]
    deltas = [
        {"type": "response.output_text.delta", **where, "delta": WORD, "logprobs": []}
        for _ in range(DELTAS)
    ]
    text = WORD * DELTAS
    done_part = {**part, "text": text}
    closing = [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": done_part},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {**item, "status": "completed", "content": [done_part]},
        },
        {"type": "response.completed", "response": _response("completed", text, USAGE)},
    ]
    events = [*opening, *deltas, *closing]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    head = b"".join(_event(e) for e in events[: len(opening)])
    middle = [_event(e) for e in events[len(opening) : len(opening) + DELTAS]]
    tail = b"".join(_event(e) for e in events[len(opening) + DELTAS :])
    return _chunk(head), [_chunk(m) for m in middle], _chunk(tail) + b"0\r\n\r\n"


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


def json_answer() -> bytes:
    body = orjson.dumps(_response("completed", WORD * DELTAS, USAGE))
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


def plain_answer(status: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n"
    return head % (status, len(body)) + body


OPENING, DELTA_CHUNKS, CLOSING = stream_parts()
JSON_ANSWER = json_answer()
STREAM_ANSWER = STREAM_HEAD + OPENING + b"".join(DELTA_CHUNKS) + CLOSING
OK_ANSWER = plain_answer(b"200 OK", b"ok\n")
NOT_FOUND = plain_answer(b"404 Not Found", b"no such route\n")


class MockProtocol(asyncio.Protocol):
    """One client connection: requests are answered in order, one at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body = bytearray()
        self._queue: deque[tuple[bytes, bytes, bool]] = deque()
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self._queue.append((self._url, bytes(self._body), self._parser.should_keep_alive()))
        self._url = b""
        self._body = bytearray()
        if not self._busy:
            self._next()

    def _next(self) -> None:
        transport = self._transport
        if transport is None or not self._queue:
            self._busy = False
            return
        url, body, keep_alive = self._queue.popleft()
        if not url.endswith(b"/responses"):
            self._finish(OK_ANSWER if url.startswith(b"/health") else NOT_FOUND, keep_alive)
            return
        request = _request(body)
        if not request.get("stream"):
            self._finish(JSON_ANSWER, keep_alive)
        elif request.get("model") != PACED_MODEL:
            self._finish(STREAM_ANSWER, keep_alive)
        else:
            self._busy = True
            transport.write(STREAM_HEAD + OPENING)
            self._pace(asyncio.get_running_loop().time(), 0, keep_alive)

    def _pace(self, started: float, sent: int, keep_alive: bool) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        if sent:
            transport.write(DELTA_CHUNKS[sent - 1])
        # Due times count from the start, so late timers do not add up to a slower stream.
        due = started + (sent + 1) * PACING_SECONDS
        loop = asyncio.get_running_loop()
        if sent == DELTAS:
            self._timer = loop.call_at(due, self._finish, CLOSING, keep_alive)
        else:
            self._timer = loop.call_at(due, self._pace, started, sent + 1, keep_alive)

    def _finish(self, answer: bytes, keep_alive: bool) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        transport.write(answer)
        if not keep_alive:
            transport.close()
            return
        self._next()


def _request(body: bytes) -> dict[str, object]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return document if isinstance(document, dict) else {}


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=4096, reuse_address=True)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


async def _serve_until_signalled(host: str, port: int) -> None:
    serving = asyncio.create_task(serve(host, port))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, serving.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # plain asyncio is slower but still correct
        uvloop = None
    print(f"mock upstream on http://{args.host}:{args.port}/v1 (pid {os.getpid()})", flush=True)
    if uvloop is not None:
        uvloop.run(_serve_until_signalled(args.host, args.port))
    else:
        asyncio.run(_serve_until_signalled(args.host, args.port))


if __name__ == "__main__":
    main()
