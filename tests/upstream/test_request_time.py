"""A request's own time limit, spent before every account could be tried, is held against no
account: the ones it never reached stay in rotation, as does the one it ran out on."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from tests.conftest import Gateway, Sandbox
from tests.upstream.chatgpt_helpers import (
    backend_requests,
    chatgpt_env,
    delay_token_endpoint,
    listed,
    only_chatgpt_accounts,
)
from tests.upstream.pool_helpers import (
    PROMPT,
    LoopbackUpstream,
    account_state,
    failing_first,
    pool_gateway,
    served_by,
    serving,
)

# A total limit shorter than the first-byte one: an account that never answers uses up the
# whole request.
SHORT_REQUEST = {
    "CODEX_GATEWAY_UPSTREAM_CONNECT_TIMEOUT": "1",
    "CODEX_GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT": "5",
    "CODEX_GATEWAY_UPSTREAM_READ_TIMEOUT": "5",
    "CODEX_GATEWAY_UPSTREAM_TOTAL_TIMEOUT": "1",
}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    yield from pool_gateway(request.param, tmp_path_factory, SHORT_REQUEST)


def test_a_request_out_of_time_leaves_the_accounts_it_did_not_reach_in_rotation(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    hanging, spare = failing_first(gateway, sandbox, "hang-before")
    user, key = gateway.new_user("10")
    response = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": "gpt-5.1-codex", "input": PROMPT, "stream": False},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert "total time limit" in error["message"]
    assert served_by(sandbox, [hanging, spare]) == [hanging.name]  # the spare never asked
    row = gateway.usage_row(response.headers["x-request-id"])
    assert [(a["account"], a["error"]) for a in row["attempts"]] == [
        (hanging.name, "timeout_total")
    ]
    assert Decimal(gateway.balance(user)) == Decimal(10)
    for account in (hanging, spare):
        assert account_state(gateway, account)["state"] == "ready"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def chatgpt_gateway(
    request: pytest.FixtureRequest, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway for ChatGPT accounts whose requests have a second, and token refreshes
    longer."""
    env = {**chatgpt_env(sandbox), **SHORT_REQUEST}
    env["CODEX_GATEWAY_TOKEN_REFRESH_TIMEOUT_SECONDS"] = "5"
    yield from pool_gateway(request.param, tmp_path_factory, env)


def test_a_401_renewed_after_the_request_ran_out_of_time_is_not_held_against_the_account(
    chatgpt_gateway: Gateway, sandbox: Sandbox
) -> None:
    gateway = chatgpt_gateway
    refusing = LoopbackUpstream(status=401, body={"detail": "token expired"})
    with serving(refusing):
        account, spare = only_chatgpt_accounts(
            gateway,
            sandbox,
            [{"name": "refusing", "base_url": refusing.base_url, "priority": 1}, {}],
        )
        _, key = gateway.new_user("10")
        sandbox.clear()
        delay_token_endpoint(sandbox, 1.5)  # the renewal ends past the request's second
        try:
            response = httpx.post(
                gateway.url + "/v1/responses",
                json={"model": "gpt-5.1-codex", "input": PROMPT, "stream": True},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
        finally:
            delay_token_endpoint(sandbox, 0)

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    row = gateway.usage_row(response.headers["x-request-id"])
    # The 401, then the renewed try, out of time before it was sent; not the spare account.
    assert [(a["account"], a["error"]) for a in row["attempts"]] == [
        (account.name, "http_401"),
        (account.name, "timeout_total"),
    ]
    assert backend_requests(sandbox) == []
    for name in (account.name, spare.name):
        assert listed(gateway, name)["state"] == "ready"
