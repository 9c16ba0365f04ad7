"""`accounts add`, `accounts seal` and `accounts list` with upstream API keys sealed at rest
by the operator's secret key, on both backends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import AccountRecord, Store
from codex_gateway.upstream.sealing import TokenCipher
from tests.conftest import Gateway

SECRET = "operator-secret-key-0123456789abcdef"
BASE_URL = "http://127.0.0.1:9/v1"


@pytest.fixture
def keyless(db: Gateway) -> Iterator[Gateway]:
    """The CLI with no secret key; `with_secret` gives it one."""
    saved = dict(db.env)
    for name in ("CODEX_GATEWAY_SECRET_KEY", "CODEX_GATEWAY_SECRET_KEY_FILE"):
        db.env.pop(name, None)
    yield db
    db.env.clear()
    db.env.update(saved)


def with_secret(db: Gateway, secret: str = SECRET) -> None:
    db.env["CODEX_GATEWAY_SECRET_KEY"] = secret


def stored(db: Gateway, name: str) -> AccountRecord:
    """The account as its row holds it."""

    async def read() -> list[AccountRecord]:
        engine = create_engine(db.database_url)
        try:
            return await Store(engine).accounts()
        finally:
            await engine.dispose()

    return next(account for account in asyncio.run(read()) if account.name == name)


def add(db: Gateway, name: str, key: str, *extra: str) -> tuple[str, str]:
    result = db.cli(
        "accounts", "add", "--name", name, "--base-url", BASE_URL, "--api-key", key, *extra
    )
    return result.stdout, result.stderr


def fresh() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"acct-{tag}", f"sk-upstream-{tag}-secret"


def listed(db: Gateway, name: str) -> str:
    return str(next(a for a in db.cli_json("accounts", "list") if a["name"] == name)["key"])


def test_a_key_added_with_a_secret_key_is_stored_sealed_and_shown_nowhere(keyless: Gateway) -> None:
    name, key = fresh()
    with_secret(keyless)

    out, err = add(keyless, name, key)

    row = stored(keyless, name)
    assert row.api_key == "" and row.api_key_sealed is not None
    assert TokenCipher(SECRET).open(row.api_key_sealed) == key
    assert err == ""
    assert out == f"added openai account {name} -> {BASE_URL}/responses\n"
    table = keyless.cli("accounts", "list").stdout
    assert listed(keyless, name) == "sealed"
    assert key not in out + table + keyless.cli("accounts", "list", "--json").stdout


def test_a_key_added_without_a_secret_key_is_stored_unsealed_and_the_operator_told(
    keyless: Gateway,
) -> None:
    name, key = fresh()

    out, err = add(keyless, name, key)

    assert (stored(keyless, name).api_key, stored(keyless, name).api_key_sealed) == (key, None)
    assert err.splitlines() == [
        f"warning: no secret key is set, so the API key of account {name} is stored unsealed "
        "in the database; set CODEX_GATEWAY_SECRET_KEY (at least 32 characters) or "
        "CODEX_GATEWAY_SECRET_KEY_FILE, then run `codex-gateway accounts seal`"
    ]
    assert listed(keyless, name) == "unsealed"
    assert key not in out + err


def test_accounts_seal_seals_the_keys_stored_unsealed_in_place(keyless: Gateway) -> None:
    name, key = fresh()
    add(keyless, name, key)
    with_secret(keyless)

    first = keyless.cli("accounts", "seal").stdout
    again = keyless.cli("accounts", "seal").stdout

    assert first.startswith("sealed the API keys of ") and name in first
    assert again == "every API key is sealed already\n"
    row = stored(keyless, name)
    assert row.api_key == "" and row.api_key_sealed is not None
    assert TokenCipher(SECRET).open(row.api_key_sealed) == key
    assert listed(keyless, name) == "sealed"


def test_accounts_seal_without_a_secret_key_seals_nothing_and_says_why(keyless: Gateway) -> None:
    name, key = fresh()
    add(keyless, name, key)

    result = keyless.cli("accounts", "seal", check=False)

    assert result.returncode == 1
    assert "no secret key to seal API keys with: set CODEX_GATEWAY_SECRET_KEY" in result.stderr
    assert stored(keyless, name).api_key == key


def test_a_key_sealed_with_a_lost_secret_key_is_replaced_under_the_current_one(
    keyless: Gateway,
) -> None:
    name, old = fresh()
    with_secret(keyless, SECRET + "-lost")
    add(keyless, name, old)
    with_secret(keyless)

    out, _ = add(keyless, name, "sk-upstream-new-key", "--replace")

    assert out == f"gave a new key to openai account {name} -> {BASE_URL}/responses\n"
    sealed = stored(keyless, name).api_key_sealed
    assert sealed is not None and TokenCipher(SECRET).open(sealed) == "sk-upstream-new-key"
