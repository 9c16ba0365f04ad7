"""POST /v1/chat/completions and GET /v1/models end to end, through the official SDK.

A chat request goes upstream as a streamed Responses call; it is billed from the upstream's
own final event exactly as the same request on /v1/responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import orjson
import pytest

from codex_gateway.http.chat import _end
from codex_gateway.relay.chat import DONE, ChatStreamTranslator
from codex_gateway.relay.sse import StreamScanner
from tests.conftest import (
    Gateway,
    Sandbox,
    add_sandbox_account,
    estimated_counts,
    make_gateway,
)
from tests.http.test_responses import (
    TRANSCRIPTS,
    assert_billed,
    cut_outcome,
    exchange_and_sent,
    expected_cost,
    transcript_events,
)
from tests.relay.test_chat import completed_with, request

Sdk = Callable[[str], openai.OpenAI]
MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "List the files here."},
]
FINISHED = [
    "responses-text",
    "responses-cached",
    "responses-reasoning-tool",
    "responses-incomplete",
]
# transcript -> finish_reason
FINISH = {
    "responses-text": "stop",
    "responses-cached": "stop",
    "responses-reasoning-tool": "tool_calls",
    "responses-incomplete": "length",
}


@pytest.mark.parametrize("name", FINISHED)
def test_a_chat_stream_with_usage_reaches_the_sdk_and_is_billed(
    gateway: Gateway, sdk: Sdk, sandbox: Sandbox, name: str
) -> None:
    user, key = gateway.new_user("10")
    sandbox.clear()

    with sdk(key) as client:
        response = client.chat.completions.with_raw_response.create(
            model="gpt-5.1-codex",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-sandbox-transcript": name},
        )
        chunks = list(response.parse())

    status, counts = TRANSCRIPTS[name]
    assert counts is not None
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == FINISH[name]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens_details is not None and usage.completion_tokens_details is not None
    assert (
        usage.prompt_tokens,
        usage.prompt_tokens_details.cached_tokens,
        usage.completion_tokens,
        usage.completion_tokens_details.reasoning_tokens,
    ) == counts
    row = gateway.usage_row(response.headers["x-request-id"])
    assert_billed(row, status, counts)
    assert row["endpoint"] == "chat.completions" and row["stream"] is True
    assert Decimal(gateway.balance(user)) == Decimal(10) - expected_cost(counts)
    sent = json.loads(sandbox.requests()[-1]["body"])
    assert sent["stream"] is True
    assert sent["input"][0] == {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": "Be terse."}],
    }


@pytest.mark.parametrize("name", FINISHED)
def test_a_whole_chat_completion_reaches_the_sdk_and_is_billed(
    gateway: Gateway, sdk: Sdk, name: str
) -> None:
    user, key = gateway.new_user("5")

    with sdk(key) as client:
        response = client.chat.completions.with_raw_response.create(
            model="gpt-5.1-codex",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"x-sandbox-transcript": name},
        )
        completion = response.parse()

    status, counts = TRANSCRIPTS[name]
    assert counts is not None and completion.usage is not None
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == FINISH[name]
    assert completion.usage.prompt_tokens == counts[0]
    assert completion.usage.completion_tokens == counts[2]
    row = gateway.usage_row(response.headers["x-request-id"])
    assert_billed(row, status, counts)
    assert row["stream"] is False
    assert Decimal(gateway.balance(user)) == Decimal(5) - expected_cost(counts)


@pytest.mark.parametrize("name", ["responses-failed", "responses-error-event"])
def test_a_failing_upstream_stream_ends_in_an_sdk_error_and_costs_nothing(
    gateway: Gateway, sdk: Sdk, name: str
) -> None:
    user, key = gateway.new_user("2")
    with sdk(key) as client, pytest.raises(openai.APIError):
        stream = client.chat.completions.create(
            model="gpt-5.1-codex",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"x-sandbox-transcript": name},
        )
        list(stream)

    assert Decimal(gateway.balance(user)) == Decimal(2)


def test_a_stream_cut_before_its_final_event_is_an_sdk_error_billed_as_estimated(
    gateway: Gateway, sdk: Sdk
) -> None:
    user, key = gateway.new_user("2")
    with sdk(key) as client, pytest.raises(openai.APIError):
        stream = client.chat.completions.with_raw_response.create(
            model="gpt-5.1-codex",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"x-sandbox-transcript": "responses-no-terminal"},
        )
        request_id = stream.headers["x-request-id"]
        list(stream.parse())

    row = gateway.usage_row(request_id)
    assert "estimated" in row["flags"] and "no_terminal_event" in row["flags"]
    assert Decimal(row["cost_usd"]) > 0
    assert Decimal(gateway.balance(user)) == Decimal(2) - Decimal(row["cost_usd"])


@pytest.fixture(scope="module")
def impatient_gateway(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway that gives up on an upstream silent for a second mid-stream."""
    gw = make_gateway("sqlite", tmp_path_factory)
    gw.env["CODEX_GATEWAY_UPSTREAM_READ_TIMEOUT"] = "1"
    try:
        add_sandbox_account(gw, sandbox)
        gw.start()
        yield gw
    finally:
        gw.stop()


