"""ChatGPT account credentials: reading Codex's auth.json, sealing tokens, refreshing them.

Refresh tokens are single-use and rotate on every refresh. `TokenRefresher.refresh` holds
the account's database row lock for the whole exchange with the token endpoint and commits
the new tokens before it hands the new access token out, so of several processes that find
the same token expired, one refreshes and the others pick up its result. Since the lock is
held meanwhile, the exchange has a time limit of its own, far below the relay's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import jwt
import orjson

from codex_gateway.config import Settings
from codex_gateway.errors import CredentialError, TokenRefreshError, UpstreamError
from codex_gateway.store.credentials import (
    STATE_NEEDS_RELOGIN,
    ChatGPTAccount,
    CredentialStore,
    SealedTokens,
)
from codex_gateway.upstream.client import UpstreamResponse
from codex_gateway.upstream.sealing import (
    SET_A_SECRET_KEY,
    TokenCipher,
    configured_cipher,
    opens,
)

log = logging.getLogger(__name__)

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
AUTH_CLAIM = "https://api.openai.com/auth"
REFRESH_MARGIN = timedelta(minutes=5)
# Codes the token endpoint gives for a refresh token that can never work again.
PERMANENT_REFRESH_CODES = frozenset(
    {"refresh_token_reused", "refresh_token_expired", "refresh_token_invalidated"}
)
# A token endpoint's answer is a few KB; anything far larger is not one.
MAX_TOKEN_RESPONSE = 1024 * 1024


# -- auth.json and JWT claims ---------------------------------------------------------------


@dataclass(frozen=True)
class CodexTokens:
    """The tokens of one ChatGPT sign-in; the tokens themselves never appear in a repr."""

    account_id: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    id_token: str | None = field(default=None, repr=False)
    expires_at: datetime | None = None
    plan_type: str | None = None


def read_codex_auth(path: Path) -> CodexTokens:
    """The ChatGPT tokens in a Codex `auth.json` (`$CODEX_HOME/auth.json`)."""
    try:
        document = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError:
        raise CredentialError(f"{path} is not JSON; expected a Codex auth.json") from None
    tokens = document.get("tokens") if isinstance(document, dict) else None
    if not isinstance(tokens, dict):
        raise CredentialError(
            f"{path} has no ChatGPT tokens (no 'tokens' object); sign in to Codex with "
            "ChatGPT first, or add an API key account with `accounts add`"
        )
    access = _required_token(tokens, "access_token", path)
    refresh = _required_token(tokens, "refresh_token", path)
    id_token = tokens.get("id_token") if isinstance(tokens.get("id_token"), str) else None
    claims = _auth_claims(id_token) or _auth_claims(access)
    account_id = claims.get("chatgpt_account_id") or tokens.get("account_id")
    if not isinstance(account_id, str) or not account_id:
        raise CredentialError(
            f"{path}: neither the id_token nor the access token names a ChatGPT account "
            f"(claim {AUTH_CLAIM!r} -> 'chatgpt_account_id')"
        )
    plan = claims.get("chatgpt_plan_type")
    return CodexTokens(
        account_id,
        access,
        refresh,
        id_token,
        jwt_expiry(access),
        plan if isinstance(plan, str) else None,
    )


def _required_token(tokens: dict[str, Any], name: str, path: Path) -> str:
    value = tokens.get(name)
    if not isinstance(value, str) or not value:
        raise CredentialError(f"{path}: tokens.{name} is missing")
    return value


def jwt_claims(token: str | None) -> dict[str, Any]:
    """A JWT's claims, unverified (the signature is the issuer's business); {} if unreadable."""
    if not token:
        return {}
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _auth_claims(token: str | None) -> dict[str, Any]:
    claims = jwt_claims(token).get(AUTH_CLAIM)
    return claims if isinstance(claims, dict) else {}


def jwt_expiry(token: str | None) -> datetime | None:
    expiry = jwt_claims(token).get("exp")
    if isinstance(expiry, bool) or not isinstance(expiry, int | float):
        return None
    return datetime.fromtimestamp(expiry, UTC)


def expiring(expires_at: datetime | None, now: datetime) -> bool:
    """True when a token expires within the refresh margin (unknown expiry never does)."""
    if expires_at is None:
        return False
    if expires_at.tzinfo is None:  # SQLite gives back naive UTC
        expires_at = expires_at.replace(tzinfo=UTC)
    return expires_at - now < REFRESH_MARGIN


# -- sealing tokens at rest -----------------------------------------------------------------


def seal_tokens(cipher: TokenCipher, tokens: CodexTokens) -> SealedTokens:
    return SealedTokens(
        cipher.seal(tokens.access_token),
        cipher.seal(tokens.refresh_token),
        cipher.seal(tokens.id_token) if tokens.id_token else None,
        tokens.expires_at,
    )


def load_cipher(settings: Settings) -> TokenCipher:
    """The cipher for this gateway's secret key; without a key, tokens are never stored."""
    cipher = configured_cipher(settings)
    if cipher is None:
        raise CredentialError(
            f"refusing to store ChatGPT tokens without a secret key: {SET_A_SECRET_KEY}"
        )
    return cipher


