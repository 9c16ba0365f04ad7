"""Settings from a TOML file and the environment: every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from codex_gateway.config import describe, environment_variables, load_settings
from codex_gateway.errors import ConfigError

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
