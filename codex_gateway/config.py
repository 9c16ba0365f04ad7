"""Settings, read once from an optional TOML file and `CODEX_GATEWAY_*` environment variables.

The environment wins over the file. Every problem is collected before anything fails, so an
operator sees all of them at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import errno
import os
import stat
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from codex_gateway.errors import ConfigError
from codex_gateway.relay.chatgpt import DEFAULT_BASE_URL as DEFAULT_CHATGPT_BASE_URL
from codex_gateway.store.db import redact_url, sqlite_file

ENV_PREFIX = "CODEX_GATEWAY_"
# Variables under the prefix that are no settings, so never reported as unknown ones.
NOT_SETTINGS = frozenset(
    {
        ENV_PREFIX + "BUILD_COMMIT",  # the commit an image was built from (`version.py`)
        ENV_PREFIX + "IMAGE_TAG",  # the image docker-compose.yml runs, set by deploy/deploy.sh
        ENV_PREFIX + "TEST_PG",  # the PostgreSQL server of the test suite and the benchmark
    }
)
DEFAULT_DATABASE_URL = "sqlite:///./data/codex-gateway.db"
DEFAULT_SPOOL_PATH = "./data/unsettled-usage.jsonl"
MIN_ADMIN_TOKEN_LENGTH = 16
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DISCONNECT_POLICIES = ("finish", "cancel")
MIN_SECRET_LENGTH = 32
# A secret key file holds one key of a few dozen characters; more than this is no key file.
MAX_SECRET_FILE_BYTES = 4096
# Upper bounds past which a value is certainly a mistake (a typo, a slip of unit): a wait,
# timeout or rest of more than a day (a conversation's binding, a week), more tokens than a
# context window holds, more bytes, connections, rows or attempts than one process can use.
DAY_SECONDS = 86_400
WEEK_SECONDS = 7 * DAY_SECONDS
MAX_BODY_BYTES_LIMIT = 1024 * 1024 * 1024
MAX_POOL_SIZE = 1_000_000
MAX_HOLD_TOKENS = 100_000_000
MAX_BACKLOG_ROWS = 1_000_000
MAX_UPSTREAM_ATTEMPTS = 100


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    log_level: str = "INFO"
    log_format: str = "plain"
    max_body_bytes: int = 32 * 1024 * 1024
    catalog_refresh_seconds: float = 1.0
    upstream_connect_timeout: float = 10.0
    upstream_first_byte_timeout: float = 120.0
    upstream_read_timeout: float = 300.0
    upstream_total_timeout: float = 3600.0
    upstream_pool_size: int = 4096
    # How long an idle upstream connection is kept for the next request: a new one costs a
    # TCP and TLS handshake. The default is that of hyper's connection pool; an upstream that
    # closes idle connections sooner costs one request sent again on a new connection.
    upstream_keepalive_seconds: float = 90.0
    hold_output_tokens: int = 32_768
    hold_context_tokens: int = 400_000
    lease_ttl_seconds: float = 60.0
    lease_renew_seconds: float = 5.0
    lease_idle_seconds: float = 10.0
    # Bills waiting to be written above which new requests wait for the writer.
    writer_backlog_rows: int = 1000
    redis_url: str | None = None
    admin_token: str | None = None
    log_levels: tuple[tuple[str, str], ...] = ()
    shutdown_grace_seconds: float = 30.0
    spool_path: str = DEFAULT_SPOOL_PATH
    # Each process's hold journal; empty means a `hold-journal` folder beside the spool.
    journal_dir: str = ""
    upstream_max_attempts: int = 3
    upstream_cooldown_seconds: float = 60.0
    upstream_failure_cooldown_seconds: float = 10.0
    sticky_ttl_seconds: float = 3600.0
    redis_prefix: str = "codex-gateway"
    disconnect_policy: str = "finish"
    disconnect_finish_seconds: float = 60.0
    # seals ChatGPT account tokens at rest and keys upstream session ids; never printed
    secret_key: str | None = field(default=None, repr=False)
    secret_key_file: str | None = None
    chatgpt_base_url: str = DEFAULT_CHATGPT_BASE_URL
    chatgpt_token_url: str = "https://auth.openai.com/oauth/token"
    # A refresh holds the account's row lock (on SQLite, the database's write lock, whose
    # busy timeout is 30 s), so the token endpoint gets less than that to answer.
    token_refresh_timeout_seconds: float = 20.0

    @property
    def journal_path(self) -> Path:
        """Where hold journals live: `journal_dir`, else a folder beside the spool."""
        if self.journal_dir:
            return Path(self.journal_dir)
        return Path(self.spool_path).parent / "hold-journal"


def _whole(high: int) -> Callable[[Any], int]:
    """A parser of whole numbers from 1 to `high`. One written in exponent form (`1e9`, as a
    TOML float or in the environment) is taken when it is whole: it means the same number."""
    expected = f"must be a whole number from 1 to {high}"

    def parse(value: Any) -> int:
        number = _decimal(value, expected)
        if not number.is_finite() or number != number.to_integral_value():
            raise ValueError(f"{expected}, not {_kind_of_number(number)}")
        if not 1 <= number <= high:
            raise ValueError(expected)
        return int(number)

    return parse


def _seconds(high: float, span: str) -> Callable[[Any], float]:
    """A parser of durations above 0 and at most `high` seconds (`span` names it)."""
    expected = f"must be a number of seconds above 0 and at most {high:g} ({span})"

    def parse(value: Any) -> float:
        number = _decimal(value, expected)
        if not number.is_finite():
            raise ValueError(f"{expected}, not {_kind_of_number(number)}")
        seconds = float(number)  # a positive number too small for a float becomes 0
        if not 0 < seconds <= high:
            raise ValueError(expected)
        return seconds

    return parse


def _decimal(value: Any, expected: str) -> Decimal:
    """A number from a TOML number (a float as the binary value TOML gives) or from an
    environment string (exactly as written)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(value)
    if not isinstance(value, str):
        raise ValueError(f"{expected}, not {_kind(value)}")
    if not value.isascii():  # Decimal would read other scripts' digits too
        raise ValueError(expected)
    try:
        return Decimal(value)
    except ArithmeticError:
        raise ValueError(expected) from None


