"""Operations commands as an operator runs them: config check, serve's refusal, version,
migrate and the health probe."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from codex_gateway.store.db import alembic_config, create_engine
from tests.cli.conftest import pg_database_exists, schema_at
from tests.conftest import CLI, PG_ADMIN_URL, free_port
from tests.test_config import BROKEN_TOML

BROKEN_SETTINGS = 8
PASSWORD = "hunter2-db-password"


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_GATEWAY_")}
    return subprocess.run(
        [*CLI, *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def broken_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(BROKEN_TOML, encoding="utf-8")
    return path


def test_config_check_reports_every_error_in_a_broken_file(broken_file: Path) -> None:
    result = run("config", "check", "--file", str(broken_file))

    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1
    assert len(errors) == BROKEN_SETTINGS
    assert f"{BROKEN_SETTINGS} problem(s) found" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_accepts_good_settings_and_shows_them_masked(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nlog_format = "json"\nshutdown_grace_seconds = 12\n')

    result = run(
        "config",
        "check",
        "--file",
        str(path),
        env={"CODEX_GATEWAY_ADMIN_TOKEN": "admin-token-0123456789"},
    )

    assert result.returncode == 0, result.stderr
    assert "log_format = 'json'" in result.stdout
    assert "shutdown_grace_seconds = 12.0" in result.stdout
    assert "admin-token-0123456789" not in result.stdout
    assert result.stdout.strip().endswith("configuration OK")


def test_config_check_reports_files_and_folders_serve_would_fail_on(tmp_path: Path) -> None:
    """With the settings' own problems, at once: a key file that gives no key, a journal
    folder that is a file, a spool whose folder is under a file."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "short-key").write_text("too-short\n")
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nlog_level = "LOUD"\nspool_path = "afile/sub/spool.jsonl"\n')

    result = run(
        "config",
        "check",
        "--file",
        str(path),
        env={
            "CODEX_GATEWAY_SECRET_KEY_FILE": "short-key",
            "CODEX_GATEWAY_JOURNAL_DIR": "afile",
        },
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: setting log_level = 'LOUD': must be one of DEBUG, INFO, WARNING, ERROR",
        "error: setting secret_key_file = 'short-key': the key in it must be at least 32 "
        "characters long",
        "error: setting spool_path = 'afile/sub/spool.jsonl': afile/sub cannot be created: "
        "afile is not a folder",
        "error: setting journal_dir = 'afile': afile is not a folder",
        "4 problem(s) found",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "gateway.toml", "short-key"]


# key files that would hang a reader or fill its memory, and why each is refused
UNREADABLE_KEY_FILES = [
    ("fifo", "must be a regular file, not a FIFO"),  # no one ever writes to it
    ("/dev/zero", "must be a regular file, not a character device"),  # endless
    ("huge", "is longer than 4096 bytes; the file must hold only the key"),  # 64 GiB, sparse
]


@pytest.mark.parametrize(("key_file", "reason"), UNREADABLE_KEY_FILES)
@pytest.mark.parametrize("command", ["config", "serve"])
def test_a_key_file_that_is_no_key_file_is_refused_at_once(
    tmp_path: Path, key_file: str, reason: str, command: str
) -> None:
    """Refused within the timeout, in bounded memory (the command may not take more than
    1 GiB of address space), naming the setting; serve never listens."""
    os.mkfifo(tmp_path / "fifo")
    with (tmp_path / "huge").open("wb") as handle:
        handle.truncate(64 * 1024**3)
    args = ["config", "check"] if command == "config" else ["serve", "--port", str(free_port())]
    base = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_GATEWAY_")}

    result = subprocess.run(
        [*CLI, *args],
        env={**base, "CODEX_GATEWAY_SECRET_KEY_FILE": key_file},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        preexec_fn=_at_most_a_gibibyte,
    )

    assert result.returncode == 1
    assert f"error: setting secret_key_file = '{key_file}': {reason}" in result.stderr.splitlines()
    assert "serving on" not in result.stdout


