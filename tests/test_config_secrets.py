"""Settings: the secret key is checked, and never shown back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codex_gateway.config import load_settings, read_secret_key_file
from codex_gateway.errors import ConfigError


def test_a_short_secret_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CODEX_GATEWAY_SECRET_KEY": "hunter2-but-short"})

    assert caught.value.problems == [
        "setting secret_key = '***': must be at least 32 characters long"
    ]


def test_a_secret_key_never_appears_in_the_settings_repr() -> None:
    secret = "s" * 40

    settings = load_settings({"CODEX_GATEWAY_SECRET_KEY": secret})

    assert settings.secret_key == secret
    assert secret not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        # ChatGPT backend and token endpoint URLs lose a trailing slash
        ("CHATGPT_BASE_URL", "http://127.0.0.1:9/backend-api/", "http://127.0.0.1:9/backend-api"),
        ("CHATGPT_TOKEN_URL", "http://127.0.0.1:9/oauth/token", "http://127.0.0.1:9/oauth/token"),
    ],
)
def test_chatgpt_urls_are_configurable(name: str, value: str, expected: str) -> None:
    settings = load_settings({"CODEX_GATEWAY_" + name: value})

    assert getattr(settings, name.lower()) == expected


def test_a_chatgpt_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ConfigError, match="must start with http"):
        load_settings({"CODEX_GATEWAY_CHATGPT_TOKEN_URL": "file:///etc/passwd"})


SECRET = "operator-secret-key-0123456789abcdef"
BOTH_SET = (
    "settings secret_key (CODEX_GATEWAY_SECRET_KEY) and secret_key_file "
    "(CODEX_GATEWAY_SECRET_KEY_FILE) are both set: give the secret key in one of them only"
)


@pytest.mark.parametrize(
    "file_key",
    [
        SECRET,  # the same key twice is refused too: which one counts is still unclear
        "another-operator-secret-key-0123456789",
    ],
)
def test_a_secret_key_given_both_inline_and_as_a_file_is_refused_naming_neither_value(
    tmp_path: Path, file_key: str
) -> None:
    key_file = tmp_path / "secret-key"
    key_file.write_text(file_key + "\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                "CODEX_GATEWAY_SECRET_KEY": SECRET,
                "CODEX_GATEWAY_SECRET_KEY_FILE": str(key_file),
            }
        )

    assert caught.value.problems == [BOTH_SET]


def test_the_secret_key_in_the_file_and_its_file_in_the_environment_are_both_set(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "secret-key"
    key_file.write_text(SECRET)
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nsecret_key = "{SECRET}"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings({"CODEX_GATEWAY_SECRET_KEY_FILE": str(key_file)}, config)

    assert caught.value.problems == [BOTH_SET]


def test_an_empty_secret_key_variable_beside_a_key_file_counts_as_not_set(
    tmp_path: Path,
) -> None:
    """As docker-compose.yml passes an unset one on."""
    key_file = tmp_path / "secret-key"
    key_file.write_text(SECRET + "\n")

    settings = load_settings(
        {"CODEX_GATEWAY_SECRET_KEY": "", "CODEX_GATEWAY_SECRET_KEY_FILE": str(key_file)}
    )

    assert (settings.secret_key, settings.secret_key_file) == (None, str(key_file))


# A secret key with whitespace around it: refused, not trimmed (the spaces would be key).
PADDED_SECRET_KEYS = [
    SECRET + " ",
    " " + SECRET,
    SECRET + "\n",
    "\t" + SECRET,
]


@pytest.mark.parametrize("padded", PADDED_SECRET_KEYS)
def test_a_secret_key_with_whitespace_around_it_is_refused_without_echoing_it(
    tmp_path: Path, padded: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f"[gateway]\nsecret_key = {json.dumps(padded)}\n")

    for environ, config_file in (({"CODEX_GATEWAY_SECRET_KEY": padded}, None), ({}, config)):
        with pytest.raises(ConfigError) as caught:
            load_settings(environ, config_file)

        assert caught.value.problems == [
            "setting secret_key = '***': must not start or end with spaces or line breaks "
            "(they would be part of the key)"
        ]


def test_a_key_file_keeps_being_trimmed(tmp_path: Path) -> None:
    key_file = tmp_path / "secret-key"
    key_file.write_text(f"  {SECRET}\n")

    settings = load_settings({"CODEX_GATEWAY_SECRET_KEY_FILE": str(key_file)}, local=True)

    assert read_secret_key_file(str(settings.secret_key_file)) == SECRET
