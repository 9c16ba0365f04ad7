"""The rules of the ChatGPT Codex backend, without I/O.

That backend (what Codex CLI talks to after "Sign in with ChatGPT") takes a Responses body
but insists on `instructions`, `store: false` and `stream: true`, rejects several fields, and
reports quota in `x-codex-*` headers and `usage_limit_reached` errors. Session ids sent to it
are derived per gateway key with a keyed hash, so two tenants never share one upstream session.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from codex_gateway.errors import UpstreamProtocolError, UpstreamStatusError
from codex_gateway.relay.redaction import redact_json, redact_text
from codex_gateway.relay.sse import parse_events

DEFAULT_BASE_URL = "https://chatgpt.com/backend-api"
RESPONSES_PATH = "/codex/responses"
COMPACT_PATH = "/codex/responses/compact"
DEFAULT_ORIGINATOR = "codex_cli_rs"

# Fields the backend rejects or ignores (protocol reference §4.3).
UNSUPPORTED_FIELDS = frozenset(
    {
        "max_output_tokens",
        "metadata",
        "prompt_cache_retention",
        "safety_identifier",
        "temperature",
        "top_p",
        "truncation",
        "user",
    }
)
ALLOWED_INCLUDE = frozenset(
    {
        "reasoning.encrypted_content",
        "message.output_text.logprobs",
        "web_search_call.action.sources",
        "file_search_call.results",
        "code_interpreter_call.outputs",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
    }
)
# Client headers that name a session; each is replaced by the tenant's derived id.
SESSION_HEADERS = ("session_id", "session-id", "conversation_id", "thread-id", "thread_id")
_PASSED_HEADERS = ("user-agent", "version", "x-openai-subagent")
_MIN_SESSION_LENGTH = 8
_INSTRUCTION_ROLES = frozenset({"developer", "system"})
_TEXT_PARTS = frozenset({"input_text", "text"})
# Every rate-limit window header begins so; an answer with none is done with at once.
_QUOTA_HEADER_PREFIX = "x-codex-"


# -- the request body ---------------------------------------------------------------------


def shape_body(
    document: dict[str, Any], session: str | None = None, client_session: str | None = None
) -> bytes:
    """A Responses body as the backend accepts it; the client's document is not changed.

    With `session` (the derived id), the client's own id (`client_session`) is replaced by it
    wherever Codex repeats it in the body: `prompt_cache_key` and `client_metadata`.
    """
    body = _shaped(document, session, client_session)
    body["store"] = False
    body["stream"] = True
    return orjson.dumps(body)


def shape_compact_body(
    document: dict[str, Any], session: str | None = None, client_session: str | None = None
) -> bytes:
    """A `/responses/compact` body: the same rules, but compaction is neither streamed nor
    stored, so (as in what Codex itself sends there) neither field is sent."""
    body = _shaped(document, session, client_session)
    body.pop("store", None)
    body.pop("stream", None)
    return orjson.dumps(body)


def _shaped(
    document: dict[str, Any], session: str | None, client_session: str | None
) -> dict[str, Any]:
    body = {name: value for name, value in document.items() if name not in UNSUPPORTED_FIELDS}
    if not isinstance(body.get("instructions"), str):
        body["instructions"], body["input"] = split_instructions(body.get("input"))
    if isinstance(body.get("include"), list):
        body["include"] = [name for name in body["include"] if name in ALLOWED_INCLUDE]
    if session is None:
        return body
    if "prompt_cache_key" in body:
        body["prompt_cache_key"] = session
    metadata = body.get("client_metadata")
    if isinstance(metadata, dict) and client_session and len(client_session) >= _MIN_SESSION_LENGTH:
        body["client_metadata"] = {
            name: value.replace(client_session, session) if isinstance(value, str) else value
            for name, value in metadata.items()
        }
    return body


def split_instructions(input_: Any) -> tuple[str, Any]:
    """Move leading developer/system text messages out of `input` into `instructions`.

    Codex CLI 0.169.0 sends its base prompt as the first developer item and no instructions.
    A leading message with anything but text stays in `input`, and so does all that follows.
    """
    if not isinstance(input_, list):
        return "", input_
    texts: list[str] = []
    for item in input_:
        text = _instruction_text(item)
        if text is None:
            break
        texts.append(text)
    return "\n\n".join(texts), input_[len(texts) :]


def _instruction_text(item: Any) -> str | None:
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        return None
    if item.get("role") not in _INSTRUCTION_ROLES:
        return None
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    if not all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content):
        return None
    return "".join(str(part.get("text", "")) for part in content)


# -- sessions and headers -----------------------------------------------------------------


class SessionIds:
    """Derives the session id sent upstream from a gateway key and the client's own id.

    The same key and client id always give the same upstream id (so the backend's prompt
    cache keeps working); different keys never do, and the client's value is not revealed.
    """

    def __init__(self, secret: bytes):
        self._secret = secret

    def derive(self, key_id: int, client_value: str) -> str:
        message = f"{key_id}\x00{client_value}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return str(uuid.UUID(bytes=digest[:16], version=4))

    def for_request(
        self, key_id: int, headers: Mapping[str, str], document: dict[str, Any], fallback: str
    ) -> str:
        """The upstream session id: from the client's session header or prompt cache key."""
        return self.derive(key_id, client_session(headers, document) or fallback)


