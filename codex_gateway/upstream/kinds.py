"""How a request reaches each kind of upstream account: its URL, headers and body.

An `openai` account (the OpenAI API, or anything that speaks it) gets the client's body byte
for byte with the account's API key. A `chatgpt` account (the Codex backend behind "Sign in
with ChatGPT") gets the body shaped to that backend's rules, an access token that is fresh,
its ChatGPT account id and a session id derived per gateway key; when that backend answers
401, the token is refreshed once and the same account is tried once more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, NamedTuple, Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from codex_gateway.errors import CredentialError, TokenRefreshError
from codex_gateway.relay.chatgpt import (
    COMPACT_PATH,
    RESPONSES_PATH,
    SessionIds,
    client_session,
    shape_body,
    shape_compact_body,
    upstream_headers,
)
from codex_gateway.relay.shaping import forward_headers
from codex_gateway.store.credentials import KIND_CHATGPT
from codex_gateway.store.queries import AccountRecord, StoreError
from codex_gateway.upstream.chatgpt_auth import TokenRefresher

KIND_OPENAI = "openai"
RESPONSES = "responses"
COMPACT = "responses.compact"
_OPENAI_PATHS = {RESPONSES: "/responses", COMPACT: "/responses/compact"}
_CHATGPT_PATHS = {RESPONSES: RESPONSES_PATH, COMPACT: COMPACT_PATH}

T = TypeVar("T")


class Call(NamedTuple):
    """What the client asked of the upstream, before any account is chosen."""

    endpoint: str  # RESPONSES or COMPACT
    body: bytes
    document: dict[str, Any]
    client_headers: Mapping[str, str]
    key_id: int
    request_id: str

    def __repr__(self) -> str:  # the client's headers carry its gateway key
        shown = f"endpoint={self.endpoint!r}, key_id={self.key_id}, request_id={self.request_id!r}"
        return f"Call({shown})"


class Outgoing(NamedTuple):
    """One request as it leaves for one account; `credential` is what authenticated it."""

    url: str
    headers: dict[str, str]
    body: bytes
    credential: str

    def __repr__(self) -> str:  # the headers and the credential carry the account's secret
        return f"Outgoing(url={self.url!r})"


class AccountKind(Protocol):
    async def prepare(self, account: AccountRecord, call: Call) -> Outgoing: ...

    async def renew(self, account: AccountRecord, refused: Outgoing) -> bool:
        """After a 401: True when the credential was renewed and one more try is worth it."""
        ...


class OpenAIKind:
    async def prepare(self, account: AccountRecord, call: Call) -> Outgoing:
        headers = forward_headers(call.client_headers, account.api_key)
        url = account.base_url + _OPENAI_PATHS[call.endpoint]
        return Outgoing(url, headers, call.body, account.api_key)

    async def renew(self, account: AccountRecord, refused: Outgoing) -> bool:
        return False  # an API key does not renew itself


class ChatGPTKind:
    def __init__(self, refresher: TokenRefresher, sessions: SessionIds):
        self._refresher = refresher
        self._sessions = sessions

    async def prepare(self, account: AccountRecord, call: Call) -> Outgoing:
        token = await _credentials(self._refresher.access_token(account.id))
        named = client_session(call.client_headers, call.document)
        session = self._sessions.derive(call.key_id, named or call.request_id)
        compact = call.endpoint == COMPACT
        shape = shape_compact_body if compact else shape_body
        headers = upstream_headers(
            access_token=token,
            account_id=account.chatgpt_account_id or "",
            session_id=session,
            client_headers=call.client_headers,
            stream=not compact,
        )
        url = account.base_url + _CHATGPT_PATHS[call.endpoint]
        return Outgoing(url, headers, shape(call.document, session, named), token)

    async def renew(self, account: AccountRecord, refused: Outgoing) -> bool:
        await _credentials(self._refresher.refresh(account.id, stale=refused.credential))
        return True


async def _credentials(pending: Awaitable[T]) -> T:
    """Tokens that cannot be had become an attempt that failed, so the next account is tried."""
    try:
        return await pending
    except CredentialError as exc:
        # This process's key, not the account, is at fault: the account only cools down, so
        # one misconfigured process does not take it out of rotation for every other.
        raise TokenRefreshError(
            "The ChatGPT account's stored tokens cannot be opened.",
            permanent=False,
            reason=str(exc),
        ) from None
    except (StoreError, SQLAlchemyError, OSError) as exc:
        raise TokenRefreshError(
            "The ChatGPT account's tokens could not be read from the database.",
            permanent=False,
            reason=type(exc).__name__,
        ) from None


def account_kinds(chatgpt: ChatGPTKind | None) -> dict[str, AccountKind]:
    """The kinds this gateway can relay to; `chatgpt` only with a secret key to open tokens."""
    kinds: dict[str, AccountKind] = {KIND_OPENAI: OpenAIKind()}
    if chatgpt is not None:
        kinds[KIND_CHATGPT] = chatgpt
    return kinds
