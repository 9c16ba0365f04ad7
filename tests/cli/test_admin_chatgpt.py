"""`accounts import-codex`, `accounts list` and `accounts enable`, run as an operator runs
them."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from codex_gateway.relay.chatgpt import Quota, QuotaWindow
from codex_gateway.store.credentials import CredentialStore
from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import Store
from codex_gateway.upstream.pool import AccountPool
from codex_gateway.upstream.quota import QuotaBook
from codex_gateway.upstream.sealing import TokenCipher
from tests.conftest import CLI, Gateway, free_port, make_gateway
from tests.upstream.chatgpt_helpers import ACCOUNT, SECRET, make_jwt


@pytest.fixture
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    return make_gateway("sqlite", tmp_path_factory)


@pytest.fixture
def auth_file(tmp_path: Path) -> tuple[Path, str, str]:
    access = make_jwt(time.time() + 3600)
    refresh = "rt_do-not-print-" + "x" * 20
    path = tmp_path / "auth.json"
    tokens = {"id_token": make_jwt(), "access_token": access, "refresh_token": refresh}
    path.write_bytes(orjson.dumps({"OPENAI_API_KEY": None, "tokens": tokens}))
    return path, access, refresh


def database(gateway: Gateway) -> sqlite3.Connection:
    return sqlite3.connect(gateway.database_url.removeprefix("sqlite:///"))


def test_import_without_a_secret_key_stores_nothing(
    gateway: Gateway, auth_file: tuple[Path, str, str]
) -> None:
    gateway.env.pop("CODEX_GATEWAY_SECRET_KEY", None)

    result = gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", "c1", check=False)

    assert result.returncode != 0
    assert "refusing to store ChatGPT tokens without a secret key" in result.stderr
    assert gateway.cli_json("accounts", "list") == []


def test_imported_tokens_are_sealed_and_never_printed(
    gateway: Gateway, auth_file: tuple[Path, str, str]
) -> None:
    path, access, refresh = auth_file
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET

    result = gateway.cli(
        "accounts", "import-codex", str(path), "--name", "c1",
        "--base-url", "http://127.0.0.1:9/backend-api/",
        "--priority", "5", "--max-concurrency", "3", "--weight", "2",
    )  # fmt: skip

    assert f"imported chatgpt account c1 (ChatGPT account {ACCOUNT}, plan plus)" in result.stdout
    assert "-> http://127.0.0.1:9/backend-api/codex/responses" in result.stdout
    listed = gateway.cli_json("accounts", "list")
    assert [(a["name"], a["kind"], a["state"], a["why"]) for a in listed] == [
        ("c1", "chatgpt", "ready", None)
    ]
    assert (listed[0]["priority"], listed[0]["max_concurrency"], listed[0]["weight"]) == (5, 3, 2)
    shown = result.stdout + result.stderr + gateway.cli("accounts", "list").stdout
    assert access not in shown and refresh not in shown
    with database(gateway) as conn:
        row = conn.execute(
            "SELECT access_token_sealed, refresh_token_sealed, chatgpt_account_id, api_key "
            "FROM upstream_accounts WHERE name = 'c1'"
        ).fetchone()
        dump = "\n".join(conn.iterdump())
    assert access not in dump and refresh not in dump
    cipher = TokenCipher(SECRET)
    assert (cipher.open(row[0]), cipher.open(row[1]), row[2], row[3]) == (
        access,
        refresh,
        ACCOUNT,
        "",
    )


def test_a_password_in_the_backend_url_is_masked_where_the_import_shows_it(
    gateway: Gateway, auth_file: tuple[Path, str, str]
) -> None:
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    with_url = "http://alice:S3CRETPASSWORD@127.0.0.1:9/backend-api"

    result = gateway.cli(
        "accounts", "import-codex", str(auth_file[0]), "--name", "c1", "--base-url", with_url
    )  # fmt: skip

    assert "-> http://alice:***@127.0.0.1:9/backend-api/codex/responses" in result.stdout
    shown = result.stdout + result.stderr + gateway.cli("accounts", "list", "--json").stdout
    assert "S3CRETPASSWORD" not in shown
    with database(gateway) as conn:
        [(stored,)] = conn.execute("SELECT base_url FROM upstream_accounts WHERE name = 'c1'")
    assert stored == with_url


def test_a_second_import_under_the_same_name_is_refused(
    gateway: Gateway, auth_file: tuple[Path, str, str]
) -> None:
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", "c1")

    result = gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", "c1", check=False)

    assert result.returncode != 0 and "already exists" in result.stderr


def test_a_missing_auth_file_is_a_one_line_error(gateway: Gateway, tmp_path: Path) -> None:
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET

    result = gateway.cli(
        "accounts", "import-codex", str(tmp_path / "none.json"), "--name", "c", check=False
    )

    assert result.returncode != 0 and "cannot read" in result.stderr


def test_list_says_why_an_account_is_out_of_rotation(
    gateway: Gateway, auth_file: tuple[Path, str, str]
) -> None:
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    for name in ("relogin", "walled", "fine"):
        gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", name)
    resets = int(time.time()) + 3600
    walled = Quota(QuotaWindow(100.0, 300, resets), QuotaWindow(61.5, 10080, resets + 60))
    fine = Quota(QuotaWindow(12.5, 300, resets))
    with database(gateway) as conn:
        conn.execute(
            "UPDATE upstream_accounts SET state = 'needs_relogin', "
            "state_reason = 'token refresh refused: refresh_token_reused (HTTP 401)' "
            "WHERE name = 'relogin'"
        )
        for name, quota in (("walled", walled), ("fine", fine)):
            conn.execute(
                "UPDATE upstream_accounts SET quota = ? WHERE name = ?",
                (orjson.dumps(quota.to_json()).decode(), name),
            )

    listed = {a["name"]: a for a in gateway.cli_json("accounts", "list")}
    text = gateway.cli("accounts", "list").stdout

    assert listed["relogin"]["state"] == "needs_relogin"
    assert "refresh_token_reused" in listed["relogin"]["why"]
    assert listed["walled"]["state"] == "cooling_down"
    assert listed["walled"]["why"].startswith("usage limit reached; resets at ")
    assert listed["walled"]["quota"]["secondary"]["used_percent"] == 61.5
    assert listed["fine"]["state"] == "ready"
    assert "needs_relogin" in text and "cooling_down" in text
    assert "primary 100% resets" in text and "secondary 61.5% resets" in text


def test_replacing_the_tokens_brings_an_account_back_into_rotation(
    gateway: Gateway, auth_file: tuple[Path, str, str], tmp_path: Path
) -> None:
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", "c1")
    with database(gateway) as conn:
        conn.execute(
            "UPDATE upstream_accounts SET state = 'needs_relogin', state_reason = 'refused'"
        )
    fresh = tmp_path / "fresh.json"
    tokens = {"access_token": make_jwt(time.time() + 7200), "refresh_token": "rt_fresh"}
    fresh.write_bytes(orjson.dumps({"tokens": tokens}))

    result = gateway.cli("accounts", "import-codex", str(fresh), "--name", "c1", "--replace")

    assert result.stdout.startswith("replaced the tokens of chatgpt account c1")
    listed = gateway.cli_json("accounts", "list")
    assert [(a["name"], a["state"], a["why"]) for a in listed] == [("c1", "ready", None)]
    with database(gateway) as conn:
        sealed = conn.execute("SELECT refresh_token_sealed FROM upstream_accounts").fetchone()[0]
    assert TokenCipher(SECRET).open(sealed) == "rt_fresh"
    missing = gateway.cli(
        "accounts", "import-codex", str(fresh), "--name", "c2", "--replace", check=False
    )
    assert missing.returncode != 0 and "no ChatGPT account named 'c2'" in missing.stderr


def test_one_sign_in_imported_under_a_second_name_is_warned_about(
    gateway: Gateway, auth_file: tuple[Path, str, str]
) -> None:
    # Two gateway accounts on one sign-in: the first refresh would lock the other out.
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    first = gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", "c1")
    second = gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", "c2")
    replaced = gateway.cli(
        "accounts", "import-codex", str(auth_file[0]), "--name", "c1", "--replace"
    )

    assert "warning" not in first.stderr
    assert "is already imported as c1; accounts imported from one sign-in" in second.stderr
    assert "warning" not in replaced.stderr


def test_a_gateway_whose_secret_key_does_not_open_the_tokens_refuses_to_start(
    gateway: Gateway, auth_file: tuple[Path, str, str]
) -> None:
    # One process started with the wrong key must not take the account out of rotation for
    # every other process: it stops, and the account stays as it was.
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", "c1")
    env = dict(gateway.env, CODEX_GATEWAY_SECRET_KEY="another-secret-key-" + "k" * 32)

    served = subprocess.run(
        [*CLI, "serve", "--port", str(free_port())],
        env=env,
        cwd=gateway.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )

    assert served.returncode != 0
    assert "does not open the stored tokens of ChatGPT account(s) c1" in served.stderr
    assert SECRET not in served.stderr and auth_file[2] not in served.stderr
    (account,) = gateway.cli_json("accounts", "list")
    assert account["state"] == "ready"


def rested_after_a_restart(gateway: Gateway, name: str) -> str:
    """The state a starting gateway gives the account, from what the database holds."""

    async def start() -> str:
        engine = create_engine(gateway.database_url)
        try:
            accounts = await Store(engine).accounts()
            pool = AccountPool(Store(engine), lambda: accounts, lambda: 0)
            await QuotaBook(pool, CredentialStore(engine)).load(accounts)
            await pool.drain()
            account = next(a for a in accounts if a.name == name)
            return pool.health(account).current(time.time())
        finally:
            await engine.dispose()

    return asyncio.run(start())


def test_enabling_an_account_lifts_its_usage_wall_for_good(
    gateway: Gateway, auth_file: tuple[Path, str, str]
) -> None:
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    gateway.cli("accounts", "import-codex", str(auth_file[0]), "--name", "walled")
    resets = int(time.time()) + 3600
    wall = Quota(QuotaWindow(100.0, 300, resets), QuotaWindow(61.5, 10080, resets + 60), resets)
    with database(gateway) as conn:  # as a gateway leaves an account that hit its wall
        conn.execute(
            "UPDATE upstream_accounts SET state = 'quota_limited', state_reason = ?, "
            "state_until = ?, quota = ? WHERE name = 'walled'",
            (
                "usage limit reached (plan plus); resets at later",
                datetime.fromtimestamp(resets, UTC).replace(tzinfo=None).isoformat(" "),
                orjson.dumps(wall.to_json()).decode(),
            ),
        )
    assert rested_after_a_restart(gateway, "walled") == "quota_limited"

    gateway.cli("accounts", "enable", "walled")

    listed = gateway.cli_json("accounts", "list")[0]
    assert (listed["state"], listed["why"]) == ("ready", None)
    assert listed["quota"]["limit_reached_until"] is None
    assert listed["quota"]["primary"] is None  # full until a reset ahead: read afresh
    assert listed["quota"]["secondary"]["used_percent"] == 61.5
    assert rested_after_a_restart(gateway, "walled") == "ready"
