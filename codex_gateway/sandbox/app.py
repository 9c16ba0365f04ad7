"""The sandbox upstream: replays the transcripts in `transcripts/` as OpenAI would send them.

Which transcript plays is chosen by the `x-sandbox-transcript` header, else by a path segment
(`/sandbox/responses-cached/v1/responses`), else `responses-text`. The scenario
`tool-conversation` answers with a tool call, and with text once the input carries the tool's
output, the way a two-turn Codex exchange goes; an input that ends with Codex's
`compaction_trigger` gets `responses-compaction` (one `compaction` item), and
`POST .../v1/responses/compact` gets `responses-compact.json`. Besides the shared fixtures,
`chatgpt-usage-limit-event.sse` is the Codex backend's usage wall inside a stream (a nested
`error` event after `response.created`), `responses-lone-surrogate.sse` is `responses-text.sse`
whose final event's id holds a lone surrogate escape (`\\ud800`, valid JSON that orjson
refuses), and `responses-usage-missing.sse` and `responses-usage-invalid.sse` are the same
answer with its usage null, or with an output count sent as a string; the header
`x-sandbox-usage` (any JSON) puts its value in place of the usage of a finished transcript's
final response, streamed or whole, for tests of how usage of any shape is billed. Streams are
sent one event per write, `x-sandbox-delay-ms` apart; a non-streaming request gets the final
response object, that long after the request. When recording is on (the standalone
`codex-gateway sandbox`), the last requests it received can be read back at GET
/sandbox/requests, which tests use to check what reached the upstream; a gateway serving the
sandbox for its quick start keeps no such record of its users' requests.

Faults, for failover tests: the header `x-sandbox-fault`, or a fault set for one upstream key
with `PUT /sandbox/faults {"key": KEY, "fault": MODE}` (`"fault": null` clears it), makes the
answer misbehave; a gateway serving the sandbox lets only callers with a gateway key reach
that switch (`http/sandbox.py`). Modes: `500` (or any 4xx/5xx status), `429` (with reset headers),
`hang-before` (no answer until the caller leaves, at most 30 s), `hang-middle:N` (N events,
then silence), `cut-after:N` (N events, then the connection drops), `garbage` (bytes that are
not SSE), `drip:MS` (each event MS milliseconds apart), `json` (the final response object even
when a stream was asked for, as an upstream that ignores `stream` answers).
`/v1/responses/compact`, which answers with one JSON object, takes a status, `hang-before` and
`garbage` (a 200 whose body is not JSON). A refused connection needs no mode: point an account
at a closed port.

A mock of the ChatGPT Codex backend answers under /sandbox/chatgpt (see `chatgpt.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from codex_gateway.http.exchange import Receive, Scope, Send
from codex_gateway.relay.sse import StreamScanner, iter_events

TRANSCRIPTS = Path(__file__).parent / "transcripts"
# The final events of an answer the upstream served, whose usage is billed.
FINISHED = ("response.completed", "response.incomplete")
DEFAULT_TRANSCRIPT = "responses-text"
TOOL_CONVERSATION = "tool-conversation"
COMPACTION_TRANSCRIPT = "responses-compaction"
COMPACT_TRANSCRIPT = "responses-compact"
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
HANG_LIMIT_SECONDS = 30.0
QUOTA_RESET_SECONDS = 120


class DroppedConnection(Exception):
    """Raised mid-response so the server drops the connection, as a failing upstream does."""


def _not_a_dropped_connection(record: logging.LogRecord) -> bool:
    """The server logs an app's exception as an error with its traceback; a fault the sandbox
    was asked for is no error of the server it runs in."""
    return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


class Transcript:
    def __init__(self, name: str, path: Path):
        self.name = name
        raw = path.read_bytes()
        self.json: dict[str, Any] | None = None
        self.events: list[bytes] = []
        self.terminal_type: str | None = None
        self.terminal: dict[str, Any] | None = None
        if path.suffix == ".json":
            self.json = orjson.loads(raw)
            return
        self.events = iter_events(raw)
        scanner = StreamScanner()
        scanner.feed(raw)
        scanner.finish()
        self.terminal_type = scanner.terminal_type
        self.terminal = scanner.terminal

    def with_usage(self, usage: Any) -> Transcript | None:
        """The same answer with `usage` in its final response; None for a transcript that
        does not end in one (a failure, a stream cut short, a JSON answer)."""
        terminal = self.terminal or {}
        final = terminal.get("response")
        if self.terminal_type not in FINISHED or not isinstance(final, dict):
            return None
        changed = copy.copy(self)
        changed.terminal = {**terminal, "response": {**final, "usage": usage}}
        event = f"event: {self.terminal_type}\ndata: ".encode() + orjson.dumps(changed.terminal)
        changed.events = [*self.events[:-1], event + b"\n\n"]
        return changed


def load_transcripts() -> dict[str, Transcript]:
    return {
        path.stem: Transcript(path.stem, path)
        for path in sorted(TRANSCRIPTS.iterdir())
        if path.suffix in (".sse", ".json")
    }


MAX_RECORDED_BODY = 256 * 1024
MAX_DELAY_MS = 60_000


class SandboxApp:
    def __init__(self, *, record: bool = False, history: int = 50):
        from codex_gateway.sandbox.chatgpt import ChatGPTBackend  # it builds on this module

        self.transcripts = load_transcripts()
        self.record = record
        self.requests: deque[dict[str, Any]] = deque(maxlen=history)
        self.faults: dict[str, str] = {}
        self.chatgpt = ChatGPTBackend(self.transcripts, self.requests if record else None)
        server_log = logging.getLogger("uvicorn.error")
        if _not_a_dropped_connection not in server_log.filters:
            server_log.addFilter(_not_a_dropped_connection)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except asyncio.CancelledError:
            # The server it runs in is shutting down: the connection drops, as it would from
            # an upstream that goes away, with no traceback in the server's log.
            raise DroppedConnection("the server shut down") from None

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"].removeprefix("/sandbox")
        method: str = scope["method"]
        if path == "/requests" and not self.record:
            await _json(send, 404, _error("This sandbox does not record requests."))
        elif path == "/requests" and method == "GET":
            await _json(send, 200, list(self.requests))
        elif path == "/requests" and method == "DELETE":
            self.requests.clear()
            await _json(send, 200, {"cleared": True})
        elif path == "/faults" and method == "PUT":
            await self._set_fault(receive, send)
        elif path.startswith("/chatgpt/") and method == "POST":
            await self.chatgpt(scope, receive, send, path.removeprefix("/chatgpt"))
        elif path.endswith("/v1/responses") and method == "POST":
            await self._responses(scope, receive, send, path)
        elif path.endswith("/v1/responses/compact") and method == "POST":
            await self._compact(scope, receive, send)
        elif path.endswith("/v1/models") and method == "GET":
            await _json(send, 200, {"object": "list", "data": []})
        else:
            await _json(send, 404, _error(f"The sandbox has no route {method} {path}."))

    async def _responses(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = await _read(receive)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            await _json(send, 400, _error("The sandbox expects a JSON body."))
            return
        if self.record:
            recorded = body[:MAX_RECORDED_BODY].decode("utf-8", "replace")
            self.requests.append({"path": scope["path"], "headers": headers, "body": recorded})
        name = headers.get("x-sandbox-transcript") or _segment(path) or DEFAULT_TRANSCRIPT
        if name == TOOL_CONVERSATION:
            name = tool_turn(document)
        transcript = self.transcripts.get(name)
        if transcript is None:
            known = ", ".join([*self.transcripts, TOOL_CONVERSATION])
            await _json(send, 400, _error(f"Unknown sandbox transcript {name!r}; known: {known}."))
            return
        if "x-sandbox-usage" in headers:
            transcript = _with_usage(transcript, headers["x-sandbox-usage"])
            if transcript is None:
                message = f"x-sandbox-usage must be JSON, for a transcript that finishes ({name})."
                await _json(send, 400, _error(message))
                return
        delay = _delay_seconds(headers.get("x-sandbox-delay-ms", ""))
        fault = headers.get("x-sandbox-fault") or self.faults.get(_bearer(headers), "")
        if fault:
            await _misbehave(fault, transcript, receive, send, delay)
        elif transcript.json is not None:
            await _replay_json(send, transcript.json)
        elif document.get("stream") is True:
            await _stream(send, transcript, delay)
        else:
            await _final(send, transcript, delay)

    async def _compact(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`/v1/responses/compact`: the compacted history as one JSON object, with usage."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = await _read(receive)
        if self.record:
            recorded = body[:MAX_RECORDED_BODY].decode("utf-8", "replace")
            self.requests.append({"path": scope["path"], "headers": headers, "body": recorded})
        fault = headers.get("x-sandbox-fault") or self.faults.get(_bearer(headers), "")
        if fault:
            await _misbehave_in_json(fault, receive, send)
            return
        transcript = self.transcripts[COMPACT_TRANSCRIPT]
        assert transcript.json is not None
        await _replay_json(send, transcript.json)

    async def _set_fault(self, receive: Receive, send: Send) -> None:
        try:
            document = orjson.loads(await _read(receive))
        except orjson.JSONDecodeError:
            document = None
        problem = _fault_problem(document)
        if problem is not None:
            await _json(send, 400, _error(problem))
            return
        key, fault = document["key"], document["fault"]
        if fault:
            self.faults[key] = fault
        else:
            self.faults.pop(key, None)
        await _json(send, 200, {"key": key, "fault": fault})


def _fault_problem(document: Any) -> str | None:
    """What is wrong with a body for PUT /sandbox/faults, or None when nothing is."""
    shape = 'a JSON object {"key": UPSTREAM_KEY, "fault": MODE or null}'
    if not isinstance(document, dict):
        return f"The sandbox expects {shape}."
    if not isinstance(document.get("key"), str) or not document["key"]:
        return f'"key" must be the upstream key the fault is for; send {shape}.'
    if "fault" not in document or not isinstance(document["fault"], str | None):
        return f'"fault" must be a fault mode, or null to clear it; send {shape}.'
    return None


def _with_usage(transcript: Transcript, usage: str) -> Transcript | None:
    try:
        return transcript.with_usage(orjson.loads(usage))
    except orjson.JSONDecodeError:
        return None


def _bearer(headers: dict[str, str]) -> str:
    return headers.get("authorization", "").removeprefix("Bearer ").strip()


async def _misbehave(
    fault: str, transcript: Transcript, receive: Receive, send: Send, delay: float
) -> None:
    mode, _, argument = fault.partition(":")
    events = transcript.events or iter_events(b"")
    if mode.isdigit():
        await _fail_with_status(send, int(mode))
    elif mode == "hang-before":
        await _until_caller_leaves(receive)
    elif mode == "hang-middle":
        await _start_stream(send, events[: int(argument or 3)])
        await _until_caller_leaves(receive)
    elif mode == "cut-after":
        await _start_stream(send, events[: int(argument or 3)])
        raise DroppedConnection(f"sandbox fault {fault}")
    elif mode == "garbage":
        await _start_stream(send, [b"\x00\xff<html>502 Bad Gateway</html>\n"])
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif mode == "drip":
        await _stream(send, transcript, float(argument or 100) / 1000)
    elif mode == "json":
        await _final(send, transcript, delay)
    else:
        await _json(send, 400, _error(f"Unknown sandbox fault {fault!r}."))


async def _misbehave_in_json(fault: str, receive: Receive, send: Send) -> None:
    """The faults that apply to an answer of one JSON object."""
    if fault.isdigit():
        await _fail_with_status(send, int(fault))
    elif fault == "hang-before":
        await _until_caller_leaves(receive)
    elif fault == "garbage":
        body = b"<html>502 Bad Gateway</html>"
        headers = [(b"content-type", b"text/html"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    else:
        message = (
            f"Sandbox fault {fault!r} does not apply here; use a status, hang-before or garbage."
        )
        await _json(send, 400, _error(message))


async def _fail_with_status(send: Send, status: int) -> None:
    if status != 429:
        await _json(send, status, _error(f"Sandbox fault: HTTP {status}.", "server_error"))
        return
    reset_at = int(time.time()) + QUOTA_RESET_SECONDS
    body = orjson.dumps(
        {
            "error": {
                "type": "usage_limit_reached",
                "message": "The usage limit has been reached",
                "resets_at": reset_at,
                "resets_in_seconds": QUOTA_RESET_SECONDS,
            }
        }
    )
    headers = [
        *_JSON,
        (b"x-codex-primary-used-percent", b"100.0"),
        (b"x-codex-primary-reset-at", str(reset_at).encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _start_stream(send: Send, events: list[bytes]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": list(_SSE)})
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})


async def _until_caller_leaves(receive: Receive) -> None:
    async def disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(disconnect(), HANG_LIMIT_SECONDS)
    raise DroppedConnection("sandbox hang ended")


def _delay_seconds(text: str) -> float:
    """`x-sandbox-delay-ms`: the pause between a stream's events, and before a final response
    object or a `json` fault's answer; anything unusable means none."""
    return min(int(text), MAX_DELAY_MS) / 1000 if text.isdigit() else 0.0


