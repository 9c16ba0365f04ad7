"""The Store on SQLite and PostgreSQL: exact balances, settling once, keys kept as hashes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from codex_gateway.billing.pricing import LIST_PRICES, Price, PriceTable, plain
from codex_gateway.billing.settlement import Outcome, bill
from codex_gateway.store.credentials import CredentialStore, SealedTokens
from codex_gateway.store.db import create_engine, migrate
from codex_gateway.store.queries import KEY_PREFIX, KeyRecord, Store, StoreError, hash_key
from tests.store.dump import dump

CODEX = Price("gpt-5.1-codex", *(Decimal(value) for value in LIST_PRICES["gpt-5.1-codex"]))
SEED_USAGE = {
    "input_tokens": 1252,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 11273,
    "output_tokens_details": {"reasoning_tokens": 10944},
    "total_tokens": 12525,
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def new_user(store: Store, balance: str = "0") -> tuple[str, int]:
    name = unique("user")
    await store.create_user(name, Decimal(balance))
    user = await user_named(store, name)
    return name, int(user["id"])


async def user_named(store: Store, name: str) -> dict[str, Any]:
    return next(user for user in await store.list_users() if user["name"] == name)


def as_utc(moment: datetime) -> datetime:
    """SQLite gives timestamps back without a zone, PostgreSQL with one; both hold UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def usage_row(user_id: int | None, usage: Any = SEED_USAGE) -> dict[str, Any]:
    """The row bill() makes for one request at the gpt-5.1-codex list price."""
    outcome = Outcome(
        request_id=unique("req"),
        started_at=datetime(2026, 12, 4, 16, 0, 0, tzinfo=UTC),
        started=0.0,
        endpoint="responses",
        model="gpt-5.1-codex",
        stream=True,
        price=CODEX,
        user_id=user_id,
        usage=usage,
        usage_reported=usage is not None,
        upstream_model="gpt-5.1-codex-2025-11-13",
        duration_ms=12.5,
    )
    return bill(outcome, PriceTable([CODEX]))


# -- users and balances ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "balance",
    [
        # the smallest and largest amounts keep every digit
        "0.000000000000000001",
        "123456789012345678.123456789012345678",
        # ordinary amounts, and one with trailing zeros
        "10",
        "0.1",
        "2.50",
    ],
)
async def test_balance_round_trips_exactly(store: Store, balance: str) -> None:
    name, _ = await new_user(store, balance)

    user = await user_named(store, name)

    assert isinstance(user["balance"], Decimal)
    assert user["balance"] == Decimal(balance)


async def test_three_topups_of_a_tenth_make_exactly_three_tenths(store: Store) -> None:
    name, _ = await new_user(store)

    balances = [await store.topup(name, Decimal("0.1")) for _ in range(3)]

    assert balances == [Decimal("0.1"), Decimal("0.2"), Decimal("0.3")]
    stored = (await user_named(store, name))["balance"]
    assert stored == Decimal("0.3")
    assert plain(stored) == "0.3"


async def test_topup_adds_to_the_smallest_balance_without_losing_it(store: Store) -> None:
    name, _ = await new_user(store, "0.000000000000000001")

    balance = await store.topup(name, Decimal("0.1"))

    assert balance == Decimal("0.100000000000000001")
    assert (await user_named(store, name))["balance"] == Decimal("0.100000000000000001")


async def test_ledger_records_the_initial_balance_and_each_topup(store: Store) -> None:
    name, _ = await new_user(store, "5")
    await store.topup(name, Decimal("0.25"), note="card")
    await store.topup(name, Decimal("0.000001"))

    entries = await store.ledger(name)

    assert [
        (entry["kind"], entry["amount"], entry["balance_after"], entry["note"]) for entry in entries
    ] == [
        ("topup", Decimal("5"), Decimal("5"), "initial balance"),
        ("topup", Decimal("0.25"), Decimal("5.25"), "card"),
        ("topup", Decimal("0.000001"), Decimal("5.250001"), None),
    ]


async def test_user_created_with_nothing_has_no_ledger_entry(store: Store) -> None:
    name, _ = await new_user(store, "0")

    assert await store.ledger(name) == []


async def test_duplicate_user_name_is_refused_and_the_first_user_kept(store: Store) -> None:
    name, _ = await new_user(store, "7")

    with pytest.raises(StoreError, match=name):
        await store.create_user(name, Decimal("100"))

    assert [user["balance"] for user in await store.list_users() if user["name"] == name] == [
        Decimal("7")
    ]
    assert len(await store.ledger(name)) == 1


