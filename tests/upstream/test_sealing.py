"""Upstream API keys sealed at rest are opened once, as the accounts are loaded; one that does
not open is left out and named, and the others serve."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from codex_gateway.config import Settings
from codex_gateway.errors import CredentialError
from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.sealing import ApiKeyOpener, TokenCipher, configured_cipher

SECRET = "operator-secret-key-0123456789abcdef"
CIPHER = TokenCipher(SECRET)
OTHER = TokenCipher(SECRET + "-changed")
KEY = "sk-upstream-sealed-0001"


def account(
    account_id: int, name: str, key: str = "", sealed: str | None = None, enabled: bool = True
) -> AccountRecord:
    return AccountRecord(
        account_id,
        name,
        "openai",
        "http://127.0.0.1:9/v1",
        key,
        100,
        enabled,
        api_key_sealed=sealed,
    )


def test_a_sealed_key_is_opened_and_a_key_in_clear_is_kept() -> None:
    accounts = [account(1, "sealed", sealed=CIPHER.seal(KEY)), account(2, "clear", "sk-clear")]

    ready, shut = ApiKeyOpener(CIPHER).open(accounts)

    assert [(a.name, a.api_key) for a in ready] == [("sealed", KEY), ("clear", "sk-clear")]
    assert shut == []


def test_a_key_that_does_not_open_leaves_its_account_out_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    changed = OTHER.seal(KEY)
    accounts = [account(1, "changed", sealed=changed), account(2, "good", sealed=CIPHER.seal("k"))]
    opener = ApiKeyOpener(CIPHER)

    with caplog.at_level(logging.ERROR):
        ready, shut = opener.open(accounts)
        again = opener.open(accounts)  # the next catalog reload

    assert [a.name for a in ready] == ["good"]
    assert shut == ["changed"] and again[1] == ["changed"]
    [record] = caplog.records
    assert record.getMessage().startswith(
        "the API key of upstream account changed does not open with this gateway's secret key"
    )
    assert "--name changed" in record.getMessage()
    assert KEY not in caplog.text and changed not in caplog.text


def test_without_a_secret_key_a_sealed_key_is_left_out_with_how_to_open_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    accounts = [account(1, "sealed", sealed=CIPHER.seal(KEY)), account(2, "clear", "sk-clear")]

    with caplog.at_level(logging.ERROR):
        ready, shut = ApiKeyOpener(None).open(accounts)

    assert [a.name for a in ready] == ["clear"]
    assert shut == ["sealed"]
    assert "account sealed is sealed and this gateway has no secret key" in caplog.text
    assert "CODEX_GATEWAY_SECRET_KEY" in caplog.text


def test_a_disabled_account_whose_key_does_not_open_is_left_out_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    disabled = account(1, "off", sealed=OTHER.seal(KEY), enabled=False)
    opener = ApiKeyOpener(CIPHER)

    with caplog.at_level(logging.ERROR):
        assert opener.open([disabled]) == ([], [])
        assert caplog.records == []
        _, shut = opener.open([replace(disabled, enabled=True)])  # the operator enables it

    assert shut == ["off"]
    assert "account off does not open" in caplog.text


class CountingCipher(TokenCipher):
    opened = 0

    def open(self, sealed: str) -> str:
        self.opened += 1
        return super().open(sealed)


def test_a_reload_opens_only_keys_it_has_not_opened_before() -> None:
    cipher = CountingCipher(SECRET)
    first = [account(1, "a", sealed=cipher.seal("k-a")), account(2, "b", sealed=cipher.seal("k-b"))]
    opener = ApiKeyOpener(cipher)

    opener.open(first)
    ready, _ = opener.open([*first, account(3, "c", sealed=cipher.seal("k-c"))])

    assert cipher.opened == 3
    assert [a.api_key for a in ready] == ["k-a", "k-b", "k-c"]


def test_a_secret_key_file_that_gives_no_key_is_a_credential_error(tmp_path: Path) -> None:
    (tmp_path / "short").write_text("short\n")

    assert configured_cipher(Settings()) is None
    with pytest.raises(CredentialError, match=r"setting secret_key_file = .*32 characters"):
        configured_cipher(Settings(secret_key_file=str(tmp_path / "short")))