# -- refreshing -----------------------------------------------------------------------------


class Poster(Protocol):
    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse: ...


@dataclass(frozen=True)
class _Refreshed:
    access_token: str
    refresh_token: str
    id_token: str | None
    expires_at: datetime | None


def refresh_request(refresh_token: str) -> bytes:
    """The body Codex itself sends to the token endpoint."""
    return orjson.dumps(
        {
            "client_id": CLIENT_ID,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "scope": "openid profile email",
        }
    )


def permanent_failure(body: bytes) -> str | None:
    """The code of a refresh failure that no retry can fix, wherever the endpoint put it."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    candidates = [
        error.get("code") if isinstance(error, dict) else error,
        document.get("code"),
    ]
    return next((str(c) for c in candidates if c in PERMANENT_REFRESH_CODES), None)


def parse_refreshed(body: bytes, previous: CodexTokens, now: datetime) -> _Refreshed:
    """New tokens from the endpoint; a token it leaves out stays as it was."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    access = document.get("access_token") if isinstance(document, dict) else None
    if not isinstance(document, dict) or not isinstance(access, str) or not access:
        raise TokenRefreshError(
            "The token endpoint answered without an access token.", permanent=False
        )
    refresh = document.get("refresh_token")
    id_token = document.get("id_token")
    expires_at = jwt_expiry(access)
    if expires_at is None and isinstance(document.get("expires_in"), int):
        expires_at = now + timedelta(seconds=document["expires_in"])
    return _Refreshed(
        access,
        refresh if isinstance(refresh, str) and refresh else previous.refresh_token,
        id_token if isinstance(id_token, str) and id_token else previous.id_token,
        expires_at,
    )


