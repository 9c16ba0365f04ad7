"""The administration commands, as operators and other tools call them.

The interface other tools rely on is run as real processes; the rest runs in process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import update

from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import Store
from codex_gateway.store.tables import User
from tests.conftest import CLI, ROOT, Gateway, make_gateway
from tests.store.test_queries import usage_row


def test_stable_interface_as_separate_processes(db: Gateway) -> None:
    assert db.real_cli("users", "create", "iface", "--balance", "12.50").returncode == 0
    assert db.real_cli("users", "topup", "iface", "0.25").returncode == 0
    users = json.loads(db.real_cli("users", "list", "--json").stdout)
    assert {"name": "iface", "balance": "12.75"}.items() <= next(
        u for u in users if u["name"] == "iface"
    ).items()
    created = db.real_cli("keys", "create", "--user", "iface")
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-cg-") and len(key) > 40
    listed = db.real_cli("keys", "list", "--json").stdout
    assert key not in listed and key[-4:] in listed
    priced = db.real_cli(
        "pricing",
        "set",
        "iface-model",
        "--input",
        "0.002",
        "--cached-input",
        "0.0002",
        "--output",
        "0.008",
        "--per",
        "1k",
        "--markup",
        "1.2",
    )
    assert priced.returncode == 0
    prices = json.loads(db.real_cli("pricing", "list", "--json").stdout)
    assert {
        "model": "iface-model",
        "input": "2",
        "cached_input": "0.2",
        "output": "8",
        "markup": "1.2",
    } in prices
    assert json.loads(db.real_cli("usage", "list", "--json").stdout) == []
    added = db.real_cli(
        "accounts",
        "add",
        "--name",
        "iface-up",
        "--kind",
        "openai",
        "--base-url",
        "https://api.example.test/v1",
        "--api-key",
        "sk-upstream-iface-9999",
    )
    assert added.returncode == 0
    assert "sk-upstream-iface-9999" not in db.real_cli("accounts", "list", "--json").stdout


def test_seeded_prices_are_the_codex_list_prices(db: Gateway) -> None:
    prices = {p["model"]: p for p in db.cli_json("pricing", "list")}
    assert prices["gpt-5.1-codex"] == {
        "model": "gpt-5.1-codex",
        "input": "1.25",
        "cached_input": "0.125",
        "output": "10",
        "markup": "1",
    }
    assert prices["gpt-5.2-codex"]["output"] == "14"
    assert prices["gpt-5.1-codex-mini"]["cached_input"] == "0.025"


def test_topups_are_exact_and_in_the_ledger(db: Gateway) -> None:
    db.cli("users", "create", "exact", "--balance", "0")
    for _ in range(3):
        db.cli("users", "topup", "exact", "0.1")
    assert db.balance("exact") == "0.3"
    ledger = db.cli_json("users", "ledger", "exact")
    assert [entry["amount"] for entry in ledger] == ["0.1", "0.1", "0.1"]
    assert sum(Decimal(entry["amount"]) for entry in ledger) == Decimal("0.3")


# command, what the error names
REFUSED = [
    # amounts that would not store what was typed, or make no sense
    (["users", "topup", "exact", "0"], "more than 0"),
    # a negative amount is an amount (no `--` needed), and only `users adjust` takes one
    (["users", "topup", "exact", "-1"], "must be positive, not '-1': a topup adds"),
    (["users", "topup", "exact", "--", "-1"], "must be positive"),
    (["users", "topup", "exact", "-0.5", "--note", "x"], "use 'users adjust NAME -USD'"),
    (
        ["users", "refund", "exact", "-1", "--reason", "r", "--operator", "o"],
        "must be positive, not '-1': a refund adds",
    ),
    # an option where the amount goes is named as the option it is
    (["users", "topup", "exact", "--notee", "5"], "No such option '--notee'"),
    (["users", "topup", "exact", "1e400"], "plain decimal"),
    (["users", "topup", "exact", "NaN"], "plain decimal"),
    (["users", "topup", "exact", "1_000"], "plain decimal"),
    (["users", "topup", "exact", "1000000000001"], "at most"),
    (
        ["pricing", "set", "m", "--input", "x", "--cached-input", "1", "--output", "1"],
        "plain decimal",
    ),
    # names that would not match what an operator types later
    (["users", "create", ""], "must not be empty"),
    (["users", "create", "alice "], "spaces"),
    (["users", "create", "a\tb"], "printable characters, and 'a\\tb' holds U+0009"),
    (["users", "create", "a\u200bb"], "holds U+200B"),
    (["users", "create", "alice smith"], "must not hold spaces, as"),
    (["users", "create", "a b"], "a user name is one word of at most 200 printable characters"),
    (["users", "create", "x" * 201], "at most 200"),
    (
        ["pricing", "set", "", "--input", "1", "--cached-input", "1", "--output", "1"],
        "must not be empty",
    ),
    # the ledger's why and who: something said, on one line, nothing that drives a terminal
    (["users", "topup", "exact", "1", "--note", "evil\x1b[31mred"], "it holds U+001B"),
    (
        ["users", "refund", "exact", "0.5", "--reason", "", "--operator", "o"],
        "must not be empty",
    ),
    (
        ["users", "adjust", "exact", "1", "--reason", "r", "--operator", " "],
        "must not be empty",
    ),
    (
        ["users", "adjust", "exact", "1", "--reason", "a\nb", "--operator", "o"],
        "must be printable text on one line; it holds U+000A",
    ),
    # things that do not exist
    (["users", "topup", "nobody", "1"], "no user named 'nobody'"),
    (["users", "ledger", "nobody"], "no user named 'nobody'"),
    (["usage", "list", "--user", "nobody"], "no user named 'nobody'"),
    (["keys", "create", "--user", "nobody"], "no user named 'nobody'"),
    (["keys", "revoke", "999999"], "no active key"),
    (["accounts", "remove", "nothing"], "no account named"),
    (["explain", "req_missing"], "no usage row"),
    (
        ["accounts", "add", "--name", "bad", "--base-url", "ftp://x", "--api-key", "k"],
        "http:// or https://",
    ),
]


@pytest.mark.parametrize(("args", "message"), REFUSED)
def test_bad_admin_input_is_refused_with_one_clear_line(
    db: Gateway, args: list[str], message: str
) -> None:
    db.cli("users", "create", "exact", "--balance", "1", check=False)
    before = db.cli("users", "list", "--json").stdout
    result = db.cli(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert db.cli("users", "list", "--json").stdout == before


def test_duplicate_user_is_refused(db: Gateway) -> None:
    db.cli("users", "create", "twice", "--balance", "1")
    result = db.cli("users", "create", "twice", "--balance", "5", check=False)
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert db.balance("twice") == "1"


def test_unreachable_database_is_one_line_without_password(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    gateway = make_gateway("sqlite", tmp_path_factory)
    gateway.env["CODEX_GATEWAY_DATABASE_URL"] = "postgresql://user:s3cret@127.0.0.1:1/none"
    result = gateway.real_cli("users", "list")
    assert result.returncode == 1
    assert "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_settings_are_each_reported(tmp_path_factory: pytest.TempPathFactory) -> None:
    gateway = make_gateway("sqlite", tmp_path_factory)
    gateway.env["CODEX_GATEWAY_LOG_LEVEL"] = "LOUD"
    gateway.env["CODEX_GATEWAY_MAX_BODY_BYTES"] = "-3"
    result = gateway.real_cli("users", "list")
    assert result.returncode == 1
    assert "log_level" in result.stderr and "max_body_bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_ledger_verify_proves_balances_and_names_a_tampered_one(db: Gateway) -> None:
    db.cli("users", "create", "audited", "--balance", "3")
    db.cli("users", "topup", "audited", "0.5")
    assert "ok:" in db.cli("ledger", "verify").stdout

    async def set_balance(value: str) -> None:
        engine = create_engine(db.database_url)
        async with engine.begin() as conn:
            await conn.execute(
                update(User).where(User.name == "audited").values(balance=Decimal(value))
            )
        await engine.dispose()

    asyncio.run(set_balance("99"))
    result = db.cli("ledger", "verify", check=False)
    assert result.returncode == 1
    assert "user audited: balance 99 but its ledger adds up to 3.5" in result.stderr
    asyncio.run(set_balance("3.5"))
    assert "ok:" in db.cli("ledger", "verify").stdout


def test_refunds_and_adjustments_are_ledger_entries_with_reason_and_operator(
    db: Gateway,
) -> None:
    db.cli("users", "create", "corrected", "--balance", "2")
    db.cli("users", "adjust", "corrected", "-0.5", "--reason", "duplicate top-up",
           "--operator", "ops@example.test")  # fmt: skip
    db.cli("users", "adjust", "corrected", "0.25", "--reason", "goodwill",
           "--operator", "ops@example.test")  # fmt: skip
    db.cli("users", "refund", "corrected", "0.1", "--reason", "outage",
           "--operator", "lead@example.test")  # fmt: skip
    assert db.balance("corrected") == "1.85"
    entries = db.cli_json("users", "ledger", "corrected")
    assert [(e["kind"], e["amount"], e["note"], e["operator"]) for e in entries[1:]] == [
        ("adjustment", "-0.5", "duplicate top-up", "ops@example.test"),
        ("adjustment", "0.25", "goodwill", "ops@example.test"),
        ("refund", "0.1", "outage", "lead@example.test"),
    ]
    assert "ok:" in db.cli("ledger", "verify").stdout


def test_an_adjustment_below_zero_warns_of_leases_only_when_there_are_some(db: Gateway) -> None:
    db.cli("users", "create", "nothing-held", "--balance", "1")

    adjusted = db.cli("users", "adjust", "nothing-held", "-3", "--reason", "chargeback",
                      "--operator", "ops@example.test")  # fmt: skip

    assert db.balance("nothing-held") == "-2"
    assert "open leases" not in adjusted.stderr


def test_an_adjustment_below_zero_says_in_one_line_that_the_balance_went_down(
    db: Gateway,
) -> None:
    db.cli("users", "create", "lowered", "--balance", "2")

    lowered = db.cli("users", "adjust", "lowered", "-0.5", "--reason", "duplicate top-up",
                     "--operator", "ops@example.test")  # fmt: skip
    raised = db.cli("users", "adjust", "lowered", "0.25", "--reason", "goodwill",
                    "--operator", "ops@example.test")  # fmt: skip

    assert db.balance("lowered") == "1.75"
    assert lowered.stderr == (
        "warning: the amount is negative: lowered's balance went down by $0.5\n"
    )
    assert raised.stderr == ""


def readme_commands(prefix: str) -> list[list[str]]:
    """README's command lines that start with `codex-gateway PREFIX`, as an operator would
    type them: optional `[...]` parts left out, trailing `# comments` dropped."""
    found = []
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith(f"codex-gateway {prefix}"):
            continue
        text = re.sub(r"\s+#\s.*$", "", re.sub(r"\s*\[[^\]]*\]", "", text))
        found.append(shlex.split(text)[1:])
    return found


def test_the_readme_user_commands_run_as_written(db: Gateway) -> None:
    commands = readme_commands("users ")
    assert any(command[:2] == ["users", "adjust"] for command in commands)

    for command in commands:
        result = db.cli(*command, check=False)
        assert result.returncode == 0, (command, result.stderr)

    assert db.balance("alice") == "24.6"


def settle_request(db: Gateway, user: str, **columns: Any) -> str:
    """Bill one request of `user` at the list price, its row's `columns` as given; its id."""

    async def settle() -> str:
        engine = create_engine(db.database_url)
        store = Store(engine)
        user_id = next(u["id"] for u in await store.list_users() if u["name"] == user)
        row = usage_row(user_id) | columns
        await store.settle(row)
        await engine.dispose()
        return str(row["request_id"])

    return asyncio.run(settle())


