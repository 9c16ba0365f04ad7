"""Find event boundaries in a Responses SSE stream and pick out its terminal event.

The relay forwards upstream bytes as they come; this scanner watches them. It splits events
at blank lines and looks at each event's name (its last `event:` line, as a client reads it,
else the leading `"type"` of its data) without decoding JSON. Only a terminal event's data is
parsed, and the others it keeps (`response.created`, `codex.rate_limits`) only when asked for.

The one exception is an event that may report a failure (`error`, `response.failed`, or one
with no name a client can read as an error), whose text may quote a credential: the scanner
sets `rewriting` when a chunk holds one, or ends inside an event (whose name a later `event:`
line may still change), and `release` then gives what of the chunk may go to the client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

# The terminal event types, each with the status it leaves the response in.
TERMINAL_STATUS = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
    "error": "error",
}
TERMINAL_TYPES = frozenset(TERMINAL_STATUS)
# The terminal events that report a failure in the upstream's own words.
ERROR_TYPES = frozenset({"response.failed", "error"})
# The ChatGPT backend's in-stream report of an account's quota windows.
RATE_LIMITS_TYPE = "codex.rate_limits"
# What Python's JSON parser leaves of a surrogate escape that is not half of a pair.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# An `event` field line; a client names the event after the last one (a bare `event` names
# it nothing).
_EVENT_LINE = re.compile(rb"^event(?::[ ]?([^\n]*))?$", re.MULTILINE)
_LEADING_TYPE = re.compile(rb'^data:[ ]?\{\s*"type"\s*:\s*"([^"]+)"', re.MULTILINE)
# Events whose `delta` is output the client saw; kept (as the bytes already in hand) so an
# estimate can be made if the stream never reports usage.
DELTA_TYPES = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)
_DELTA_NAMES = frozenset(name.encode() for name in DELTA_TYPES)
_TERMINAL_HINT = re.compile(rb"response\.(?:completed|incomplete|failed)|\"error\"")
# A blank line in the bytes as they came, CRLF or LF, as the scanner finds it once CRLF is LF.
_RAW_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# A line end a client reads and the scanner does not: a CR alone (or one whose LF has not come).
_LONE_CR = re.compile(rb"\r(?!\n)")


class StreamScanner:
    """Watches a byte stream of SSE events; `terminal` is set once a terminal event is seen.

    After `feed`, `rewriting` says whether the chunk may go to the client as it came. It is
    set when an `error` or `response.failed` event, or one with no name, ended in the chunk,
    or when the chunk ends inside an event, whatever its first line names: a client names an
    event after its last `event:` line, so only a whole event shows what it is. Then
    `release` gives what may go: every whole event, those rewritten, and the bytes of the
    event still arriving held back until it is whole, so a credential it quotes never leaves
    in pieces. A client dispatches no event before its blank line, so holding its first bytes
    back delays nothing it can read. Any other chunk, the whole of a `response.completed`
    stream cut at event boundaries included, is relayed as it came at the cost of one
    attribute check.
    """

    __slots__ = (
        "_buffer",
        "_created",
        "_created_block",
        "_pending_cr",
        "_rate_limits_block",
        "_unfinished",
        "_withheld",
        "bytes_seen",
        "deltas",
        "events",
        "rewriting",
        "terminal",
        "terminal_type",
    )

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pending_cr = False
        self._created_block: bytes | None = None
        self._created: dict[str, Any] | None = None
        self._rate_limits_block: bytes | None = None
        self.events = 0
        self.terminal: dict[str, Any] | None = None
        self.terminal_type: str | None = None
        self.bytes_seen = 0
        # Raw blocks of the events whose text an estimate counts (see DELTA_TYPES).
        self.deltas: list[bytes] = []
        self.rewriting = False
        # The bytes, as they came, of an event that may report a failure, until it is whole.
        self._withheld = bytearray()
        # Whether the stream stopped inside an event, once `finish` has taken it.
        self._unfinished = False

    @property
    def created(self) -> dict[str, Any] | None:
        """The `response.created` event, parsed only when someone asks for it."""
        if self._created is None and self._created_block is not None:
            data = _parse_data(self._created_block)
            self._created = data if isinstance(data, dict) else None
            self._created_block = None
        return self._created

    @property
    def rate_limits(self) -> Any:
        """The last `codex.rate_limits` event (the ChatGPT backend's quota windows), parsed."""
        if self._rate_limits_block is None:
            return None
        return _parse_data(self._rate_limits_block)

    def feed(self, chunk: bytes) -> None:
        self.bytes_seen += len(chunk)
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if b"\r" in chunk:
            # CRLF framing: a CR that ends this chunk waits for its LF in the next one.
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._pending_cr = True
            chunk = chunk.replace(b"\r\n", b"\n")
            if b"\r" in chunk:
                # A CR alone ends a line for a client, not for this scanner: the events it
                # splits may hold others, any of which may report a failure.
                self.rewriting = True
        # The last blank line ends every whole event there is: they are split out in one call.
        buffer = self._buffer
        if buffer:
            # Only the new bytes (and the one before them) can complete a blank line.
            search_from = len(buffer) - 1
            buffer += chunk
            end = buffer.rfind(b"\n\n", search_from)
            if end < 0:
                return  # the same event goes on, held back since it began
            blocks = bytes(buffer[:end]).split(b"\n\n")
            del buffer[: end + 2]
        else:
            # Nothing held back: the usual case, a chunk of whole events, is not copied.
            end = chunk.rfind(b"\n\n")
            if end < 0:
                buffer += chunk
                if buffer:
                    self.rewriting = True  # an event began: see below
                return
            blocks = chunk[:end].split(b"\n\n")
            buffer += chunk[end + 2 :]
        if buffer:
            # An event began and is not whole yet: a later line may yet name it a failure.
            self.rewriting = True
        deltas = self.deltas
        for block in blocks:
            # The bulk of a stream: a delta named on its first line and on no other (as
            # `_first_line_name` reads it, inline, without a call per event), kept as it
            # came; `_event` reads every other event.
            if block.startswith(b"event: "):
                newline = block.find(b"\n")
                if (
                    newline > 0
                    and block[7:newline] in _DELTA_NAMES
                    and (block.rfind(b"\n") == newline or block.find(b"\nevent", newline) < 0)
                ):
                    self.events += 1
                    deltas.append(block)
                    continue
            self._event(block)

    def release(self, chunk: bytes, rewrite: Callable[[bytes], bytes]) -> bytes:
        """What may go to the client of the bytes held back and `chunk` (fed already): every
        whole event, each that may report a failure passed through `rewrite` (its lines
        without the blank line after them). The event still arriving is held back, and
        `rewriting` stays set, until it is whole. Bytes of events that report nothing pass as
        they came. Each byte is searched for a blank line once, however many chunks an event
        held back takes."""
        held = self._withheld
        if held:
            # Only the new bytes, and the three before them, can complete the blank line
            # that ends the event held back.
            search_from = max(len(held) - 3, 0)
            held += chunk
            # A blank line ends in LF: a chunk with none (most of a long line) ends nothing.
            first = _RAW_BLANK_LINE.search(held, search_from) if b"\n" in chunk else None
            if first is None:
                return b""  # the event held back goes on
            data = bytes(held)
            held.clear()
            search_from = first.start()
        else:
            data = chunk
            search_from = 0
        parts = []
        start = 0
        for blank in _RAW_BLANK_LINE.finditer(data, search_from):
            block = data[start : blank.start()]
            parts.append(rewrite(block) if _may_report_failure(block) else block)
            parts.append(blank.group())
            start = blank.end()
        held += data[start:]
        self.rewriting = bool(held)
        return b"".join(parts)

    def release_rest(self, rewrite: Callable[[bytes], bytes]) -> bytes:
        """What is still held back once the stream has ended, taken for its last event (as
        `finish` takes it), rewritten unless it names an event that reports nothing."""
        rest = bytes(self._withheld)
        self._withheld.clear()
        self.rewriting = False
        if not rest:
            return rest
        return rewrite(rest) if _may_report_failure(rest) else rest

    def finish(self) -> None:
        """Treat what is left after the stream closed as a last event, as browsers do."""
        if self._buffer.strip():
            self._event(bytes(self._buffer))
            self._unfinished = True
        self._buffer.clear()

    def closing(self) -> bytes:
        """What ends the event the stream stopped inside, if it did (a blank line), so that
        an event the gateway sends after it is read as one of its own."""
        if self._unfinished or self._buffer.strip():
            return b"\n\n"
        return b""

    def _event(self, block: bytes) -> None:
        raw = _first_line_name(block)  # the shape every upstream sends, read without a regex
        if raw:
            name: str | None = raw.decode("utf-8", "replace")
        elif not block.strip():
            return
        else:
            name = _event_name(block)
        self.events += 1
        if name is None:
            # A client reads an `error` in the data of an event with no name as a failure.
            self.rewriting = True
            if not _TERMINAL_HINT.search(block):
                return
            data = _parse_data(block)
            name = data.get("type") if isinstance(data, dict) else None
            if name not in TERMINAL_TYPES:
                return
            self._set_terminal(str(name), data)
            return
        if name in DELTA_TYPES:
            self.deltas.append(block)
        elif name in TERMINAL_TYPES:
            self._set_terminal(name, _parse_data(block))
        elif name == "response.created" and self._created_block is None:
            self._created_block = block
        elif name == RATE_LIMITS_TYPE:
            self._rate_limits_block = block

    def _set_terminal(self, name: str, data: Any) -> None:
        if name in ERROR_TYPES:
            self.rewriting = True  # a second one, after the first terminal event, too
        if self.terminal is not None:
            return
        self.terminal_type = name
        self.terminal = data if isinstance(data, dict) else {}


def _has_lone_cr(raw: bytes) -> bool:
    return b"\r" in raw and _LONE_CR.search(raw) is not None


def _may_report_failure(block: bytes) -> bool:
    """Whether a whole event, as it came, may report a failure: it is named `error` or
    `response.failed`, or has no name, or has a line that ends in a CR alone and so may hold
    events the scanner did not split out."""
    if _has_lone_cr(block):
        return True
    name = _event_type(block)
    return name is None or name in ERROR_TYPES


def _event_type(block: bytes) -> str | None:
    """An event's name as the scanner reads it, from the bytes as they came; None when it
    has none (a comment, data that is not JSON or names no type)."""
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n")
    raw = _first_line_name(block)
    if raw:
        return raw.decode("utf-8", "replace")
    name = _event_name(block)
    if name is not None:
        return name
    data = _parse_data(block)
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def _first_line_name(block: bytes) -> bytes:
    """The name on an event's first line when it is an `event: ` line and no other line is
    an `event` field; empty otherwise, for `_event_name`. An event of two lines, as upstreams
    send them, costs one search for its last line end more than its first line's name.
    `StreamScanner.feed` makes the same check inline for delta events: change both."""
    if not block.startswith(b"event: "):
        return b""
    newline = block.find(b"\n")
    if newline < 0:
        return block[7:]
    if block.rfind(b"\n") != newline and block.find(b"\nevent", newline) >= 0:
        return b""
    return block[7:newline]


def _event_name(block: bytes) -> str | None:
    """An event's name as a client reads it, from its last `event` line; when that names
    nothing (or there is none), the leading `"type"` of its data."""
    names = _EVENT_LINE.findall(block)
    name = names[-1].strip() if names else b""
    if not name:
        match = _LEADING_TYPE.search(block)
        name = match.group(1).strip() if match else b""
    return name.decode("utf-8", "replace") if name else None


def _parse_data(block: bytes) -> Any:
    values = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    data = upstream_json(b"\n".join(values))
    if data is None and len(values) > 1:
        # A string cut across data lines (a client reads a line break inside it): read as
        # the upstream wrote it, so that what it says can be told and kept.
        data = upstream_json(b"".join(values))
    return data


def upstream_json(payload: bytes) -> Any:
    """What an upstream sent as JSON (an event's data, a response body), or None when it is
    not JSON."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _parse_with_lone_surrogates(payload)


def _parse_with_lone_surrogates(payload: bytes) -> Any:
    """JSON that orjson refuses only for a lone surrogate escape such as `\\ud800` (valid
    JSON, but no character), as Python's own parser reads it, each lone surrogate replaced by
    U+FFFD, so that the usage it carries is billed and its text can be stored and logged;
    None for anything else that is not JSON."""
    if b"\\ud" not in payload.lower():
        return None
    try:
        data = json.loads(payload, parse_constant=_refuse_constant, parse_int=_int_of_64_bits)
    except (ValueError, RecursionError):
        return None
    return _without_surrogates(data)


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity, which Python's parser takes and orjson does not."""
    raise ValueError(f"{name} is not JSON")


def _int_of_64_bits(text: str) -> int:
    """A whole number as orjson reads it: one of more than 64 bits is refused."""
    number = int(text)
    if not -(2**63) <= number < 2**64:
        raise ValueError("a whole number of more than 64 bits")
    return number


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    return value


def iter_events(raw: bytes) -> list[bytes]:
    """Split a whole SSE document into event blocks, each with its trailing blank line."""
    text = raw.replace(b"\r\n", b"\n")
    return [block + b"\n\n" for block in text.split(b"\n\n") if block.strip()]


def error_event(code: str, message: str) -> bytes:
    """A top-level Responses `error` event, for a stream the gateway has to end itself."""
    data = {"type": "error", "code": code, "message": message, "param": None}
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def event_data(block: bytes) -> Any:
    """The JSON data of one event block, or None when it is not JSON."""
    return _parse_data(block)


def parse_events(raw: bytes) -> list[Any]:
    """The JSON data of every event in a whole SSE document, in order."""
    return [event_data(block) for block in iter_events(raw)]


class EventSplitter:
    """Cuts a byte stream into whole event blocks as each one completes, for translation."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer
        split_crlf = buffer.endswith(b"\r")
        buffer += chunk
        if split_crlf or b"\r" in chunk:
            buffer[:] = buffer.replace(b"\r\n", b"\n")
        blocks = buffer.split(b"\n\n")
        self._buffer = bytearray(blocks.pop())
        return [bytes(block) for block in blocks if block.strip()]

    def finish(self) -> list[bytes]:
        """What is left after the stream closed counts as a last event, as browsers do."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return [rest] if rest.strip() else []
