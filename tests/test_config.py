"""Settings from the environment and a TOML file; every problem is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from codex_gateway.config import DEFAULT_DATABASE_URL, load_settings
from codex_gateway.errors import ConfigError


def test_defaults_need_nothing() -> None:
    settings = load_settings({})
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.log_level == "INFO"


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
