"""Gateways with ChatGPT accounts on the sandbox's mock of the Codex backend.

Each account is imported from an auth.json the test writes, as an operator imports one, and
names its own ChatGPT account id, so the `chatgpt-account-id` header the mock saw tells which
account served a request. Tests that expire tokens run a sandbox of their own, since the
mock's expiry reaches every token it has issued (`run_sandbox` starts one).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
import pytest

from codex_gateway.sandbox.chatgpt import access_token
from codex_gateway.store.credentials import CredentialStore
from codex_gateway.store.db import create_engine
from codex_gateway.upstream.chatgpt_auth import AUTH_CLAIM
from codex_gateway.upstream.sealing import TokenCipher
from tests.conftest import Gateway, Sandbox
from tests.upstream.pool_helpers import CATALOG_SETTLE_SECONDS

SECRET = "test-operator-secret-for-chatgpt-0123456789"
MODEL = "gpt-5.1-codex"
TOKEN_REFRESH_TIMEOUT = 1
SIGNING_KEY = "a-test-signing-key-of-at-least-32-bytes"
ACCOUNT = "5c3f0a4e-1b2c-4d5e-8f90-123456789abc"  # the ChatGPT account make_jwt names


@dataclass
class ChatGPTAccount:
    name: str
    account_id: str  # the ChatGPT account id its requests carry
    access_token: str
    refresh_token: str


def make_jwt(exp: float | None = None, account: str | None = ACCOUNT, **extra: Any) -> str:
    """A token as Codex's sign-in issues them: expiring at `exp`, naming ChatGPT account
    `account` on the plus plan, with `extra` claims."""
    claims: dict[str, Any] = dict(extra)
    if exp is not None:
        claims["exp"] = int(exp)
    if account is not None:
        claims[AUTH_CLAIM] = {"chatgpt_account_id": account, "chatgpt_plan_type": "plus"}
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")


def chatgpt_env(sandbox: Sandbox) -> dict[str, str]:
    """Settings that let a gateway open ChatGPT tokens and refresh them at the mock."""
    return {
        "CODEX_GATEWAY_SECRET_KEY": SECRET,
        "CODEX_GATEWAY_CHATGPT_TOKEN_URL": sandbox.url + "/sandbox/chatgpt/oauth/token",
        "CODEX_GATEWAY_CHATGPT_BASE_URL": sandbox.url + "/sandbox/chatgpt/backend-api",
    }


def backend_url(sandbox: Sandbox, transcript: str | None = None) -> str:
    segment = f"/{transcript}" if transcript else ""
    return f"{sandbox.url}/sandbox/chatgpt{segment}/backend-api"


def import_chatgpt(
    gateway: Gateway,
    sandbox: Sandbox,
    name: str = "plus",
    *,
    transcript: str | None = None,
    base_url: str | None = None,
    priority: int = 100,
    lifetime: float = 3600,
    refresh_token: str | None = None,
) -> ChatGPTAccount:
    """Import a ChatGPT account from a fresh auth.json; the mock accepts its access token.
    `base_url` points it at another backend than the mock."""
    tag = uuid.uuid4().hex[:8]
    account_id = f"acct-{tag}"
    account = ChatGPTAccount(
        f"{name}-{tag}",
        account_id,
        access_token(account_id, lifetime),
        refresh_token or f"rt_seed_{tag}_" + uuid.uuid4().hex,
    )
    path = gateway.workdir / f"auth-{account.name}.json"
    tokens = {"access_token": account.access_token, "refresh_token": account.refresh_token}
    path.write_bytes(orjson.dumps({"OPENAI_API_KEY": None, "tokens": tokens}))
    gateway.cli(
        "accounts", "import-codex", str(path), "--name", account.name,
        "--base-url", base_url or backend_url(sandbox, transcript),
        "--priority", str(priority),
    )  # fmt: skip
    return account


def only_chatgpt_accounts(
    gateway: Gateway, sandbox: Sandbox, specs: list[dict[str, Any]]
) -> list[ChatGPTAccount]:
    """Disable every account the gateway has, then import these (keyword arguments of
    `import_chatgpt`) and wait for the gateway to see them."""
    for existing in gateway.cli_json("accounts", "list"):
        if existing["enabled"]:
            gateway.cli("accounts", "disable", existing["name"])
    accounts = [import_chatgpt(gateway, sandbox, **spec) for spec in specs]
    time.sleep(CATALOG_SETTLE_SECONDS)
    return accounts


@pytest.fixture(scope="module", params=["sqlite", "postgresql"], name="gateway")
def chatgpt_gateway_on_each_backend(
    request: pytest.FixtureRequest, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """`gateway` for a module that imports this: one per database backend, for ChatGPT
    accounts on the session's sandbox."""
    yield from chatgpt_gateway(request.param, sandbox, tmp_path_factory)


def chatgpt_gateway(
    backend: str, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A running gateway that can relay to ChatGPT accounts, with none yet."""
    from tests.upstream.pool_helpers import pool_gateway

    env = chatgpt_env(sandbox)
    env["CODEX_GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT"] = "10"
    env["CODEX_GATEWAY_TOKEN_REFRESH_TIMEOUT_SECONDS"] = str(TOKEN_REFRESH_TIMEOUT)
    yield from pool_gateway(backend, tmp_path_factory, env)


def backend_requests(sandbox: Sandbox, kind: str = "/codex/responses") -> list[dict[str, Any]]:
    """What the mock backend received at one of its paths, oldest first."""
    return [r for r in sandbox.requests() if r["path"].endswith(kind)]


def refresh_calls(sandbox: Sandbox) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in sandbox.requests() if r["path"].endswith("/oauth/token")]


def expire_tokens(sandbox: Sandbox) -> None:
    """Every access token the mock issued so far is refused from now on."""
    httpx.post(sandbox.url + "/sandbox/chatgpt/expire-tokens").raise_for_status()


def delay_token_endpoint(sandbox: Sandbox, seconds: float) -> None:
    """The mock's token endpoint answers only after `seconds` from now on."""
    response = httpx.post(sandbox.url + "/sandbox/chatgpt/token-delay", json={"seconds": seconds})
    response.raise_for_status()


def stored_tokens(gateway: Gateway, name: str) -> tuple[str, str]:
    """An account's access and refresh tokens as the database holds them, opened."""

    async def read() -> tuple[str, str]:
        engine = create_engine(gateway.database_url)
        try:
            credentials = CredentialStore(engine)
            account = await credentials.account(await credentials.account_id(name))
        finally:
            await engine.dispose()
        cipher = TokenCipher(SECRET)
        return cipher.open(account.tokens.access_token), cipher.open(account.tokens.refresh_token)

    return asyncio.run(read())


def wait_for(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """The first truthy result of `check`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def listed(gateway: Gateway, name: str) -> dict[str, Any]:
    return next(a for a in gateway.cli_json("accounts", "list") if a["name"] == name)
