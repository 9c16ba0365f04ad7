"""ChatGPT accounts end to end: a gateway process relaying to the sandbox's strict mock backend.

A request for a ChatGPT account is shaped to the Codex backend's rules, sent with the
account's access token, ChatGPT account id and a session id derived per gateway key, and
billed exactly as the same answer from the OpenAI API. Usage walls rest an account until its
reset, and `accounts list` shows its windows; a refresh the token endpoint refuses for good
takes the account out of rotation and says why.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from itertools import takewhile
from typing import Any

import httpx
import openai

from tests.conftest import Gateway, Sandbox, fixture_path
from tests.http.test_responses import TRANSCRIPTS, assert_billed, expected_cost, transcript_events
from tests.upstream.chatgpt_helpers import (
    MODEL,
    ChatGPTAccount,
    backend_requests,
    chatgpt_gateway_on_each_backend,
    listed,
    only_chatgpt_accounts,
    refresh_calls,
    stored_tokens,
    wait_for,
)
from tests.upstream.pool_helpers import (
    CATALOG_SETTLE_SECONDS,
    LoopbackUpstream,
    serving,
    stream_events,
)

CODEX_TURN = "codex-exec-0.169.0-tool-turn1"
# The usage wall fixture: its windows, and the wall's relative reset (its absolute one is past).
WALL_RESET_SECONDS = 18000
COMPACT_COUNTS = (5300, 0, 150, 64)
HI = {"model": MODEL, "input": "hi"}

__all__ = ["chatgpt_gateway_on_each_backend"]  # the module's `gateway` fixture


def codex_turn(key: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Codex CLI 0.169.0's recorded turn, as it would reach the gateway with `key`."""
    recorded = json.loads(fixture_path("requests", f"{CODEX_TURN}.headers.json").read_text())
    headers = {name.lower(): value for name, value in recorded["headers"].items()}
    headers["authorization"] = f"Bearer {key}"
    body = json.loads(fixture_path("requests", f"{CODEX_TURN}.body.json").read_text())
    return headers, body


def walled_and_spare(
    gateway: Gateway, sandbox: Sandbox, transcript: str
) -> tuple[ChatGPTAccount, ChatGPTAccount, str]:
    """An account behind a usage wall, tried first, a spare one behind it, and a user's key."""
    walled, spare = only_chatgpt_accounts(
        gateway, sandbox, [{"name": "walled", "transcript": transcript, "priority": 1}, {}]
    )
    return walled, spare, gateway.new_user("10")[1]


def attempts_of(gateway: Gateway, response: httpx.Response) -> list[tuple[str, str, str | None]]:
    row = gateway.usage_row(response.headers["x-request-id"])
    return [(a["account"], a["outcome"], a["error"]) for a in row["attempts"]]


