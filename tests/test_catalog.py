"""The catalog offers the relay only accounts it can serve, with their keys in clear."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import pytest

from codex_gateway.catalog import RELAYED_KINDS, Catalog
from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.sealing import ApiKeyOpener, TokenCipher

ACCOUNTS = [
    AccountRecord(1, "api", "openai", "http://127.0.0.1:9/v1", "sk-x", 100, True),
    AccountRecord(2, "off", "openai", "http://127.0.0.1:9/v1", "sk-y", 100, False),
    AccountRecord(3, "plus", "chatgpt", "http://127.0.0.1:9/backend-api", "", 100, True),
]


@pytest.mark.parametrize(
    ("kinds", "offered"),
    [
        # a gateway with a secret key relays to both kinds; disabled accounts never
        (RELAYED_KINDS, ["api", "plus"]),
        # without one, ChatGPT tokens cannot be opened, so those accounts rest
        (RELAYED_KINDS - {"chatgpt"}, ["api"]),
    ],
)
def test_only_enabled_accounts_of_a_kind_the_gateway_can_serve_are_offered(
    kinds: frozenset[str], offered: list[str]
) -> None:
    catalog = Catalog(cast(Any, None), kinds)
    catalog.accounts = list(ACCOUNTS)

    assert [account.name for account in catalog.usable_accounts()] == offered


class OneRevision:
    """A store at one revision that holds these accounts and nothing else."""

    def __init__(self, accounts: list[AccountRecord]):
        self._accounts = accounts

    async def revision(self) -> int:
        return 1

    async def accounts(self) -> list[AccountRecord]:
        return self._accounts

    async def active_keys(self) -> dict[str, Any]:
        return {}

    async def prices(self) -> list[Any]:
        return []

    async def traced_keys(self) -> frozenset[int]:
        return frozenset()


async def test_sealed_keys_are_held_open_and_one_that_does_not_open_is_not_offered() -> None:
    cipher = TokenCipher("operator-secret-key-0123456789abcdef")
    other = TokenCipher("operator-secret-key-0123456789abcdef-changed")
    stored = [
        replace(ACCOUNTS[0], api_key="", api_key_sealed=cipher.seal("sk-x")),
        AccountRecord(4, "changed", "openai", "http://127.0.0.1:9/v1", "", 100, True),
    ]
    stored[1] = replace(stored[1], api_key_sealed=other.seal("sk-z"))
    catalog = Catalog(cast(Any, OneRevision(stored)), RELAYED_KINDS, ApiKeyOpener(cipher))

    await catalog.refresh()

    assert [(a.name, a.api_key) for a in catalog.usable_accounts()] == [("api", "sk-x")]
    assert catalog.shut_accounts == ["changed"]


async def test_a_catalog_without_a_secret_key_never_offers_a_sealed_account() -> None:
    sealed = replace(ACCOUNTS[0], api_key="", api_key_sealed="gAAAA-sealed")
    catalog = Catalog(cast(Any, OneRevision([sealed])), RELAYED_KINDS)

    await catalog.refresh()

    assert catalog.usable_accounts() == []
    assert catalog.shut_accounts == ["api"]
