"""Log lines for operators: plain or JSON, the request id on each, levels per logger."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from codex_gateway import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = ("codex_gateway", "codex_gateway.access", "codex_gateway.billing")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


def record(name: str, message: str, **extra: object) -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(
        name, logging.INFO, __file__, 1, message, (), None, extra=extra
    )


def test_json_lines_carry_the_request_id_as_a_field() -> None:
    line = logs.JsonFormatter().format(
        record("codex_gateway.access", "POST /v1/responses 200", request_id="req_1")
    )

    payload = json.loads(line)
    assert payload["request_id"] == "req_1"
    assert payload["logger"] == "codex_gateway.access"
    assert payload["message"] == "POST /v1/responses 200"


def test_plain_lines_put_the_request_id_after_the_logger() -> None:
    line = logs.PlainFormatter().format(
        record("codex_gateway.billing", "stage=raw", request_id="req_2")
    )

    assert line.endswith(" INFO  codex_gateway.billing [req_2] stage=raw")


def test_levels_per_logger_override_the_gateway_level() -> None:
    logs.configure(
        "INFO",
        "json",
        (("codex_gateway.access", "WARNING"), ("codex_gateway.billing", "DEBUG")),
    )

    assert logging.getLogger("codex_gateway").level == logging.INFO
    assert not logging.getLogger("codex_gateway.access").isEnabledFor(logging.INFO)
    assert logging.getLogger("codex_gateway.billing").isEnabledFor(logging.DEBUG)
    assert isinstance(logging.getLogger().handlers[0].formatter, logs.JsonFormatter)


# what a client put in a path or a model name, and how a plain line shows it
FORGED = [
    # a line break that would start a line of the client's own
    (
        "GET /x\n2026-12-06T14:31:00.000Z ERROR codex_gateway.billing forged 404",
        "GET /x\\n2026-12-06T14:31:00.000Z ERROR codex_gateway.billing forged 404",
    ),
    ("GET /x\r\x00 404", "GET /x\\r\\x00 404"),
    # a terminal's colour code, and text turned right to left
    ("model=\x1b[31mred\x9b", "model=\\x1b[31mred\\x9b"),
    ("model=\u202egnp.exe", "model=\\u202egnp.exe"),
    # invisible characters that make two names look alike
    ("model=gpt\u200b-5\ufeff", "model=gpt\\u200b-5\\ufeff"),
    # printable text, whatever its script, is left as it is
    ("model=ünïcødé-模型", "model=ünïcødé-模型"),
]


@pytest.mark.parametrize(("message", "shown"), FORGED)
def test_a_plain_line_shows_what_a_client_sent_on_one_line_with_controls_escaped(
    message: str, shown: str
) -> None:
    line = logs.PlainFormatter().format(record("codex_gateway.access", message))

    assert "\n" not in line
    assert line.endswith(f" INFO  codex_gateway.access {shown}")


def test_a_traceback_stays_under_its_line_whatever_its_error_says() -> None:
    try:
        raise ValueError("bad model 'x\n2026-12-06T14:31:00.000Z ERROR codex_gateway forged'")
    except ValueError:
        failure = logging.getLogger("codex_gateway").makeRecord(
            "codex_gateway", logging.ERROR, __file__, 1, "refused", (), sys.exc_info()
        )

    lines = logs.PlainFormatter().format(failure).splitlines()

    assert lines[0].endswith(" ERROR codex_gateway refused")
    assert "Traceback (most recent call last):" in lines[1]
    assert all(line.startswith("  ") for line in lines[1:])


KEY = "sk-cg-Dw0TvM6FRvCc8frFUeUno1Ki20jh03sTlrxOLIJYu-I"
UPSTREAM_KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"


@pytest.mark.parametrize("formatter", [logs.PlainFormatter(), logs.JsonFormatter()])
def test_a_key_a_client_put_in_a_model_name_or_a_path_is_never_logged_whole(
    formatter: logging.Formatter,
) -> None:
    line = formatter.format(
        record(
            "codex_gateway.access",
            f"GET /v1/{KEY} 404 0.1ms model=x-{KEY} key=- upstream={UPSTREAM_KEY}",
            detail=f"the upstream refused {UPSTREAM_KEY}",  # a field of JSON lines
        )
    )

    assert KEY not in line and UPSTREAM_KEY not in line
    assert line.count("sk-cg-…Yu-I") == 2
    assert "sk-pro…0123" in line


def test_words_that_merely_contain_sk_are_logged_as_they_are() -> None:
    line = logs.PlainFormatter().format(
        record("codex_gateway.pool", "account task-runner-0123456789abcdef is resting")
    )

    assert line.endswith("account task-runner-0123456789abcdef is resting")