def test_a_refund_of_a_request_is_bounded_by_what_it_cost(db: Gateway) -> None:
    db.cli("users", "create", "refunded", "--balance", "1")

    request_id = settle_request(db, "refunded")
    refund = ["--reason", "bad answer", "--operator", "ops", "--request", request_id]
    db.cli("users", "refund", "refunded", "0.1", *refund)
    too_much = db.cli("users", "refund", "refunded", "0.02", *refund, check=False)
    assert too_much.returncode == 1
    assert "more than its cost 0.114295" in too_much.stderr
    db.cli("users", "refund", "refunded", "0.014295", *refund)
    assert db.balance("refunded") == "1"
    db.cli("users", "create", "bystander", "--balance", "1")
    someone_else = db.cli(
        "users", "refund", "bystander", "0.01", "--reason", "x", "--operator", "ops",
        "--request", request_id, check=False,
    )  # fmt: skip
    assert "not one of this user's requests" in someone_else.stderr
    assert "ok:" in db.cli("ledger", "verify").stdout


def test_usage_list_and_explain_show_the_bytes_the_client_was_sent(db: Gateway) -> None:
    db.cli("users", "create", "left-early", "--balance", "1")
    flags = '["client_disconnected"]'
    request_id = settle_request(db, "left-early", client_bytes=2048, flags=flags)

    header, line = db.cli("usage", "list", "--user", "left-early").stdout.splitlines()
    explained = db.cli("explain", request_id).stdout

    assert header.split()[-3:] == ["COST_USD", "CLIENT_BYTES", "FLAGS"]
    assert line.split()[-3:] == ["0.114295", "2048", "client_disconnected"]
    assert "status    completed (HTTP 200)   client bytes 2048\n" in explained
    assert "flags     client_disconnected\n" in explained