def test_a_codex_turn_reaches_the_backend_shaped_and_is_billed_like_the_api(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    (account,) = only_chatgpt_accounts(gateway, sandbox, [{}])
    user, key = gateway.new_user("10")
    headers, body = codex_turn(key)
    sandbox.clear()

    response = httpx.post(
        gateway.url + "/v1/responses", content=json.dumps(body), headers=headers, timeout=30
    )

    events = [json.loads(line[6:]) for line in response.text.splitlines() if line[:6] == "data: "]
    assert response.status_code == 200
    assert events == transcript_events("responses-text")
    row = gateway.usage_row(response.headers["x-request-id"])
    assert_billed(row, "completed", TRANSCRIPTS["responses-text"][1])
    assert (row["account"], row["endpoint"], row["flags"]) == (account.name, "responses", [])
    assert Decimal(gateway.balance(user)) == 10 - expected_cost(TRANSCRIPTS["responses-text"][1])

    (sent,) = backend_requests(sandbox)
    shaped = json.loads(sent["body"])
    # Codex's leading developer messages (its base prompt, then skills) become instructions.
    leading = len(list(takewhile(lambda item: item.get("role") == "developer", body["input"])))
    texts = ["".join(p["text"] for p in item["content"]) for item in body["input"][:leading]]
    assert leading == 2
    assert shaped["instructions"] == "\n\n".join(texts)
    assert shaped["input"] == body["input"][leading:]
    assert (shaped["store"], shaped["stream"]) == (False, True)
    upstream = sent["headers"]
    assert upstream["authorization"] == f"Bearer {account.access_token}"
    assert upstream["chatgpt-account-id"] == account.account_id
    assert upstream["originator"] == "codex_exec"
    client_session = headers["session-id"]
    assert upstream["session_id"] != client_session
    assert str(uuid.UUID(upstream["session_id"])) == upstream["session_id"]
    assert shaped["prompt_cache_key"] == upstream["session_id"]
    assert upstream["x-codex-beta-features"] == headers["x-codex-beta-features"]
    assert upstream["x-codex-window-id"] == upstream["session_id"] + ":0"
    assert client_session not in json.dumps(sent)
    assert key not in json.dumps(sent)


def test_two_tenants_never_share_an_upstream_session(gateway: Gateway, sandbox: Sandbox) -> None:
    only_chatgpt_accounts(gateway, sandbox, [{}])
    keys = [gateway.new_user("10")[1] for _ in range(2)]
    session = {"session-id": str(uuid.uuid4())}
    sandbox.clear()

    for key in [keys[0], keys[1], keys[0]]:
        response, _ = stream_events(gateway, key, HI, session)
        assert response.status_code == 200

    first, second, again = [r["headers"]["session_id"] for r in backend_requests(sandbox)]
    assert first != second
    assert first == again
    assert session["session-id"] not in (first, second)


def test_a_client_that_does_not_stream_gets_the_final_response_assembled(
    gateway: Gateway, sandbox: Sandbox, sdk: Callable[[str], openai.OpenAI]
) -> None:
    only_chatgpt_accounts(gateway, sandbox, [{"transcript": "responses-reasoning-tool"}])
    _, key = gateway.new_user("10")
    sandbox.clear()

    raw = sdk(key).responses.with_raw_response.create(model=MODEL, input="List the files here")
    response = raw.parse()

    final = transcript_events("responses-reasoning-tool")[-1]["response"]
    assert response.to_dict() == final
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert_billed(row, "completed", TRANSCRIPTS["responses-reasoning-tool"][1])
    assert row["stream"] is False
    (sent,) = backend_requests(sandbox)
    assert json.loads(sent["body"])["stream"] is True


def test_compaction_goes_to_the_backends_compact_path_and_is_billed(
    gateway: Gateway, sandbox: Sandbox, sdk: Callable[[str], openai.OpenAI]
) -> None:
    only_chatgpt_accounts(gateway, sandbox, [{}])
    user, key = gateway.new_user("10")
    sandbox.clear()

    raw = sdk(key).responses.with_raw_response.compact(
        model=MODEL,
        input=[
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "List the files here"},
        ],
    )
    compacted = raw.parse()

    assert compacted.object == "response.compaction"
    assert [item.type for item in compacted.output] == ["message", "compaction"]
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert_billed(row, "completed", COMPACT_COUNTS)
    assert (row["endpoint"], row["response_id"]) == ("responses.compact", "resp_fx_compact")
    assert Decimal(gateway.balance(user)) == 10 - expected_cost(COMPACT_COUNTS)
    (sent,) = backend_requests(sandbox, "/codex/responses/compact")
    shaped = json.loads(sent["body"])
    assert shaped["instructions"] == "Be terse."
    assert "stream" not in shaped and "store" not in shaped
    assert sent["headers"]["accept"] == "application/json"