def _at_most_a_gibibyte() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1024**3, 1024**3))


def test_serve_refuses_bad_settings_with_one_line_each_and_exit_1(
    broken_file: Path, tmp_path: Path
) -> None:
    result = run(
        "serve",
        "--port",
        str(free_port()),
        env={"CODEX_GATEWAY_CONFIG": str(broken_file)},
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == BROKEN_SETTINGS
    assert all(line.startswith("error: ") for line in lines)


@pytest.mark.parametrize("command", [["config", "check"], ["serve", "--port", "0"]])
def test_a_misspelt_variable_stops_a_command_naming_the_one_meant(
    tmp_path: Path, command: list[str]
) -> None:
    result = run(*command, env={"CODEX_GATEWAY_DATABSE_URL": "sqlite:///x.db"}, cwd=tmp_path)

    assert result.returncode == 1
    assert (
        "error: unknown setting 'CODEX_GATEWAY_DATABSE_URL' in the environment; "
        "did you mean 'CODEX_GATEWAY_DATABASE_URL'?"
    ) in result.stderr.splitlines()
    assert not (tmp_path / "data").exists()  # nothing was created at the default


WRONG_TYPED_TOML = """
[gateway]
upstream_connect_timeout = [1]
max_body_bytes = true
upstream_keepalive_seconds = 1e300
spool_path = 5
"""


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["users", "list"]])
def test_wrong_typed_settings_stop_a_command_with_one_line_each_and_exit_1(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(WRONG_TYPED_TOML, encoding="utf-8")

    result = run(*command, env={"CODEX_GATEWAY_CONFIG": str(path)}, cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: setting upstream_connect_timeout = [1]: must be a number of seconds above 0 "
        "and at most 86400 (a day), not a list",
        "error: setting max_body_bytes = true: must be a whole number from 1 to 1073741824, "
        "not a boolean",
        "error: setting upstream_keepalive_seconds = 1e+300: must be a number of seconds "
        "above 0 and at most 86400 (a day)",
        "error: setting spool_path = 5: must be text (a quoted string in TOML), not a number",
    ]
    assert result.stdout == ""


@pytest.fixture(params=["server down", "unknown user"])
def unreachable(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """A database URL with a password in it, the URL as messages show it, and what the
    server's answer says."""
    name = "cg_test_" + uuid.uuid4().hex[:12]
    if request.param == "server down":
        port = free_port()
        url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/{name}"
        return url, f"postgresql://postgres:***@127.0.0.1:{port}/{name}", "[Errno 111]"
    # A user the test server does not know: its trust authentication takes any password.
    user = "cg_nobody_" + uuid.uuid4().hex[:8]
    server = PG_ADMIN_URL.split("@", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql://{user}:{PASSWORD}@{server}/{name}"
    return url, f"postgresql://{user}:***@{server}/{name}", f'role "{user}" does not exist'


@pytest.mark.parametrize("command", [["migrate"], ["users", "list"]])
def test_a_database_that_cannot_be_opened_stops_a_command_with_one_line_naming_it(
    unreachable: tuple[str, str, str], command: list[str], tmp_path: Path
) -> None:
    url, shown, answer = unreachable

    result = run(*command, env={"CODEX_GATEWAY_DATABASE_URL": url}, cwd=tmp_path)

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: database {shown}: ")
    assert answer in line
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["users", "create", "alice", "--balance", "1"],
        ["keys", "create", "--user", "alice"],
        ["ledger", "verify"],
    ],
)
def test_an_admin_command_refuses_a_database_not_created_yet_and_names_migrate(
    missing_database: str, command: list[str], tmp_path: Path
) -> None:
    result = run(*command, env={"CODEX_GATEWAY_DATABASE_URL": missing_database}, cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: database {missing_database} does not exist; run `codex-gateway migrate` "
        "(or start the gateway) to create it"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not pg_database_exists(missing_database)


def test_serve_exits_1_without_a_traceback_when_the_database_is_unreachable(
    unreachable: tuple[str, str, str], tmp_path: Path
) -> None:
    url, shown, answer = unreachable

    result = run(
        "serve", "--port", str(free_port()), env={"CODEX_GATEWAY_DATABASE_URL": url}, cwd=tmp_path
    )

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    [failed] = [line for line in lines if "startup failed: " in line]
    assert f"startup failed: database {shown}: " in failed
    assert answer in failed
    # Every line is a log line, dated: no message runs on, no traceback follows.
    assert all(line.startswith(failed[:4]) for line in lines), result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_version_shows_the_commit_baked_into_the_image() -> None:
    result = run("version", env={"CODEX_GATEWAY_BUILD_COMMIT": "0123abcd4567"})

    assert result.stdout.strip() == "codex-gateway 0.1.0 (commit 0123abcd4567)"


def test_version_asks_git_in_a_checkout() -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()

    assert run("version").stdout.strip() == f"codex-gateway 0.1.0 (commit {commit})"


def migrated_to(url: str, revision: str) -> None:
    """Migrate the database at `url` only as far as `revision`, as an older version did."""

    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async def run_upgrade() -> None:
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                await connection.run_sync(upgrade)
                await connection.commit()
        finally:
            await engine.dispose()

    asyncio.run(run_upgrade())


def test_migrate_says_whether_it_created_upgraded_or_found_the_schema_current(
    tmp_path: Path,
) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    assert head is not None
    previous = str(scripts.get_revision(head).down_revision)
    new, older = f"sqlite:///{tmp_path}/new.db", f"sqlite:///{tmp_path}/older.db"
    migrated_to(older, previous)

    created = run("migrate", env={"CODEX_GATEWAY_DATABASE_URL": new})
    again = run("migrate", env={"CODEX_GATEWAY_DATABASE_URL": new})
    upgraded = run("migrate", env={"CODEX_GATEWAY_DATABASE_URL": older})

    assert (created.returncode, created.stdout) == (
        0,
        f"created the database schema at revision {head} on a new database ({new})\n",
    )
    assert (again.returncode, again.stdout) == (
        0,
        f"database schema is current at revision {head} ({new})\n",
    )
    assert (upgraded.returncode, upgraded.stdout) == (
        0,
        f"upgraded the database schema from revision {previous} to {head} ({older})\n",
    )


def test_migrate_creates_a_postgresql_database_the_server_does_not_have_yet(
    missing_database: str,
) -> None:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()

    result = run("migrate", env={"CODEX_GATEWAY_DATABASE_URL": missing_database})

    assert (result.returncode, result.stdout) == (
        0,
        f"created the database schema at revision {head} on a new database ({missing_database})\n",
    )
    assert schema_at(missing_database) == "current"


def test_health_probe_fails_when_nothing_answers() -> None:
    result = run("health", "--url", f"http://127.0.0.1:{free_port()}")

    assert result.returncode == 1
    assert "/healthz" in result.stderr


@pytest.mark.parametrize("command", ["config", "serve", "accounts"])
def test_a_secret_key_given_twice_is_refused_by_every_command_naming_no_key(
    tmp_path: Path, command: str
) -> None:
    args = {
        "config": ["config", "check"],
        "serve": ["serve", "--port", str(free_port())],
        "accounts": ["accounts", "list"],
    }[command]
    inline = "operator-secret-key-0123456789abcdef"
    in_file = "operator-secret-key-in-the-file-0123456789"
    (tmp_path / "secret-key").write_text(in_file + "\n")

    result = run(
        *args,
        env={"CODEX_GATEWAY_SECRET_KEY": inline, "CODEX_GATEWAY_SECRET_KEY_FILE": "secret-key"},
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        "error: settings secret_key (CODEX_GATEWAY_SECRET_KEY) and secret_key_file "
        "(CODEX_GATEWAY_SECRET_KEY_FILE) are both set: give the secret key in one of them only"
    )
    assert inline not in result.stdout + result.stderr
    assert in_file not in result.stdout + result.stderr
    assert "serving on" not in result.stdout
