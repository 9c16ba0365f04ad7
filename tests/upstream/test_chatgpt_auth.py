"""ChatGPT credentials: auth.json, sealed tokens, and refreshes that happen exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from codex_gateway.config import Settings, local_problems
from codex_gateway.errors import CredentialError, TokenRefreshError
from codex_gateway.store.credentials import STATE_NEEDS_RELOGIN, CredentialStore
from codex_gateway.store.db import create_engine, migrate
from codex_gateway.upstream.chatgpt_auth import (
    CLIENT_ID,
    CodexTokens,
    TokenRefresher,
    expiring,
    jwt_expiry,
    load_cipher,
    permanent_failure,
    read_codex_auth,
    seal_tokens,
)
from codex_gateway.upstream.client import UpstreamClient
from codex_gateway.upstream.sealing import TokenCipher
from tests.upstream.chatgpt_helpers import ACCOUNT, make_jwt

SECRET = "operator-secret-key-0123456789abcdef"


def write_auth(tmp_path: Path, tokens: dict[str, Any]) -> Path:
    path = tmp_path / "auth.json"
    path.write_bytes(orjson.dumps({"OPENAI_API_KEY": None, "tokens": tokens}))
    return path


# -- auth.json ------------------------------------------------------------------------------


def test_auth_json_gives_the_account_from_the_id_token_and_the_access_expiry(
    tmp_path: Path,
) -> None:
    exp = time.time() + 3600
    access = make_jwt(exp, account="from-access")
    path = write_auth(
        tmp_path,
        {
            "id_token": make_jwt(),
            "access_token": access,
            "refresh_token": "rt_1",
            "account_id": "x",
        },
    )

    tokens = read_codex_auth(path)

    assert tokens.account_id == ACCOUNT
    assert tokens.plan_type == "plus"
    assert (tokens.access_token, tokens.refresh_token) == (access, "rt_1")
    assert tokens.expires_at == datetime.fromtimestamp(int(exp), UTC)
    assert "rt_1" not in repr(tokens) and access not in repr(tokens)


@pytest.mark.parametrize(
    ("id_token", "access_account", "stored", "expected"),
    [
        # no id_token: the access token carries the same claim
        (None, "from-access", None, "from-access"),
        # an id_token that is not a JWT: the access token's claim still counts
        ("garbage", "from-access", None, "from-access"),
        # neither names it: the account_id Codex stored at sign-in
        (None, None, "stored-id", "stored-id"),
    ],
)
def test_the_account_id_falls_back_to_the_access_token_then_the_stored_id(
    tmp_path: Path,
    id_token: str | None,
    access_account: str | None,
    stored: str | None,
    expected: str,
) -> None:
    tokens: dict[str, Any] = {
        "access_token": make_jwt(account=access_account),
        "refresh_token": "r",
    }
    if id_token is not None:
        tokens["id_token"] = id_token
    if stored is not None:
        tokens["account_id"] = stored

    assert read_codex_auth(write_auth(tmp_path, tokens)).account_id == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # not an auth.json at all
        (b"not json", "is not JSON"),
        (b'{"OPENAI_API_KEY": "sk-x", "tokens": null}', "no ChatGPT tokens"),
        # tokens without what a refresh needs, or without an account
        (orjson.dumps({"tokens": {"access_token": "a"}}), "tokens.refresh_token is missing"),
        (
            orjson.dumps({"tokens": {"access_token": "a", "refresh_token": "r"}}),
            "names a ChatGPT account",
        ),
    ],
)
def test_unusable_auth_files_are_refused_saying_why(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "auth.json"
    path.write_bytes(content)

    with pytest.raises(CredentialError, match=message):
        read_codex_auth(path)


def test_a_missing_file_is_a_credential_error(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="cannot read"):
        read_codex_auth(tmp_path / "nope.json")


def test_expiry_comes_from_the_exp_claim_and_counts_the_five_minute_margin() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    exp = now + timedelta(minutes=4)

    assert jwt_expiry(make_jwt(exp.timestamp())) == exp
    assert jwt_expiry(make_jwt()) is None and jwt_expiry("x.y.z") is None
    assert expiring(exp, now)
    assert not expiring(now + timedelta(minutes=6), now)
    assert expiring(exp.replace(tzinfo=None), now)  # SQLite's naive UTC
    assert not expiring(None, now)


# -- sealing ----------------------------------------------------------------------------------


def test_sealed_tokens_open_only_with_the_same_secret() -> None:
    cipher = TokenCipher(SECRET)

    sealed = cipher.seal("eyJ-access-token")

    assert "eyJ-access-token" not in sealed
    assert cipher.open(sealed) == "eyJ-access-token"
    assert TokenCipher(SECRET).open(sealed) == "eyJ-access-token"  # another process
    with pytest.raises(CredentialError, match="does not open"):
        TokenCipher(SECRET + "-other").open(sealed)
    assert cipher.session_key != TokenCipher(SECRET + "-other").session_key


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        # no key anywhere: tokens are never stored
        (Settings(), "refusing to store ChatGPT tokens without a secret key"),
        # a key too short to be a secret
        (Settings(secret_key="short"), "at least 32 characters"),
    ],
)
def test_no_usable_secret_key_means_no_cipher(settings: Settings, error: str) -> None:
    with pytest.raises(CredentialError, match=error):
        load_cipher(settings)


def test_the_secret_key_can_come_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "secret"
    key_file.write_text(SECRET + "\n")
    sealed = TokenCipher(SECRET).seal("t")

    assert load_cipher(Settings(secret_key_file=str(key_file))).open(sealed) == "t"


@pytest.mark.parametrize("content", [None, "short\n", "\u00e9".encode("latin-1")])
def test_a_key_file_that_gives_no_key_is_refused_as_config_check_words_it(
    tmp_path: Path, content: str | bytes | None
) -> None:
    """The file is read again at start (it may have changed since `config check`): missing,
    too short, not UTF-8."""
    key_file = tmp_path / "key"
    if isinstance(content, str):
        key_file.write_text(content)
    elif content is not None:
        key_file.write_bytes(content)
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/gateway.db",
        spool_path=str(tmp_path / "spool.jsonl"),
        secret_key_file=str(key_file),
    )

    with pytest.raises(CredentialError) as caught:
        load_cipher(settings)

    assert [str(caught.value)] == local_problems(settings)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        # the code may sit in error.code, in error as a string, or at the top level
        ({"error": {"code": "refresh_token_reused", "message": "m"}}, "refresh_token_reused"),
        ({"error": "refresh_token_expired"}, "refresh_token_expired"),
        ({"code": "refresh_token_invalidated"}, "refresh_token_invalidated"),
        # anything else may pass with a retry
        ({"error": {"code": "server_error"}}, None),
        ("not json", None),
    ],
)
def test_permanent_refresh_failures_are_recognised(body: Any, code: str | None) -> None:
    raw = body.encode() if isinstance(body, str) else orjson.dumps(body)

    assert permanent_failure(raw) == code


# -- refreshing against a token endpoint on loopback ------------------------------------------


@dataclass
class TokenEndpoint:
    """A mock token endpoint with single-use refresh tokens, as the real one has."""

    url: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    fail_with: tuple[int, dict[str, Any]] | None = None
    delay: float = 0.3
    issued: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(body)
        await asyncio.sleep(self.delay)  # long enough for a second refresher to race this one
        if self.fail_with is not None:
            return web.json_response(self.fail_with[1], status=self.fail_with[0])
        if body.get("refresh_token") not in self.valid:
            return web.json_response({"error": {"code": "refresh_token_reused"}}, status=401)
        self.valid.discard(body["refresh_token"])
        self.issued += 1
        refresh = f"rt_new_{self.issued}"
        self.valid.add(refresh)
        access = make_jwt(time.time() + 3600, jti=f"access-{self.issued}")
        return web.json_response({"access_token": access, "refresh_token": refresh})


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    endpoint = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/oauth/token", endpoint.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    endpoint.url = f"http://127.0.0.1:{port}/oauth/token"
    try:
        yield endpoint
    finally:
        await runner.cleanup()


@dataclass
class Process:
    """What one gateway process has: its own engine, HTTP client and refresher."""

    engine: AsyncEngine
    client: UpstreamClient
    refresher: TokenRefresher
    credentials: CredentialStore


@pytest.fixture
async def processes(
    database_url: str, token_endpoint: TokenEndpoint
) -> AsyncIterator[list[Process]]:
    made = []
    for _ in range(2):
        engine = create_engine(database_url)
        await migrate(engine)
        client = UpstreamClient(connect_timeout=5, read_timeout=10, pool_size=4, keepalive=60)
        credentials = CredentialStore(engine)
        refresher = TokenRefresher(
            credentials, TokenCipher(SECRET), client, token_endpoint.url, timeout=5
        )
        made.append(Process(engine, client, refresher, credentials))
    try:
        yield made
    finally:
        for process in made:
            await process.client.close()
            await process.engine.dispose()


async def add_account(
    process: Process, endpoint: TokenEndpoint, expires_in: float
) -> tuple[int, str]:
    access = make_jwt(time.time() + expires_in, jti="access-0")
    tokens = CodexTokens(ACCOUNT, access, "rt_first", make_jwt(), jwt_expiry(access), "plus")
    endpoint.valid.add("rt_first")
    sealed = seal_tokens(TokenCipher(SECRET), tokens)
    account_id = await process.credentials.add_chatgpt_account(
        "main", "http://127.0.0.1:9/backend-api", ACCOUNT, sealed
    )
    return account_id, access


async def test_a_fresh_token_is_served_without_calling_the_endpoint(
    processes: list[Process], token_endpoint: TokenEndpoint
) -> None:
    account_id, access = await add_account(processes[0], token_endpoint, expires_in=3600)

    assert await processes[0].refresher.access_token(account_id) == access
    assert await processes[0].refresher.access_token(account_id) == access
    assert token_endpoint.calls == []


async def test_a_token_about_to_expire_is_refreshed_and_the_new_refresh_token_stored(
    processes: list[Process], token_endpoint: TokenEndpoint
) -> None:
    account_id, old_access = await add_account(processes[0], token_endpoint, expires_in=120)

    new_access = await processes[0].refresher.access_token(account_id)

    assert new_access != old_access
    assert token_endpoint.calls == [
        {
            "client_id": CLIENT_ID,
            "grant_type": "refresh_token",
            "refresh_token": "rt_first",
            "scope": "openid profile email",
        }
    ]
    stored = await processes[1].credentials.account(account_id)
    cipher = TokenCipher(SECRET)
    assert cipher.open(stored.tokens.refresh_token) == "rt_new_1"
    assert cipher.open(stored.tokens.access_token) == new_access
    assert stored.tokens.expires_at is not None
    assert await processes[0].refresher.access_token(account_id) == new_access
    assert len(token_endpoint.calls) == 1


async def test_two_processes_refreshing_one_account_make_exactly_one_call(
    processes: list[Process], token_endpoint: TokenEndpoint
) -> None:
    account_id, stale = await add_account(processes[0], token_endpoint, expires_in=3600)

    # both saw a 401 with the same access token at the same moment
    first, second = await asyncio.gather(
        processes[0].refresher.refresh(account_id, stale=stale),
        processes[1].refresher.refresh(account_id, stale=stale),
    )

    assert len(token_endpoint.calls) == 1
    assert first == second != stale
    assert token_endpoint.valid == {"rt_new_1"}
    stored = await processes[0].credentials.account(account_id)
    assert TokenCipher(SECRET).open(stored.tokens.refresh_token) == "rt_new_1"


async def test_a_reused_refresh_token_marks_the_account_for_a_new_sign_in(
    processes: list[Process], token_endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    account_id, stale = await add_account(processes[0], token_endpoint, expires_in=3600)
    token_endpoint.fail_with = (401, {"error": {"code": "refresh_token_reused", "message": "x"}})
    caplog.set_level(logging.DEBUG)

    with pytest.raises(TokenRefreshError) as caught:
        await processes[0].refresher.refresh(account_id, stale=stale)

    assert caught.value.permanent
    state = (await processes[1].credentials.states())[account_id]
    assert state.state == STATE_NEEDS_RELOGIN
    assert state.state_reason == "token refresh refused: refresh_token_reused (HTTP 401)"
    # the other process refuses at once, without spending a call
    with pytest.raises(TokenRefreshError, match="needs a new sign-in"):
        await processes[1].refresher.access_token(account_id)
    assert len(token_endpoint.calls) == 1
    assert "rt_first" not in caplog.text and stale not in caplog.text
    assert "needs a new sign-in" in caplog.text


async def test_a_passing_failure_keeps_the_account_and_its_refresh_token(
    processes: list[Process], token_endpoint: TokenEndpoint
) -> None:
    account_id, stale = await add_account(processes[0], token_endpoint, expires_in=3600)
    token_endpoint.fail_with = (503, {"error": {"code": "server_error"}})

    with pytest.raises(TokenRefreshError) as caught:
        await processes[0].refresher.refresh(account_id, stale=stale)

    assert not caught.value.permanent
    stored = await processes[0].credentials.account(account_id)
    assert stored.state == "ready"
    assert TokenCipher(SECRET).open(stored.tokens.refresh_token) == "rt_first"
    assert TokenCipher(SECRET).open(stored.tokens.access_token) == stale


async def test_an_unreachable_token_endpoint_is_a_passing_failure(processes: list[Process]) -> None:
    process = processes[0]
    refresher = TokenRefresher(
        process.credentials,
        TokenCipher(SECRET),
        process.client,
        "http://127.0.0.1:9/oauth/token",
        timeout=5,
    )
    account_id, stale = await add_account(process, TokenEndpoint(), expires_in=3600)

    with pytest.raises(TokenRefreshError, match="Could not reach the token endpoint") as caught:
        await refresher.refresh(account_id, stale=stale)

    assert not caught.value.permanent


async def test_a_hanging_token_endpoint_times_out_and_the_account_is_tried_again_later(
    processes: list[Process], token_endpoint: TokenEndpoint
) -> None:
    process = processes[0]
    refresher = TokenRefresher(
        process.credentials, TokenCipher(SECRET), process.client, token_endpoint.url, timeout=0.3
    )
    account_id, stale = await add_account(process, token_endpoint, expires_in=3600)
    token_endpoint.delay = 2  # answers long after the refresher stops waiting

    started = time.monotonic()
    with pytest.raises(TokenRefreshError, match=r"did not answer a refresh within 0\.3 s") as hung:
        await refresher.refresh(account_id, stale=stale)
    waited = time.monotonic() - started

    assert not hung.value.permanent  # a timeout says nothing about the sign-in
    assert waited < 1.5
    stored = await process.credentials.account(account_id)
    assert (stored.state, TokenCipher(SECRET).open(stored.tokens.refresh_token)) == (
        "ready",
        "rt_first",
    )
    # the row lock went with the timeout: once the endpoint answers, the refresh goes through
    token_endpoint.delay = 0
    renewed = await processes[1].refresher.refresh(account_id, stale=stale)
    assert renewed != stale
    assert [call["refresh_token"] for call in token_endpoint.calls] == ["rt_first", "rt_first"]
