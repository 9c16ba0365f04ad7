"""`accounts add`, `accounts import-codex`, `accounts seal`, `accounts reseal` and `accounts
list` with upstream API keys and ChatGPT tokens sealed at rest by the operator's secret key, on
both backends."""

from __future__ import annotations

import asyncio
import getpass
import io
import json
import os
import pty
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from select import select as wait_for_io
from typing import IO, TextIO

import pytest
from sqlalchemy import select, update

from codex_gateway.errors import CredentialError
from codex_gateway.sandbox import ACCOUNT_KEY as SANDBOX_KEY
from codex_gateway.sandbox import ACCOUNT_NAME as SANDBOX_ACCOUNT
from codex_gateway.store.credentials import CredentialStore, SealedTokens
from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import AccountRecord, Store
from codex_gateway.store.tables import SEALED_COLUMNS, UpstreamAccount
from codex_gateway.upstream.sealing import TokenCipher
from tests.conftest import CLI, Gateway
from tests.upstream.chatgpt_helpers import make_jwt

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


@pytest.fixture
def empty(keyless_gateway: Gateway) -> Gateway:
    """A database of its own, with nothing sealed in it yet, and no secret key."""
    return keyless_gateway


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


def stored_tokens(db: Gateway, name: str) -> SealedTokens:
    """The ChatGPT account's tokens as its row holds them."""

    async def read() -> SealedTokens:
        engine = create_engine(db.database_url)
        try:
            credentials = CredentialStore(engine)
            return (await credentials.account(await credentials.account_id(name))).tokens
        finally:
            await engine.dispose()

    return asyncio.run(read())


def import_codex(
    db: Gateway, tmp_path: Path, name: str, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Import a sign-in of its own as ChatGPT account `name`; its refresh token is
    `rt-NAME` and its id token `it-NAME`."""
    access = make_jwt(time.time() + 3600, account=f"chatgpt-{name}")
    tokens = {"id_token": f"it-{name}", "access_token": access, "refresh_token": f"rt-{name}"}
    path = tmp_path / f"{name}-{uuid.uuid4().hex[:8]}.json"
    path.write_bytes(json.dumps({"tokens": tokens}).encode())
    return db.cli(
        "accounts", "import-codex", str(path), "--name", name,
        "--base-url", "http://127.0.0.1:9/backend-api", *extra, check=check,
    )  # fmt: skip


def sealed_accounts(db: Gateway, tmp_path: Path) -> tuple[str, str]:
    """An API account and ChatGPT account plus-1, both sealed under SECRET, which the CLI
    then holds; the API account's name and key."""
    name, key = fresh()
    with_secret(db)
    add(db, name, key)
    import_codex(db, tmp_path, "plus-1")
    return name, key


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
        "in the database; first give the gateway a secret key (set CODEX_GATEWAY_SECRET_KEY "
        "(at least 32 characters) or CODEX_GATEWAY_SECRET_KEY_FILE) and restart it, then run "
        "`codex-gateway accounts seal` with that same key"
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
    empty: Gateway,
) -> None:
    name, old = fresh()
    with_secret(empty, SECRET + "-lost")
    add(empty, name, old)
    with_secret(empty)

    out, _ = add(empty, name, "sk-upstream-new-key", "--replace")

    assert out == f"gave a new key to openai account {name} -> {BASE_URL}/responses\n"
    sealed = stored(empty, name).api_key_sealed
    assert sealed is not None and TokenCipher(SECRET).open(sealed) == "sk-upstream-new-key"


def test_a_secret_key_that_opens_nothing_sealed_seals_nothing_and_says_why(
    empty: Gateway,
) -> None:
    """The shell's secret key is not the one the database's keys were sealed with, which the
    gateways hold: sealing under it would leave them keys they cannot open."""
    gateway_key, clear, shell_key = fresh(), fresh(), fresh()
    with_secret(empty)
    add(empty, *gateway_key)
    empty.env.pop("CODEX_GATEWAY_SECRET_KEY")
    add(empty, *clear)
    with_secret(empty, SECRET + "-in-the-shell")

    refused = [
        empty.cli("accounts", "seal", check=False),
        empty.cli(
            "accounts", "add", "--name", shell_key[0], "--base-url", BASE_URL,
            "--api-key", shell_key[1], check=False,
        ),
        empty.cli(
            "accounts", "add", "--name", clear[0], "--base-url", BASE_URL,
            "--api-key", clear[1], "--replace", check=False,
        ),
    ]  # fmt: skip

    for result in refused:
        assert result.returncode == 1
        assert result.stderr.startswith(
            "Error: this secret key opens none of the values already sealed in the database "
            f"(accounts {gateway_key[0]}): they were sealed with another key"
        )
    assert stored(empty, clear[0]).api_key == clear[1]
    assert shell_key[0] not in empty.cli("accounts", "list").stdout


