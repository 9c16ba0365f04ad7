"""The sandbox's faults: each answers as it says, and stays a fault of the sandbox, not an
error of the server it runs in."""

from __future__ import annotations

import json
import logging
import sys

import httpx
import pytest

from codex_gateway.relay.sse import parse_events
from codex_gateway.sandbox.app import DroppedConnection, SandboxApp
from tests.conftest import Sandbox


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


def test_compaction_names_a_fault_that_does_not_apply_to_it(sandbox: Sandbox) -> None:
    response = httpx.post(
        sandbox.base_url + "/responses/compact",
        json={"model": "gpt-5.1-codex", "input": [{"role": "user", "content": "hi"}]},
        headers={"x-sandbox-fault": "cut-after:2"},
    )

    assert response.status_code == 400
    assert "'cut-after:2' does not apply" in response.json()["error"]["message"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_usage_header_replaces_the_usage_of_the_final_response(
    sandbox: Sandbox, stream: bool
) -> None:
    usage = {"input_tokens": -1, "output_tokens": "2", "total_tokens": 99}
    response = httpx.post(
        sandbox.base_url + "/responses",
        json={"model": "gpt-5.1-codex", "input": "hi", "stream": stream},
        headers={"x-sandbox-usage": json.dumps(usage)},
    )

    final = parse_events(response.content)[-1]["response"] if stream else response.json()
    assert final["usage"] == usage and final["id"] == "resp_fx_text"


@pytest.mark.parametrize(
    ("transcript", "usage"),
    [
        # not JSON
        ("responses-text", "{input_tokens: 1}"),
        # a transcript without a final response to put it in
        ("responses-no-terminal", "null"),
        ("responses-failed", "null"),
    ],
)
def test_a_usage_header_that_cannot_apply_is_refused(
    sandbox: Sandbox, transcript: str, usage: str
) -> None:
    response = httpx.post(
        sandbox.base_url + "/responses",
        json={"model": "gpt-5.1-codex", "input": "hi", "stream": True},
        headers={"x-sandbox-transcript": transcript, "x-sandbox-usage": usage},
    )

    assert response.status_code == 400
    assert "x-sandbox-usage must be JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        # not JSON, or JSON that is no object
        (b"key=sandbox", "The sandbox expects a JSON object"),
        (b'["sandbox", "500"]', "The sandbox expects a JSON object"),
        # no key, or one that is not a string
        (b'{"fault": "500"}', '"key" must be the upstream key'),
        (b'{"key": 7, "fault": "500"}', '"key" must be the upstream key'),
        # no fault (null clears one), or one that is not a string
        (b'{"key": "sandbox"}', '"fault" must be a fault mode, or null'),
        (b'{"key": "sandbox", "fault": 500}', '"fault" must be a fault mode, or null'),
    ],
)
def test_a_badly_formed_fault_is_a_400_naming_the_problem(
    sandbox: Sandbox, body: bytes, named: str
) -> None:
    response = httpx.put(sandbox.url + "/sandbox/faults", content=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(named)
