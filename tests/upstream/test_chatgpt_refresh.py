"""A ChatGPT account's access token expires in the middle of a session, with two gateway
processes on one database (a PostgreSQL one, and a SQLite file) in front of the mock backend.

The backend answers 401 once the token is expired; each process refreshes once and retries
the same account. Refresh tokens are single-use, so exactly one refresh may reach the token
endpoint: the process that gets the row lock first (PostgreSQL's `FOR UPDATE`, SQLite's
`BEGIN IMMEDIATE`) refreshes, the other finds the new token stored and uses it. A token
endpoint that hangs costs a request its own short time limit, not the account its sign-in.
The module runs a sandbox of its own, since expiring the mock's tokens touches every token
it has issued.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, Sandbox, run_sandbox
from tests.upstream.chatgpt_helpers import (
    MODEL,
    TOKEN_REFRESH_TIMEOUT,
    backend_requests,
    chatgpt_gateway,
    delay_token_endpoint,
    expire_tokens,
    listed,
    only_chatgpt_accounts,
    refresh_calls,
    stored_tokens,
    wait_for,
)
from tests.upstream.pool_helpers import start_second_process

SESSION = {"session-id": "0b7d7c1e-5a0b-4c55-9d3e-8a7f0f6c2b11"}


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from run_sandbox(tmp_path_factory.mktemp("chatgpt-mock"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(
    request: pytest.FixtureRequest, mock: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    yield from chatgpt_gateway(request.param, mock, tmp_path_factory)


def turn(url: str, key: str, process: str) -> httpx.Response:
    """One turn of the session, tagged with the process it goes to (x-codex-* headers reach
    the backend as they are)."""
    body = {"model": MODEL, "input": "Continue", "stream": True}
    headers = {"Authorization": f"Bearer {key}", "x-codex-test-process": process, **SESSION}
    return httpx.post(url + "/v1/responses", json=body, headers=headers, timeout=30)


def completed(response: httpx.Response) -> bool:
    return response.status_code == 200 and '"type":"response.completed"' in response.text


def attempts(gateway: Gateway, response: httpx.Response) -> list[tuple[str, str | None]]:
    row = gateway.usage_row(response.headers["x-request-id"])
    return [(a["outcome"], a["error"]) for a in row["attempts"]]


def by_process(requests: list[dict[str, Any]], process: str) -> list[str]:
    """The access tokens one process's requests carried, in order."""
    return [
        r["headers"]["authorization"].removeprefix("Bearer ")
        for r in requests
        if r["headers"].get("x-codex-test-process") == process
    ]


def test_a_401_refreshes_the_token_once_and_retries_the_same_account(
    gateway: Gateway, mock: Sandbox
) -> None:
    (account,) = only_chatgpt_accounts(gateway, mock, [{}])
    _, key = gateway.new_user("10")
    assert completed(turn(gateway.url, key, "a"))
    mock.clear()
    expire_tokens(mock)

    response = turn(gateway.url, key, "a")

    assert completed(response)
    assert attempts(gateway, response) == [("failed", "http_401"), ("ok", None)]
    assert [call["refresh_token"] for call in refresh_calls(mock)] == [account.refresh_token]
    access, _ = stored_tokens(gateway, account.name)
    assert by_process(backend_requests(mock), "a") == [account.access_token, access]


def test_two_processes_refresh_an_expired_token_exactly_once(
    gateway: Gateway, mock: Sandbox
) -> None:
    (account,) = only_chatgpt_accounts(gateway, mock, [{}])
    other = start_second_process(gateway)
    _, key = gateway.new_user("10")
    urls = {"a": gateway.url, "b": other}
    # the session runs on both processes, each holding the token in memory
    for process, url in urls.items():
        assert completed(turn(url, key, process))
    mock.clear()
    expire_tokens(mock)

    # both find the token expired at the same moment
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda item: turn(item[1], key, item[0]), urls.items()))
    after = [turn(url, key, process) for process, url in urls.items()]

    assert all(completed(response) for response in [*responses, *after])
    assert [call["refresh_token"] for call in refresh_calls(mock)] == [account.refresh_token]
    access, refresh = stored_tokens(gateway, account.name)
    assert refresh != account.refresh_token
    seen = backend_requests(mock)
    for process in urls:
        carried = by_process(seen, process)
        # the expired token at most once (a 401), then the new one every time
        assert carried[-2:] == [access, access]
        assert set(carried) <= {account.access_token, access}
        assert carried.count(account.access_token) <= 1
    assert len(seen) == len(responses) + len(after) + sum(
        1 for r in responses if attempts(gateway, r)[0] == ("failed", "http_401")
    )


