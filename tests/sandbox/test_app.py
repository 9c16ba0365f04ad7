"""The sandbox's faults stay faults of the sandbox, not errors of the server it runs in."""

from __future__ import annotations

import logging
import sys

from codex_gateway.sandbox.app import DroppedConnection, SandboxApp


def _record(error: Exception) -> logging.LogRecord:
    try:
        raise error
    except Exception:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application", (), exc_info
    )


def test_a_connection_the_sandbox_drops_on_purpose_is_not_logged_as_a_server_error() -> None:
    server_log = logging.getLogger("uvicorn.error")
    SandboxApp()
    filters = len(server_log.filters)
    SandboxApp()

    assert not server_log.filter(_record(DroppedConnection("sandbox fault cut-after:2")))
    assert server_log.filter(_record(RuntimeError("a real bug")))
    assert len(server_log.filters) == filters