def test_after_a_change_of_secret_key_the_first_account_given_again_says_so(
    empty: Gateway,
) -> None:
    (first, _), (second, _) = fresh(), fresh()
    with_secret(empty, SECRET + "-lost")
    add(empty, first, "sk-lost-1")
    add(empty, second, "sk-lost-2")
    with_secret(empty)

    refused = empty.cli(
        "accounts", "add", "--name", first, "--base-url", BASE_URL,
        "--api-key", "sk-new-1", "--replace", check=False,
    )  # fmt: skip
    add(empty, first, "sk-new-1", "--replace", "--secret-key-changed")
    add(empty, second, "sk-new-2", "--replace")  # one value opens with this key now

    assert refused.returncode == 1 and f"(accounts {second})" in refused.stderr
    for name, key in ((first, "sk-new-1"), (second, "sk-new-2")):
        sealed = stored(empty, name).api_key_sealed
        assert sealed is not None and TokenCipher(SECRET).open(sealed) == key


def test_an_import_under_a_secret_key_that_opens_nothing_sealed_stores_nothing(
    empty: Gateway, tmp_path: Path
) -> None:
    """Tokens sealed under the shell's key would not open in the gateways, which hold the key
    the database's values were sealed with."""
    api = sealed_accounts(empty, tmp_path)
    with_secret(empty, SECRET + "-in-the-shell")

    refused = {
        f"{api[0]}, plus-1": import_codex(empty, tmp_path, "plus-2", check=False),
        # the account being replaced aside
        api[0]: import_codex(empty, tmp_path, "plus-1", "--replace", check=False),
    }

    for named, result in refused.items():
        assert result.returncode == 1
        assert result.stderr.startswith(
            "Error: this secret key opens none of the values already sealed in the database "
            f"(accounts {named}): they were sealed with another key"
        )
    assert "plus-2" not in empty.cli("accounts", "list").stdout
    assert TokenCipher(SECRET).open(stored_tokens(empty, "plus-1").refresh_token) == "rt-plus-1"


def test_after_a_change_of_secret_key_the_first_import_says_so(
    empty: Gateway, tmp_path: Path
) -> None:
    name, _ = fresh()
    with_secret(empty, SECRET + "-lost")
    add(empty, name, "sk-lost-1")
    import_codex(empty, tmp_path, "plus-1")
    with_secret(empty)

    refused = import_codex(empty, tmp_path, "plus-1", "--replace", check=False)
    import_codex(empty, tmp_path, "plus-1", "--replace", "--secret-key-changed")
    import_codex(empty, tmp_path, "plus-2")  # one value opens with this key now
    add(empty, name, "sk-new-1", "--replace")

    assert refused.returncode == 1 and f"(accounts {name}): they were" in refused.stderr
    cipher = TokenCipher(SECRET)
    for account in ("plus-1", "plus-2"):
        assert cipher.open(stored_tokens(empty, account).refresh_token) == f"rt-{account}"
    sealed = stored(empty, name).api_key_sealed
    assert sealed is not None and cipher.open(sealed) == "sk-new-1"


def stored_sealed_columns(db: Gateway) -> dict[str, tuple[str | None, ...]]:
    """Every account's sealed columns as its row holds them."""

    async def read() -> dict[str, tuple[str | None, ...]]:
        engine = create_engine(db.database_url)
        try:
            async with engine.connect() as conn:
                query = select(UpstreamAccount.name, *SEALED_COLUMNS)
                rows = (await conn.execute(query)).all()
        finally:
            await engine.dispose()
        return {name: tuple(values) for name, *values in rows}

    return asyncio.run(read())


def revision(db: Gateway) -> int:
    """The revision the gateways reload on."""

    async def read() -> int:
        engine = create_engine(db.database_url)
        try:
            return await Store(engine).revision()
        finally:
            await engine.dispose()

    return asyncio.run(read())


def key_file(tmp_path: Path, secret: str) -> str:
    path = tmp_path / f"key-{uuid.uuid4().hex[:8]}"
    path.write_text(f"{secret}\n")
    return str(path)


NEW_SECRET = SECRET + "-new"


