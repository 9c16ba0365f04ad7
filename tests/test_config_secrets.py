"""Settings: the secret key is checked, and never shown back."""

from __future__ import annotations

import pytest

from codex_gateway.config import load_settings
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
