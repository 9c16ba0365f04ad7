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
from codex_gateway.upstream.sealing import (
    ApiKeyOpener,
    TokenCipher,
    configured_cipher,
    opens,
    refuse_another_secret_key,
    resealed,
    same_secret_key,
)

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


# What a client is told of the accounts left out, with a secret key that opens none of
# their keys and with none at all: counted, never named, and no key shown.
LEFT_OUT = [
    (CIPHER, "do not open with this gateway's secret key"),
    (None, "are sealed and this gateway has no secret key to open them"),
]


@pytest.mark.parametrize(("cipher", "why"), LEFT_OUT)
def test_why_accounts_are_left_out_is_said_without_names_or_keys(
    cipher: TokenCipher | None, why: str
) -> None:
    sealed = OTHER.seal(KEY)
    accounts = [account(1, "first", sealed=sealed), account(2, "second", sealed=sealed)]
    opener = ApiKeyOpener(cipher)

    _, shut = opener.open(accounts)

    assert opener.left_out(shut) == f"2 account(s) are left out because their API keys {why}"
    assert opener.left_out([]) is None


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


# A serving account as it was stored, the key it served with, what its stored key became,
# and the secret key of the gateway.
STOPPED_OPENING = [
    # a key in clear, sealed in place under a secret key the gateway lacks
    pytest.param(("sk-a", None), "sk-a", OTHER.seal("sk-a"), CIPHER, id="sealed-elsewhere"),
    pytest.param(("sk-a", None), "sk-a", CIPHER.seal("sk-a"), None, id="sealed-keyless"),
    # a sealed key, replaced by a new one sealed under another secret key
    pytest.param(("", CIPHER.seal("sk-a")), "sk-a", OTHER.seal("sk-b"), CIPHER, id="replaced"),
]


@pytest.mark.parametrize(("stored", "held", "after", "cipher"), STOPPED_OPENING)
def test_a_serving_account_whose_key_stops_opening_keeps_serving_with_the_key_it_held(
    caplog: pytest.LogCaptureFixture,
    stored: tuple[str, str | None],
    held: str,
    after: str,
    cipher: TokenCipher | None,
) -> None:
    was, now = account(1, "a", *stored), account(1, "a", sealed=after)
    opener = ApiKeyOpener(cipher)
    opener.open([was])

    with caplog.at_level(logging.ERROR):
        ready, shut = opener.open([now])
        again, _ = opener.open([now])  # the next reload

    assert [(a.name, a.api_key) for a in ready] == [("a", held)]
    assert shut == [] and [a.api_key for a in again] == [held]
    [record] = caplog.records
    assert record.getMessage().startswith("the API key of upstream account a ")
    assert record.getMessage().endswith(
        "; the account keeps serving with the key this process held before, until it restarts"
    )
    assert held not in caplog.text
    # A restarted gateway never held it, and leaves it out.
    assert ApiKeyOpener(cipher).open([now]) == ([], ["a"])


@pytest.mark.parametrize(
    "moved",
    [
        pytest.param({"base_url": "http://127.0.0.1:9/other/v1"}, id="another-upstream"),
        pytest.param({"name": "b"}, id="another-account-under-the-same-id"),
    ],
)
def test_a_key_held_for_one_upstream_never_goes_to_another(moved: dict[str, str]) -> None:
    """An account given a new base URL and a key this gateway cannot open (`--replace`), or
    a new account that took a removed one's id, is left out: the key last held was given for
    another upstream."""
    opener = ApiKeyOpener(CIPHER)
    opener.open([account(1, "a", KEY, None)])
    elsewhere = replace(account(1, "a", sealed=OTHER.seal("sk-new-key-0002")), **moved)

    ready, shut = opener.open([elsewhere])

    assert ready == []
    assert shut == [elsewhere.name]