def test_accounts_reseal_seals_every_sealed_value_again_under_the_new_secret_key(
    empty: Gateway, tmp_path: Path
) -> None:
    (api, api_key), (clear, clear_key) = sealed_accounts(empty, tmp_path), fresh()
    empty.env.pop("CODEX_GATEWAY_SECRET_KEY")
    add(empty, clear, clear_key)
    empty.env["CODEX_GATEWAY_SECRET_KEY_FILE"] = key_file(tmp_path, NEW_SECRET)

    before = revision(empty)
    result = empty.cli("accounts", "reseal", "--old-secret-key-file", key_file(tmp_path, SECRET))
    after = revision(empty)

    assert result.stdout == (
        "re-sealed 4 value(s) of 2 account(s) under the new secret key; restart every gateway "
        "with it\n"
    )
    new, old = TokenCipher(NEW_SECRET), TokenCipher(SECRET)
    sealed = stored(empty, api).api_key_sealed
    assert sealed is not None and new.open(sealed) == api_key
    tokens = stored_tokens(empty, "plus-1")
    assert tokens.id_token is not None and new.open(tokens.id_token) == "it-plus-1"
    assert new.open(tokens.refresh_token) == "rt-plus-1"
    assert new.open(tokens.access_token).count(".") == 2  # the JWT, as imported
    for value in (sealed, tokens.access_token, tokens.refresh_token):
        with pytest.raises(CredentialError):
            old.open(value)
    assert (stored(empty, clear).api_key, stored(empty, clear).api_key_sealed) == (clear_key, None)
    assert after > before  # the gateways reload
    listed = {a["name"]: a["why"] for a in empty.cli_json("accounts", "list")}
    assert listed == {api: None, "plus-1": None, clear: None}
    for secret in (api_key, clear_key, "rt-plus-1", SECRET, NEW_SECRET):
        assert secret not in result.stdout + result.stderr


def test_accounts_reseal_run_again_changes_nothing_and_says_every_value_was_done(
    empty: Gateway, tmp_path: Path
) -> None:
    sealed_accounts(empty, tmp_path)
    with_secret(empty, NEW_SECRET)
    old = key_file(tmp_path, SECRET)
    empty.cli("accounts", "reseal", "--old-secret-key-file", old)
    held, before = stored_sealed_columns(empty), revision(empty)

    again = empty.cli("accounts", "reseal", "--old-secret-key-file", old)

    assert again.stdout == (
        "nothing left to re-seal: all 4 value(s) already sealed under the new key\n"
    )
    assert stored_sealed_columns(empty) == held
    assert revision(empty) == before  # the gateways have nothing to reload


def test_accounts_reseal_seals_what_the_old_key_opens_and_leaves_what_the_new_one_does(
    empty: Gateway, tmp_path: Path
) -> None:
    (api, api_key), (added, added_key) = sealed_accounts(empty, tmp_path), fresh()
    with_secret(empty, NEW_SECRET)
    # sealed under the new key meanwhile, by commands run with it
    add(empty, added, added_key, "--secret-key-changed")
    import_codex(empty, tmp_path, "plus-2")
    held, before = stored_sealed_columns(empty), revision(empty)

    result = empty.cli("accounts", "reseal", "--old-secret-key-file", key_file(tmp_path, SECRET))

    assert result.stdout == (
        "re-sealed 4 value(s) of 2 account(s) under the new secret key and left the 4 value(s) "
        "already sealed under the new key as they were; restart every gateway with it\n"
    )
    after = stored_sealed_columns(empty)
    assert (after[added], after["plus-2"]) == (held[added], held["plus-2"])
    new = TokenCipher(NEW_SECRET)
    sealed = stored(empty, api).api_key_sealed
    assert sealed is not None and new.open(sealed) == api_key
    assert new.open(stored_tokens(empty, "plus-1").refresh_token) == "rt-plus-1"
    assert revision(empty) > before


def test_accounts_reseal_changes_nothing_if_a_value_opens_with_neither_key(
    empty: Gateway, tmp_path: Path
) -> None:
    (_, api_key), (lost, lost_key) = sealed_accounts(empty, tmp_path), fresh()
    with_secret(empty, SECRET + "-lost")
    add(empty, lost, lost_key, "--secret-key-changed")
    import_codex(empty, tmp_path, "plus-lost")
    with_secret(empty, NEW_SECRET)
    import_codex(empty, tmp_path, "plus-new", "--secret-key-changed")  # opens, is not named
    held, before = stored_sealed_columns(empty), revision(empty)

    result = empty.cli(
        "accounts", "reseal", "--old-secret-key-file", key_file(tmp_path, SECRET), check=False
    )

    assert result.returncode == 1 and result.stdout == ""
    assert revision(empty) == before  # the gateways have nothing to reload
    assert result.stderr.startswith(
        "Error: neither the old nor the new secret key opens the sealed values of accounts "
        f"{lost}, plus-lost, so nothing was re-sealed. Give --old-secret-key-file the key they "
        "were sealed with"
    )
    assert stored_sealed_columns(empty) == held
    for secret in (api_key, lost_key, "rt-plus-1", "rt-plus-lost", SECRET, NEW_SECRET):
        assert secret not in result.stderr