# how the upstream's stream stops short -> (the chat client's error code, its message)
STREAM_STOPPED_SHORT = [
    # it goes silent past the idle timeout: said as /v1/responses says it
    pytest.param(
        {"x-sandbox-fault": "hang-middle:5"}, "upstream_timeout",
        "The upstream went silent for longer than the idle timeout before the response ended.",
        id="idle",
    ),
    # it ends without its final event
    pytest.param(
        {"x-sandbox-transcript": "responses-no-terminal"}, "stream_incomplete",
        "The upstream stream ended before its final event, so this response is incomplete.",
        id="early-end",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "code", "message"), STREAM_STOPPED_SHORT)
def test_a_chat_stream_that_stops_short_ends_in_an_error_that_says_why(
    impatient_gateway: Gateway, headers: dict[str, str], code: str, message: str
) -> None:
    _, key = impatient_gateway.new_user("2")
    body = {"model": "gpt-5.1-codex", "messages": MESSAGES, "stream": True}

    response = httpx.post(
        impatient_gateway.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
    )

    assert response.status_code == 200
    *_, last, done = [line for line in response.text.splitlines() if line]
    assert done == "data: [DONE]"
    error = json.loads(last.removeprefix("data: "))["error"]
    assert (error["code"], error["message"]) == (code, message)


@pytest.mark.parametrize(
    ("stream", "fault"),
    [
        # a stream translated chunk by chunk
        (True, None),
        # a stream gathered into one chat.completion
        (False, None),
        # an upstream that ignored `stream` and sent the response object, gathered or streamed
        (False, "json"),
        (True, "json"),
    ],
)
def test_a_chat_answer_served_with_invalid_usage_is_billed_the_estimate(
    gateway: Gateway, stream: bool, fault: str | None
) -> None:
    user, key = gateway.new_user("2")
    headers = {"Authorization": f"Bearer {key}", "x-sandbox-transcript": "responses-usage-invalid"}
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-5.1-codex", "messages": MESSAGES, "stream": stream},
        headers=headers | ({"x-sandbox-fault": fault} if fault else {}),
        timeout=30,
    )

    assert response.status_code == 200
    if stream:
        chunks = [
            json.loads(line[6:])
            for line in response.text.split("\n\n")
            if line.startswith("data: {")
        ]
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text.startswith("Here is an") and response.text.endswith("data: [DONE]\n\n")
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    else:
        assert response.json()["choices"][0]["message"]["content"].startswith("Here is an")
    row = gateway.usage_row(response.headers["x-request-id"])
    assert row["status"] == "completed"
    assert "usage_invalid" in row["flags"] and "estimated" in row["flags"]
    # the same answer text, whichever way it came: the same estimate of its output
    _, _, output_tokens, _ = estimated_counts("", transcript_events("responses-usage-invalid"))
    assert row["output_tokens"] == output_tokens
    # the input counts read, and are billed as the upstream sent them
    assert (row["input_tokens"], row["cached_tokens"]) == (1252, 0)
    assert Decimal(row["cost_usd"]) > 0
    assert Decimal(gateway.balance(user)) == Decimal(2) - Decimal(row["cost_usd"])