# a command line an operator might mistype, and what the error says
MISTAKES = [
    # a journal folder that is not there
    (["recover", "--journal-dir", "/nonexistent/journals"], "does not exist"),
    # a span that ends before it starts
    (["usage", "export", "--from", "2026-12-05", "--to", "2026-12-01"], "must come before --to"),
    # an amount past the limits says what they are
    (["users", "topup", "nobody", "0.1234567890123456789"], "at most 18 decimals"),
]


@pytest.mark.parametrize(("args", "said"), MISTAKES)
def test_a_mistyped_command_fails_and_says_why(db: Gateway, args: list[str], said: str) -> None:
    result = db.cli(*args, check=False)

    assert result.returncode != 0
    assert said in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        # written while the database is open
        ["usage", "export", "--format", "csv"],
        # written after it is closed
        ["users", "list"],
    ],
)
def test_a_reader_that_stops_early_ends_the_command_quietly(
    db: Gateway, command: list[str]
) -> None:
    # `codex-gateway usage export | head`: the pipe closes before the output is written; that
    # is no database error.
    db.cli("users", "create", f"piped-{command[0]}", "--balance", "1")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [*CLI, *command],
            env=db.env,
            stdout=writer,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writer)

    assert result.returncode == 1
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("options", "warning"),
    [
        # limits a key can never be used under
        (["--expires", "2020-01-01"], "2020-01-01 00:00 UTC has passed"),
        (["--models", "gpt-5.1-codex,no-such-model"], "no price for no-such-model"),
        # ordinary limits
        (["--expires", "2999-01-01", "--models", "gpt-5.1-codex"], None),
    ],
)
def test_key_limits_that_make_a_key_unusable_are_warned_about(
    db: Gateway, options: list[str], warning: str | None
) -> None:
    user = "warned-" + "-".join(options).replace(",", "-")
    db.cli("users", "create", user, "--balance", "1")

    created = db.cli("keys", "create", "--user", user, *options)
    key_id = db.cli_json("keys", "list", "--user", user)[0]["id"]
    updated = db.cli("keys", "update", str(key_id), *options)

    for result in (created, updated):
        if warning is None:
            assert "warning" not in result.stderr
        else:
            assert f"warning: {warning}" in result.stderr.replace("--expires ", "")
    assert created.stdout.splitlines()[-1].startswith("sk-cg-")