# What `accounts reseal` refuses before it opens anything: the old key's file, then the new
# key of the settings. {path} is the path given.
BAD_OLD_KEY = "Invalid value for '--old-secret-key-file': "
RESEAL_REFUSED = [
    # no file: an empty path (which as a path is the current directory), or a directory
    ("empty", NEW_SECRET, 2, BAD_OLD_KEY + "is empty; give the path of the file holding the"),
    ("directory", NEW_SECRET, 2, BAD_OLD_KEY + "File '{path}' is a directory."),
    # a file that gives no key, named by the option and never shown
    ("missing", NEW_SECRET, 2, BAD_OLD_KEY + "cannot be read: No such file or directory"),
    ("short", NEW_SECRET, 2, BAD_OLD_KEY + "the key in it must be at least 32 characters"),
    ("fifo", NEW_SECRET, 2, BAD_OLD_KEY + "must be a regular file, not a FIFO"),
    # no new key, or the old one again
    ("old", None, 1, "Error: no new secret key to re-seal with: set CODEX_GATEWAY_SECRET_KEY"),
    ("old", SECRET, 1, "Error: the old secret key is the secret key set now, so nothing was"),
]


def old_key_file(tmp_path: Path, kind: str) -> str:
    """A path for --old-secret-key-file: a file of the old key, or one that gives no key."""
    if kind == "old":
        return key_file(tmp_path, SECRET)
    if kind == "short":
        return key_file(tmp_path, "short")
    if kind == "empty":
        return ""
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "directory":
        path.mkdir()
    return str(path)


@pytest.mark.parametrize(
    ("old", "new", "code", "problem"),
    RESEAL_REFUSED,
    ids=["empty", "directory", "missing", "short", "fifo", "no-new-key", "same-key"],
)
def test_accounts_reseal_refuses_an_old_key_it_cannot_read_or_no_new_one_and_changes_nothing(
    empty: Gateway, tmp_path: Path, old: str, new: str | None, code: int, problem: str
) -> None:
    sealed_accounts(empty, tmp_path)
    held, before = stored_sealed_columns(empty), revision(empty)
    empty.env.pop("CODEX_GATEWAY_SECRET_KEY")
    if new is not None:
        with_secret(empty, new)
    path = old_key_file(tmp_path, old)

    result = empty.cli("accounts", "reseal", "--old-secret-key-file", path, check=False)

    assert (result.returncode, result.stdout) == (code, "")
    assert problem.format(path=path) in result.stderr
    assert SECRET not in result.stderr
    assert stored_sealed_columns(empty) == held
    assert revision(empty) == before


def test_accounts_reseal_with_nothing_sealed_says_so(empty: Gateway, tmp_path: Path) -> None:
    add(empty, *fresh())  # unsealed: no secret key yet
    with_secret(empty, NEW_SECRET)
    before = revision(empty)

    result = empty.cli("accounts", "reseal", "--old-secret-key-file", key_file(tmp_path, SECRET))

    assert result.stdout == "nothing is sealed in the database; nothing to re-seal\n"
    assert revision(empty) == before


# An option --replace would not apply: the account keeps what it has.
KEPT_BY_REPLACE = [
    ("--priority", "5"),
    ("--weight", "3"),
    ("--max-concurrency", "2"),
    ("--priority", "100"),  # even its default, given on purpose
]


@pytest.mark.parametrize(("option", "value"), KEPT_BY_REPLACE)
def test_replace_refuses_an_option_it_would_not_apply(
    keyless: Gateway, option: str, value: str
) -> None:
    name, key = fresh()
    add(keyless, name, key)

    result = keyless.cli(
        "accounts", "add", "--name", name, "--base-url", BASE_URL,
        "--api-key", "sk-upstream-new-key", "--replace", option, value, check=False,
    )  # fmt: skip

    assert result.returncode == 2
    assert (
        f"Error: {option} cannot be given with --replace: --replace gives the account a new "
        "base URL and key, and keeps its priority, weight and cap as they are"
    ) in result.stderr
    assert stored(keyless, name).api_key == key


def test_accounts_seal_leaves_the_quick_starts_placeholder_key_in_clear(empty: Gateway) -> None:
    """A quick start without a secret key still sends its sandbox account's key."""
    name, key = fresh()
    add(empty, SANDBOX_ACCOUNT, SANDBOX_KEY)
    add(empty, name, key)
    with_secret(empty)

    out = empty.cli("accounts", "seal").stdout

    assert out == f"sealed the API keys of 1 account(s): {name}\n"
    sandbox = stored(empty, SANDBOX_ACCOUNT)
    assert (sandbox.api_key, sandbox.api_key_sealed) == (SANDBOX_KEY, None)


# Keys an HTTP header cannot carry as typed, and the problem named for each.
UNUSABLE_KEYS = [
    # nothing to send
    ("", "must not be empty"),
    # whitespace around the key is refused, not trimmed: the key stays as typed
    ("   ", "must not start or end with spaces"),
    (" sk-upstream-padded", "must not start or end with spaces"),
    ("sk-upstream-padded\n", "must not start or end with spaces"),
    # a line break inside would split the upstream request's head
    ("sk-x\r\nX-Injected: yes", "must not hold control characters"),
    ("sk-x\tsecret", "must not hold control characters"),
    ("sk-x\x7fsecret", "must not hold control characters"),
    # no header carries these
    ("sk-x secret", "must not hold spaces"),
    ("sk-x-sécret", "must be ASCII text"),
]