def _segment(path: str) -> str | None:
    """`/responses-cached/v1/responses` -> `responses-cached`."""
    parts = [part for part in path.split("/") if part]
    return parts[0] if len(parts) == 3 else None


def tool_turn(document: dict[str, Any]) -> str:
    """The transcript for one turn of the tool conversation, from what the input holds.

    Codex's remote compaction (v2) is an ordinary request whose input ends with a
    `compaction_trigger` item; it is answered with one `compaction` item, and a history that
    carries one has been answered before.
    """
    items = document.get("input")
    if not isinstance(items, list):
        return "responses-reasoning-tool"
    kinds = [item.get("type") for item in items if isinstance(item, dict)]
    if kinds and kinds[-1] == "compaction_trigger":
        return COMPACTION_TRANSCRIPT
    if "function_call_output" in kinds or "compaction" in kinds:
        return "responses-text"
    return "responses-reasoning-tool"


async def _stream(send: Send, transcript: Transcript, delay: float) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": list(_SSE)})
    for event in transcript.events:
        if delay:
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _final(send: Send, transcript: Transcript, delay: float) -> None:
    """A non-streaming answer, after `delay`: the final response, an error, or a body cut
    short."""
    if delay:
        await asyncio.sleep(delay)
    terminal = transcript.terminal
    if transcript.terminal_type in FINISHED and terminal:
        await _json(send, 200, terminal["response"])
        return
    if transcript.terminal_type in ("response.failed", "error") and terminal:
        error = terminal.get("response", {}).get("error") or terminal
        await _json(send, 500, _error(str(error.get("message")), "server_error"))
        return
    # No terminal event means no final object: answer with the JSON cut where the stream was.
    body = b'{"id":"resp_cut","object":"response","status":"in_progress","output":['
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*_JSON, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _replay_json(send: Send, recorded: dict[str, Any]) -> None:
    headers = [(k.encode(), str(v).encode()) for k, v in recorded.get("headers", {}).items()]
    body = orjson.dumps(recorded.get("body", {}))
    await send({"type": "http.response.start", "status": recorded["status"], "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read(receive: Receive) -> bytes:
    chunks = bytearray()
    while True:
        message = await receive()
        chunks += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(chunks)


async def _json(send: Send, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
