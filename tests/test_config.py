"""Settings from the environment and a TOML file; every problem is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from codex_gateway.app import Gateway
from codex_gateway.config import (
    DEFAULT_DATABASE_URL,
    describe,
    environment_variables,
    load_settings,
)
from codex_gateway.errors import ConfigError


def test_defaults_need_nothing() -> None:
    settings = load_settings({})
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.log_level == "INFO"


async def test_the_upstream_keepalive_reaches_the_upstream_client(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "CODEX_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db",
            "CODEX_GATEWAY_SPOOL_PATH": str(tmp_path / "spool.jsonl"),
            "CODEX_GATEWAY_UPSTREAM_KEEPALIVE_SECONDS": "2.5",
        }
    )
    gateway = Gateway(settings)
    try:
        assert gateway.client.keepalive == 2.5
    finally:
        await gateway.engine.dispose()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nlog_level = "warning"\nmax_body_bytes = 1000\n')
    settings = load_settings(
        {"CODEX_GATEWAY_CONFIG": str(config), "CODEX_GATEWAY_MAX_BODY_BYTES": "2000"}
    )
    assert (settings.log_level, settings.max_body_bytes) == ("WARNING", 2000)


# setting, value, what the problem says
BAD = [
    # numbers that are not usable
    ("max_body_bytes", "-1", "positive whole number"),
    ("max_body_bytes", "ten", "invalid literal"),
    ("catalog_refresh_seconds", "nan", "finite"),
    ("catalog_refresh_seconds", "inf", "finite"),
    ("upstream_connect_timeout", "0", "positive"),
    ("upstream_keepalive_seconds", "0", "positive"),
    # words outside their set
    ("log_level", "LOUD", "must be one of"),
    ("log_format", "xml", "plain or json"),
    ("database_url", "mysql://x", "sqlite:///"),
]


@pytest.mark.parametrize(("name", "value", "problem"), BAD)
def test_a_bad_setting_names_itself_and_its_value(name: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({f"CODEX_GATEWAY_{name.upper()}": value})
    (line,) = caught.value.problems
    assert name in line and value in line and problem in line


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway]\nmax_body_bytes = true\nnot_a_setting = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"CODEX_GATEWAY_CONFIG": str(config), "CODEX_GATEWAY_LOG_LEVEL": "x"})
    assert len(caught.value.problems) == 3
    assert any("not_a_setting" in problem for problem in caught.value.problems)


def test_a_broken_file_is_one_problem(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"CODEX_GATEWAY_CONFIG": str(config)})
    assert str(config) in caught.value.problems[0]


BROKEN_TOML = """
[gateway]
database_url = "mysql://root:hunter2@db/cg"
log_level = "LOUD"
max_body_bytes = -5
shutdown_grace_seconds = "soon"
redis_url = "127.0.0.1:6379"
admin_token = "short-secret"
log_levels = "codex_gateway.billing"
colour = "blue"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_broken_file_reports_every_problem_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({}, write(tmp_path, BROKEN_TOML))

    problems = caught.value.problems
    assert len(problems) == 8
    for name in (
        "database_url",
        "log_level",
        "max_body_bytes",
        "shutdown_grace_seconds",
        "redis_url",
        "admin_token",
        "log_levels",
        "'colour'",
    ):
        assert any(name in problem for problem in problems), name


def test_secrets_in_bad_settings_are_never_repeated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({}, write(tmp_path, BROKEN_TOML))

    problems = " ".join(caught.value.problems)
    assert "short-secret" not in problems
    assert "hunter2" not in problems
    assert "mysql://root:***@db/cg" in problems


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nlog_level = "DEBUG"\nshutdown_grace_seconds = 5\n')

    settings = load_settings({"CODEX_GATEWAY_LOG_LEVEL": "warning"}, path)

    assert settings.log_level == "WARNING"
    assert settings.shutdown_grace_seconds == 5.0


@pytest.mark.parametrize(
    ("raw", "pairs"),
    [
        # a comma-separated environment value
        (
            "codex_gateway.access=warning, sqlalchemy.engine=INFO",
            (("codex_gateway.access", "WARNING"), ("sqlalchemy.engine", "INFO")),
        ),
        # one logger
        ("codex_gateway.billing=DEBUG", (("codex_gateway.billing", "DEBUG"),)),
    ],
)
def test_log_levels_name_one_level_per_logger(raw: str, pairs: tuple[tuple[str, str]]) -> None:
    assert load_settings({"CODEX_GATEWAY_LOG_LEVELS": raw}).log_levels == pairs


def test_log_levels_may_be_a_toml_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway.log_levels]\n"codex_gateway.access" = "error"\n')

    assert load_settings({}, path).log_levels == (("codex_gateway.access", "ERROR"),)


def test_describe_masks_the_admin_token_and_the_database_password() -> None:
    settings = load_settings(
        {
            "CODEX_GATEWAY_DATABASE_URL": "postgresql://cg:hunter2@db:5432/cg",
            "CODEX_GATEWAY_ADMIN_TOKEN": "a-very-secret-admin-token",
        }
    )

    shown = repr(describe(settings))

    assert "hunter2" not in shown
    assert "a-very-secret-admin-token" not in shown
    assert "postgresql://cg:***@db:5432/cg" in shown


def test_every_setting_has_an_environment_variable() -> None:
    names = environment_variables()

    assert "CODEX_GATEWAY_CONFIG" in names
    assert "CODEX_GATEWAY_ADMIN_TOKEN" in names
    assert len(names) == len(set(names)) == len(describe(load_settings({}))) + 1
