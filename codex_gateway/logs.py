"""Log lines for operators: plain or JSON, with the request id on every line that has one."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime

import orjson

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# An API key, the gateway's (sk-cg-...) or an upstream's, wherever a client or a message put
# it: in a model name, a path, an error's text.
_KEY = re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{12,}")


def escape_controls(text: str) -> str:
    """`text` on one line, each character in it that is not printable written as its escape
    (`\\n`, `\\x1b`, `\\u202e`): text a client chose (a path, a model name) can then neither
    start a line of its own nor drive or reorder the terminal it is read on."""
    if text.isprintable():
        return text
    return "".join(
        character if character.isprintable() else ascii(character)[1:-1] for character in text
    )


def _indented(traceback: str) -> str:
    """A traceback's lines indented, so that none of them (its last holds the error's message,
    which may quote a client) starts at the beginning of a line as a log line does."""
    return "\n".join("  " + line for line in traceback.splitlines())


def hide_keys(text: str) -> str:
    """`text` with every API key in it cut to its first six and last four characters."""
    if "sk-" not in text:
        return text
    return _KEY.sub(lambda key: f"{key[0][:6]}…{key[0][-4:]}", text)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        request_id = getattr(record, "request_id", None)
        prefix = f"{stamp}Z {record.levelname:<5} {record.name}"
        if request_id:
            prefix += f" [{request_id}]"
        line = f"{prefix} {escape_controls(record.getMessage())}"
        if record.exc_info:
            line += "\n" + _indented(self.formatException(record.exc_info))
        return hide_keys(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(
            {key: value for key, value in record.__dict__.items() if key not in _STANDARD}
        )
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return hide_keys(orjson.dumps(payload, default=str).decode())


def configure(level: str, fmt: str = "plain", per_logger: tuple[tuple[str, str], ...] = ()) -> None:
    """One handler on the root; `per_logger` pairs (name, LEVEL) override single loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("codex_gateway").setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("uvicorn.access").disabled = True
    for name, logger_level in per_logger:
        logging.getLogger(name).setLevel(logger_level)