async def test_topup_of_an_unknown_user_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="no user named"):
        await store.topup(unique("nobody"), Decimal("1"))


async def test_administrative_changes_bump_the_revision(store: Store) -> None:
    before = await store.revision()

    name, _ = await new_user(store, "1")
    await store.topup(name, Decimal("1"))

    assert await store.revision() == before + 2


# -- settlement ------------------------------------------------------------------------------


async def test_settle_writes_the_row_and_debits_the_cost_exactly(store: Store) -> None:
    name, user_id = await new_user(store, "1")
    row = usage_row(user_id)

    balance = await store.settle(row)

    assert balance == Decimal("0.885705")
    assert (await user_named(store, name))["balance"] == Decimal("0.885705")
    stored = await store.usage(row["request_id"])
    assert stored is not None
    assert {column: stored[column] for column in row if column != "started_at"} == {
        column: value for column, value in row.items() if column != "started_at"
    }
    assert as_utc(stored["started_at"]) == row["started_at"]
    assert stored["user"] == name


async def test_settle_adds_one_settle_entry_to_the_ledger(store: Store) -> None:
    name, user_id = await new_user(store, "1")
    row = usage_row(user_id)

    await store.settle(row)

    charge = (await store.ledger(name))[-1]
    assert (charge["kind"], charge["amount"], charge["balance_after"], charge["request_id"]) == (
        "settle",
        Decimal("-0.114295"),
        Decimal("0.885705"),
        row["request_id"],
    )


async def test_settling_the_same_request_twice_changes_nothing_the_second_time(
    store: Store, engine: AsyncEngine
) -> None:
    name, user_id = await new_user(store, "1")
    row = usage_row(user_id)
    assert await store.settle(row) == Decimal("0.885705")
    before = await dump(engine)

    again = await store.settle(dict(row))

    assert again is None
    assert await dump(engine) == before
    assert (await user_named(store, name))["balance"] == Decimal("0.885705")
    assert [entry["kind"] for entry in await store.ledger(name)] == ["topup", "settle"]


async def served_by_an_account(store: Store, user_id: int) -> tuple[str, dict[str, Any]]:
    """A new account, and the row of a request it served for the user."""
    account = unique("acct")
    row = usage_row(user_id)
    row["account_id"] = await store.add_account(account, "openai", "http://127.0.0.1:9/v1", "k")
    row["attempts"] = orjson.dumps([{"account": account, "result": "ok"}]).decode()
    return account, row


async def test_a_row_whose_account_was_removed_meanwhile_is_billed_and_names_it_in_attempts(
    store: Store,
) -> None:
    name, user_id = await new_user(store, "1")
    account, row = await served_by_an_account(store, user_id)
    await store.remove_account(account)  # while the request was still being served

    [settled] = await store.settle_many([row])

    assert settled.balance == Decimal("0.885705")
    assert (await user_named(store, name))["balance"] == Decimal("0.885705")
    stored = await store.usage(row["request_id"])
    assert stored is not None
    assert stored["account_id"] is None
    assert orjson.loads(stored["flags"]) == [*orjson.loads(row["flags"]), "account_removed"]
    assert orjson.loads(stored["attempts"])[0]["account"] == account


async def test_a_batch_with_a_removed_accounts_row_still_settles_each_request_once(
    store: Store,
) -> None:
    name, user_id = await new_user(store, "1")
    account, removed = await served_by_an_account(store, user_id)
    settled_before, plain_row = usage_row(user_id), usage_row(user_id)
    await store.settle(settled_before)
    await store.remove_account(account)

    await store.settle_many([removed, plain_row, dict(settled_before)])

    charges = [
        entry["request_id"] for entry in await store.ledger(name) if entry["kind"] == "settle"
    ]
    assert sorted(charges) == sorted(
        row["request_id"] for row in (settled_before, removed, plain_row)
    )
    assert (await user_named(store, name))["balance"] == Decimal(1) - 3 * Decimal("0.114295")
    stored = await store.usage(removed["request_id"])
    assert stored is not None and stored["account_id"] is None


async def test_settle_without_a_user_writes_the_row_and_debits_no_one(store: Store) -> None:
    row = usage_row(None)
    count = await store.count_usage()

    assert await store.settle(row) is None

    assert await store.count_usage() == count + 1
    assert (await store.usage(row["request_id"]) or {})["cost_usd"] == Decimal("0.114295")


