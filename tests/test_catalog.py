"""The catalog offers the relay only accounts it can serve."""

from __future__ import annotations

from typing import Any, cast

import pytest

from codex_gateway.catalog import RELAYED_KINDS, Catalog
from codex_gateway.store.queries import AccountRecord

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