def test_a_hanging_token_endpoint_is_a_passing_failure_and_the_account_is_tried_again(
    gateway: Gateway, mock: Sandbox
) -> None:
    (account,) = only_chatgpt_accounts(gateway, mock, [{"lifetime": 60}])  # due a refresh
    _, key = gateway.new_user("10")
    mock.clear()
    delay_token_endpoint(mock, TOKEN_REFRESH_TIMEOUT + 4)

    try:
        started = time.monotonic()
        hung = turn(gateway.url, key, "a")
        waited = time.monotonic() - started
    finally:
        delay_token_endpoint(mock, 0)
    shown = wait_for(lambda: (a := listed(gateway, account.name))["state"] != "ready" and a)
    again = turn(gateway.url, key, "a")

    assert hung.status_code == 502
    error = hung.json()["error"]
    assert error["code"] == "upstream_token_refresh_failed"
    assert f"did not answer a refresh within {TOKEN_REFRESH_TIMEOUT:g} s" in error["message"]
    assert waited < TOKEN_REFRESH_TIMEOUT + 3
    assert attempts(gateway, hung) == [("failed", "token_refresh")]
    # resting after a passing failure, its sign-in intact
    assert shown["state"] == "cooling_down"
    assert "did not answer a refresh" in shown["why"]
    assert completed(again)
    assert [c["refresh_token"] for c in refresh_calls(mock)] == [account.refresh_token] * 2
    assert wait_for(lambda: listed(gateway, account.name)["state"] == "ready")


def test_refreshed_sessions_keep_no_secret_in_logs_rows_or_error_bodies(
    gateway: Gateway, mock: Sandbox
) -> None:
    (account,) = only_chatgpt_accounts(gateway, mock, [{"lifetime": 60}])
    _, key = gateway.new_user("10")
    bodies = [turn(gateway.url, key, "a").text]  # refreshed before use: about to expire
    expire_tokens(mock)
    bodies.append(turn(gateway.url, key, "a").text)  # a 401, then a refresh
    # the refresh token the account holds now is spent elsewhere: the next refresh is refused
    _, refresh = stored_tokens(gateway, account.name)
    grant = {"grant_type": "refresh_token", "refresh_token": refresh}
    httpx.post(mock.url + "/sandbox/chatgpt/oauth/token", json=grant).raise_for_status()
    expire_tokens(mock)
    refused = turn(gateway.url, key, "a")
    bodies += [refused.text, turn(gateway.url, key + "x", "a").text]
    rows = gateway.usage_rows()

    assert refused.status_code == 502
    assert refused.json()["error"]["code"] == "upstream_token_refresh_failed"
    secrets = {
        key,
        account.access_token,
        account.refresh_token,
        *stored_tokens(gateway, account.name),
    }
    secrets |= {call["refresh_token"] for call in refresh_calls(mock)}
    secrets |= {
        r["headers"]["authorization"].removeprefix("Bearer ")
        for r in mock.requests()
        if "authorization" in r["headers"]
    }
    logs = gateway.log_text() + "".join(proc.log_text() for proc in gateway.extra_procs)
    explained = [gateway.usage_row(row["request_id"]) for row in rows]
    shown = "\n".join([logs, *bodies, json.dumps(rows), json.dumps(explained)])
    assert "refreshed the access token" in logs
    assert len(secrets) >= 6
    for secret in secrets:
        assert secret not in shown
