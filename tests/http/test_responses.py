"""POST /v1/responses end to end: the official SDK and raw HTTP through a gateway process.

Every upstream transcript is replayed by the sandbox upstream and must reach the client
unchanged, and be billed exactly as the price table says. A stream the shutdown cuts ends
as it is when its final event had come, else with one error event.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from codex_gateway.billing.pricing import Price, plain
from codex_gateway.billing.settlement import Outcome
from codex_gateway.http.exchange import Exchange, Message
from codex_gateway.http.responses import end_cut_stream
from codex_gateway.relay.sse import StreamScanner
from tests.conftest import (
    MAX_BODY_BYTES,
    Gateway,
    Sandbox,
    add_sandbox_account,
    estimated_counts,
    fixture_path,
    free_port,
    make_gateway,
)
from tests.http.conftest import rows_by_id

GPT_51_CODEX = (Decimal("1.25"), Decimal("0.125"), Decimal("10"))

# transcript -> (status, input, cached, output, reasoning); None where no usage is reported
TRANSCRIPTS: dict[str, tuple[str, tuple[int, int, int, int] | None]] = {
    "responses-text": ("completed", (1252, 0, 11273, 10944)),
    "responses-cached": ("completed", (11771, 11465, 306, 192)),
    "responses-reasoning-tool": ("completed", (5120, 4864, 180, 128)),
    "responses-incomplete": ("incomplete", (120, 0, 64, 40)),
    "responses-failed": ("failed", None),
    "responses-error-event": ("error", None),
    "responses-no-terminal": ("no_terminal_event", None),
}


def expected_cost(counts: tuple[int, int, int, int] | None) -> Decimal:
    if counts is None:
        return Decimal(0)
    input_tokens, cached, output, _ = counts
    p_in, p_cached, p_out = GPT_51_CODEX
    return ((input_tokens - cached) * p_in + cached * p_cached + output * p_out) / Decimal(10**6)


def transcript_events(name: str) -> list[dict[str, Any]]:
    raw = fixture_path("upstream", f"{name}.sse").read_text(encoding="utf-8")
    events = []
    for block in raw.split("\n\n"):
        data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def assert_billed(
    row: dict[str, Any], status: str, counts: tuple[int, int, int, int] | None
) -> None:
    assert row["status"] == status
    if counts is None:
        assert row["raw_usage"] is None
        assert "usage_missing" in row["flags"]
    else:
        assert (
            row["input_tokens"],
            row["cached_tokens"],
            row["output_tokens"],
            row["reasoning_tokens"],
        ) == counts
        assert row["uncached_input_tokens"] == counts[0] - counts[1]
    assert Decimal(row["cost_usd"]) == expected_cost(counts)


@pytest.mark.parametrize("name", list(TRANSCRIPTS))
def test_stream_reaches_the_sdk_unchanged_and_is_billed(
    gateway: Gateway, sdk: Callable[[str], openai.OpenAI], name: str
) -> None:
    user, key = gateway.new_user("10")
    client = sdk(key)
    response = client.responses.with_raw_response.create(
        model="gpt-5.1-codex",
        input="Write a Python function that computes the Fibonacci sequence",
        stream=True,
        extra_headers={"x-sandbox-transcript": name},
    )
    request_id = response.headers["x-request-id"]
    received = [event.to_dict() for event in response.parse()]
    expected = transcript_events(name)
    status, counts = TRANSCRIPTS[name]
    row = gateway.usage_row(request_id)
    if name == "responses-no-terminal":
        # The gateway never passes a cut stream off as a clean end: it adds an error event,
        # and bills its own count of the request and of what was streamed.
        assert received[: len(expected)] == expected
        assert received[-1]["type"] == "error"
        assert received[-1]["code"] == "stream_incomplete"
        assert len(received) == len(expected) + 1
        counts = estimated_counts(
            "Write a Python function that computes the Fibonacci sequence", expected
        )
        assert "estimated" in row["flags"]
    else:
        assert received == expected
    assert_billed(row, status, counts)
    assert row["stream"] is True
    assert row["upstream_model"] == "gpt-5.1-codex-2025-11-13"
    assert Decimal(gateway.balance(user)) == Decimal(10) - expected_cost(counts)


def test_a_final_event_with_a_lone_surrogate_escape_is_billed_its_usage(gateway: Gateway) -> None:
    """Valid JSON that orjson refuses (`"id":"resp_fx_\\ud800text"`): the stream reaches
    the client untouched, and the bill counts the usage it carries."""
    user, key = gateway.new_user("10")
    with httpx.stream(
        "POST",
        gateway.url + "/v1/responses",
        json={"model": "gpt-5.1-codex", "input": "hi", "stream": True},
        headers={
            "Authorization": f"Bearer {key}",
            "x-sandbox-transcript": "responses-lone-surrogate",
        },
        timeout=30,
    ) as response:
        streamed = response.read()
        request_id = response.headers["x-request-id"]

    assert b'"id":"resp_fx_\\ud800text"' in streamed
    row = gateway.usage_row(request_id)
    _, counts = TRANSCRIPTS["responses-text"]
    assert_billed(row, "completed", counts)
    assert row["response_id"] == "resp_fx_\ufffdtext"
    assert Decimal(gateway.balance(user)) == Decimal(10) - expected_cost(counts)


@pytest.mark.parametrize("name", ["responses-text", "responses-cached", "responses-incomplete"])
def test_json_response_reaches_the_sdk_unchanged_and_is_billed(
    gateway: Gateway, sdk: Callable[[str], openai.OpenAI], name: str
) -> None:
    user, key = gateway.new_user("3")
    response = sdk(key).responses.with_raw_response.create(
        model="gpt-5.1-codex", input="hi", extra_headers={"x-sandbox-transcript": name}
    )
    final = transcript_events(name)[-1]["response"]
    assert response.parse().to_dict() == final
    row = gateway.usage_row(response.headers["x-request-id"])
    status, counts = TRANSCRIPTS[name]
    assert_billed(row, status, counts)
    assert row["stream"] is False
    assert Decimal(gateway.balance(user)) == Decimal(3) - expected_cost(counts)


def _http_1_0(url: str, path: str, key: str, body: bytes) -> tuple[bytes, bytes]:
    """POST `body` as an HTTP/1.0 client does, and read the answer until the gateway closes
    the connection; its head and body."""
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST {path} HTTP/1.0\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return head.lower(), rest


@pytest.mark.parametrize(
    ("path", "stream"),
    [
        # streams: no chunk framing, the close ends them
        ("/v1/responses", True),
        ("/v1/chat/completions", True),
        # JSON answers: a length, as for any client
        ("/v1/responses", False),
        ("/v1/chat/completions", False),
    ],
)
def test_an_http_1_0_client_gets_no_chunked_framing_and_is_billed_once(
    gateway: Gateway, path: str, stream: bool
) -> None:
    user, key = gateway.new_user("3")
    message = {"messages": [{"role": "user", "content": "hi"}]}
    body = json.dumps({"model": "gpt-5.1-codex", "stream": stream, **message}).encode()

    head, rest = _http_1_0(gateway.url, path, key, body)

    assert head.startswith(b"http/1.1 200 ")
    assert b"transfer-encoding" not in head
    assert b"\r\nconnection: close" in head
    if stream:
        assert b"content-length" not in head
        assert rest.startswith(b"event: response.created" if "responses" in path else b"data: ")
        assert rest.endswith(b"\n\n")
        assert b'"response.completed"' in rest or rest.endswith(b"data: [DONE]\n\n")
    else:
        assert f"\r\ncontent-length: {len(rest)}\r\n".encode() in head
        json.loads(rest)
    request_id = re.search(rb"x-request-id: (\S+)", head)
    assert request_id is not None
    row = gateway.usage_row(request_id.group(1).decode())
    assert_billed(row, "completed", TRANSCRIPTS["responses-text"][1])
    assert "client_disconnected" not in row["flags"]  # the close ended a whole answer
    assert list(rows_by_id(gateway, user)) == [row["request_id"]]
    assert Decimal(gateway.balance(user)) == Decimal(3) - Decimal(row["cost_usd"])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize(
    ("name", "flag"),
    [
        # an output count sent as a string
        ("responses-usage-invalid", "usage_invalid"),
        # usage null
        ("responses-usage-missing", "usage_missing"),
    ],
)
def test_an_answer_served_without_usable_usage_is_billed_the_estimate(
    gateway: Gateway, name: str, flag: str, stream: bool
) -> None:
    """A completed answer whose usage is null, or whose counts are not counts, still cost
    the upstream its work: the client gets it as it came, and the row bills the gateway's
    count of the request and of the answer's text, for the counts it cannot read, instead of
    nothing."""
    user, key = gateway.new_user("10")
    prompt = "Write a Python function that computes the Fibonacci sequence"
    response = httpx.post(
        gateway.url + "/v1/responses",
        json={"model": "gpt-5.1-codex", "input": prompt, "stream": stream},
        headers={"Authorization": f"Bearer {key}", "x-sandbox-transcript": name},
        timeout=30,
    )
    assert response.status_code == 200
    events = transcript_events(name)
    if not stream:
        assert response.json() == events[-1]["response"]
    row = gateway.usage_row(response.headers["x-request-id"])
    counts = estimated_counts(prompt, events)
    assert counts[2] > 0
    if name == "responses-usage-invalid":
        # its input counts read (1252, none cached): billed as reported; output estimated
        counts = (1252, 0, counts[2], 0)
    assert_billed(row, "completed", counts)
    assert flag in row["flags"] and "estimated" in row["flags"]
    assert row["raw_usage"] == events[-1]["response"]["usage"]
    assert Decimal(gateway.balance(user)) == Decimal(10) - expected_cost(counts)


@pytest.mark.parametrize(
    "name", ["responses-failed", "responses-error-event", "responses-no-terminal"]
)
def test_json_upstream_failure_is_a_clear_error_and_free(
    gateway: Gateway, sdk: Callable[[str], openai.OpenAI], name: str
) -> None:
    user, key = gateway.new_user("3")
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(key).responses.create(
            model="gpt-5.1-codex", input="hi", extra_headers={"x-sandbox-transcript": name}
        )
    assert caught.value.status_code == 502
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "upstream_error"
    row = gateway.usage_row(caught.value.response.headers["x-request-id"])
    assert row["status"] == "upstream_error"
    assert Decimal(row["cost_usd"]) == 0
    assert Decimal(gateway.balance(user)) == Decimal(3)


def test_guide_request_streams_event_by_event_and_is_billed(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    user, key = gateway.new_user("1")
    body = fixture_path("requests", "seed-guide-request.json").read_bytes()
    sandbox.clear()
    chunks: list[bytes] = []
    with httpx.stream(
        "POST",
        gateway.url + "/v1/responses",
        content=body,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "x-sandbox-delay-ms": "30",
        },
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        chunks.extend(response.iter_raw())
    streamed = b"".join(chunks)
    assert streamed == fixture_path("upstream", "responses-text.sse").read_bytes()
    # Paced upstream events arrive as separate chunks: nothing is buffered to the end.
    assert len(chunks) >= len(transcript_events("responses-text")) // 2
    upstream_body = json.loads(sandbox.requests()[-1]["body"])
    assert "messages" not in upstream_body
    assert upstream_body["input"] == [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "写一个Python函数计算斐波那契数列"}],
        }
    ]
    row = gateway.usage_row(request_id)
    assert Decimal(row["cost_usd"]) == Decimal("0.114295")
    assert "messages_converted" in row["flags"]
    assert Decimal(gateway.balance(user)) == Decimal("0.885705")
    explained = gateway.cli("explain", request_id).stdout
    assert "1252 x 1.25 / 1,000,000 = 0.001565" in explained
    assert "11273 x 10 / 1,000,000 = 0.11273" in explained
    assert "total charged: $0.114295" in explained


def test_guide_four_stages_are_logged_with_one_request_id(gateway: Gateway) -> None:
    _, key = gateway.new_user("1")
    response = httpx.post(
        gateway.url + "/v1/responses",
        content=fixture_path("requests", "seed-guide-request.json").read_bytes(),
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    request_id = response.headers["x-request-id"]
    gateway.usage_row(request_id)
    lines = [line for line in gateway.log_text().splitlines() if request_id in line]
    stages = [line.split("stage=")[1].split()[0] for line in lines if "stage=" in line]
    assert stages == ["raw", "mapped", "billed", "cost"]
    assert any("stage=cost" in line and "total=$0.114295" in line for line in lines)
    assert any("codex_gateway.access" in line and " 200 " in line for line in lines)
    assert key not in gateway.log_text()


@pytest.mark.parametrize("fixture", ["codex-exec-0.169.0-turn1", "codex-exec-0.169.0-tool-turn2"])
def test_codex_body_arrives_upstream_unchanged_apart_from_auth(
    gateway: Gateway, sandbox: Sandbox, fixture: str
) -> None:
    _, key = gateway.new_user("1")
    body = fixture_path("requests", f"{fixture}.body.json").read_bytes()
    captured = json.loads(fixture_path("requests", f"{fixture}.headers.json").read_text())
    headers = {k: v for k, v in captured["headers"].items() if k.lower() != "authorization"}
    headers["Authorization"] = f"Bearer {key}"
    sandbox.clear()
    response = httpx.post(gateway.url + "/v1/responses", content=body, headers=headers, timeout=30)
    assert response.status_code == 200
    seen = sandbox.requests()[-1]
    assert seen["body"].encode() == body
    assert seen["headers"]["authorization"] == "Bearer sk-upstream-secret-0001"
    for name in ("session-id", "thread-id", "x-codex-turn-metadata", "originator", "user-agent"):
        assert (
            seen["headers"][name]
            == captured["headers"][next(k for k in captured["headers"] if k.lower() == name)]
        )
    gateway.usage_row(response.headers["x-request-id"])


def post(gateway: Gateway, key: str | None, body: bytes, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    headers.setdefault("Content-Type", "application/json")
    return httpx.post(gateway.url + "/v1/responses", content=body, headers=headers, timeout=30)


GOOD = b'{"model":"gpt-5.1-codex","input":"hi"}'

# body, status, error type, error code, param
BAD_INPUT = [
    # not JSON, or not the shape the gateway needs
    (b'{"model": "gpt-5.1-codex", "input": ', 400, "invalid_request_error", None, None),
    (b"[1, 2, 3]", 400, "invalid_request_error", None, None),
    (b"", 400, "invalid_request_error", None, None),
    (b'{"input": "hi"}', 400, "invalid_request_error", None, "model"),
    (b'{"model": "", "input": "hi"}', 400, "invalid_request_error", None, "model"),
    (
        b'{"model": "gpt-5.1-codex", "input": "hi", "stream": "yes"}',
        400,
        "invalid_request_error",
        None,
        "stream",
    ),
    # both or neither of input and messages
    (
        b'{"model": "gpt-5.1-codex", "input": "a", "messages": [{"role": "user", "content": "b"}]}',
        400,
        "invalid_request_error",
        None,
        "messages",
    ),
    (b'{"model": "gpt-5.1-codex"}', 400, "invalid_request_error", None, "input"),
    (
        b'{"model": "gpt-5.1-codex", "messages": [{"role": "wizard", "content": "b"}]}',
        400,
        "invalid_request_error",
        None,
        "messages[0].role",
    ),
    # model names that could not be priced or logged safely
    (
        b'{"model": "gpt\\nINFO forged line", "input": "hi"}',
        400,
        "invalid_request_error",
        None,
        "model",
    ),
    (
        b'{"model": "' + b"m" * 201 + b'", "input": "hi"}',
        400,
        "invalid_request_error",
        None,
        "model",
    ),
    # a model with no price is refused, never priced as another model
    (
        b'{"model": "gpt-9-unknown", "input": "hi"}',
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    ),
    (
        b'{"model": "gpt-5.1-codex-2025-11-13-x", "input": "hi"}',
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    ),
    (
        b'{"model": "gpt-5-codex-2025-13-45", "input": "hi"}',
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    ),
]


@pytest.mark.parametrize(("body", "status", "kind", "code", "param"), BAD_INPUT)
def test_bad_input_gets_a_clear_error_and_changes_nothing(
    gateway: Gateway,
    sandbox: Sandbox,
    body: bytes,
    status: int,
    kind: str,
    code: str | None,
    param: str | None,
) -> None:
    user, key = gateway.new_user("2")
    sandbox.clear()
    response = post(gateway, key, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == kind
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"].endswith(".") and len(error["message"]) > 20
    assert response.headers["x-request-id"].startswith("req_")
    assert sandbox.requests() == []
    assert gateway.cli_json("usage", "list", "--user", user) == []
    assert gateway.balance(user) == "2"
    assert "Traceback" not in gateway.log_text()


def test_oversized_body_is_refused_before_reading_it_all(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    user, key = gateway.new_user("2")
    sandbox.clear()
    big = b'{"model":"gpt-5.1-codex","input":"' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    response = post(gateway, key, big)
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]
    assert sandbox.requests() == []
    assert gateway.cli_json("usage", "list", "--user", user) == []


@pytest.mark.parametrize(
    ("headers", "message_part"),
    [
        ({}, "didn't provide an API key"),
        ({"Authorization": "Bearer sk-cg-not-a-real-key-000000000000"}, "Incorrect API key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "didn't provide an API key"),
    ],
)
@pytest.mark.parametrize(
    "body",
    [
        GOOD,
        # a body with faults: a caller without a key learns nothing of them
        b'{"model": "gpt-5.1-codex", "input": "hi", "input": "ho"',
    ],
)
def test_bad_key_gets_401_in_openai_shape(
    gateway: Gateway, sandbox: Sandbox, headers: dict[str, str], message_part: str, body: bytes
) -> None:
    sandbox.clear()
    response = httpx.post(gateway.url + "/v1/responses", content=body, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert message_part in error["message"]
    assert sandbox.requests() == []
    assert "not-a-real-key-000000000000" not in gateway.log_text()


WRONG_KEY = "sk-cg-not-a-real-key-000000000000"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        # the key alone in either header Azure-style and other clients send
        ({"api-key": "{key}"}, 200),
        ({"x-api-key": "{key}"}, 200),
        # the same key in several, or an Authorization header of another scheme beside one
        ({"Authorization": "Bearer {key}", "api-key": "{key}", "x-api-key": "{key}"}, 200),
        ({"api-key": "{key}", "x-api-key": "{key}"}, 200),
        ({"Authorization": "Basic dXNlcjpwYXNz", "x-api-key": "{key}"}, 200),
    ],
)
def test_a_key_may_come_in_an_api_key_header(
    gateway: Gateway, headers: dict[str, str], status: int
) -> None:
    user, key = gateway.new_user("2")
    sent = {name: value.format(key=key) for name, value in headers.items()}
    response = httpx.post(gateway.url + "/v1/responses", content=GOOD, headers=sent)
    assert response.status_code == status
    if status == 200:
        assert gateway.usage_row(response.headers["x-request-id"])["status"] == "completed"
    else:
        assert gateway.cli_json("usage", "list", "--user", user) == []


@pytest.mark.parametrize(
    ("headers", "shown"),
    [
        # a credential header sent twice is refused, whichever copy holds the good key
        (
            [("Authorization", f"Bearer {WRONG_KEY}"), ("Authorization", "Bearer {key}")],
            "Authorization",
        ),
        (
            [("Authorization", "Bearer {key}"), ("Authorization", f"Bearer {WRONG_KEY}")],
            "Authorization",
        ),
        ([("api-key", WRONG_KEY), ("api-key", "{key}")], "api-key"),
        ([("api-key", "{key}"), ("api-key", WRONG_KEY)], "api-key"),
        ([("x-api-key", WRONG_KEY), ("x-api-key", "{key}")], "x-api-key"),
        # even when the copies agree, and when another header holds the key
        ([("api-key", "{key}"), ("api-key", "{key}")], "api-key"),
        (
            [("Authorization", "Bearer {key}"), ("x-api-key", "{key}"), ("x-api-key", "{key}")],
            "x-api-key",
        ),
    ],
)
def test_a_credential_header_sent_twice_gets_401_naming_it(
    gateway: Gateway, headers: list[tuple[str, str]], shown: str
) -> None:
    user, key = gateway.new_user("2")
    sent = [(name, value.format(key=key)) for name, value in headers]
    assert_key_refused(gateway, user, key, sent, f"carries the {shown} header 2 times")


@pytest.mark.parametrize(
    ("headers", "shown"),
    [
        # different keys in different headers, whichever of them is good
        ({"Authorization": "Bearer {key}", "x-api-key": WRONG_KEY}, "Authorization and x-api-key"),
        ({"Authorization": f"Bearer {WRONG_KEY}", "api-key": "{key}"}, "Authorization and api-key"),
        ({"api-key": "{key}", "x-api-key": WRONG_KEY}, "api-key and x-api-key"),
        (
            {"Authorization": "Bearer {key}", "api-key": "{key}", "x-api-key": WRONG_KEY},
            "Authorization, api-key and x-api-key",
        ),
    ],
)
def test_different_keys_in_credential_headers_get_401_naming_them(
    gateway: Gateway, headers: dict[str, str], shown: str
) -> None:
    user, key = gateway.new_user("2")
    sent = [(name, value.format(key=key)) for name, value in headers.items()]
    assert_key_refused(gateway, user, key, sent, f"different API keys in its {shown} headers")


def assert_key_refused(
    gateway: Gateway, user: str, key: str, headers: list[tuple[str, str]], says: str
) -> None:
    """A request with these credential headers is a 401 whose message `says` why and shows
    no key, and leaves no usage row."""
    response = httpx.post(gateway.url + "/v1/responses", content=GOOD, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert says in error["message"]
    assert key not in response.text and WRONG_KEY not in response.text
    assert gateway.cli_json("usage", "list", "--user", user) == []


def test_revoked_key_gets_401(gateway: Gateway) -> None:
    user, key = gateway.new_user("2")
    assert post(gateway, key, GOOD).status_code == 200
    key_id = next(k["id"] for k in gateway.cli_json("keys", "list", "--user", user))
    gateway.cli("keys", "revoke", str(key_id))
    deadline = time.monotonic() + 5
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status = post(gateway, key, GOOD).status_code
        time.sleep(0.05)
    assert status == 401


def test_user_at_zero_gets_insufficient_quota_before_any_upstream_call(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    user, key = gateway.new_user("0")
    sandbox.clear()
    response = post(gateway, key, GOOD)
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert sandbox.requests() == []
    assert gateway.cli_json("usage", "list", "--user", user) == []


def test_a_request_is_admitted_only_if_the_balance_covers_its_largest_cost(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    # The largest cost of GOOD: (body bytes + 1000) input tokens and 32768 output tokens.
    largest = (Decimal(len(GOOD) + 1000) * Decimal("1.25") + 32768 * 10) / 10**6
    user, key = gateway.new_user(str(largest + Decimal("0.1")))
    first = post(gateway, key, GOOD)
    assert first.status_code == 200
    gateway.usage_row(first.headers["x-request-id"])
    # What is left (largest + 0.1 - 0.114295) no longer covers the largest cost.
    sandbox.clear()
    second = post(gateway, key, GOOD)
    assert second.status_code == 429
    message = second.json()["error"]["message"]
    assert f"largest possible cost, ${plain(largest)}" in message
    assert "max_output_tokens" in message
    assert sandbox.requests() == []
    assert Decimal(gateway.balance(user)) == largest + Decimal("0.1") - Decimal("0.114295")


def test_max_output_tokens_bounds_the_hold(gateway: Gateway) -> None:
    body = b'{"model":"gpt-5.1-codex","input":"hi","max_output_tokens":1000}'
    largest = (Decimal(len(body) + 1000) * Decimal("1.25") + 1000 * 10) / 10**6
    _, key = gateway.new_user(str(largest))
    assert post(gateway, key, body).status_code == 200


def test_unknown_route_is_an_openai_shaped_404(gateway: Gateway) -> None:
    response = httpx.get(gateway.url + "/v1/nothing-here")
    assert response.status_code == 404
    assert "no route GET /v1/nothing-here" in response.json()["error"]["message"]
    assert response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("method", "path", "allow", "message"),
    [
        ("GET", "/v1/responses", "POST", "/v1/responses accepts POST, not GET."),
        ("HEAD", "/v1/responses", "POST", ""),
        ("DELETE", "/healthz", "GET, HEAD", "/healthz accepts GET or HEAD, not DELETE."),
        (
            "POST",
            "/v1/models/gpt-5.1-codex",
            "GET, HEAD",
            "/v1/models/gpt-5.1-codex accepts GET or HEAD, not POST.",
        ),
    ],
)
def test_a_method_a_route_does_not_take_is_a_405_that_names_the_ones_it_does(
    gateway: Gateway, method: str, path: str, allow: str, message: str
) -> None:
    response = httpx.request(method, gateway.url + path)

    assert response.status_code == 405
    assert response.headers["allow"] == allow
    if method == "HEAD":
        assert response.content == b""  # the head of the answer alone
        return
    error = response.json()["error"]
    assert error["code"] == "method_not_allowed"
    assert error["message"] == message


def test_a_head_request_gets_the_head_of_the_get_answer_on_one_connection(
    gateway: Gateway,
) -> None:
    with httpx.Client(base_url=gateway.url) as client:
        head = client.head("/healthz")
        get = client.get("/healthz")
        keyless_head = client.head("/v1/models")
        keyless_get = client.get("/v1/models")

    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == str(len(get.content))
    # A refusal's head is the GET refusal's, without its body.
    assert keyless_head.status_code == keyless_get.status_code == 401
    assert keyless_head.content == b""
    assert keyless_head.headers["content-length"] == str(len(keyless_get.content))
    # The access line counts the body bytes that left: none for a HEAD answer.
    for answer, sent in ((head, 0), (get, len(get.content))):
        request_id = answer.headers["x-request-id"]
        line = next(ln for ln in gateway.log_text().splitlines() if request_id in ln)
        assert line.endswith(f" bytes={sent}")


def test_unreachable_upstream_is_a_clear_502_that_names_no_address(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    gateway = make_gateway("sqlite", tmp_path_factory)
    closed_port = free_port()
    gateway.cli(
        "accounts",
        "add",
        "--name",
        "down",
        "--base-url",
        f"http://127.0.0.1:{closed_port}/v1",
        "--api-key",
        "sk-upstream-down-0001",
    )
    gateway.start()
    try:
        user, key = gateway.new_user("1")
        response = post(gateway, key, GOOD)
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "upstream_connect_error"
        assert error["message"].endswith("the last one failed: Could not connect to the upstream.")
        assert str(closed_port) not in response.text
        row = gateway.usage_row(response.headers["x-request-id"])
        assert row["status"] == "upstream_error"
        assert str(closed_port) in row["error"]
        assert Decimal(row["cost_usd"]) == 0
        assert gateway.balance(user) == "1"
        assert "sk-upstream-down-0001" not in gateway.log_text()
    finally:
        gateway.stop()


# path, a body that names `model` twice: first a model the key may not use, last one it may
REPEATED_MODEL = [
    ("/v1/responses", b'{"model":"gpt-5.1-codex","input":"x","model":"gpt-5.1-codex-mini"}'),
    (
        "/v1/chat/completions",
        b'{"model":"gpt-5.1-codex","messages":[{"role":"user","content":"x"}],'
        b'"model" :"gpt-5.1-codex-mini"}',
    ),
    (
        "/v1/responses/compact",
        b'{"model":"gpt-5.1-codex","input":"x","mod\\u0065l":"gpt-5.1-codex-mini"}',
    ),
]


@pytest.mark.parametrize(("path", "body"), REPEATED_MODEL)
def test_a_body_naming_a_field_twice_is_refused_before_any_upstream_call(
    gateway: Gateway, sandbox: Sandbox, path: str, body: bytes
) -> None:
    user, _ = gateway.new_user("1")
    key = gateway.cli("keys", "create", "--user", user, "--models", "gpt-5.1-codex-mini")
    sandbox.clear()

    response = httpx.post(
        gateway.url + path,
        content=body,
        headers={"Authorization": f"Bearer {key.stdout.strip().splitlines()[-1]}"},
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "model")
    assert "`model` more than once" in error["message"]
    assert sandbox.requests() == []


# body bytes and headers that are not JSON text, the status and what the refusal says
UNREADABLE_BODIES = [
    (gzip.compress(b'{"model":"gpt-5.1-codex","input":"x"}'), {}, 400, "gzip-compressed"),
    (
        gzip.compress(b'{"model":"gpt-5.1-codex","input":"x"}'),
        {"Content-Encoding": "gzip"},
        415,
        "does not accept compressed request bodies",
    ),
    (b'\xef\xbb\xbf{"model":"gpt-5.1-codex","input":"x"}', {}, 400, "byte-order mark"),
]


@pytest.mark.parametrize(("body", "headers", "status", "says"), UNREADABLE_BODIES)
def test_a_body_that_is_not_json_text_is_refused_saying_what_it_is(
    gateway: Gateway, sandbox: Sandbox, body: bytes, headers: dict[str, str], status: int, says: str
) -> None:
    user, _ = gateway.new_user("1")
    key = gateway.cli("keys", "create", "--user", user).stdout.strip().splitlines()[-1]
    sandbox.clear()

    response = httpx.post(
        gateway.url + "/v1/responses",
        content=body,
        headers={"Authorization": f"Bearer {key}", **headers},
    )

    assert response.status_code == status
    assert says in response.json()["error"]["message"]
    assert "UTF-8 text" not in response.json()["error"]["message"]
    assert sandbox.requests() == []


# path, a body the upstream must never see, and the field the refusal names
REFUSED_BEFORE_UPSTREAM = [
    (
        "/v1/responses",
        b'{"model":"gpt-5.1-codex","input":"x","max_output_tokens":-1}',
        "max_output_tokens",
    ),
    (
        "/v1/responses",
        b'{"model":"gpt-5.1-codex","input":[{"role":"user","content":[{"type":"input_image",'
        b'"image_url":"https://a/1.png","image_url":"https://b/2.png"}]}]}',
        "input[0].content[0].image_url",
    ),
    (
        "/v1/chat/completions",
        b'{"model":"gpt-5.1-codex","messages":[{"role":"user","content":"x"}],"max_tokens":0}',
        "max_tokens",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), REFUSED_BEFORE_UPSTREAM)
def test_a_field_the_upstream_would_misread_is_refused_naming_it(
    gateway: Gateway, sandbox: Sandbox, path: str, body: bytes, param: str
) -> None:
    user, _ = gateway.new_user("1")
    key = gateway.cli("keys", "create", "--user", user).stdout.strip().splitlines()[-1]
    sandbox.clear()

    response = httpx.post(
        gateway.url + path, content=body, headers={"Authorization": f"Bearer {key}"}
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert sandbox.requests() == []


# -- streams cut by the shutdown ----------------------------------------------------------

CUT_COMPLETED = (
    b'event: response.completed\ndata: {"type":"response.completed","response":'
    b'{"id":"resp_1","status":"completed","usage":{"input_tokens":5,"output_tokens":2}}}\n\n'
)
CUT_EVENT = b'event: error\ndata: {"type":"error","code":"gateway_shutting_down"}\n\n'


def exchange_and_sent() -> tuple[Exchange, list[Message]]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"method": "POST", "path": "/v1/responses", "headers": []}
    return Exchange(scope, receive, send, "req_cut"), sent


def cut_outcome() -> Outcome:
    return Outcome(
        request_id="req_cut",
        started_at=datetime.now(UTC),
        started=0.0,
        endpoint="responses",
        model="gpt-5.1-codex",
        stream=True,
        price=Price("gpt-5.1-codex", Decimal("1.25"), Decimal("0.125"), Decimal("10")),
    )


async def test_a_stream_cut_after_its_final_event_ends_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exchange, sent = exchange_and_sent()
    scanner = StreamScanner()
    scanner.feed(CUT_COMPLETED)
    cut = cut_outcome()

    with caplog.at_level(logging.WARNING):
        await end_cut_stream(exchange, cut, scanner, CUT_EVENT, b"")

    assert sent == [{"type": "http.response.body", "body": b"", "more_body": False}]
    assert cut.error is None
    assert "cut by the shutdown" not in caplog.text


async def test_a_stream_cut_before_its_final_event_ends_with_the_error_and_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exchange, sent = exchange_and_sent()
    cut = cut_outcome()

    with caplog.at_level(logging.WARNING):
        await end_cut_stream(exchange, cut, StreamScanner(), CUT_EVENT, b"")

    assert sent == [{"type": "http.response.body", "body": CUT_EVENT, "more_body": False}]
    assert cut.error is not None and "shut down" in cut.error
    assert caplog.text.count("stream cut by the shutdown") == 1


async def test_a_stream_cut_after_its_client_left_is_marked_as_left() -> None:
    exchange, sent = exchange_and_sent()
    exchange.disconnected = True
    cut = cut_outcome()

    await end_cut_stream(exchange, cut, StreamScanner(), CUT_EVENT, b"")

    assert sent == []
    assert "client_disconnected" in cut.flags
    assert cut.status == "client_disconnected"


async def test_what_came_but_was_not_relayed_goes_first_and_can_make_the_stream_whole() -> None:
    """The final event was buffered, unread, when the shutdown cut the stream: the caller
    has fed it to the scanner, and the client gets it with no error after it."""
    exchange, sent = exchange_and_sent()
    scanner = StreamScanner()
    scanner.feed(CUT_COMPLETED)

    await end_cut_stream(exchange, cut_outcome(), scanner, CUT_EVENT, CUT_COMPLETED)

    assert sent == [{"type": "http.response.body", "body": CUT_COMPLETED, "more_body": False}]


BACKLOG_ADMIN_TOKEN = "backlog-admin-token-0123456789"
BACKLOG_BODY = b'{"model":"gpt-5.1-codex","input":"hi"}'
BACKLOG_CLIENTS = 16
BACKLOG_EACH = 6
# What the sandbox's default answer costs at the seeded price.
SEED_COST = Decimal("0.114295")


def test_requests_wait_for_a_writer_far_behind_and_each_is_billed_once(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    gw = make_gateway("sqlite", tmp_path_factory)
    # One bill queued is "far behind": requests that arrive while a batch is written wait.
    gw.env["CODEX_GATEWAY_WRITER_BACKLOG_ROWS"] = "1"
    gw.env["CODEX_GATEWAY_ADMIN_TOKEN"] = BACKLOG_ADMIN_TOKEN
    add_sandbox_account(gw, sandbox)
    gw.start(log_level="INFO")
    try:
        user, key = gw.new_user("100")

        async def client_loop(client: httpx.AsyncClient) -> list[int]:
            statuses = []
            for _ in range(BACKLOG_EACH):
                response = await client.post(
                    gw.url + "/v1/responses",
                    content=BACKLOG_BODY,
                    headers={"Authorization": f"Bearer {key}"},
                )
                statuses.append(response.status_code)
            return statuses

        async def fire() -> list[list[int]]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client_loop(client) for _ in range(BACKLOG_CLIENTS)))

        statuses = [status for loop in asyncio.run(fire()) for status in loop]
        assert statuses == [200] * BACKLOG_CLIENTS * BACKLOG_EACH

        deadline = time.monotonic() + 20
        while len(rows := gw.cli_json("usage", "list", "--user", user, "--limit", "500")) < len(
            statuses
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert len({row["request_id"] for row in rows}) == len(statuses)
        assert Decimal(gw.balance(user)) == 100 - len(statuses) * SEED_COST
        assert "ok:" in gw.cli("ledger", "verify").stdout

        waited = [row for row in rows if "waited_for_writer" in str(row["flags"])]
        assert waited
        text = httpx.get(
            gw.url + "/metrics",
            headers={"Authorization": f"Bearer {BACKLOG_ADMIN_TOKEN}"},
            timeout=10,
        ).text
        counted = re.search(r"^codex_gateway_writer_waits_total (\S+)$", text, re.MULTILINE)
        assert counted is not None
        assert float(counted.group(1)) == len(waited)
    finally:
        gw.stop()
