"""Settings, read once from an optional TOML file and `CODEX_GATEWAY_*` environment variables.

The environment wins over the file. Every problem is collected before anything fails, so an
operator sees all of them at once.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codex_gateway.errors import ConfigError
from codex_gateway.relay.chatgpt import DEFAULT_BASE_URL as DEFAULT_CHATGPT_BASE_URL

ENV_PREFIX = "CODEX_GATEWAY_"
DEFAULT_DATABASE_URL = "sqlite:///./data/codex-gateway.db"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MIN_SECRET_LENGTH = 32


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    log_level: str = "INFO"
    log_format: str = "plain"
    max_body_bytes: int = 32 * 1024 * 1024
    catalog_refresh_seconds: float = 1.0
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 300.0
    upstream_pool_size: int = 512
    # seals ChatGPT account tokens at rest and keys upstream session ids; never printed
    secret_key: str | None = field(default=None, repr=False)
    secret_key_file: str | None = None
    chatgpt_base_url: str = DEFAULT_CHATGPT_BASE_URL
    chatgpt_token_url: str = "https://auth.openai.com/oauth/token"
    extra: Mapping[str, Any] = field(default_factory=dict)


def _positive_int(value: Any) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive whole number")
    return number


def _positive_float(value: Any) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be a positive number")
    return number


def _log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _log_format(value: Any) -> str:
    text = str(value).lower()
    if text not in ("plain", "json"):
        raise ValueError("must be plain or json")
    return text


def _database_url(value: Any) -> str:
    text = str(value)
    if not text.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("must start with sqlite:/// or postgresql://")
    return text


def _secret_key(value: Any) -> str:
    text = str(value)
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters long")
    return text


def _http_url(value: Any) -> str:
    text = str(value).rstrip("/")
    if not text.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return text


PARSERS: dict[str, Callable[[Any], Any]] = {
    "database_url": _database_url,
    "log_level": _log_level,
    "log_format": _log_format,
    "max_body_bytes": _positive_int,
    "catalog_refresh_seconds": _positive_float,
    "upstream_connect_timeout": _positive_float,
    "upstream_read_timeout": _positive_float,
    "upstream_pool_size": _positive_int,
    "secret_key": _secret_key,
    "secret_key_file": str,
    "chatgpt_base_url": _http_url,
    "chatgpt_token_url": _http_url,
}
SECRET_SETTINGS = frozenset({"secret_key"})


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: Path | None = None
) -> Settings:
    """Build settings from the file named by CODEX_GATEWAY_CONFIG (if any) and the environment."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    problems: list[str] = []
    path = config_file or (
        Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None
    )
    if path is not None:
        raw.update(_read_toml(path, problems))
    for name in PARSERS:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            raw[name] = value
    values: dict[str, Any] = {}
    for name, value in raw.items():
        parser = PARSERS.get(name)
        if parser is None:
            problems.append(f"unknown setting {name!r}")
            continue
        try:
            values[name] = parser(value)
        except (TypeError, ValueError) as exc:
            shown = "(hidden)" if name in SECRET_SETTINGS else repr(value)
            problems.append(f"setting {name} = {shown}: {exc}")
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(Settings(), **values)


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"config file {path}: {exc.strerror}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: {exc}")
        return {}
    return dict(data.get("gateway", data))