# prices given to `pricing set`, the cached input price kept (per 1M) and the warning they
# draw (None: no warning)
PRICE_WARNINGS = [
    # a cache read dearer than a fresh one, named by the prices as typed
    (["--input", "1.25", "--cached-input", "12.5"], "12.5", "12.5 is above the input price 1.25"),
    (
        ["--input", "0.001", "--cached-input", "0.002", "--per", "1k"],
        "2",
        "0.002 is above the input price 0.001",
    ),
    # a cache read at or below the input price
    (["--input", "1.25", "--cached-input", "0.125"], "0.125", None),
    (["--input", "1", "--cached-input", "1"], "1", None),
]


def test_a_markup_of_zero_is_warned_about_and_kept(db: Gateway) -> None:
    result = db.cli(
        "pricing",
        "set",
        "free-model",
        "--input",
        "1",
        "--cached-input",
        "0.1",
        "--output",
        "2",
        "--markup",
        "0",
    )

    stored = {p["model"]: p for p in db.cli_json("pricing", "list")}["free-model"]
    assert stored["markup"] == "0"
    assert "warning: a markup of 0 makes every request for free-model free" in result.stderr


@pytest.mark.parametrize(("prices", "kept", "warning"), PRICE_WARNINGS)
def test_a_cached_input_price_above_the_input_price_is_warned_about_and_kept(
    db: Gateway, prices: list[str], kept: str, warning: str | None
) -> None:
    result = db.cli("pricing", "set", "warned-model", *prices, "--output", "10")

    stored = {p["model"]: p for p in db.cli_json("pricing", "list")}["warned-model"]
    assert stored["cached_input"] == kept
    if warning is None:
        assert "warning" not in result.stderr
    else:
        assert f"warning: the cached input price {warning}" in result.stderr
        assert "warning" not in result.stdout
