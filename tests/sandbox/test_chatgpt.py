"""The mock ChatGPT backend refuses what the real one refuses, and accepts what we send it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from codex_gateway.relay.chatgpt import (
    SessionIds,
    quota_from_headers,
    shape_body,
    upstream_headers,
    usage_limit,
)
from codex_gateway.relay.sse import parse_events
from codex_gateway.sandbox.app import SandboxApp
from codex_gateway.sandbox.chatgpt import access_token
from tests.conftest import FIXTURES

BASE = "http://sandbox/sandbox/chatgpt"
CODEX_TURN = FIXTURES / "requests" / "codex-exec-0.169.0-tool-turn1"


@pytest.fixture
async def backend() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=SandboxApp(record=True))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


def headers(token: str | None = None, **extra: str) -> dict[str, str]:
    return upstream_headers(
        access_token=token or access_token(),
        account_id="acct",
        session_id="s1",
        client_headers=extra,
    )


def body(**fields: Any) -> dict[str, Any]:
    document = {"model": "gpt-5.1-codex", "instructions": "", "store": False, "stream": True}
    document["input"] = [{"type": "message", "role": "user", "content": "hi"}]
    document.update(fields)
    return document


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        # the three rules every third-party gateway has met
        ({"instructions": None}, "Instructions are required"),
        ({"store": True}, "Store must be set to false"),
        ({"stream": False}, "Stream must be set to true"),
        # a field the backend does not take
        ({"max_output_tokens": 64}, "Unsupported parameter: max_output_tokens"),
    ],
)
async def test_requests_that_break_the_rules_get_the_backends_detail(
    backend: httpx.AsyncClient, document: dict[str, Any], detail: str
) -> None:
    response = await backend.post(
        "/backend-api/codex/responses", headers=headers(), json=body(**document)
    )

    assert (response.status_code, response.json()) == (400, {"detail": detail})


async def test_missing_headers_and_bad_tokens_are_refused(backend: httpx.AsyncClient) -> None:
    no_account = {k: v for k, v in headers().items() if k != "chatgpt-account-id"}
    expired = headers(access_token(lifetime=-10))

    missing = await backend.post("/backend-api/codex/responses", headers=no_account, json=body())
    stale = await backend.post("/backend-api/codex/responses", headers=expired, json=body())
    garbage = await backend.post("/backend-api/codex/responses", headers=headers("x"), json=body())

    assert missing.status_code == 400 and "chatgpt-account-id" in missing.json()["detail"]
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "token_expired"
    assert garbage.status_code == 401


async def test_a_codex_cli_turn_shaped_by_the_gateway_is_accepted(
    backend: httpx.AsyncClient,
) -> None:
    recorded = json.loads(CODEX_TURN.with_name(CODEX_TURN.name + ".headers.json").read_text())
    client_headers = {name.lower(): value for name, value in recorded["headers"].items()}
    document = json.loads(CODEX_TURN.with_name(CODEX_TURN.name + ".body.json").read_text())
    session = SessionIds(b"k" * 32).for_request(1, client_headers, document, "req_1")
    sent = upstream_headers(
        access_token=access_token(),
        account_id="acct",
        session_id=session,
        client_headers=client_headers,
    )

    response = await backend.post(
        "/backend-api/codex/responses", headers=sent, content=shape_body(document, session)
    )

    assert response.status_code == 200
    events = parse_events(response.content)
    assert events[-1]["type"] == "response.completed"
    quota = quota_from_headers(response.headers)
    assert quota is not None and quota.primary is not None
    assert quota.primary.used_percent == 12.5


async def test_the_usage_wall_comes_with_its_headers_and_reset_time(
    backend: httpx.AsyncClient,
) -> None:
    # an account's base URL can name the transcript, since the sandbox header is not passed on
    response = await backend.post(
        "/chatgpt-usage-limit-429/backend-api/codex/responses", headers=headers(), json=body()
    )

    assert response.status_code == 429
    wall = usage_limit(response.json(), 0)
    assert wall is not None and wall.limit_reached_until == 1764824400
    quota = quota_from_headers(response.headers)
    assert quota is not None and quota.primary is not None and quota.primary.used_percent == 100


async def test_refresh_tokens_are_single_use_and_expiry_can_be_forced(
    backend: httpx.AsyncClient,
) -> None:
    grant = {"client_id": "c", "grant_type": "refresh_token", "refresh_token": "rt_seed"}
    old = headers()

    await backend.post("/expire-tokens")
    first = await backend.post("/oauth/token", json=grant)
    again = await backend.post("/oauth/token", json=grant)
    with_old = await backend.post("/backend-api/codex/responses", headers=old, json=body())
    with_new = await backend.post(
        "/backend-api/codex/responses", headers=headers(first.json()["access_token"]), json=body()
    )

    assert first.status_code == 200 and first.json()["refresh_token"] != "rt_seed"
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "refresh_token_reused"
    assert with_old.status_code == 401 and with_new.status_code == 200
    requests = (await backend.get("http://sandbox/sandbox/requests")).json()
    grants = [orjson.loads(r["body"]) for r in requests if r["path"].endswith("/oauth/token")]
    assert grants == [grant, grant]