def usage_of(row: dict[str, Any]) -> dict[str, Any]:
    """The Chat Completions usage of a usage row's billed counts."""
    cached = row["input_tokens"] - row["uncached_input_tokens"]
    return {
        "prompt_tokens": row["input_tokens"],
        "completion_tokens": row["output_tokens"],
        "total_tokens": row["input_tokens"] + row["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": row["reasoning_tokens"],
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def streamed_usage(text: str) -> Any:
    """The usage of a chat stream: its one usage chunk, the last before [DONE]."""
    assert text.endswith("\n\ndata: [DONE]\n\n")
    chunks = [json.loads(block[6:]) for block in text.split("\n\n") if block[6:7] == "{"]
    assert chunks[-1]["choices"] == []
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    return chunks[-1]["usage"]


READ = {"input_tokens": 1252, "input_tokens_details": {"cached_tokens": 0}}
WRITTEN = {"output_tokens": 11273, "output_tokens_details": {"reasoning_tokens": 10944}}


@pytest.mark.parametrize(
    ("stream", "fault"),
    [
        # a stream translated chunk by chunk, and one gathered into one chat.completion
        (True, None),
        (False, None),
        # an upstream that ignored `stream` and sent the response object, streamed or not
        (True, "json"),
        (False, "json"),
    ],
)
@pytest.mark.parametrize(
    ("usage", "estimated"),
    [
        # no usage, or usage that is not an object: the gateway's estimate is billed
        pytest.param(None, True, id="usage-null"),
        pytest.param("12525 tokens", True, id="usage-a-string"),
        # a count below zero: that side is the estimate, the other billed as reported
        pytest.param(
            {**READ, "output_tokens": -11273, "total_tokens": -10021}, True, id="negative-output"
        ),
        pytest.param(
            {"input_tokens": -1252, **WRITTEN, "total_tokens": 10021}, True, id="negative-input"
        ),
        # counts that read: billed as reported, with a total that is not their sum, or with
        # more cached than input (billed as all of the input cached)
        pytest.param({**READ, **WRITTEN, "total_tokens": 99}, False, id="total-not-the-sum"),
        pytest.param(
            {**READ, "input_tokens_details": {"cached_tokens": 2000}, **WRITTEN},
            False,
            id="cached-over-input",
        ),
    ],
)
def test_the_usage_a_chat_client_is_told_is_the_usage_its_row_bills(
    gateway: Gateway, stream: bool, fault: str | None, usage: Any, estimated: bool
) -> None:
    _, key = gateway.new_user("2")
    headers = {"Authorization": f"Bearer {key}", "x-sandbox-usage": json.dumps(usage)}
    body: dict[str, Any] = {"model": "gpt-5.1-codex", "messages": MESSAGES, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        headers=headers | ({"x-sandbox-fault": fault} if fault else {}),
        timeout=30,
    )

    assert response.status_code == 200
    told = streamed_usage(response.text) if stream else response.json()["usage"]
    row = gateway.usage_row(response.headers["x-request-id"])
    assert row["status"] == "completed"
    assert ("estimated" in row["flags"]) is estimated
    assert told == usage_of(row)
    assert row["output_tokens"] > 0 and row["input_tokens"] > 0


def test_a_chat_stream_answered_with_one_json_object_is_billed_as_its_stream_would_be(
    gateway: Gateway,
) -> None:
    """An upstream that ignored `stream`: the client still gets chunks, with the upstream's
    usage when asked for it, and the row reads the answer's usage, model and id."""
    user, key = gateway.new_user("2")
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={
            "model": "gpt-5.1-codex",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": f"Bearer {key}", "x-sandbox-fault": "json"},
        timeout=30,
    )

    assert response.status_code == 200
    chunks = [json.loads(line[6:]) for line in response.text.split("\n\n") if line[6:7] == "{"]
    assert chunks[-1]["usage"]["prompt_tokens"] == 1252
    assert chunks[-1]["usage"]["completion_tokens"] == 11273
    row = gateway.usage_row(response.headers["x-request-id"])
    status, counts = TRANSCRIPTS["responses-text"]
    assert_billed(row, status, counts)
    assert row["upstream_model"] == "gpt-5.1-codex-2025-11-13"
    assert row["response_id"] == "resp_fx_text"
    assert Decimal(gateway.balance(user)) == Decimal(2) - expected_cost(counts)


def test_a_bad_chat_request_is_refused_before_any_upstream_call(
    gateway: Gateway, sdk: Sdk, sandbox: Sandbox
) -> None:
    _, key = gateway.new_user("1")
    sandbox.clear()

    with sdk(key) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gpt-5.1-codex",
            messages=MESSAGES,  # type: ignore[arg-type]
            n=3,
        )

    assert caught.value.param == "n"  # type: ignore[attr-defined]
    assert sandbox.requests() == []


def test_models_lists_the_priced_models_for_a_key(gateway: Gateway, sdk: Sdk) -> None:
    _, key = gateway.new_user("1")

    with sdk(key) as client:
        models = [model.id for model in client.models.list()]

    assert "gpt-5.1-codex" in models and models == sorted(models)
    denied = httpx.get(gateway.url + "/v1/models", headers={"authorization": "Bearer sk-cg-no"})
    assert denied.status_code == 401


def test_one_model_is_retrieved_by_name_and_an_allowlist_narrows_what_is_shown(
    gateway: Gateway, sdk: Sdk
) -> None:
    user, key = gateway.new_user("1")
    created = gateway.cli("keys", "create", "--user", user, "--models", "gpt-5.1-codex")
    limited = created.stdout.strip().splitlines()[-1]

    with sdk(key) as client:
        model = client.models.retrieve("gpt-5.1-codex")
        snapshot = client.models.retrieve("gpt-5.1-codex-2025-11-13")
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("no-such-model")
    with sdk(limited) as client:
        shown = [each.id for each in client.models.list()]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-5.1-codex-mini")

    assert (model.id, model.object) == ("gpt-5.1-codex", "model")
    assert snapshot.id == "gpt-5.1-codex-2025-11-13"
    assert missing.value.code == "model_not_found"  # type: ignore[attr-defined]
    assert shown == ["gpt-5.1-codex"]


def test_the_key_never_reaches_the_gateway_log_or_the_usage_row(gateway: Gateway, sdk: Sdk) -> None:
    _, key = gateway.new_user("1")

    with sdk(key) as client:
        response = client.chat.completions.with_raw_response.create(
            model="gpt-5.1-codex",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"x-sandbox-transcript": "responses-text"},
        )
    row = gateway.usage_row(response.headers["x-request-id"])

    assert response.headers["x-request-id"] in gateway.log_text()
    assert key not in gateway.log_text()
    assert key not in json.dumps(row)


