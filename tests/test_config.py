"""Settings from the environment and a TOML file; every problem is reported at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from codex_gateway.app import Gateway
from codex_gateway.config import (
    DEFAULT_DATABASE_URL,
    Settings,
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


A_DAY = "a number of seconds above 0 and at most 86400 (a day)"
FLOAT_SETTINGS = [f.name for f in dataclasses.fields(Settings) if f.type == "float"]
INT_SETTINGS = [f.name for f in dataclasses.fields(Settings) if f.type == "int"]

# setting, value in the environment, what the problem says
BAD = [
    # numbers that are not usable
    ("max_body_bytes", "-1", "a whole number from 1 to 1073741824"),
    ("max_body_bytes", "ten", "a whole number from 1 to 1073741824"),
    ("max_body_bytes", "1.5", "a whole number from 1 to 1073741824, not a fraction"),
    ("max_body_bytes", "nan", "not NaN"),
    ("catalog_refresh_seconds", "nan", f"{A_DAY}, not NaN"),
    ("catalog_refresh_seconds", "inf", f"{A_DAY}, not infinite"),
    ("upstream_connect_timeout", "0", A_DAY),
    ("upstream_keepalive_seconds", "0", A_DAY),
    # beyond the bounds: certainly a mistake
    ("upstream_keepalive_seconds", "1e300", A_DAY),
    ("upstream_total_timeout", "86401", A_DAY),
    ("sticky_ttl_seconds", "604801", "at most 604800 (a week)"),
    ("max_body_bytes", "1e10", "from 1 to 1073741824"),
    ("upstream_max_attempts", "101", "from 1 to 100"),
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
    assert line.startswith(f"setting {name} = '{value}': must ")
    assert problem in line


# a line of [gateway], what the problem says
WRONG_TYPES = [
    # a number setting given something that is no number
    ("upstream_connect_timeout = [1]", f"= [1]: must be {A_DAY}, not a list"),
    ("upstream_connect_timeout = true", f"= true: must be {A_DAY}, not a boolean"),
    ("upstream_connect_timeout = 1979-05-27", "= 1979-05-27: must be a number of seconds"),
    ("upstream_connect_timeout = {a = 1}", "not a table"),
    ('upstream_connect_timeout = "soon"', f"= 'soon': must be {A_DAY}"),
    ("max_body_bytes = false", "= false: must be a whole number from 1 to"),
    ("upstream_keepalive_seconds = inf", f"= inf: must be {A_DAY}, not infinite"),
    ("upstream_keepalive_seconds = nan", f"= nan: must be {A_DAY}, not NaN"),
    ("upstream_keepalive_seconds = 1e300", f"= 1e+300: must be {A_DAY}"),
    # a text setting given something else
    ("spool_path = [1]", "= [1]: must be text (a quoted string in TOML), not a list"),
    ("secret_key_file = 5", "= 5: must be text (a quoted string in TOML), not a number"),
    ('redis_prefix = ["a"]', "not a list"),
    ("log_levels = [1]", "= [1]: must be logger=LEVEL,... or a TOML table, not a list"),
]


@pytest.mark.parametrize(("line", "problem"), WRONG_TYPES)
def test_a_wrong_typed_toml_value_is_one_clear_problem(
    tmp_path: Path, line: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({}, write(tmp_path, f"[gateway]\n{line}\n"))

    (text,) = caught.value.problems
    assert text.startswith(f"setting {line.partition(' ')[0]} = ")
    assert problem in text


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_no_number_of_seconds_is_infinite_or_nan(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({f"CODEX_GATEWAY_{name.upper()}": value})
    (text,) = caught.value.problems
    assert text.startswith(f"setting {name} = '{value}': must be a number of seconds")
    assert text.endswith("not NaN" if value == "nan" else "not infinite")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # positive as written, but 0 once a float
        ("catalog_refresh_seconds", "1e-400"),
        ("lease_renew_seconds", "1e-400"),
        # digits of another script, which Decimal reads as 12 and 30
        ("max_body_bytes", "\u0661\u0662"),
        ("shutdown_grace_seconds", "\u0663\u0660"),
    ],
)
def test_a_number_that_only_looks_usable_is_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({f"CODEX_GATEWAY_{name.upper()}": value})
    (text,) = caught.value.problems
    assert text.startswith(f"setting {name} = {value!r}: must be")


def test_a_config_file_that_is_not_utf8_is_one_problem(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    before = b'[gateway]\nlog_format = "pl'
    config.write_bytes(before + b'\xe9in"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, config)
    assert caught.value.problems == [f"config file {config}: not UTF-8 text (byte {len(before)})"]


def test_a_lease_time_refused_alone_is_not_also_compared_with_the_other() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {"CODEX_GATEWAY_LEASE_TTL_SECONDS": "100000", "CODEX_GATEWAY_LEASE_RENEW_SECONDS": "40"}
        )
    (text,) = caught.value.problems
    assert text.startswith("setting lease_ttl_seconds = '100000': must be")


@pytest.mark.parametrize("name", INT_SETTINGS)
def test_a_whole_number_may_be_written_in_exponent_form(tmp_path: Path, name: str) -> None:
    from_env = load_settings({f"CODEX_GATEWAY_{name.upper()}": "1e2"})
    from_file = load_settings({}, write(tmp_path, f"[gateway]\n{name} = 1e2\n"))

    assert getattr(from_env, name) == getattr(from_file, name) == 100
    assert isinstance(getattr(from_file, name), int)


def test_the_bounds_themselves_are_allowed() -> None:
    settings = load_settings(
        {
            "CODEX_GATEWAY_UPSTREAM_TOTAL_TIMEOUT": "86400",
            "CODEX_GATEWAY_STICKY_TTL_SECONDS": "604800",
            "CODEX_GATEWAY_MAX_BODY_BYTES": "1073741824",
            "CODEX_GATEWAY_UPSTREAM_MAX_ATTEMPTS": "100",
        }
    )

    assert settings.upstream_total_timeout == 86400.0
    assert settings.sticky_ttl_seconds == 604800.0
    assert settings.max_body_bytes == 1024**3
    assert settings.upstream_max_attempts == 100


@pytest.mark.parametrize(
    ("renew", "ttl", "refused"),
    [
        # the defaults, and renewal at exactly half the TTL
        ("5", "60", False),
        ("30", "60", False),
        # past half, against a TTL set or the default one
        ("31", "60", True),
        ("31", "", True),
    ],
)
def test_leases_are_renewed_at_least_twice_within_their_ttl(
    renew: str, ttl: str, refused: bool
) -> None:
    """A lease renewed less often than that lapses while its process lives, and another
    process hands the balance it set aside back to be admitted again."""
    environ = {
        "CODEX_GATEWAY_LEASE_RENEW_SECONDS": renew,
        "CODEX_GATEWAY_LEASE_TTL_SECONDS": ttl,
        # Counted too when something else is wrong.
        "CODEX_GATEWAY_LOG_LEVEL": "LOUD",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)

    lease_problems = [p for p in caught.value.problems if "lease_renew_seconds" in p]
    if refused:
        assert lease_problems == [
            f"lease_renew_seconds ({renew}) must be at most half of lease_ttl_seconds "
            f"({ttl or 60}), so that a live process renews its leases at least twice before "
            "another process may take them back"
        ]
    else:
        assert lease_problems == []
        environ.pop("CODEX_GATEWAY_LOG_LEVEL")
        assert load_settings(environ).lease_renew_seconds == float(renew)


def test_a_gateway_that_is_not_a_table_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({}, write(tmp_path, "gateway = 5\n"))

    assert caught.value.problems == [
        f"config file {tmp_path / 'gateway.toml'}: gateway must be a table, [gateway], not a number"
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway]\nmax_body_bytes = true\nnot_a_setting = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"CODEX_GATEWAY_CONFIG": str(config), "CODEX_GATEWAY_LOG_LEVEL": "x"})
    assert len(caught.value.problems) == 3
    assert any("not_a_setting" in problem for problem in caught.value.problems)


@pytest.mark.parametrize(
    ("environ", "problems"),
    [
        # a misspelt variable, with the known one it may have meant
        (
            {"CODEX_GATEWAY_DATABSE_URL": "sqlite:///x.db"},
            [
                "unknown setting 'CODEX_GATEWAY_DATABSE_URL' in the environment; "
                "did you mean 'CODEX_GATEWAY_DATABASE_URL'?"
            ],
        ),
        (
            {"CODEX_GATEWAY_CONFG": "gateway.toml"},
            [
                "unknown setting 'CODEX_GATEWAY_CONFG' in the environment; "
                "did you mean 'CODEX_GATEWAY_CONFIG'?"
            ],
        ),
        # one like no setting, named alone; every one is reported, in name order
        (
            {"CODEX_GATEWAY_WIDGETS": "3", "CODEX_GATEWAY_LOGLEVEL": "DEBUG"},
            [
                "unknown setting 'CODEX_GATEWAY_LOGLEVEL' in the environment; "
                "did you mean 'CODEX_GATEWAY_LOG_LEVEL'?",
                "unknown setting 'CODEX_GATEWAY_WIDGETS' in the environment",
            ],
        ),
    ],
)
def test_an_unknown_variable_under_the_prefix_is_a_problem(
    environ: dict[str, str], problems: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CODEX_GATEWAY_LOG_LEVEL": "DEBUG", **environ})
    assert caught.value.problems == problems


@pytest.mark.parametrize(
    "environ",
    [
        # variables under the prefix that are no settings: the image's commit, the image
        # deploy.sh runs, the tests' PostgreSQL server
        {"CODEX_GATEWAY_BUILD_COMMIT": "0123abcd4567"},
        {"CODEX_GATEWAY_IMAGE_TAG": "0123abcd4567"},
        {"CODEX_GATEWAY_TEST_PG": "postgresql://postgres@127.0.0.1:5432/postgres"},
        # an empty variable counts as not set, a misspelt one too
        {"CODEX_GATEWAY_DATABSE_URL": ""},
        # other prefixes are not ours
        {"CODEX_GATEWAYS": "1", "OTHER_CODEX_GATEWAY_X": "1"},
    ],
)
def test_variables_that_are_no_settings_are_left_alone(environ: dict[str, str]) -> None:
    assert load_settings(environ) == load_settings({})


def test_an_unknown_key_in_the_file_names_the_setting_it_may_mean(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\ndatabse_url = "sqlite:///x.db"\ncolour = "blue"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, path)

    assert caught.value.problems == [
        "unknown setting 'databse_url'; did you mean 'database_url'?",
        "unknown setting 'colour'",
    ]


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


LEVELS_ONE_OF = "which must be one of DEBUG, INFO, WARNING, ERROR"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        # every bad entry is named, in the order given, whatever is wrong with each
        (
            "codex_gateway.access=LOUD,foo",
            f"'codex_gateway.access' has level 'LOUD', {LEVELS_ONE_OF}; 'foo' is not logger=LEVEL",
        ),
        (
            "foo,codex_gateway.access=LOUD",
            f"'foo' is not logger=LEVEL; 'codex_gateway.access' has level 'LOUD', {LEVELS_ONE_OF}",
        ),
        ("a=LOUD,b=INFO,c=QUIET", f"'a' has level 'LOUD', {LEVELS_ONE_OF}; 'c' has level 'QUIET'"),
        ("a,=INFO,b=DEBUG", "'a' is not logger=LEVEL; '=INFO' is not logger=LEVEL"),
    ],
)
def test_log_levels_name_every_bad_entry_in_one_problem(raw: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CODEX_GATEWAY_LOG_LEVELS": raw})

    (line,) = caught.value.problems
    assert line.startswith(f"setting log_levels = '{raw}': {problem}")


def test_log_levels_in_a_toml_table_name_every_bad_level(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway.log_levels]\na = "LOUD"\nb = "info"\nc = 5\n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, path)

    (line,) = caught.value.problems
    assert line.endswith(
        f"'a' has level 'LOUD', {LEVELS_ONE_OF}; 'c' has level '5', {LEVELS_ONE_OF}"
    )


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