@pytest.mark.parametrize(("key", "problem"), UNUSABLE_KEYS)
@pytest.mark.parametrize("replace", [False, True])
def test_an_api_key_a_header_cannot_carry_is_refused_without_repeating_it(
    keyless: Gateway, key: str, problem: str, replace: bool
) -> None:
    name, good = fresh()
    if replace:
        add(keyless, name, good)

    result = keyless.cli(
        "accounts", "add", "--name", name, "--base-url", BASE_URL, "--api-key", key,
        *(["--replace"] if replace else []), check=False,
    )  # fmt: skip

    assert result.returncode == 2
    assert f"Invalid value for '--api-key': {problem}" in result.stderr
    assert result.stdout == ""
    if key.strip():
        assert key.strip() not in result.stderr
    listed_names = [a["name"] for a in keyless.cli_json("accounts", "list")]
    if replace:
        assert stored(keyless, name).api_key == good
    else:
        assert name not in listed_names


# The ways of giving a key off the command line, each with what it is given: a file, a
# line of standard input, or one typed at a terminal, ended by a line break (LF or CR LF)
# that is not part of the key.
KEY_OFF_THE_COMMAND_LINE = [
    ("file", "\n"),
    ("file", "\r\n"),
    ("file", ""),
    ("stdin", "\n"),
    ("stdin", "\r\n"),
    ("stdin", ""),
    # a terminal turns Enter into LF; a key ended by the end of input is taken as well
    ("terminal", "\n"),
    ("terminal", ""),
]


class Terminal(io.BytesIO):
    """Standard input that is a terminal; what it holds is never the key typed at it."""

    def isatty(self) -> bool:
        return True


def type_at_a_terminal(monkeypatch: pytest.MonkeyPatch, given: str) -> list[tuple[str, bool]]:
    """Have getpass read `given` as it reads a UTF-8 terminal: up to the first LF, which it
    drops, or the end of input, which it refuses before any line; a byte that is not UTF-8
    (a lone surrogate in `given`) fails to decode. Each prompt is recorded, with whether it
    went to standard error."""
    asked: list[tuple[str, bool]] = []

    def read(prompt: str, stream: TextIO | None = None) -> str:
        asked.append((prompt, stream is sys.stderr))
        if not given:
            raise EOFError
        line = given.partition("\n")[0]
        return line.encode("utf-8", "surrogateescape").decode("utf-8")

    monkeypatch.setattr(getpass, "getpass", read)
    return asked