# -- the end of a stream whose usage waits for the gateway's estimate ----------------------


class BrokenTokens:
    """An estimator with a bug."""

    def estimate(self, request: object, deltas: object) -> dict[str, Any]:
        raise ValueError("the tokenizer broke")


class StuckTokens:
    """An estimator that runs until `release` is set, having set `started`."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def estimate(self, request: object, deltas: object) -> dict[str, Any]:
        self.started.set()
        self.release.wait(5)
        return {"input_tokens": 1, "output_tokens": 1}


async def end_awaiting_usage(tokens: object) -> tuple[list[bytes], Any]:
    """`_end` of a chat stream whose final event served the answer without usage, with
    `tokens` as the gateway's estimator; (the bodies written, the outcome)."""
    events = completed_with(None)
    scanner = StreamScanner()
    scanner.feed(b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events))
    translator = ChatStreamTranslator("gpt-5.1-codex", include_usage=True)
    for event in events:
        translator.feed(event)
    assert translator.awaits_usage
    exchange, sent = exchange_and_sent()
    await exchange.start(200, [])
    outcome = cut_outcome()
    chat = SimpleNamespace(responses=request())
    gateway: Any = SimpleNamespace(tokens=tokens)
    await _end(gateway, exchange, outcome, chat, scanner, translator)  # type: ignore[arg-type]
    return [message.get("body", b"") for message in sent[1:]], outcome


async def test_a_stream_whose_estimate_fails_still_ends_with_done_and_no_usage_chunk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR):
        bodies, outcome = await end_awaiting_usage(BrokenTokens())

    assert bodies == [DONE]
    assert outcome.status == "completed" and outcome.estimate is None
    assert "estimate_failed" in outcome.flags
    (record,) = [r for r in caplog.records if "estimate" in r.getMessage()]
    assert record.request_id == outcome.request_id  # type: ignore[attr-defined]


async def test_a_shutdown_during_the_estimate_ends_the_stream_with_done_and_no_usage_chunk() -> (
    None
):
    tokens = StuckTokens()
    ending = asyncio.create_task(end_awaiting_usage(tokens))
    await asyncio.to_thread(tokens.started.wait, 5)
    ending.cancel()
    try:
        bodies, outcome = await ending
    finally:
        tokens.release.set()

    assert bodies == [DONE]
    assert outcome.estimate is None and "estimate_failed" not in outcome.flags