def _kind_of_number(number: Decimal) -> str:
    if number.is_nan():
        return "NaN"
    return "infinite" if number.is_infinite() else "a fraction"


def _kind(value: Any) -> str:
    """What kind of TOML value a setting was given, in an operator's words."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return "a date or time"
    return type(value).__name__


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be text (a quoted string in TOML), not {_kind(value)}")
    return value


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


def _disconnect_policy(value: Any) -> str:
    text = str(value).lower()
    if text not in DISCONNECT_POLICIES:
        raise ValueError(f"must be one of {', '.join(DISCONNECT_POLICIES)}")
    return text


def _prefix(value: Any) -> str:
    text = _text(value)
    if not text or any(char.isspace() for char in text):
        raise ValueError("must be a non-empty word without spaces")
    return text


def _database_url(value: Any) -> str:
    text = _text(value)
    if not text.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("must start with sqlite:/// or postgresql://")
    return text


def _secret_key(value: Any) -> str:
    """The key as given: spaces around it would be part of the key, so they are refused
    rather than trimmed (only a key file, whose last line break editors add, is trimmed)."""
    text = _text(value)
    if text != text.strip():
        raise ValueError(
            "must not start or end with spaces or line breaks (they would be part of the key)"
        )
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters long")
    return text


def _http_url(value: Any) -> str:
    text = _text(value).rstrip("/")
    if not text.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return text


def _redis_url(value: Any) -> str:
    text = _text(value)
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return text


def _admin_token(value: Any) -> str:
    text = _text(value)
    if len(text) < MIN_ADMIN_TOKEN_LENGTH or text != text.strip():
        # The value itself is never repeated: it is a secret.
        raise ValueError(
            f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters without surrounding spaces"
        )
    return text


def _log_levels(value: Any) -> tuple[tuple[str, str], ...]:
    """`logger=LEVEL,logger=LEVEL` (or a TOML table) into (logger, LEVEL) pairs; a value with
    bad entries is one problem that names each of them."""
    if isinstance(value, Mapping):
        entries: list[tuple[str, str] | str] = [
            (str(name), str(level)) for name, level in value.items()
        ]
    elif not isinstance(value, str):
        raise ValueError(f"must be logger=LEVEL,... or a TOML table, not {_kind(value)}")
    else:
        entries = [_log_level_entry(item.strip()) for item in value.split(",")]
    pairs: list[tuple[str, str]] = []
    faults: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            faults.append(f"{entry!r} is not logger=LEVEL")
            continue
        name, level = entry
        try:
            pairs.append((name, _log_level(level)))
        except ValueError as exc:
            faults.append(f"{name!r} has level {level!r}, which {exc}")
    if faults:
        raise ValueError("; ".join(faults))
    return tuple(pairs)


def _log_level_entry(item: str) -> tuple[str, str] | str:
    """One `logger=LEVEL` of the environment's list as its pair, or as written if it is none."""
    name, sep, level = item.partition("=")
    if not sep or not name.strip():
        return item
    return name.strip(), level.strip()