async def test_settle_of_a_request_without_usage_charges_nothing_and_settles_for_zero(
    store: Store,
) -> None:
    name, user_id = await new_user(store, "2")
    ledger_before = await store.ledger(name)
    row = usage_row(user_id, usage=None)

    balance = await store.settle(row)

    assert balance is None
    assert (await store.balances())[user_id] == Decimal("2")
    stored = await store.usage(row["request_id"])
    assert stored is not None
    assert (stored["raw_usage"], stored["cost_usd"], stored["flags"]) == (
        None,
        Decimal("0"),
        '["usage_missing"]',
    )
    (*earlier, settlement) = await store.ledger(name)
    assert earlier == ledger_before
    assert (settlement["kind"], settlement["amount"], settlement["request_id"]) == (
        "settle",
        Decimal("0"),
        row["request_id"],
    )


async def test_settle_keeps_the_smallest_costs_exact(store: Store) -> None:
    name, user_id = await new_user(store, "0.000000000000000001")
    row = usage_row(user_id, {"input_tokens": 1, "output_tokens": 0})

    balance = await store.settle(row)

    assert row["cost_usd"] == Decimal("0.00000125")
    assert balance == Decimal("-0.000001249999999999")
    assert (await user_named(store, name))["balance"] == balance


# -- keys ------------------------------------------------------------------------------------


async def test_created_key_is_found_by_its_hash(store: Store) -> None:
    name, user_id = await new_user(store)

    raw, display = await store.create_key(name, name="laptop")

    assert raw.startswith(KEY_PREFIX)
    # Shown as the fixed prefix and the last four characters: nothing more of the secret.
    assert display == f"{KEY_PREFIX}…{raw[-4:]}"
    record = await store.find_key(hash_key(raw))
    assert record is not None
    assert record == KeyRecord(record.id, user_id, name, display, revoked=False)
    assert (await store.active_keys())[hash_key(raw)] == record


async def test_unknown_key_is_not_found(store: Store) -> None:
    assert await store.find_key(hash_key(KEY_PREFIX + "never-issued")) is None


async def test_raw_key_is_stored_nowhere_in_the_database(store: Store, engine: AsyncEngine) -> None:
    name, _ = await new_user(store)
    raw, _ = await store.create_key(name)
    secret = raw[len(KEY_PREFIX) :]

    tables = await dump(engine)

    assert "api_keys" in tables
    text = repr(tables)
    assert raw not in text
    assert secret not in text
    assert secret[:-4] not in text
    assert hash_key(raw) in text


async def test_revoked_key_is_found_as_revoked_and_is_not_active(store: Store) -> None:
    name, _ = await new_user(store)
    raw, _ = await store.create_key(name)
    record = await store.find_key(hash_key(raw))
    assert record is not None

    await store.revoke_key(record.id)

    revoked = await store.find_key(hash_key(raw))
    assert revoked is not None and revoked.revoked
    assert hash_key(raw) not in await store.active_keys()
    listed = next(key for key in await store.list_keys(name) if key["id"] == record.id)
    assert listed["revoked_at"] is not None


async def test_revoking_a_key_twice_is_refused(store: Store) -> None:
    name, _ = await new_user(store)
    raw, _ = await store.create_key(name)
    record = await store.find_key(hash_key(raw))
    assert record is not None
    await store.revoke_key(record.id)

    with pytest.raises(StoreError, match=f"no active key with id {record.id}"):
        await store.revoke_key(record.id)


async def test_key_for_an_unknown_user_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="no user named"):
        await store.create_key(unique("nobody"))


async def test_a_database_keeps_one_identity_however_it_is_reached_and_another_has_its_own(
    store: Store, database_url: str, empty_database_url: str
) -> None:
    identity = await store.database_id()
    same = create_engine(database_url.replace("@127.0.0.1", "@localhost"))
    other = create_engine(empty_database_url)
    try:
        await migrate(same)
        await migrate(other)
        assert await Store(same).database_id() == identity
        assert await Store(other).database_id() != identity
    finally:
        await same.dispose()
        await other.dispose()


# -- upstream API keys sealed at rest ----------------------------------------------------------


async def stored_key(store: Store, name: str) -> tuple[str, str | None]:
    """An account's key columns as the row holds them: (api_key, api_key_sealed)."""
    found = next(account for account in await store.accounts() if account.name == name)
    return found.api_key, found.api_key_sealed


async def test_a_sealed_key_is_stored_only_sealed(store: Store) -> None:
    name = unique("sealed")

    await store.add_account(name, "openai", "http://127.0.0.1:9/v1", "SEALED(k)", sealed=True)

    assert await stored_key(store, name) == ("", "SEALED(k)")