class TokenRefresher:
    """Hands out a ChatGPT account's access token, refreshing it when due or after a 401.

    Tokens are cached in memory, so the common case needs no database round trip.
    """

    def __init__(
        self,
        credentials: CredentialStore,
        cipher: TokenCipher,
        poster: Poster,
        token_url: str,
        *,
        timeout: float,
    ):
        self._credentials = credentials
        self._cipher = cipher
        self._poster = poster
        self._token_url = token_url
        self._timeout = timeout
        self._cache: dict[int, tuple[str, datetime | None]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def access_token(self, account_id: int) -> str:
        """A usable access token: cached, stored, or refreshed when it expires within 5 min."""
        now = datetime.now(UTC)
        cached = self._cache.get(account_id)
        if cached is not None and not expiring(cached[1], now):
            return cached[0]
        account = await self._credentials.account(account_id)
        self._refuse_if_relogin(account)
        token = self._cipher.open(account.tokens.access_token)
        if expiring(account.tokens.expires_at, now):
            return await self.refresh(account_id, stale=token)
        self._cache[account_id] = (token, account.tokens.expires_at)
        return token

    async def opens(self, account_id: int) -> bool:
        """Whether this process's secret key opens the account's stored tokens."""
        account = await self._credentials.account(account_id)
        return opens(self._cipher, account.tokens.refresh_token)

    async def refresh(self, account_id: int, stale: str | None) -> str:
        """Refresh unless another process already replaced `stale`; returns the new token.

        Pass the access token that failed (or expired) as `stale`, None to refresh regardless.
        """
        lock = self._locks.setdefault(account_id, asyncio.Lock())
        async with lock:
            self._cache.pop(account_id, None)
            failure: TokenRefreshError | None = None
            async with self._credentials.locked(account_id) as locked:
                account = locked.account
                self._refuse_if_relogin(account)
                current = self._cipher.open(account.tokens.access_token)
                replaced = stale is not None and current != stale
                if replaced and not expiring(account.tokens.expires_at, datetime.now(UTC)):
                    self._cache[account_id] = (current, account.tokens.expires_at)
                    return current
                try:
                    refreshed = await self._exchange(account)
                except TokenRefreshError as exc:
                    if not exc.permanent:
                        raise
                    await locked.mark_needs_relogin(exc.reason or "refresh refused")
                    failure = exc
                else:
                    await locked.save_tokens(self._seal(refreshed))
            # the block has committed: the new refresh token is stored before anyone uses
            # the new access token
            if failure is not None:
                log.warning(
                    "ChatGPT account %s needs a new sign-in: %s",
                    account.name,
                    failure.reason,
                    extra={"account": account.name},
                )
                raise failure
            log.info(
                "refreshed the access token of ChatGPT account %s",
                account.name,
                extra={"account": account.name},
            )
            self._cache[account_id] = (refreshed.access_token, refreshed.expires_at)
            return refreshed.access_token

    def forget(self, account_id: int) -> None:
        self._cache.pop(account_id, None)

    async def _exchange(self, account: ChatGPTAccount) -> _Refreshed:
        previous = CodexTokens(
            account.chatgpt_account_id,
            self._cipher.open(account.tokens.access_token),
            self._cipher.open(account.tokens.refresh_token),
            self._cipher.open(account.tokens.id_token) if account.tokens.id_token else None,
        )
        headers = {"content-type": "application/json", "accept": "application/json"}
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._poster.post(
                    self._token_url, headers, refresh_request(previous.refresh_token)
                )
                try:
                    body = await response.read(MAX_TOKEN_RESPONSE)
                except BaseException:
                    response.close()
                    raise
        except TimeoutError:
            # Not the sign-in's fault: the account rests a while and is tried again.
            raise TokenRefreshError(
                f"The token endpoint did not answer a refresh within {self._timeout:g} s; "
                "the account is tried again later.",
                permanent=False,
                reason="token endpoint timeout",
            ) from None
        except UpstreamError as exc:
            raise TokenRefreshError(
                f"Could not reach the token endpoint to refresh an access token: {exc.message}",
                permanent=False,
            ) from None
        if response.status == 200:
            return parse_refreshed(body, previous, datetime.now(UTC))
        code = permanent_failure(body)
        if code is not None:
            raise TokenRefreshError(
                f"The ChatGPT account's sign-in is no longer valid ({code}); "
                "import fresh credentials with `accounts import-codex`.",
                permanent=True,
                reason=f"token refresh refused: {code} (HTTP {response.status})",
            )
        raise TokenRefreshError(
            f"The token endpoint answered HTTP {response.status} to a refresh.", permanent=False
        )

    def _seal(self, refreshed: _Refreshed) -> SealedTokens:
        return SealedTokens(
            self._cipher.seal(refreshed.access_token),
            self._cipher.seal(refreshed.refresh_token),
            self._cipher.seal(refreshed.id_token) if refreshed.id_token else None,
            refreshed.expires_at,
        )

    @staticmethod
    def _refuse_if_relogin(account: ChatGPTAccount) -> None:
        if account.state == STATE_NEEDS_RELOGIN:
            raise TokenRefreshError(
                f"The ChatGPT account {account.name} needs a new sign-in: {account.state_reason}",
                permanent=True,
                reason=account.state_reason,
            )
