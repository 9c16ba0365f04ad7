"""Secrets taken out of an upstream's error text before a client or a usage row sees it.

An upstream's answer about a request (a 4xx body, a failed response's message) is relayed
to the client and kept in the usage row, and it may quote a credential: the account's own
key, or the token it was sent. Anything shaped like an API key, a bearer token or a JWT is
replaced, and so are the account's key and the token sent verbatim, whatever their shape;
the rest of the text, and a JSON body's shape, are kept.

Everything that reports a failure is redacted: a 4xx body, a failed response sent whole,
the error a chat client or a non-streaming client is shown, the `response.failed` and `error`
events of a stream relayed as it comes, and any event with no name (`redact_event`: every
line of it, a secret cut across its data lines too; the scanner holds an event back until it
is whole), and the usage row. The other events of a stream pass as they came.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from codex_gateway.relay.sse import upstream_json

REDACTED = "[redacted]"
# An `sk-` key (sk-proj-..., a gateway's sk-cg-...), a bearer token, a JWT (a ChatGPT
# account's access token is one).
_SECRET = re.compile(
    r"(?P<scheme>\b[Bb][Ee][Aa][Rr][Ee][Rr]\s+)[A-Za-z0-9._~+/=-]{8,}"
    r"|\bsk-[A-Za-z0-9_-]{8,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
)
# A configured key shorter than this is not looked for verbatim: it would match plain words.
MIN_KNOWN_LENGTH = 8
# The end of a line of an event, as a client reads it.
_LINE_END = re.compile(rb"\r\n|\r|\n")


def redact_text(text: str, known: Sequence[str] = ()) -> str:
    """`text` with every secret in it, and every `known` one, replaced by REDACTED."""
    for secret in known:
        if len(secret) >= MIN_KNOWN_LENGTH and secret in text:
            text = text.replace(secret, REDACTED)
    return _SECRET.sub(_replacement, text)


def redact_body(body: bytes, known: Sequence[str] = ()) -> bytes:
    """An upstream body with its secrets replaced: JSON stays JSON of the same shape (encoded
    anew only when something was replaced), anything else is redacted as text; a body with
    nothing to replace comes back as it was. JSON nested too deep to encode again is redacted
    as text too."""
    document = upstream_json(body)
    if document is not None:
        try:
            cleaned = redact_json(document, known)
            return body if cleaned == document else orjson.dumps(cleaned)
        except (orjson.JSONEncodeError, RecursionError):
            pass  # nested deeper than can be walked or written again: redacted as text
    text = body.decode("utf-8", "replace")
    cleaned_text = redact_text(text, known)
    return body if cleaned_text == text else cleaned_text.encode()


def redact_event(block: bytes, known: Sequence[str] = ()) -> bytes:
    """One SSE event (its lines, without the blank line after them) with the secrets in it
    replaced, read as a client reads it: its lines end in LF, CRLF or a CR alone, and its
    `data` lines are joined. Every other line (`id:`, `event:`, a comment, a field no client
    knows) is redacted as text, its field name and colon kept. An event with nothing to
    replace comes back as it was; one that had something keeps its lines in their order, and
    is written with the line ending it used first and with its data where its first `data`
    line was."""
    lines = _LINE_END.split(block)
    data_at = [index for index, line in enumerate(lines) if _is_data(line)]
    data = _redact_data([_data_value(lines[index]) for index in data_at], known)
    written: list[bytes] = []
    for index, line in enumerate(lines):
        if not _is_data(line):
            written.append(_redact_line(line, known))
        elif data is None:
            written.append(line)
        elif index == data_at[0]:
            written.extend(b"data: " + value for value in data)
    if written == lines:
        return block
    first_end = _LINE_END.search(block)
    ending = b"\n" if first_end is None else first_end.group()
    return ending.join(written)


def _redact_data(values: list[bytes], known: Sequence[str]) -> list[bytes] | None:
    """An event's data values redacted, as the lines to write them on; None when there was
    nothing to replace. A client joins them with line breaks, so a secret may be cut across
    two of them: one found once they are joined without the breaks is redacted there, and
    the data written anew on one line."""
    if not values:
        return None
    payload = b"\n".join(values)
    cleaned = redact_body(payload, known)
    if len(values) > 1:
        flat = cleaned.replace(b"\n", b"")
        one_line = redact_body(flat, known)
        if one_line != flat:
            return [one_line]
    return None if cleaned == payload else cleaned.split(b"\n")


def _is_data(line: bytes) -> bool:
    return line.startswith(b"data:") or line == b"data"


def _data_value(line: bytes) -> bytes:
    return line[5:].lstrip(b" ")


def _redact_line(line: bytes, known: Sequence[str]) -> bytes:
    """A line of an event other than its data, its secrets replaced; its other bytes, even
    those that are not UTF-8, as they came."""
    text = line.decode("utf-8", "surrogateescape")
    cleaned = redact_text(text, known)
    return line if cleaned == text else cleaned.encode("utf-8", "surrogateescape")


def redact_json(value: Any, known: Sequence[str] = ()) -> Any:
    """A parsed JSON value with every string in it, keys included, redacted."""
    if isinstance(value, str):
        return redact_text(value, known)
    if isinstance(value, list):
        return [redact_json(item, known) for item in value]
    if isinstance(value, dict):
        return {redact_text(k, known): redact_json(v, known) for k, v in value.items()}
    return value


def _replacement(match: re.Match[str]) -> str:
    return (match.group("scheme") or "") + REDACTED