def test_a_worker_that_does_not_advise_still_says_when_it_drops_an_account_it_served_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With `serve --workers N` the first worker says which stored keys do not open; the
    others stay quiet about it, but for an account one of them served with until now and
    leaves out, which the first worker may have kept."""
    quiet = ApiKeyOpener(CIPHER, advises=False)
    never_opened = account(2, "b", sealed=OTHER.seal("sk-other-key-0003"))
    served = account(1, "a", KEY, None)
    moved = replace(
        account(1, "a", sealed=OTHER.seal("sk-new-key-0002")), base_url="http://127.0.0.1:9/o/v1"
    )

    with caplog.at_level(logging.ERROR):
        quiet.open([served, never_opened])
        assert caplog.records == []
        ready, shut = quiet.open([moved, never_opened])

    assert (ready, shut) == ([], ["a", "b"])
    [record] = caplog.records
    assert record.getMessage().startswith("the API key of upstream account a does not open")
    assert record.getMessage().endswith("; the account is left out of rotation")


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


# Values already sealed, by account name, under which CIPHER may seal more.
MAY_SEAL = [
    pytest.param({}, id="nothing-sealed-yet"),
    pytest.param({"a": CIPHER.seal("k")}, id="sealed-with-it"),
    # some accounts given their keys again after the secret key changed
    pytest.param({"a": OTHER.seal("k"), "b": CIPHER.seal("k")}, id="some-with-it"),
]


@pytest.mark.parametrize("sealed", MAY_SEAL)
def test_a_secret_key_that_opens_a_sealed_value_or_finds_none_may_seal(
    sealed: dict[str, str],
) -> None:
    refuse_another_secret_key(CIPHER, sealed)


def test_a_secret_key_that_opens_none_of_the_sealed_values_is_refused() -> None:
    sealed = {"a": OTHER.seal("k"), "b": OTHER.seal("k")}

    with pytest.raises(CredentialError) as refused:
        refuse_another_secret_key(CIPHER, sealed)

    assert str(refused.value).startswith(
        "this secret key opens none of the values already sealed in the database (accounts a, b)"
    )
    assert str(refused.value).endswith("give --secret-key-changed")


def test_resealing_opens_each_value_with_the_old_key_and_seals_it_with_the_new() -> None:
    held = {
        "api": {"api_key_sealed": OTHER.seal("sk-1")},
        "plus": {"access_token_sealed": OTHER.seal("at"), "refresh_token_sealed": OTHER.seal("rt")},
    }

    done = resealed(held, OTHER, CIPHER)

    opened = {name: {c: CIPHER.open(v) for c, v in values.items()} for name, values in done.items()}
    assert opened == {
        "api": {"api_key_sealed": "sk-1"},
        "plus": {"access_token_sealed": "at", "refresh_token_sealed": "rt"},
    }


def test_resealing_leaves_out_the_values_the_new_key_opens_already() -> None:
    held = {
        "old": {"api_key_sealed": OTHER.seal("sk-old")},
        "new": {"api_key_sealed": CIPHER.seal("sk-new")},
        # its access token was saved under the new key meanwhile, its refresh token not yet
        "half": {
            "access_token_sealed": CIPHER.seal("at"),
            "refresh_token_sealed": OTHER.seal("rt"),
        },
    }

    done = resealed(held, OTHER, CIPHER)
    again = resealed({name: {**held[name], **done.get(name, {})} for name in held}, OTHER, CIPHER)

    opened = {name: {c: CIPHER.open(v) for c, v in values.items()} for name, values in done.items()}
    assert opened == {"old": {"api_key_sealed": "sk-old"}, "half": {"refresh_token_sealed": "rt"}}
    assert again == {}


def test_resealing_gives_nothing_if_a_value_does_not_open_and_names_its_accounts() -> None:
    lost = TokenCipher(SECRET + "-lost")
    held = {
        "fine": {"api_key_sealed": OTHER.seal("sk-fine")},
        "done": {"api_key_sealed": CIPHER.seal("sk-done")},
        "lost": {"api_key_sealed": lost.seal("sk-lost")},
        # one of its tokens opens, the other does not
        "half": {
            "access_token_sealed": OTHER.seal("at-half"),
            "refresh_token_sealed": lost.seal("rt-half"),
        },
    }

    with pytest.raises(CredentialError) as refused:
        resealed(held, OTHER, CIPHER)

    assert str(refused.value).startswith(
        "neither the old nor the new secret key opens the sealed values of accounts lost, half, "
        "so nothing was re-sealed"
    )
    for value in ("sk-fine", "sk-done", "sk-lost", "at-half", "rt-half", SECRET):
        assert value not in str(refused.value)


def test_two_ciphers_are_of_the_same_secret_key_only_if_one_opens_what_the_other_seals() -> None:
    assert same_secret_key(CIPHER, TokenCipher(SECRET))
    assert not same_secret_key(CIPHER, OTHER)
    assert opens(TokenCipher(SECRET), CIPHER.seal("sealed")) and not opens(OTHER, CIPHER.seal("x"))