def add_off_the_command_line(
    db: Gateway, tmp_path: Path, name: str, way: str, given: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`accounts add` given the key `given` holds by --api-key-file or `--api-key -`, on
    standard input or at a terminal (once `type_at_a_terminal` has given getpass the key)."""
    if way == "file":
        path = tmp_path / f"api-key-{uuid.uuid4().hex[:8]}"
        path.write_bytes(given.encode())
        option, stdin = ["--api-key-file", str(path)], None
    else:
        option = ["--api-key", "-"]
        stdin = Terminal(b"sk-not-typed\n") if way == "terminal" else given
    return db.cli(
        "accounts", "add", "--name", name, "--base-url", BASE_URL, *option, *extra,
        check=False, stdin=stdin,
    )  # fmt: skip


@pytest.mark.parametrize(("way", "line_break"), KEY_OFF_THE_COMMAND_LINE)
@pytest.mark.parametrize("replace", [False, True])
def test_a_key_given_in_a_file_or_on_standard_input_is_stored_without_its_line_break(
    keyless: Gateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    way: str,
    line_break: str,
    replace: bool,
) -> None:
    name, key = fresh()
    with_secret(keyless)
    if replace:
        add(keyless, name, "sk-upstream-old-key")
    asked = type_at_a_terminal(monkeypatch, key + line_break)

    result = add_off_the_command_line(
        keyless, tmp_path, name, way, key + line_break, *(["--replace"] if replace else [])
    )

    assert (result.returncode, result.stderr) == (0, "")
    assert asked == ([("Upstream API key: ", True)] if way == "terminal" else [])
    done = "gave a new key to" if replace else "added"
    assert result.stdout == f"{done} openai account {name} -> {BASE_URL}/responses\n"
    sealed = stored(keyless, name).api_key_sealed
    assert sealed is not None and TokenCipher(SECRET).open(sealed) == key


def read_until(pipe: IO[bytes], wanted: bytes, seconds: float = 60) -> bytes:
    """What comes from `pipe` until it holds `wanted`, it ends, or `seconds` pass."""
    read, deadline = b"", time.monotonic() + seconds
    while wanted not in read and wait_for_io([pipe], [], [], deadline - time.monotonic())[0]:
        chunk = os.read(pipe.fileno(), 4096)
        if not chunk:
            break
        read += chunk
    return read


def shown_on(controller: int) -> bytes:
    """What a terminal's other end has left to show once the program at it has exited."""
    shown = b""
    while wait_for_io([controller], [], [], 0)[0]:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the program's end is closed and everything has been read
            break
        if not chunk:
            break
        shown += chunk
    return shown


def type_at_a_pty(db: Gateway, name: str, typed: bytes) -> tuple[int, bytes, bytes, bytes]:
    """`accounts add --api-key -` at a terminal, as an operator uses it: standard input is a
    terminal, of no session, so getpass turns off the echo of standard input itself. `typed`
    is typed once the prompt is out. The exit status, the prompt and standard error after
    it, standard output, and what the terminal showed."""
    controller, terminal = pty.openpty()
    command = ["accounts", "add", "--name", name, "--base-url", BASE_URL, "--api-key", "-"]
    proc = subprocess.Popen(
        [*CLI, *command], stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=db.env, cwd=db.workdir, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    try:
        assert proc.stderr is not None
        prompt = read_until(proc.stderr, b"Upstream API key: ")
        os.write(controller, typed)
        stdout, stderr = proc.communicate(timeout=60)
        shown = shown_on(controller)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    return proc.returncode, prompt + stderr, stdout, shown


def test_a_key_typed_at_a_terminal_is_not_echoed(keyless: Gateway) -> None:
    name, key = fresh()
    with_secret(keyless)

    status, stderr, stdout, shown = type_at_a_pty(keyless, name, key.encode() + b"\r")  # Enter

    assert (status, stderr) == (0, b"Upstream API key: \n")
    assert stdout == f"added openai account {name} -> {BASE_URL}/responses\n".encode()
    assert b"sk-upstream" not in shown
    sealed = stored(keyless, name).api_key_sealed
    assert sealed is not None and TokenCipher(SECRET).open(sealed) == key


def test_the_end_of_input_at_the_key_prompt_is_refused_on_a_line_of_its_own(
    keyless: Gateway,
) -> None:
    name = fresh()[0]

    status, stderr, stdout, _ = type_at_a_pty(keyless, name, b"\x04")  # Ctrl-D

    assert (status, stdout) == (2, b"")
    prompt, _, problem = stderr.partition(b"\n")
    assert prompt == b"Upstream API key: "
    assert problem.startswith(b"Usage: ")
    assert name not in [a["name"] for a in keyless.cli_json("accounts", "list")]


# Refused before any key is read: the key given no way, or more than one.
KEY_WAYS_REFUSED = [
    ([], "Error: give the upstream API key with --api-key-file PATH, --api-key - (one line"),
    (
        ["--api-key", "sk-upstream-typed", "--api-key-file", "{file}"],
        "Error: --api-key cannot be given with --api-key-file: give the upstream API key one",
    ),
    (
        ["--api-key", "-", "--api-key-file", "{file}"],
        "Error: --api-key cannot be given with --api-key-file: give the upstream API key one",
    ),
]


@pytest.mark.parametrize(("ways", "problem"), KEY_WAYS_REFUSED, ids=["none", "typed", "stdin"])
@pytest.mark.parametrize("replace", [False, True])
def test_accounts_add_refuses_a_key_given_no_way_or_two(
    keyless: Gateway, tmp_path: Path, ways: list[str], problem: str, replace: bool
) -> None:
    name, good = fresh()
    if replace:
        add(keyless, name, good)
    file = tmp_path / "api-key"
    file.write_text("sk-upstream-in-file\n")
    options = [option.format(file=file) for option in ways]

    result = keyless.cli(
        "accounts", "add", "--name", name, "--base-url", BASE_URL, *options,
        *(["--replace"] if replace else []), check=False, stdin="sk-upstream-on-stdin\n",
    )  # fmt: skip

    assert (result.returncode, result.stdout) == (2, "")
    assert problem in result.stderr
    if replace:
        assert stored(keyless, name).api_key == good
    else:
        assert name not in [a["name"] for a in keyless.cli_json("accounts", "list")]


# What standard input may hold besides the key's one line: blank lines, and nothing else.
STDIN_WITH_MORE_LINES = [
    # which line is the key would be a guess
    ("sk-upstream-first\nsk-upstream-second\n", False),
    ("sk-upstream-first\r\nsk-upstream-second", False),
    ("sk-upstream-first\n\n  second-half\n", False),
    # blank lines after the key say nothing more
    ("sk-upstream-first\n\n", True),
    ("sk-upstream-first\r\n \r\n", True),
]


@pytest.mark.parametrize(("given", "taken"), STDIN_WITH_MORE_LINES)
def test_standard_input_with_a_second_line_that_is_not_blank_is_refused(
    keyless: Gateway, given: str, taken: bool
) -> None:
    name, _ = fresh()

    result = keyless.cli(
        "accounts", "add", "--name", name, "--base-url", BASE_URL, "--api-key", "-",
        check=False, stdin=given,
    )  # fmt: skip

    if taken:
        assert result.returncode == 0, result.stderr
        assert stored(keyless, name).api_key == "sk-upstream-first"
        return
    assert (result.returncode, result.stdout) == (2, "")
    assert (
        "Invalid value for '--api-key -': standard input holds more than one line that is "
        "not blank; it must hold only the key, on one line"
    ) in result.stderr
    assert "sk-upstream" not in result.stderr
    assert name not in [a["name"] for a in keyless.cli_json("accounts", "list")]


# A key file that cannot be read as the secret key file is: refused, naming the option.
KEY_FILES_REFUSED = [
    ("missing", "cannot be read: No such file or directory"),
    ("directory", "File '{path}' is a directory."),
    ("fifo", "must be a regular file, not a FIFO"),
    ("huge", "is longer than 4096 bytes; the file must hold only the key"),
]


def unreadable_key_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / kind
    if kind == "directory":
        path.mkdir()
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "huge":
        path.write_text("sk-" + "x" * 5000)
    return path


@pytest.mark.parametrize(("kind", "problem"), KEY_FILES_REFUSED)
def test_a_key_file_that_cannot_be_read_is_refused_and_nothing_stored(
    keyless: Gateway, tmp_path: Path, kind: str, problem: str
) -> None:
    name = fresh()[0]
    path = unreadable_key_file(tmp_path, kind)

    result = keyless.cli(
        "accounts", "add", "--name", name, "--base-url", BASE_URL,
        "--api-key-file", str(path), check=False,
    )  # fmt: skip

    assert (result.returncode, result.stdout) == (2, "")
    assert f"Invalid value for '--api-key-file': {problem.format(path=path)}" in result.stderr
    assert name not in [a["name"] for a in keyless.cli_json("accounts", "list")]


# Lines refused alike on standard input and typed at a terminal, in the same words.
LINES_REFUSED = [
    ("", "must not be empty"),
    (" sk-x-padded\n", "must not start or end with spaces or line breaks"),
    ("sk-x secret\n", "must not hold spaces"),
    ("sk-x\tsecret\n", "must not hold control characters"),
    ("sk-x-sécret\n", "must be ASCII text"),
    ("sk-x" + "x" * 4096 + "\n", "the line read from standard input is longer than 4096 bytes"),
]

# What a file, a line of standard input or one typed at a terminal holds is checked as a
# typed key is, and refused naming the way it was given and never the key.
KEYS_REFUSED_OFF_THE_COMMAND_LINE = [
    ("file", "", "must not be empty"),
    ("file", "sk-x secret\n", "must not hold spaces"),
    ("file", "sk-x-twice\n\n", "must not start or end with spaces or line breaks"),
    *[(way, line, problem) for way in ("stdin", "terminal") for line, problem in LINES_REFUSED],
    # a byte that is not UTF-8, as a terminal read as UTF-8 gives it
    ("terminal", "sk-x-\udcff\n", "not UTF-8 text (byte 5)"),
]


@pytest.mark.parametrize(("way", "given", "problem"), KEYS_REFUSED_OFF_THE_COMMAND_LINE)
def test_a_key_given_off_the_command_line_is_checked_as_a_typed_one(
    keyless: Gateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    way: str,
    given: str,
    problem: str,
) -> None:
    name = fresh()[0]
    type_at_a_terminal(monkeypatch, given)

    result = add_off_the_command_line(keyless, tmp_path, name, way, given)

    option = "'--api-key-file'" if way == "file" else "'--api-key -'"
    assert (result.returncode, result.stdout) == (2, "")
    assert f"Invalid value for {option}: {problem}" in result.stderr
    if given.strip():
        assert given.strip() not in result.stderr
    assert name not in [a["name"] for a in keyless.cli_json("accounts", "list")]


def test_a_password_in_the_base_url_is_masked_wherever_the_url_is_shown(
    keyless: Gateway,
) -> None:
    name, key = fresh()
    with_url = "http://alice:S3CRETPASSWORD@127.0.0.1:28998/v1"

    added = keyless.cli(
        "accounts", "add", "--name", name, "--base-url", with_url, "--api-key", key
    )  # fmt: skip
    replaced = keyless.cli(
        "accounts", "add", "--name", name, "--base-url", with_url + "/", "--api-key", key,
        "--replace",
    )  # fmt: skip
    table = keyless.cli("accounts", "list").stdout
    [row] = [a for a in keyless.cli_json("accounts", "list") if a["name"] == name]

    masked = "http://alice:***@127.0.0.1:28998/v1"
    assert added.stdout == f"added openai account {name} -> {masked}/responses\n"
    assert replaced.stdout == f"gave a new key to openai account {name} -> {masked}/responses\n"
    assert row["base_url"] == masked and masked in table
    for shown in (added.stdout, added.stderr, replaced.stdout, table, str(row)):
        assert "S3CRETPASSWORD" not in shown
    assert stored(keyless, name).base_url == with_url  # used as given


def test_accounts_list_says_which_sealed_keys_do_not_open_with_its_secret_key(
    empty: Gateway, tmp_path: Path
) -> None:
    """The command cannot know the serving gateways' key: it checks with its own, if any."""
    (lost, lost_key), (kept, kept_key), (clear, clear_key) = fresh(), fresh(), fresh()
    with_secret(empty, SECRET + "-lost")
    add(empty, lost, lost_key)
    with_secret(empty)
    add(empty, kept, kept_key, "--secret-key-changed")
    empty.env.pop("CODEX_GATEWAY_SECRET_KEY")
    add(empty, clear, clear_key)

    def why() -> dict[str, tuple[str, str, str | None]]:
        rows = empty.cli_json("accounts", "list")
        return {a["name"]: (a["key"], a["state"], a["why"]) for a in rows}

    without_a_key = why()
    with_secret(empty)
    checked = why()
    table = empty.cli("accounts", "list")
    empty.cli("accounts", "disable", lost)
    disabled = why()[lost]
    empty.env.pop("CODEX_GATEWAY_SECRET_KEY")
    empty.env["CODEX_GATEWAY_SECRET_KEY_FILE"] = str(tmp_path / "missing")
    unreadable = empty.cli("accounts", "list", "--json")

    assert without_a_key == {
        lost: ("sealed", "ready", None),
        kept: ("sealed", "ready", None),
        clear: ("unsealed", "ready", None),
    }
    assert checked == {
        lost: ("sealed", "ready", "sealed key does not open with this secret key"),
        kept: ("sealed", "ready", None),
        clear: ("unsealed", "ready", None),
    }
    assert "sealed key does not open with this secret key" in table.stdout
    assert disabled == (
        "sealed",
        "disabled",
        "disabled by the operator; sealed key does not open with this secret key",
    )
    assert unreadable.stderr.startswith("warning: setting secret_key_file = ")
    assert unreadable.stderr.rstrip().endswith("sealed keys are listed without checking them")
    assert [a["why"] for a in json.loads(unreadable.stdout) if a["name"] == lost] == [
        "disabled by the operator"
    ]
    for key in (lost_key, kept_key, clear_key):
        assert key not in table.stdout + unreadable.stdout + unreadable.stderr


def seal_again(db: Gateway, name: str, column: str, secret: str) -> None:
    """Seal one of the account's stored values again, under `secret`."""

    async def change() -> None:
        engine = create_engine(db.database_url)
        held = getattr(UpstreamAccount, column)
        try:
            async with engine.begin() as conn:
                query = select(held).where(UpstreamAccount.name == name)
                value = TokenCipher(SECRET).open((await conn.execute(query)).scalar_one())
                sealed = TokenCipher(secret).seal(value)
                await conn.execute(
                    update(UpstreamAccount)
                    .where(UpstreamAccount.name == name)
                    .values({column: sealed})
                )
        finally:
            await engine.dispose()

    asyncio.run(change())


def test_accounts_list_says_which_chatgpt_tokens_do_not_open_with_its_secret_key(
    empty: Gateway, tmp_path: Path
) -> None:
    """Either token of a ChatGPT account that does not open is enough to name the account."""
    lost = SECRET + "-lost"
    with_secret(empty, lost)
    import_codex(empty, tmp_path, "plus-lost")
    with_secret(empty)
    import_codex(empty, tmp_path, "plus-kept", "--secret-key-changed")
    for name in ("plus-access", "plus-refresh"):
        import_codex(empty, tmp_path, name)
    seal_again(empty, "plus-access", "access_token_sealed", lost)
    seal_again(empty, "plus-refresh", "refresh_token_sealed", lost)

    def why() -> dict[str, tuple[str, str, str | None]]:
        rows = empty.cli_json("accounts", "list")
        return {a["name"]: (a["key"], a["state"], a["why"]) for a in rows}

    checked = why()
    table = empty.cli("accounts", "list")
    empty.cli("accounts", "disable", "plus-lost")
    disabled = why()["plus-lost"]
    empty.env.pop("CODEX_GATEWAY_SECRET_KEY")
    without_a_key = why()

    shut = ("sealed", "ready", "sealed tokens do not open with this secret key")
    assert checked == {
        "plus-lost": shut,
        "plus-kept": ("sealed", "ready", None),
        "plus-access": shut,
        "plus-refresh": shut,
    }
    assert "sealed tokens do not open with this secret key" in table.stdout
    assert disabled == (
        "sealed",
        "disabled",
        "disabled by the operator; sealed tokens do not open with this secret key",
    )
    assert without_a_key == {
        "plus-lost": ("sealed", "disabled", "disabled by the operator"),
        "plus-kept": ("sealed", "ready", None),
        "plus-access": ("sealed", "ready", None),
        "plus-refresh": ("sealed", "ready", None),
    }
    for name in checked:
        assert f"rt-{name}" not in table.stdout + table.stderr
