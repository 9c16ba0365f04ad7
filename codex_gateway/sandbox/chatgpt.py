"""A mock of the ChatGPT Codex backend and its token endpoint, strict about their rules.

Mounted in the sandbox at `/sandbox/chatgpt`: `POST /backend-api/codex/responses` refuses what
the real backend refuses (no `instructions`, `store` not false, `stream` not true, fields it
does not take, missing headers) with its `{"detail": ...}` bodies, answers an expired access
token with 401 `token_expired`, and otherwise replays a transcript with `x-codex-*` quota
headers. `POST /backend-api/codex/responses/compact` (history compaction, one JSON answer)
holds the same rules but for `stream` and `store`, which compaction does not take.
`POST /oauth/token` rotates single-use refresh tokens. `POST /expire-tokens` makes every
access token issued so far expire, as happens in the middle of a long session, and
`POST /token-delay` (`{"seconds": N}`) makes the token endpoint wait that long before it
answers, as one that hangs does.
Sandbox headers do not travel through the gateway's backend shaping, so an account whose
base URL is `/sandbox/chatgpt/<transcript>/backend-api` picks the transcript instead
(`tool-conversation` plays the two-turn tool exchange, as the OpenAI sandbox does).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import jwt
import orjson

from codex_gateway.http.exchange import Receive, Scope, Send
from codex_gateway.relay.chatgpt import UNSUPPORTED_FIELDS
from codex_gateway.sandbox.app import (
    COMPACT_TRANSCRIPT,
    DEFAULT_TRANSCRIPT,
    TOOL_CONVERSATION,
    _json,
    _read,
    _replay_json,
    tool_turn,
)

RESPONSES = "/backend-api/codex/responses"
COMPACT = "/backend-api/codex/responses/compact"
TOKEN = "/oauth/token"
EXPIRE = "/expire-tokens"
TOKEN_DELAY = "/token-delay"
ACCOUNT_ID = "sandbox-chatgpt-account"
ACCESS_TOKEN_SECONDS = 3600
_SIGNING_KEY = "sandbox-only-signing-key-never-a-secret"  # the gateway never verifies it
QUOTA_HEADERS = [
    (b"x-codex-primary-used-percent", b"12.5"),
    (b"x-codex-primary-window-minutes", b"300"),
    (b"x-codex-secondary-used-percent", b"40.0"),
    (b"x-codex-secondary-window-minutes", b"10080"),
]
REQUIRED_HEADERS = ("chatgpt-account-id", "originator", "session_id")
# What Codex never sends to the compaction endpoint [inferred: its CompactionInput has neither].
COMPACT_REFUSED = frozenset({"stream", "store"})


def access_token(account_id: str = ACCOUNT_ID, lifetime: float = ACCESS_TOKEN_SECONDS) -> str:
    """An access token shaped like the real ones: the account claim, `iat` and `exp`."""
    now = time.time()
    claims = {
        "iat": now,
        "exp": int(now + lifetime),
        "https://api.openai.com/auth": {"chatgpt_account_id": account_id},
    }
    return jwt.encode(claims, _SIGNING_KEY, algorithm="HS256")


def violation(
    headers: dict[str, str], document: Any, compact: bool = False
) -> tuple[int, dict[str, Any]] | None:
    """What the backend says about a request that breaks its rules, or None."""
    missing = [name for name in REQUIRED_HEADERS if not headers.get(name)]
    if missing:
        return 400, {"detail": f"Missing required header: {missing[0]}"}
    if not isinstance(document, dict):
        return 400, {"detail": "The body must be a JSON object"}
    if not isinstance(document.get("instructions"), str):
        return 400, {"detail": "Instructions are required"}
    if not compact and document.get("store") is not False:
        return 400, {"detail": "Store must be set to false"}
    if not compact and document.get("stream") is not True:
        return 400, {"detail": "Stream must be set to true"}
    unsupported = sorted(
        (UNSUPPORTED_FIELDS | (COMPACT_REFUSED if compact else set())) & set(document)
    )
    if unsupported:
        return 400, {"detail": f"Unsupported parameter: {unsupported[0]}"}
    return None


class ChatGPTBackend:
    def __init__(self, transcripts: dict[str, Any], requests: deque[dict[str, Any]] | None):
        self._transcripts = transcripts
        self._requests = requests
        self._expired_before = 0.0
        self._used_refresh_tokens: set[str] = set()
        self._token_delay = 0.0
        self.refresh_calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = await _read(receive)
        if self._requests is not None:  # only a recording sandbox keeps requests
            self._requests.append(
                {"path": scope["path"], "headers": headers, "body": body.decode("utf-8", "replace")}
            )
        transcript, path = _transcript_segment(path)
        if path in (RESPONSES, COMPACT):
            await self._responses(send, headers, body, transcript, path == COMPACT)
        elif path == TOKEN:
            await self._token(send, body)
        elif path == EXPIRE:
            self._expired_before = time.time()
            await _json(send, 200, {"expired_before": self._expired_before})
        elif path == TOKEN_DELAY:
            self._token_delay = float(orjson.loads(body)["seconds"])
            await _json(send, 200, {"seconds": self._token_delay})
        else:
            await _json(send, 404, {"detail": "Not Found"})

    async def _responses(
        self,
        send: Send,
        headers: dict[str, str],
        body: bytes,
        transcript_name: str | None,
        compact: bool,
    ) -> None:
        refused = self._auth(headers)
        document: Any = None
        if refused is None:
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                refused = 400, {"detail": "The body is not JSON"}
            else:
                refused = violation(headers, document, compact)
        if refused is not None:
            await _json(send, *refused)
            return
        name = _transcript_name(transcript_name, headers, document, compact)
        transcript = self._transcripts.get(name)
        if transcript is None:
            await _json(send, 400, {"detail": f"Unknown sandbox transcript {name!r}"})
        elif transcript.json is not None:
            await _replay_json(send, transcript.json)
        else:
            await _stream(send, transcript.events)

    def _auth(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            claims = None
        if scheme.lower() != "bearer" or not isinstance(claims, dict):
            return 401, _error("Missing or malformed access token.", "invalid_api_key")
        expired = claims.get("exp", 0) <= time.time()
        if expired or claims.get("iat", 0) < self._expired_before:
            return 401, _error("Your authentication token has expired.", "token_expired")
        return None

    async def _token(self, send: Send, body: bytes) -> None:
        self.refresh_calls += 1
        await asyncio.sleep(self._token_delay)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        refresh = document.get("refresh_token") if isinstance(document, dict) else None
        if not isinstance(refresh, str) or document.get("grant_type") != "refresh_token":
            await _json(send, 400, {"error": "invalid_request"})
            return
        if refresh in self._used_refresh_tokens:
            await _json(send, 401, _error("This refresh token was used.", "refresh_token_reused"))
            return
        self._used_refresh_tokens.add(refresh)
        rotated = f"rt_sandbox_{self.refresh_calls}_{int(time.time() * 1000)}"
        await _json(send, 200, {"access_token": access_token(), "refresh_token": rotated})


def _transcript_name(
    named: str | None, headers: dict[str, str], document: dict[str, Any], compact: bool
) -> str:
    """Compaction answers with the compacted history, unless the base URL names another
    transcript (a usage wall); a request plays the transcript its account's base URL names."""
    name = named or headers.get("x-sandbox-transcript")
    if compact:
        return name if name and name != TOOL_CONVERSATION else COMPACT_TRANSCRIPT
    if name == TOOL_CONVERSATION:
        return tool_turn(document)
    return name or DEFAULT_TRANSCRIPT


def _transcript_segment(path: str) -> tuple[str | None, str]:
    """`/responses-cached/backend-api/codex/responses` names the transcript to play."""
    if path.startswith(("/backend-api/", TOKEN, EXPIRE, TOKEN_DELAY)):
        return None, path
    name, _, rest = path.removeprefix("/").partition("/")
    return name, "/" + rest


def _error(message: str, code: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}
    }


async def _stream(send: Send, events: list[bytes]) -> None:
    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), *QUOTA_HEADERS]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
