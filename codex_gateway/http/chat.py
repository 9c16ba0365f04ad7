"""POST /v1/chat/completions, served by a Responses upstream call and translated back.

The upstream is always asked to stream: a streaming client gets each Responses event as
`chat.completion.chunk`s as it arrives, a non-streaming one the final response as one
`chat.completion`. Billing reads the upstream's own terminal event through the same scanner
and settlement as /v1/responses, so a request costs the same on either route.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson

from codex_gateway.billing.settlement import Outcome
from codex_gateway.errors import UpstreamError, UpstreamProtocolError
from codex_gateway.http.exchange import Exchange
from codex_gateway.http.responses import (
    _STREAM_HEADERS,
    MAX_UPSTREAM_BODY,
    MISSING_TERMINAL_MESSAGE,
    _record_failure,
    _relay_error,
    _take_terminal,
    authenticate,
    choose_account,
    hold,
    price_of,
    upstream_headers,
)
from codex_gateway.relay.chat import (
    ChatRequest,
    ChatStreamTranslator,
    chat_completion,
    parse_chat_request,
)
from codex_gateway.relay.chatgpt import ResponseAssembler
from codex_gateway.relay.shaping import ResponsesRequest
from codex_gateway.relay.sse import EventSplitter, StreamScanner, event_data
from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.client import UpstreamResponse

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

ENDPOINT = "chat.completions"


async def relay_chat(gateway: Gateway, exchange: Exchange) -> None:
    key = await authenticate(gateway, exchange)
    chat = parse_chat_request(await exchange.body(gateway.settings.max_body_bytes))
    exchange.model = chat.model
    request = _upstream_request(chat)
    price = price_of(gateway, request)
    account = choose_account(gateway)
    held = await hold(gateway, key, request, price)
    outcome = Outcome(
        request_id=exchange.request_id,
        started_at=datetime.now(UTC),
        started=exchange.started,
        endpoint=ENDPOINT,
        model=chat.model,
        stream=chat.stream,
        price=price,
        user_id=key.user_id,
        key_id=key.id,
        account_id=account.id,
        hold=held,
    )
    try:
        await _relay(gateway, exchange, account, chat, request, outcome)
    except UpstreamError:
        raise
    except BaseException:
        outcome.status = "gateway_error"
        outcome.http_status = 500
        outcome.flag("gateway_error")
        raise
    finally:
        outcome.client_bytes = exchange.bytes_sent
        outcome.http_status = exchange.status or outcome.http_status
        outcome.duration_ms = (time.perf_counter() - outcome.started) * 1000
        gateway.settle(outcome)


def _upstream_request(chat: ChatRequest) -> ResponsesRequest:
    document = {**chat.responses, "stream": True}
    return ResponsesRequest(chat.model, True, orjson.dumps(document), document, False)


async def _relay(
    gateway: Gateway,
    exchange: Exchange,
    account: AccountRecord,
    chat: ChatRequest,
    request: ResponsesRequest,
    outcome: Outcome,
) -> None:
    url = account.base_url + "/responses"
    outcome.overhead_ms = (time.perf_counter() - outcome.started) * 1000
    try:
        upstream = await gateway.client.post(url, upstream_headers(exchange, account), request.body)
    except UpstreamError as exc:
        _record_failure(outcome, exc)
        raise
    outcome.ttfb_ms = (time.perf_counter() - outcome.started) * 1000
    gateway.metrics.upstream_answered(account.name, upstream.headers)
    try:
        if upstream.status != 200:
            await _relay_error(exchange, upstream, outcome)
        elif chat.stream:
            await _stream(exchange, upstream, chat, outcome)
        else:
            await _whole(exchange, upstream, chat, outcome)
    except UpstreamError as exc:
        _record_failure(outcome, exc)
        raise
    finally:
        upstream.release()


async def _stream(
    exchange: Exchange, upstream: UpstreamResponse, chat: ChatRequest, outcome: Outcome
) -> None:
    scanner = StreamScanner()
    splitter = EventSplitter()
    translator = ChatStreamTranslator(chat.model, chat.include_usage, int(time.time()))
    await exchange.start(200, list(_STREAM_HEADERS))
    try:
        async for chunk in upstream.chunks():
            scanner.feed(chunk)
            await _write(exchange, translator, splitter.feed(chunk))
    except UpstreamError as exc:
        _record_failure(outcome, exc)
        outcome.flag("stream_interrupted")
        _take_terminal(scanner, outcome)
        await _write_lines(exchange, translator.finish(), last=True)
        return
    scanner.finish()
    await _write(exchange, translator, splitter.finish())
    _take_terminal(scanner, outcome)
    if scanner.terminal is None:
        outcome.status = "no_terminal_event"
        outcome.error = MISSING_TERMINAL_MESSAGE
        outcome.flag("no_terminal_event")
    await _write_lines(exchange, translator.finish(), last=True)


async def _write(exchange: Exchange, translator: ChatStreamTranslator, blocks: list[bytes]) -> None:
    lines = [line for block in blocks for line in translator.feed(_event(block))]
    await _write_lines(exchange, lines, last=False)


async def _write_lines(exchange: Exchange, lines: list[bytes], last: bool) -> None:
    if lines or last:
        await exchange.write(b"".join(lines), more=not last)


def _event(block: bytes) -> dict[str, object]:
    data = event_data(block)
    return data if isinstance(data, dict) else {}


async def _whole(
    exchange: Exchange, upstream: UpstreamResponse, chat: ChatRequest, outcome: Outcome
) -> None:
    """Collect the stream, bill it, and answer with one chat.completion."""
    body = await upstream.read(MAX_UPSTREAM_BODY)
    scanner = StreamScanner()
    scanner.feed(body)
    scanner.finish()
    _take_terminal(scanner, outcome)
    if upstream.content_type == "text/event-stream":
        assembler = ResponseAssembler()
        for block in EventSplitter().feed(body + b"\n\n"):
            assembler.feed(event_data(block))
        response = assembler.result()
    else:
        response = _json_response(body, outcome)
    await exchange.send_json(200, chat_completion(response, chat.model))


def _json_response(body: bytes, outcome: Outcome) -> dict[str, object]:
    """An upstream that ignored `stream` and sent the response object itself."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        outcome.flag("upstream_body_not_json")
        raise UpstreamProtocolError("The upstream answered with a body that is not JSON.")
    outcome.usage = document.get("usage")
    outcome.usage_reported = outcome.usage is not None
    status = document.get("status")
    outcome.status = status if isinstance(status, str) else "completed"
    return document