async def test_sealing_in_place_seals_only_keys_in_clear_and_says_which(store: Store) -> None:
    clear, sealed = unique("clear"), unique("sealed")
    await store.add_account(clear, "openai", "http://127.0.0.1:9/v1", "sk-clear-1")
    await store.add_account(sealed, "openai", "http://127.0.0.1:9/v1", "SEALED(x)", sealed=True)
    before = await store.revision()

    first = await store.seal_api_keys("openai", lambda key: f"SEALED({key})")
    again = await store.seal_api_keys("openai", lambda key: f"SEALED({key})")

    assert clear in first and sealed not in first
    assert again == []
    assert await stored_key(store, clear) == ("", "SEALED(sk-clear-1)")
    assert await stored_key(store, sealed) == ("", "SEALED(x)")
    assert await store.revision() > before  # running gateways reload and open it


async def test_sealing_in_place_keeps_the_placeholder_it_is_told_to(store: Store) -> None:
    placeholder, real = unique("sandbox"), unique("real")
    await store.add_account(placeholder, "openai", "http://127.0.0.1:9/v1", "no-secret")
    await store.add_account(real, "openai", "http://127.0.0.1:9/v1", "no-secret")

    sealed = await store.seal_api_keys(
        "openai", lambda key: f"SEALED({key})", keep=(placeholder, "no-secret")
    )

    assert real in sealed and placeholder not in sealed
    assert await stored_key(store, placeholder) == ("no-secret", None)
    assert await stored_key(store, real) == ("", "SEALED(no-secret)")


async def test_sealed_values_are_one_per_account_of_either_kind(store: Store) -> None:
    clear, api, chatgpt = unique("clear"), unique("api"), unique("chatgpt")
    await store.add_account(clear, "openai", "http://127.0.0.1:9/v1", "sk-clear")
    await store.add_account(api, "openai", "http://127.0.0.1:9/v1", "SEALED(k)", sealed=True)
    tokens = {"access_token_sealed": "SEALED(at)", "refresh_token_sealed": "SEALED(rt)"}
    await store.add_account(chatgpt, "chatgpt", "http://127.0.0.1:9/b", "", extra=tokens)

    every = await store.sealed_values()
    besides = await store.sealed_values(besides=api)

    assert (every[api], every[chatgpt]) == ("SEALED(k)", "SEALED(rt)")
    assert clear not in every
    assert api not in besides and besides[chatgpt] == "SEALED(rt)"


async def test_resealing_waits_for_a_token_refresh_and_seals_the_tokens_it_saved(
    store: Store, engine: AsyncEngine
) -> None:
    """A refresh holding the account's row (on SQLite, the database) saves tokens sealed under
    the old key: the re-seal waits for it, then seals those, not the ones they replaced."""
    credentials = CredentialStore(engine)
    name = unique("plus")
    tokens = SealedTokens("OLD(at-1)", "OLD(rt-1)", None, None)
    account_id = await credentials.add_chatgpt_account(name, "http://127.0.0.1:9/b", "a", tokens)

    def reseal_this_account(held: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        return {name: {column: f"NEW{value[3:]}" for column, value in held[name].items()}}

    async with credentials.locked(account_id) as refresh:
        resealing = asyncio.create_task(store.reseal(reseal_this_account))
        await asyncio.sleep(0.5)
        assert not resealing.done()
        await refresh.save_tokens(SealedTokens("OLD(at-2)", "OLD(rt-2)", "OLD(it-2)", None))
    done = await asyncio.wait_for(resealing, timeout=10)

    saved = (await credentials.account(account_id)).tokens
    assert (saved.access_token, saved.refresh_token, saved.id_token) == (
        "NEW(at-2)",
        "NEW(rt-2)",
        "NEW(it-2)",
    )
    assert done.held[name]["refresh_token_sealed"] == "OLD(rt-2)"


async def test_a_new_key_replaces_the_old_and_makes_the_account_ready(store: Store) -> None:
    name = unique("replaced")
    account_id = await store.add_account(name, "openai", "http://127.0.0.1:9/v1", "sk-old")
    await store.mark_account(account_id, "needs_relogin", "HTTP 401", None)

    await store.replace_api_key(
        name, "openai", "http://127.0.0.1:8/v1/", "SEALED(new)", sealed=True
    )

    found = next(account for account in await store.accounts() if account.name == name)
    assert (found.base_url, found.api_key, found.api_key_sealed) == (
        "http://127.0.0.1:8/v1",
        "",
        "SEALED(new)",
    )
    assert (found.state, found.state_reason) == ("ready", None)


async def test_replacing_the_key_of_an_account_that_is_not_there_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="no openai account named 'nobody' to replace"):
        await store.replace_api_key("nobody", "openai", "http://127.0.0.1:9/v1", "k", sealed=False)