def test_a_usage_wall_rests_the_account_until_its_reset_and_lists_its_windows(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    walled, spare, key = walled_and_spare(gateway, sandbox, "chatgpt-usage-limit-429")

    first, events = stream_events(gateway, key, HI)
    walled_at = time.time()

    assert first.status_code == 200 and events == transcript_events("responses-text")
    assert attempts_of(gateway, first) == [
        (walled.name, "failed", "http_429"),
        (spare.name, "ok", None),
    ]
    shown = wait_for(lambda: (a := listed(gateway, walled.name))["quota"] and a)
    assert shown["state"] == "quota_limited"
    assert shown["why"].startswith("usage limit reached (plan plus); resets at ")
    until = datetime.fromisoformat(shown["until"]).timestamp()
    assert abs(until - (walled_at + WALL_RESET_SECONDS)) < 30
    assert shown["quota"]["primary"] == {
        "used_percent": 100.0,
        "window_minutes": 300,
        "resets_at": 1764824400,
    }
    assert shown["quota"]["secondary"] == {
        "used_percent": 61.5,
        "window_minutes": 10080,
        "resets_at": 1765238400,
    }
    assert shown["quota"]["plan_type"] == "plus"

    second, _ = stream_events(gateway, key, HI)
    assert attempts_of(gateway, second) == [(spare.name, "ok", None)]
    assert listed(gateway, spare.name)["quota"]["primary"]["used_percent"] == 12.5


def test_a_usage_wall_inside_the_stream_rests_the_account(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    walled, spare, key = walled_and_spare(gateway, sandbox, "chatgpt-usage-limit-event")

    first, events = stream_events(gateway, key, HI)

    # The wall came after the first byte: the client sees it as the backend sent it.
    assert events == transcript_events("chatgpt-usage-limit-event")
    assert gateway.usage_row(first.headers["x-request-id"])["status"] == "error"
    shown = wait_for(lambda: listed(gateway, walled.name)["state"] == "quota_limited")
    assert shown
    second, _ = stream_events(gateway, key, HI)
    assert attempts_of(gateway, second) == [(spare.name, "ok", None)]


def assert_usage_limit_answer(response: httpx.Response, resets_in: float) -> None:
    """A 429 shaped like the backend's own wall, as Codex CLI reads it, resetting in about
    `resets_in` seconds."""
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("usage_limit_reached", "usage_limit_reached")
    assert abs(error["resets_in_seconds"] - resets_in) < 30
    assert abs(error["resets_at"] - (time.time() + error["resets_in_seconds"])) < 30
    assert response.headers["retry-after"] == str(error["resets_in_seconds"])
    moment = datetime.fromtimestamp(error["resets_at"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    assert error["message"].startswith("Every upstream account that can serve this request")
    assert f"the first one resets at {moment}" in error["message"]


def test_when_every_account_is_at_its_usage_limit_the_client_gets_the_walls_429(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    (walled,) = only_chatgpt_accounts(gateway, sandbox, [{"transcript": "chatgpt-usage-limit-429"}])
    user, key = gateway.new_user("10")
    sandbox.clear()

    # the only answer there was: the backend's wall
    first, _ = stream_events(gateway, key, HI)
    # then the account rests, and nothing reaches the backend
    second = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )

    assert_usage_limit_answer(first, WALL_RESET_SECONDS)
    assert_usage_limit_answer(second, WALL_RESET_SECONDS)
    assert len(backend_requests(sandbox)) == 1
    assert attempts_of(gateway, first) == [(walled.name, "failed", "http_429")]
    assert attempts_of(gateway, second) == []
    for response in (first, second):
        row = gateway.usage_row(response.headers["x-request-id"])
        assert (row["status"], row["http_status"]) == ("upstream_error", 429)
        assert "usage_limit_reached" in row["flags"]
        assert Decimal(row["cost_usd"]) == 0
    assert Decimal(gateway.balance(user)) == 10


def test_the_usage_limit_answer_comes_only_while_no_other_account_can_serve(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    _, spare, key = walled_and_spare(gateway, sandbox, "chatgpt-usage-limit-429")
    stream_events(gateway, key, HI)  # rests the walled account; the spare serves
    gateway.cli("accounts", "disable", spare.name)
    time.sleep(CATALOG_SETTLE_SECONDS)

    walled_only, _ = stream_events(gateway, key, HI)
    gateway.cli("accounts", "enable", spare.name)
    time.sleep(CATALOG_SETTLE_SECONDS)
    served, _ = stream_events(gateway, key, HI)

    assert_usage_limit_answer(walled_only, WALL_RESET_SECONDS)
    assert served.status_code == 200
    assert attempts_of(gateway, served) == [(spare.name, "ok", None)]


def test_rate_limit_events_in_the_stream_update_the_accounts_windows(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    (account,) = only_chatgpt_accounts(gateway, sandbox, [{"transcript": "chatgpt-rate-limits"}])
    _, key = gateway.new_user("10")

    response, events = stream_events(gateway, key, HI)

    assert response.status_code == 200
    assert events[0]["type"] == "codex.rate_limits"  # relayed as the backend sent it
    shown = wait_for(lambda: (q := listed(gateway, account.name)["quota"]) and q["plan_type"] and q)
    # the headers said 12.5 % (primary) and 40 %; the event, read after them, says more
    assert shown == {
        "primary": {"used_percent": 87.5, "window_minutes": 300, "resets_at": 1764824400},
        "secondary": {"used_percent": 40.0, "window_minutes": 10080, "resets_at": 1765238400},
        "limit_reached_until": None,
        "plan_type": "pro",
    }
    assert listed(gateway, account.name)["state"] == "ready"


def test_a_token_about_to_expire_is_refreshed_before_it_is_used(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    (account,) = only_chatgpt_accounts(gateway, sandbox, [{"lifetime": 120}])
    _, key = gateway.new_user("10")
    sandbox.clear()

    response, _ = stream_events(gateway, key, HI)

    assert response.status_code == 200
    assert [call["refresh_token"] for call in refresh_calls(sandbox)] == [account.refresh_token]
    access, refresh = stored_tokens(gateway, account.name)
    assert refresh != account.refresh_token
    (sent,) = backend_requests(sandbox)
    assert sent["headers"]["authorization"] == f"Bearer {access}" != account.access_token


def test_a_refresh_refused_for_good_takes_the_account_out_of_rotation(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    spent = "rt_spent_" + uuid.uuid4().hex
    grant = {"grant_type": "refresh_token", "refresh_token": spent}
    httpx.post(sandbox.url + "/sandbox/chatgpt/oauth/token", json=grant).raise_for_status()
    stale, spare = only_chatgpt_accounts(
        gateway,
        sandbox,
        [{"name": "stale", "lifetime": 60, "refresh_token": spent, "priority": 1}, {}],
    )
    _, key = gateway.new_user("10")

    first, _ = stream_events(gateway, key, HI)
    second, _ = stream_events(gateway, key, HI)

    assert first.status_code == 200
    assert attempts_of(gateway, first) == [
        (stale.name, "failed", "token_refresh"),
        (spare.name, "ok", None),
    ]
    assert attempts_of(gateway, second) == [(spare.name, "ok", None)]
    shown = listed(gateway, stale.name)
    assert shown["state"] == "needs_relogin"
    assert shown["why"] == "token refresh refused: refresh_token_reused (HTTP 401)"


def test_codex_asking_for_its_model_catalog_gets_one_it_can_read(gateway: Gateway) -> None:
    _, key = gateway.new_user("1")
    auth = {"Authorization": f"Bearer {key}"}

    catalog = httpx.get(gateway.url + "/v1/models?client_version=0.169.0", headers=auth)
    listing = httpx.get(gateway.url + "/v1/models", headers=auth)

    assert (catalog.status_code, catalog.json()) == (200, {"models": []})
    assert MODEL in [model["id"] for model in listing.json()["data"]]


def test_a_client_that_does_not_stream_is_billed_the_estimate_of_a_stream_without_its_end(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    """The backend always streams: one that stops before its final event leaves no response
    to assemble, so the client gets an error, and its row the estimate a streaming client's
    row gets for the same stream."""
    only_chatgpt_accounts(gateway, sandbox, [{"transcript": "responses-no-terminal"}])
    user, key = gateway.new_user("10")
    auth = {"Authorization": f"Bearer {key}"}
    url = gateway.url + "/v1/responses"

    whole = httpx.post(url, json=HI, headers=auth, timeout=30)
    streamed = httpx.post(url, json={**HI, "stream": True}, headers=auth, timeout=30)

    assert whole.status_code == 502
    assert whole.json()["error"]["code"] == "upstream_protocol_error"
    row = gateway.usage_row(whole.headers["x-request-id"])
    like = gateway.usage_row(streamed.headers["x-request-id"])
    assert row["stream"] is False and row["status"] == "upstream_error"
    assert {"no_terminal_event", "protocol", "estimated"} <= set(row["flags"])
    assert {"no_terminal_event", "estimated"} <= set(like["flags"])
    counts = ("input_tokens", "output_tokens", "cost_usd")
    assert [row[name] for name in counts] == [like[name] for name in counts]
    assert Decimal(row["cost_usd"]) > 0
    spent = Decimal(row["cost_usd"]) + Decimal(like["cost_usd"])
    assert Decimal(gateway.balance(user)) == 10 - spent


def test_a_backend_error_quoting_its_token_reaches_neither_the_client_nor_the_row(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    """The 502 a client that did not stream gets for the backend's `error` event names the
    reason, less the access token and any key it quotes."""
    error = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "code": "bad_thing",
            "message": "bad thing with key sk-UPSTREAMSECRET-0123456789abcdef, token {token}",
        },
    }
    event = b"event: error\ndata: %s\n\n" % json.dumps(error).encode()
    with serving(LoopbackUpstream(events=[event])) as backend:
        (account,) = only_chatgpt_accounts(gateway, sandbox, [{"base_url": backend.base_url}])
        _, key = gateway.new_user("10")
        response = httpx.post(
            gateway.url + "/v1/responses",
            json=HI,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    assert response.status_code == 502
    redacted = "bad thing with key [redacted], token [redacted]"
    assert redacted in response.json()["error"]["message"]
    row = gateway.usage_row(response.headers["x-request-id"])
    assert redacted in row["error"]
    for secret in ("UPSTREAMSECRET", account.access_token):
        assert secret not in response.text and secret not in json.dumps(row)