def client_session(headers: Mapping[str, str], document: dict[str, Any]) -> str | None:
    """The session id the client named: a session header, else its prompt cache key."""
    value = next((headers[name] for name in SESSION_HEADERS if headers.get(name)), None)
    if value is None and isinstance(document.get("prompt_cache_key"), str):
        value = document["prompt_cache_key"]
    return value


def upstream_headers(
    *,
    access_token: str,
    account_id: str,
    session_id: str,
    client_headers: Mapping[str, str],
    stream: bool = True,
) -> dict[str, str]:
    """Headers for a backend call; `client_headers` has lower-case names, as the edge keeps them.

    `stream` is False for the one call that answers with JSON (compaction).
    """
    # Codex repeats its session id inside other x-codex-* values (turn metadata, window id);
    # there too it becomes the derived one, so the client's own id never travels upstream.
    # A value too short to be an id would match unrelated text, so it is left alone.
    client_session = next((client_headers[n] for n in SESSION_HEADERS if client_headers.get(n)), "")
    rewrite = len(client_session) >= _MIN_SESSION_LENGTH
    headers = {
        name: value.replace(client_session, session_id) if rewrite else value
        for name, value in client_headers.items()
        if name.startswith("x-codex-") or name in _PASSED_HEADERS
    }
    headers.update(
        {
            "authorization": f"Bearer {access_token}",
            "chatgpt-account-id": account_id,
            "originator": client_headers.get("originator") or DEFAULT_ORIGINATOR,
            "openai-beta": "responses=experimental",
            "session_id": session_id,
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
    )
    return headers


# -- quota ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaWindow:
    used_percent: float
    window_minutes: int | None = None
    resets_at: int | None = None


@dataclass(frozen=True)
class Quota:
    """What the backend last said about an account's usage windows, in unix seconds."""

    primary: QuotaWindow | None = None
    secondary: QuotaWindow | None = None
    limit_reached_until: int | None = None
    plan_type: str | None = None

    def blocked_until(self, now: float) -> int | None:
        """When the account may be used again, if it is at a limit now."""
        times = [self.limit_reached_until] + [
            window.resets_at
            for window in (self.primary, self.secondary)
            if window is not None and window.used_percent >= 100
        ]
        future = [moment for moment in times if moment is not None and moment > now]
        return max(future) if future else None

    def without_walls(self, now: float) -> Quota:
        """This quota with nothing that blocks the account at `now`: no wall time, and no
        window that is full until a reset still ahead (the next answer reports it afresh)."""

        def open_window(window: QuotaWindow | None) -> QuotaWindow | None:
            if window is None or window.used_percent < 100 or (window.resets_at or 0) <= now:
                return window
            return None

        return Quota(open_window(self.primary), open_window(self.secondary), None, self.plan_type)

    def updated(self, newer: Quota) -> Quota:
        """This quota with whatever `newer` knows laid over it."""
        return Quota(
            newer.primary or self.primary,
            newer.secondary or self.secondary,
            newer.limit_reached_until or self.limit_reached_until,
            newer.plan_type or self.plan_type,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "primary": _window_json(self.primary),
            "secondary": _window_json(self.secondary),
            "limit_reached_until": self.limit_reached_until,
            "plan_type": self.plan_type,
        }

    @classmethod
    def from_json(cls, data: Any) -> Quota:
        if not isinstance(data, dict):
            return cls()
        return cls(
            _window_from_json(data.get("primary")),
            _window_from_json(data.get("secondary")),
            _int(data.get("limit_reached_until")),
            data.get("plan_type") if isinstance(data.get("plan_type"), str) else None,
        )


def _window_json(window: QuotaWindow | None) -> dict[str, Any] | None:
    if window is None:
        return None
    return {
        "used_percent": window.used_percent,
        "window_minutes": window.window_minutes,
        "resets_at": window.resets_at,
    }


def _window_from_json(data: Any) -> QuotaWindow | None:
    if not isinstance(data, dict):
        return None
    used = _float(data.get("used_percent"))
    if used is None:
        return None
    # stored windows say `resets_at`; the backend's `codex.rate_limits` event says `reset_at`
    resets_at = data.get("resets_at", data.get("reset_at"))
    return QuotaWindow(used, _int(data.get("window_minutes")), _int(resets_at))


def quota_from_headers(headers: Mapping[str, str]) -> Quota | None:
    """The `x-codex-primary-*` / `x-codex-secondary-*` windows of a response, if it has any."""
    lowered = {
        name.lower(): value
        for name, value in headers.items()
        if name[:8].lower() == _QUOTA_HEADER_PREFIX
    }
    if not lowered:
        return None
    primary = _header_window(lowered, "x-codex-primary-")
    secondary = _header_window(lowered, "x-codex-secondary-")
    if primary is None and secondary is None:
        return None
    return Quota(primary, secondary)


def _header_window(headers: Mapping[str, str], prefix: str) -> QuotaWindow | None:
    used = _float(headers.get(prefix + "used-percent"))
    if used is None:
        return None
    return QuotaWindow(
        used,
        _int(headers.get(prefix + "window-minutes")),
        _int(headers.get(prefix + "reset-at")),
    )


def quota_from_event(event: Any) -> Quota | None:
    """The windows in a `codex.rate_limits` stream event."""
    if not isinstance(event, dict) or event.get("type") != "codex.rate_limits":
        return None
    limits = event.get("rate_limits")
    limits = limits if isinstance(limits, dict) else {}
    primary = _window_from_json(limits.get("primary"))
    secondary = _window_from_json(limits.get("secondary"))
    plan = event.get("plan_type") if isinstance(event.get("plan_type"), str) else None
    if primary is None and secondary is None:
        return None
    return Quota(primary, secondary, plan_type=plan)


def usage_limit(payload: Any, now: float) -> Quota | None:
    """A `usage_limit_reached` error (a 429 body or an `error` event) as a quota at its limit.

    `resets_at` is authoritative while it lies ahead; one already past (a clock apart from
    the backend's, or a replayed answer) gives way to `now + resets_in_seconds`.
    """
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or error.get("type") != "usage_limit_reached":
        return None
    resets_at = _int(error.get("resets_at"))
    seconds = _int(error.get("resets_in_seconds"))
    if (resets_at is None or resets_at <= now) and seconds is not None:
        resets_at = int(now) + seconds
    plan = error.get("plan_type") if isinstance(error.get("plan_type"), str) else None
    return Quota(limit_reached_until=resets_at, plan_type=plan)


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


# -- a whole response for a client that did not stream ------------------------------------


class ResponseAssembler:
    """Collects a backend stream into the final response object a non-streaming client gets.

    The terminal event carries the response; when its `output` is empty (the backend may leave
    it so), the items from `response.output_item.done` events are filled in, in order. A
    failed response, and an `error` event's reason, are given with their secrets (the `known`
    ones and any of a key's or token's shape) replaced.
    """

    __slots__ = ("_error", "_items", "_known", "_response")

    def __init__(self, known: Sequence[str] = ()) -> None:
        self._known = known
        self._items: dict[int, dict[str, Any]] = {}
        self._response: dict[str, Any] | None = None
        self._error: dict[str, Any] | None = None

    def feed(self, event: Any) -> None:
        if not isinstance(event, dict) or self._response is not None or self._error is not None:
            return
        kind = event.get("type")
        if kind == "response.output_item.done" and isinstance(event.get("item"), dict):
            index = event.get("output_index")
            self._items[index if isinstance(index, int) else len(self._items)] = event["item"]
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.get("response")
            self._response = dict(response) if isinstance(response, dict) else {}
        elif kind == "error":
            self._error = event

    def result(self) -> dict[str, Any]:
        if self._error is not None:
            nested = self._error.get("error")
            source = nested if isinstance(nested, dict) else self._error
            code = source.get("code") or source.get("type")
            reason = redact_text(str(source.get("message") or "no reason given"), self._known)
            raise UpstreamStatusError(
                f"The upstream failed: {reason}",
                code=str(code) if code else None,
            )
        if self._response is None:
            raise UpstreamProtocolError(
                "The upstream stream ended before its final event, so there is no response."
            )
        if not self._response.get("output") and self._items:
            self._response["output"] = [self._items[index] for index in sorted(self._items)]
        if self._response.get("status") == "failed":
            return dict(redact_json(self._response, self._known))
        return self._response


def assemble_response(raw: bytes, known: Sequence[str] = ()) -> dict[str, Any]:
    """The final response object from a whole backend stream; the `known` secrets, and any
    other, are taken out of its error."""
    assembler = ResponseAssembler(known)
    for event in parse_events(raw):
        assembler.feed(event)
    return assembler.result()


def with_quota(current: Quota | None, newer: Quota | None) -> Quota | None:
    """Lay a newer reading over the last one kept for an account."""
    if newer is None:
        return current
    return newer if current is None else current.updated(newer)
