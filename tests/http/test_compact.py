"""POST /v1/responses/compact through the official SDK, to an OpenAI-API account.

The body goes upstream to the account's `/responses/compact` untouched, the compacted history
comes back as it is, and its `usage` is billed like any response's. A request that cannot be
compacted is refused with an OpenAI-shaped error before any upstream call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, Sandbox, fixture_path
from tests.http.test_responses import assert_billed, expected_cost

Sdk = Callable[[str], openai.OpenAI]
COUNTS = (5300, 0, 150, 64)
INPUT = [{"role": "user", "content": "List the files here"}]


def test_compaction_is_relayed_untouched_and_billed(
    gateway: Gateway, sdk: Sdk, sandbox: Sandbox
) -> None:
    user, key = gateway.new_user("5")
    sandbox.clear()

    raw = sdk(key).responses.with_raw_response.compact(model="gpt-5.1-codex", input=INPUT)  # type: ignore[arg-type]
    compacted = raw.parse()

    recorded = json.loads(fixture_path("upstream", "responses-compact.json").read_text())
    assert json.loads(raw.text) == recorded["body"]
    assert [item.type for item in compacted.output] == ["message", "compaction"]
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert_billed(row, "completed", COUNTS)
    assert (row["endpoint"], row["stream"], row["flags"]) == ("responses.compact", False, [])
    assert Decimal(gateway.balance(user)) == Decimal(5) - expected_cost(COUNTS)
    (sent,) = sandbox.requests()
    assert sent["path"] == "/v1/responses/compact"
    assert json.loads(sent["body"]) == {"model": "gpt-5.1-codex", "input": INPUT}
    assert key not in json.dumps(sent)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        # compaction answers with one JSON object
        ({"model": "gpt-5.1-codex", "input": INPUT, "stream": True}, 400, "stream"),
        # nothing to compact
        ({"model": "gpt-5.1-codex"}, 400, "input"),
        # no price, no call
        ({"model": "gpt-unknown", "input": INPUT}, 404, "model"),
    ],
)
def test_a_request_that_cannot_be_compacted_is_refused_before_any_upstream_call(
    gateway: Gateway, sandbox: Sandbox, body: dict[str, Any], status: int, param: str
) -> None:
    _, key = gateway.new_user("5")
    sandbox.clear()

    response = httpx.post(
        gateway.url + "/v1/responses/compact",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
    )

    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"].endswith(".")
    assert sandbox.requests() == []


@pytest.mark.parametrize(
    ("fault", "status", "flag"),
    [
        # a body that is not JSON, with a 200
        ("garbage", 502, "upstream_body_not_json"),
        # the upstream fails (the one account is tried, then rests)
        ("500", 502, "http_500"),
    ],
)
def test_a_compaction_the_upstream_botches_is_an_error_and_a_row_with_nothing_billed(
    gateway: Gateway, sandbox: Sandbox, fault: str, status: int, flag: str
) -> None:
    user, key = gateway.new_user("5")

    response = httpx.post(
        gateway.url + "/v1/responses/compact",
        json={"model": "gpt-5.1-codex", "input": INPUT},
        headers={"Authorization": f"Bearer {key}", "x-sandbox-fault": fault},
    )

    assert response.status_code == status
    assert response.json()["error"]["type"] == "upstream_error"
    row = gateway.usage_row(response.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["http_status"]) == (
        "responses.compact",
        "upstream_error",
        status,
    )
    assert flag in row["flags"]
    assert Decimal(row["cost_usd"]) == 0
    assert Decimal(gateway.balance(user)) == Decimal(5)
