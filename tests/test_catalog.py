"""The catalog offers the relay only accounts it can serve."""

from __future__ import annotations

from typing import Any, cast

from codex_gateway.catalog import Catalog
from codex_gateway.store.queries import AccountRecord


def test_chatgpt_and_disabled_accounts_are_not_offered_to_the_relay() -> None:
    catalog = Catalog(cast(Any, None))
    catalog.accounts = [
        AccountRecord(1, "api", "openai", "http://127.0.0.1:9/v1", "sk-x", 100, True),
        AccountRecord(2, "off", "openai", "http://127.0.0.1:9/v1", "sk-y", 100, False),
        AccountRecord(3, "plus", "chatgpt", "http://127.0.0.1:9/backend-api", "", 100, True),
    ]

    assert [account.name for account in catalog.usable_accounts()] == ["api"]
