"""The ChatGPT Codex backend's rules: body shape, headers, session ids, quota, assembly."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from codex_gateway.errors import UpstreamProtocolError, UpstreamStatusError
from codex_gateway.relay.chatgpt import (
    UNSUPPORTED_FIELDS,
    Quota,
    QuotaWindow,
    SessionIds,
    assemble_response,
    quota_from_event,
    quota_from_headers,
    shape_body,
    split_instructions,
    upstream_headers,
    usage_limit,
    with_quota,
)
from tests.conftest import FIXTURES, fixture_path

CODEX_TURN = FIXTURES / "requests"
CODEX_TURN_NAME = "codex-exec-0.169.0-tool-turn2"
SECRET = b"k" * 32


def developer(*texts: str) -> dict[str, Any]:
    content = [{"type": "input_text", "text": text} for text in texts]
    return {"type": "message", "role": "developer", "content": content}


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


# -- body -----------------------------------------------------------------------------------


def test_a_codex_cli_turn_gets_instructions_store_false_and_stream_true() -> None:
    document = json.loads((CODEX_TURN / f"{CODEX_TURN_NAME}.body.json").read_text())

    client_session = document["prompt_cache_key"]
    derived = "11111111-2222-4333-8444-555555555555"

    body = orjson.loads(shape_body(document, derived, client_session))

    assert body["instructions"].startswith("You are a coding agent running in the Codex CLI")
    assert body["store"] is False and body["stream"] is True
    assert [item.get("role") for item in body["input"][:2]] == ["user", "user"]
    assert body["input"][-2:] == document["input"][-2:]  # the tool call and its output
    assert body["prompt_cache_key"] == derived
    # Codex repeats its session id in client_metadata: there too it becomes the derived one
    assert client_session in json.dumps(document["client_metadata"])
    assert client_session not in json.dumps(body)
    assert body["client_metadata"]["thread_id"] == derived
    assert body["include"] == ["reasoning.encrypted_content"]
    assert document["input"][0]["role"] == "developer"  # the client's document is untouched


@pytest.mark.parametrize(
    ("input_", "instructions", "rest"),
    [
        # leading developer/system messages, as text parts or a string, join in order
        (
            [developer("a", "b"), {"role": "system", "content": "c"}, user("u")],
            "ab\n\nc",
            [user("u")],
        ),
        # only the leading run moves; a developer message after the user's stays
        ([user("u"), developer("late")], "", [user("u"), developer("late")]),
        # a leading message with an image is not text, so it and what follows stay
        (
            [{"type": "message", "role": "developer", "content": [{"type": "input_image"}]}],
            "",
            [{"type": "message", "role": "developer", "content": [{"type": "input_image"}]}],
        ),
        # a string input has no items to move
        ("just text", "", "just text"),
    ],
)
def test_instructions_come_from_the_leading_developer_and_system_items(
    input_: Any, instructions: str, rest: Any
) -> None:
    assert split_instructions(input_) == (instructions, rest)


def test_given_instructions_are_kept_and_unsupported_fields_removed() -> None:
    document: dict[str, Any] = {
        "model": "gpt-5.1-codex",
        "instructions": "Be brief.",
        "input": [developer("stays")],
        "store": True,
        "stream": False,
        "include": ["reasoning.encrypted_content", "web_search_call.results"],
        **{name: 1 for name in UNSUPPORTED_FIELDS},
    }

    body = orjson.loads(shape_body(document))

    assert body == {
        "model": "gpt-5.1-codex",
        "instructions": "Be brief.",
        "input": [developer("stays")],
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
    }


def test_no_instructions_and_no_developer_item_sends_an_empty_string() -> None:
    body = orjson.loads(shape_body({"model": "m", "input": [user("hi")]}))

    assert body["instructions"] == ""
    assert "prompt_cache_key" not in body


# -- sessions and headers -----------------------------------------------------------------


def test_session_ids_differ_between_keys_and_repeat_for_one_key() -> None:
    ids = SessionIds(SECRET)

    first = ids.derive(1, "019a3c1e-session")

    assert first == ids.derive(1, "019a3c1e-session")
    assert first != ids.derive(2, "019a3c1e-session")
    assert first != SessionIds(b"other" * 8).derive(1, "019a3c1e-session")
    assert "019a3c1e" not in first and len(first) == 36


@pytest.mark.parametrize(
    ("headers", "document", "client_value"),
    [
        # Codex CLI 0.169.0's hyphenated header, older releases' underscore
        ({"session-id": "s1", "thread-id": "t1"}, {}, "s1"),
        ({"session_id": "s2"}, {"prompt_cache_key": "p"}, "s2"),
        # no header: the body's prompt cache key, else the request id
        ({}, {"prompt_cache_key": "p3"}, "p3"),
        ({}, {}, "req_fallback"),
    ],
)
def test_the_upstream_session_follows_the_clients_own_session(
    headers: dict[str, str], document: dict[str, Any], client_value: str
) -> None:
    ids = SessionIds(SECRET)

    assert ids.for_request(7, headers, document, "req_fallback") == ids.derive(7, client_value)


def test_backend_headers_carry_credentials_and_pass_codex_headers_through() -> None:
    recorded = json.loads((CODEX_TURN / f"{CODEX_TURN_NAME}.headers.json").read_text())["headers"]
    client = {name.lower(): value for name, value in recorded.items()}

    headers = upstream_headers(
        access_token="at-123", account_id="acct-1", session_id="sess-1", client_headers=client
    )

    assert headers["authorization"] == "Bearer at-123"
    assert headers["chatgpt-account-id"] == "acct-1"
    assert headers["originator"] == "codex_exec"
    assert headers["openai-beta"] == "responses=experimental"
    assert headers["session_id"] == "sess-1"
    assert headers["accept"] == "text/event-stream"
    assert headers["x-codex-beta-features"] == client["x-codex-beta-features"]
    # the client's session id, wherever Codex repeats it, becomes the derived one
    assert headers["x-codex-window-id"] == "sess-1:0"
    metadata = json.loads(headers["x-codex-turn-metadata"])
    assert metadata["session_id"] == metadata["thread_id"] == "sess-1"
    assert metadata["turn_id"] == json.loads(client["x-codex-turn-metadata"])["turn_id"]
    assert client["session-id"] not in orjson.dumps(headers).decode()
    assert headers["user-agent"].startswith("codex_exec/0.169.0")
    # the client's own key and its raw session ids never travel upstream
    assert "sk-REPLACE-WITH-GATEWAY-KEY" not in orjson.dumps(headers).decode()
    assert not {"session-id", "thread-id", "x-client-request-id"} & set(headers)


@pytest.mark.parametrize(
    "session",
    [
        # no session header at all
        {},
        # a "session id" too short to be one would match unrelated text
        {"session-id": "1"},
    ],
)
def test_without_a_real_client_session_codex_headers_pass_unchanged(
    session: dict[str, str],
) -> None:
    client = {"x-codex-turn-metadata": '{"turn_id": "t1"}', "x-codex-window-id": "w1:0"}

    headers = upstream_headers(
        access_token="a", account_id="b", session_id="c", client_headers={**client, **session}
    )

    assert {name: headers[name] for name in client} == client


def test_a_client_without_an_originator_gets_codexs_own() -> None:
    headers = upstream_headers(access_token="a", account_id="b", session_id="c", client_headers={})

    assert headers["originator"] == "codex_cli_rs"


# -- quota ----------------------------------------------------------------------------------


def test_the_usage_wall_fixture_blocks_the_account_until_its_reset() -> None:
    wall = json.loads(fixture_path("upstream", "chatgpt-usage-limit-429.json").read_text())
    now = 1764806400

    quota = with_quota(quota_from_headers(wall["headers"]), usage_limit(wall["body"], now))

    assert quota == Quota(
        QuotaWindow(100.0, 300, 1764824400),
        QuotaWindow(61.5, 10080, 1765238400),
        limit_reached_until=1764824400,
        plan_type="plus",
    )
    assert quota.blocked_until(now) == 1764824400
    assert quota.blocked_until(1764824400) is None
    assert Quota.from_json(orjson.loads(orjson.dumps(quota.to_json()))) == quota


@pytest.mark.parametrize(
    ("payload", "until"),
    [
        # a 429 body, and the same object inside a stream's error event
        ({"error": {"type": "usage_limit_reached", "resets_at": 2000}}, 2000),
        (
            {
                "type": "error",
                "status": 429,
                "error": {"type": "usage_limit_reached", "resets_at": 2000},
            },
            2000,
        ),
        # no absolute time: now plus the relative one
        ({"error": {"type": "usage_limit_reached", "resets_in_seconds": 60}}, 1060),
        # an absolute time already past (a replayed wall, another clock): the relative one
        (
            {"error": {"type": "usage_limit_reached", "resets_at": 900, "resets_in_seconds": 60}},
            1060,
        ),
        # a past time with nothing to fall back on is kept: the wall has ended
        ({"error": {"type": "usage_limit_reached", "resets_at": 900}}, 900),
        # other errors are not a usage wall
        ({"error": {"type": "usage_not_included"}}, None),
        ({"type": "error", "code": "server_error"}, None),
        (None, None),
    ],
)
def test_usage_limit_errors_give_the_reset_time(payload: Any, until: int | None) -> None:
    quota = usage_limit(payload, 1000)

    assert (quota.limit_reached_until if quota else None) == until


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # header names in any case; a window below its limit does not block
        (
            {"X-Codex-Primary-Used-Percent": "12.5", "X-Codex-Primary-Reset-At": "99"},
            Quota(QuotaWindow(12.5, None, 99)),
        ),
        # unreadable or missing numbers: no window
        ({"x-codex-primary-used-percent": "lots"}, None),
        ({"content-type": "text/event-stream"}, None),
    ],
)
def test_quota_headers_are_read_leniently(headers: dict[str, str], expected: Quota | None) -> None:
    quota = quota_from_headers(headers)

    assert quota == expected
    assert quota is None or quota.blocked_until(0) is None


def test_a_rate_limits_event_updates_the_windows() -> None:
    event = {
        "type": "codex.rate_limits",
        "plan_type": "pro",
        "rate_limits": {
            "primary": {"used_percent": 100, "window_minutes": 300, "reset_at": 5000},
            "secondary": {"used_percent": 40.0, "window_minutes": 10080, "reset_at": 9000},
        },
    }

    quota = quota_from_event(event)

    assert quota is not None
    assert quota.primary == QuotaWindow(100.0, 300, 5000)
    assert quota.blocked_until(4000) == 5000
    assert quota.plan_type == "pro" and quota_from_event({"type": "other"}) is None


# -- assembling a whole response --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "item_types"),
    [
        ("responses-text.sse", "completed", ["reasoning", "message"]),
        ("responses-reasoning-tool.sse", "completed", ["reasoning", "function_call"]),
        ("responses-incomplete.sse", "incomplete", ["reasoning", "message"]),
        ("responses-failed.sse", "failed", []),
    ],
)
def test_a_stream_assembles_to_its_final_response(
    name: str, status: str, item_types: list[str]
) -> None:
    response = assemble_response(fixture_path("upstream", name).read_bytes())

    assert response["status"] == status
    assert [item["type"] for item in response["output"]] == item_types


def test_items_fill_in_a_final_response_that_left_its_output_empty() -> None:
    item = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "x"}],
    }
    stream = (
        b'data: {"type":"response.output_item.done","output_index":0,"item":'
        + orjson.dumps(item)
        + b'}\n\ndata: {"type":"response.completed","response":{"id":"r","output":[]}}\n\n'
    )

    assert assemble_response(stream)["output"] == [item]


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("responses-error-event.sse", UpstreamStatusError),
        ("responses-no-terminal.sse", UpstreamProtocolError),
    ],
)
def test_a_stream_without_a_response_is_an_upstream_error(
    name: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        assemble_response(fixture_path("upstream", name).read_bytes())


# A token not shaped like one: only the credential the request was sent with names it.
PLAIN_TOKEN = "plain-token-0123456789"


def test_a_failed_response_and_an_error_event_lose_the_credential_they_quote() -> None:
    message = f"refused token {PLAIN_TOKEN} and key sk-UPSTREAMSECRET-0123456789"
    failed = {
        "type": "response.failed",
        "response": {"status": "failed", "error": {"message": message}},
    }
    error = {"type": "error", "error": {"code": "bad_thing", "message": message}}

    response = assemble_response(b"data: " + orjson.dumps(failed) + b"\n\n", (PLAIN_TOKEN,))
    with pytest.raises(UpstreamStatusError) as caught:
        assemble_response(b"data: " + orjson.dumps(error) + b"\n\n", (PLAIN_TOKEN,))

    redacted = "refused token [redacted] and key [redacted]"
    assert response["error"] == {"message": redacted}
    assert caught.value.message == f"The upstream failed: {redacted}"