def _path(value: Any) -> str:
    text = _text(value).strip()
    if not text:
        raise ValueError("must be a path (leave the setting out for its default)")
    return text


_SECONDS_UP_TO_A_DAY = _seconds(DAY_SECONDS, "a day")

PARSERS: dict[str, Callable[[Any], Any]] = {
    "database_url": _database_url,
    "log_level": _log_level,
    "log_format": _log_format,
    "max_body_bytes": _whole(MAX_BODY_BYTES_LIMIT),
    "catalog_refresh_seconds": _SECONDS_UP_TO_A_DAY,
    "upstream_connect_timeout": _SECONDS_UP_TO_A_DAY,
    "upstream_first_byte_timeout": _SECONDS_UP_TO_A_DAY,
    "upstream_read_timeout": _SECONDS_UP_TO_A_DAY,
    "upstream_total_timeout": _SECONDS_UP_TO_A_DAY,
    "upstream_pool_size": _whole(MAX_POOL_SIZE),
    "upstream_keepalive_seconds": _SECONDS_UP_TO_A_DAY,
    "hold_output_tokens": _whole(MAX_HOLD_TOKENS),
    "hold_context_tokens": _whole(MAX_HOLD_TOKENS),
    "lease_ttl_seconds": _SECONDS_UP_TO_A_DAY,
    "lease_renew_seconds": _SECONDS_UP_TO_A_DAY,
    "lease_idle_seconds": _SECONDS_UP_TO_A_DAY,
    "writer_backlog_rows": _whole(MAX_BACKLOG_ROWS),
    "redis_url": _redis_url,
    "admin_token": _admin_token,
    "log_levels": _log_levels,
    "shutdown_grace_seconds": _SECONDS_UP_TO_A_DAY,
    "spool_path": _path,
    "journal_dir": _path,
    "upstream_max_attempts": _whole(MAX_UPSTREAM_ATTEMPTS),
    "upstream_cooldown_seconds": _SECONDS_UP_TO_A_DAY,
    "upstream_failure_cooldown_seconds": _SECONDS_UP_TO_A_DAY,
    "sticky_ttl_seconds": _seconds(WEEK_SECONDS, "a week"),
    "redis_prefix": _prefix,
    "disconnect_policy": _disconnect_policy,
    "disconnect_finish_seconds": _SECONDS_UP_TO_A_DAY,
    "secret_key": _secret_key,
    "secret_key_file": _path,
    "chatgpt_base_url": _http_url,
    "chatgpt_token_url": _http_url,
    "token_refresh_timeout_seconds": _SECONDS_UP_TO_A_DAY,
}
SECRET_SETTINGS = frozenset({"admin_token", "secret_key"})
# The two ways of giving the secret key, of which one at most may be set.
SECRET_KEY_SETTINGS = ("secret_key", "secret_key_file")
# Settings checked against each other once each is valid (`_conflicts`).
LEASE_TIMES = ("lease_renew_seconds", "lease_ttl_seconds")
# URLs that may carry a password, shown with it masked.
URL_SETTINGS = frozenset({"database_url", "redis_url"})


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    *,
    local: bool = False,
) -> Settings:
    """Build settings from the file named by CODEX_GATEWAY_CONFIG (if any) and the environment.

    `local`: also check what a serving gateway needs of this machine (`local_problems`).
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    problems: list[str] = []
    path = config_file or (
        Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None
    )
    if path is not None:
        raw.update(_read_toml(path, problems))
    # A file that could not be read leaves the settings unknown: the machine is not checked
    # for defaults the operator may not have meant.
    check_machine = local and not problems
    for name in PARSERS:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            raw[name] = value
    problems.extend(_unknown_variables(env))
    values: dict[str, Any] = {}
    for name, value in raw.items():
        parser = PARSERS.get(name)
        if parser is None:
            problems.append(_unknown(repr(name), _closest(name, PARSERS, repr)))
            continue
        try:
            values[name] = parser(value)
        except (TypeError, ValueError) as exc:
            problems.append(_problem(name, value, str(exc)))
    settings = dataclasses.replace(Settings(), **values)
    if not any(name in raw and name not in values for name in LEASE_TIMES):
        problems.extend(_conflicts(settings))
    problems.extend(_secret_key_twice(raw))
    if check_machine:
        problems.extend(local_problems(settings, refused=raw.keys() - values.keys()))
    if problems:
        raise ConfigError(problems)
    return settings


def _unknown_variables(env: Mapping[str, str]) -> list[str]:
    """Variables under the prefix that no setting reads, as a misspelt one would be (set to
    the empty string, a variable counts as not set, and is not reported)."""
    known = {*environment_variables(), *NOT_SETTINGS}
    unknown = sorted(
        variable
        for variable, value in env.items()
        if variable.startswith(ENV_PREFIX) and variable not in known and value != ""
    )
    names = ["config", *PARSERS]
    return [
        _unknown(
            f"{variable!r} in the environment",
            _closest(
                variable.removeprefix(ENV_PREFIX).lower(),
                names,
                lambda name: repr(ENV_PREFIX + name.upper()),
            ),
        )
        for variable in unknown
    ]


def _unknown(name: str, suggestion: str | None) -> str:
    """The problem of a setting no one reads, with the known one it may have meant."""
    return f"unknown setting {name}" + (f"; did you mean {suggestion}?" if suggestion else "")


def _closest(name: str, known: Collection[str], shown: Callable[[str], str]) -> str | None:
    close = difflib.get_close_matches(name, known, n=1)
    return shown(close[0]) if close else None


def _conflicts(settings: Settings) -> list[str]:
    """Settings that are each fine but do not fit together (each checked alone first). A
    lease its holder renews no more often than its TTL lapses while the holder lives: another
    process takes it back, and the balance it set aside is admitted twice."""
    renew, ttl = settings.lease_renew_seconds, settings.lease_ttl_seconds
    if renew > ttl / 2:
        return [
            f"lease_renew_seconds ({renew:g}) must be at most half of lease_ttl_seconds "
            f"({ttl:g}), so that a live process renews its leases at least twice before "
            "another process may take them back"
        ]
    return []


def _secret_key_twice(raw: Mapping[str, Any]) -> list[str]:
    """The secret key given both inline and as a file: neither is taken over the other, since
    the one not taken may be the key the stored values were sealed with. Neither value is
    repeated."""
    if not all(raw.get(name) for name in SECRET_KEY_SETTINGS):
        return []
    return [
        "settings secret_key (CODEX_GATEWAY_SECRET_KEY) and secret_key_file "
        "(CODEX_GATEWAY_SECRET_KEY_FILE) are both set: give the secret key in one of them only"
    ]


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"config file {path}: {exc.strerror}")
        return {}
    except UnicodeDecodeError as exc:
        problems.append(f"config file {path}: not UTF-8 text (byte {exc.start})")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: {exc}")
        return {}
    table = data.get("gateway", data)
    if not isinstance(table, dict):
        problems.append(
            f"config file {path}: gateway must be a table, [gateway], not {_kind(table)}"
        )
        return {}
    return dict(table)


# -- what a serving gateway needs of this machine ------------------------------------------


def local_problems(settings: Settings, refused: Collection[str] = ()) -> list[str]:
    """What `serve` would fail on at start for want of a file or folder, one line each: the
    secret key file, and the folders of a SQLite database, the spool and the hold journals.

    Settings in `refused` (already reported as invalid) are passed over. Nothing is created
    or changed, and neither the database nor the network is asked.
    """
    found: dict[str, str | None] = {}
    # The file is read only when no key is given inline, as `load_cipher` does.
    if settings.secret_key_file and not settings.secret_key and "secret_key" not in refused:
        found["secret_key_file"] = _secret_key_file_problem(settings.secret_key_file)
    database = sqlite_file(settings.database_url)
    if database is not None and "database_url" not in refused:
        found["database_url"] = _folder_problem(database.parent)
    if "spool_path" not in refused:
        spool = Path(settings.spool_path)
        found["spool_path"] = _folder_problem(spool.parent) or _file_problem(spool)
    # Journals beside the spool are checked once the spool is fine: else they would repeat
    # its problem.
    spool_fine = "spool_path" not in refused and found["spool_path"] is None
    if settings.journal_dir or ("journal_dir" not in refused and spool_fine):
        found["journal_dir"] = _folder_problem(settings.journal_path)
    return [_local_line(settings, name, reason) for name, reason in found.items() if reason]


def _local_line(settings: Settings, name: str, reason: str) -> str:
    if name == "journal_dir" and not settings.journal_dir:
        return f"setting journal_dir (not set, so beside the spool): {reason}"
    return _problem(name, getattr(settings, name), reason)


def read_secret_key_file(path: str) -> str:
    """The secret key held in the file `secret_key_file` names, without surrounding
    whitespace. A file that gives none is a ConfigError naming the setting, never the file's
    contents."""
    try:
        return secret_in_file(Path(path))
    except ValueError as exc:
        raise ConfigError([_problem("secret_key_file", path, str(exc))]) from None


def _secret_key_file_problem(path: str) -> str | None:
    try:
        secret_in_file(Path(path))
    except ValueError as exc:
        return str(exc)
    return None


def secret_in_file(path: Path) -> str:
    """The secret key a key file holds, without surrounding whitespace, read as the secret
    key file is. A file that gives none is a ValueError saying why, never what it holds."""
    secret = text_in_key_file(path).strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"the key in it must be at least {MIN_SECRET_LENGTH} characters long")
    return secret


def text_in_key_file(path: Path) -> str:
    """All the text a file holding a key holds, read as the secret key file is (see
    `_key_file_bytes`). A file that cannot be read is a ValueError saying why, never what
    it holds."""
    try:
        return _key_file_bytes(path).decode("utf-8")
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None


def _key_file_bytes(path: Path) -> bytes:
    """What a key file holds, read only if it is a regular file of at most
    MAX_SECRET_FILE_BYTES: a FIFO, a device such as /dev/zero or a huge file would hang the
    reader or fill its memory. Nothing else is opened (opening a device can act on it), and
    the file is opened without blocking, so a FIFO put in its place meanwhile is refused at
    once rather than waited on."""
    _regular(os.stat(path).st_mode)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _regular(os.fstat(descriptor).st_mode)
        held = b""
        while len(held) <= MAX_SECRET_FILE_BYTES:
            chunk = os.read(descriptor, MAX_SECRET_FILE_BYTES + 1 - len(held))
            if not chunk:
                break
            held += chunk
    finally:
        os.close(descriptor)
    if len(held) > MAX_SECRET_FILE_BYTES:
        raise ValueError(
            f"is longer than {MAX_SECRET_FILE_BYTES} bytes; the file must hold only the key"
        )
    return held


def _regular(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
    if not stat.S_ISREG(mode):
        raise ValueError(f"must be a regular file, not {_file_kind(mode)}")


def _file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in an operator's words."""
    kinds = [
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")


def _folder_problem(folder: Path) -> str | None:
    """Why this process could not keep files in `folder`, or None. A missing folder is fine
    when it can be created: its nearest existing ancestor is a folder this process may write."""
    existing = next((path for path in (folder, *folder.parents) if os.path.lexists(path)), folder)
    if existing == folder:
        if not folder.is_dir():
            return f"{folder} is not a folder"
        return _unwritable(folder)
    if not existing.is_dir():
        return f"{folder} cannot be created: {existing} is not a folder"
    refusal = _unwritable(existing)
    return f"{folder} cannot be created: {refusal}" if refusal else None


def _file_problem(path: Path) -> str | None:
    """Why this process could not read and append to the file at `path`, or None."""
    if not path.exists():
        return None
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"cannot read and write {path}: {_refusal(path)}"
    return None


def _unwritable(folder: Path) -> str | None:
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    return f"cannot write in {folder}: {_refusal(folder)}"


def _refusal(path: Path) -> str:
    """The system's words for a write refused at `path`."""
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return os.strerror(errno.EROFS if read_only else errno.EACCES)


def environment_variables() -> list[str]:
    """Every environment variable the settings read, for `.env.example` and the docs."""
    return [ENV_PREFIX + "CONFIG"] + [ENV_PREFIX + name.upper() for name in PARSERS]


def describe(settings: Settings) -> dict[str, Any]:
    """The settings as an operator may see them: secrets masked, the database password too."""
    return {name: _shown(name, getattr(settings, name)) for name in PARSERS}


def _problem(name: str, value: Any, reason: str) -> str:
    """One problem with a setting, in the words every such problem uses."""
    return f"setting {name} = {_as_written(name, value)}: {reason}"


def _as_written(name: str, value: Any) -> str:
    """A value given for a setting, in TOML's spelling (`true`, `inf`, a quoted string)."""
    shown = _shown(name, value)
    if isinstance(shown, bool):
        return str(shown).lower()
    if isinstance(shown, datetime.date | datetime.time):
        return shown.isoformat()
    return repr(shown)


def _shown(name: str, value: Any) -> Any:
    if not value:
        return value
    if name in SECRET_SETTINGS:
        return "***"
    if name in URL_SETTINGS:
        return redact_url(str(value))
    return value
