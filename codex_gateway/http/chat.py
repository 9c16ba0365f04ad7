"""POST /v1/chat/completions, served by a Responses upstream call and translated back.

The upstream is always asked to stream: a streaming client gets each Responses event as
`chat.completion.chunk`s as it arrives, a non-streaming one the final response as one
`chat.completion`. Billing reads the upstream's own terminal event through the same scanner
and settlement as /v1/responses, so a request costs the same on either route. An upstream
that ignores `stream` and answers with the response object is read as /v1/responses reads
one, and a streaming client gets the chunks of its events. The usage a client gets is the
billed counts (`Outcome.billed_usage`); when the upstream's own usage cannot be billed, they
are known once the gateway's estimate is made, which the usage chunk of a stream, or the
completion of a client that did not stream, then waits for.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import orjson

from codex_gateway.billing.settlement import Outcome
from codex_gateway.errors import UpstreamError
from codex_gateway.http.exchange import Exchange
from codex_gateway.http.responses import (
    _STREAM_HEADERS,
    MISSING_TERMINAL_MESSAGE,
    SHUTDOWN_CODE,
    SHUTDOWN_MESSAGE,
    _last_words,
    _on_disconnect,
    _record_failure,
    _relay_client_error,
    admit,
    authenticate,
    chunks_of,
    client_left,
    collect_stream,
    end_cut_stream,
    estimate_unbilled,
    estimate_unbilled_answer,
    read_json_answer,
    send_upstream,
    settle_after,
    take_terminal,
)
from codex_gateway.relay.chat import (
    ChatRequest,
    ChatStreamTranslator,
    chat_completion,
    parse_chat_request,
    response_events,
)
from codex_gateway.relay.shaping import ResponsesRequest
from codex_gateway.relay.sse import EventSplitter, StreamScanner, event_data
from codex_gateway.relay.usage import MappedUsage
from codex_gateway.store.queries import KeyRecord
from codex_gateway.upstream.router import Answer

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

ENDPOINT = "chat.completions"


async def relay_chat(gateway: Gateway, exchange: Exchange) -> None:
    key = await authenticate(gateway, exchange)
    chat = parse_chat_request(await exchange.body(gateway.settings.max_body_bytes))
    exchange.model = chat.model
    request = _upstream_request(chat)
    outcome = await admit(gateway, exchange, key, request, ENDPOINT, chat.stream)
    await settle_after(
        gateway, exchange, outcome, _relay(gateway, exchange, key, chat, request, outcome)
    )


def _upstream_request(chat: ChatRequest) -> ResponsesRequest:
    document = {**chat.responses, "stream": True}
    return ResponsesRequest(chat.model, True, orjson.dumps(document), document, False)


async def _relay(
    gateway: Gateway,
    exchange: Exchange,
    key: KeyRecord,
    chat: ChatRequest,
    request: ResponsesRequest,
    outcome: Outcome,
) -> None:
    deadline = time.monotonic() + gateway.settings.upstream_total_timeout
    answer = await send_upstream(gateway, exchange, key, request, outcome, deadline)
    scanner = StreamScanner()
    try:
        if answer.rest is None and answer.response.status != 200:
            await _relay_client_error(exchange, answer, outcome)
        elif chat.stream:
            await _stream(gateway, exchange, answer, chat, outcome, scanner, deadline)
        else:
            await _whole(gateway, exchange, answer, chat, outcome, scanner, deadline)
    except UpstreamError as exc:
        _record_failure(outcome, exc)
        raise
    finally:
        answer.close()
    if answer.rest is not None:
        await estimate_unbilled(gateway, outcome, request.document, scanner)


async def _stream(
    gateway: Gateway,
    exchange: Exchange,
    answer: Answer,
    chat: ChatRequest,
    outcome: Outcome,
    scanner: StreamScanner,
    deadline: float,
) -> None:
    """Translate chunk by chunk, within the total time limit (`deadline`); a client that
    leaves is handled as on /v1/responses."""
    translator = ChatStreamTranslator(
        chat.model, chat.include_usage, int(time.time()), answer.secrets
    )
    if answer.rest is None:
        await _stream_whole(gateway, exchange, answer, chat, outcome, translator)
        return
    splitter = EventSplitter()
    await exchange.start(200, list(_STREAM_HEADERS))
    stop_later: list[asyncio.TimerHandle] = []
    exchange.watch_disconnect(
        lambda: _on_disconnect(gateway, answer, stop_later), lambda: translator.ended
    )
    try:
        await _translate(exchange, answer, scanner, splitter, translator, deadline)
    except asyncio.CancelledError:  # by a shutdown: end the stream as for a broken upstream
        buffered = answer.response.buffered()
        scanner.feed(buffered)
        take_terminal(gateway, answer, scanner, outcome)
        blocks = splitter.feed(buffered)
        lines = [exchange.unsent, *(line for b in blocks for line in translator.feed(_event(b)))]
        last = _gateway_error(translator, "server_error", SHUTDOWN_CODE, SHUTDOWN_MESSAGE)
        # A cut stream is billed what the upstream reported: no estimate, so no usage chunk.
        lines.extend(translator.finish())
        await end_cut_stream(exchange, outcome, scanner, b"".join(last), b"".join(lines))
        return
    except UpstreamError as exc:
        take_terminal(gateway, answer, scanner, outcome)
        if exchange.disconnected:
            client_left(outcome, whole=scanner.terminal is not None, failure=exc)
            return
        if scanner.terminal is None:
            _record_failure(outcome, exc)
            outcome.flag("stream_interrupted")
            # Worded as /v1/responses words the same cut: the client learns what happened.
            code = exc.code or "upstream_error"
            await _write_lines(
                exchange, _gateway_error(translator, exc.type, code, exc.message), True
            )
            return
        await _end(gateway, exchange, outcome, chat, scanner, translator)
        return
    finally:
        for handle in stop_later:
            handle.cancel()
    scanner.finish()
    take_terminal(gateway, answer, scanner, outcome)
    if exchange.disconnected:
        client_left(outcome, whole=scanner.terminal is not None)
        return
    await _write(exchange, translator, splitter.finish())
    if scanner.terminal is None:
        outcome.status = "no_terminal_event"
        outcome.error = MISSING_TERMINAL_MESSAGE
        outcome.flag("no_terminal_event")
    await _end(gateway, exchange, outcome, chat, scanner, translator)


async def _end(
    gateway: Gateway,
    exchange: Exchange,
    outcome: Outcome,
    chat: ChatRequest,
    scanner: StreamScanner,
    translator: ChatStreamTranslator,
) -> None:
    """Write the stream's last lines. One whose final usage cannot be billed as it came gets
    its usage chunk once the estimate is made; a shutdown that cuts the estimate short, or an
    estimate that fails (`estimate_unbilled` logs it), ends the stream with `[DONE]` and
    without one, as the request is then billed what the upstream reported."""
    if not translator.awaits_usage:
        await _write_lines(exchange, translator.finish(), last=True)
        return
    try:
        await estimate_unbilled(gateway, outcome, chat.responses, scanner)
    except asyncio.CancelledError:
        await _last_words(exchange.write(b"".join(translator.finish()), more=False))
        return
    await _write_lines(exchange, translator.finish(_billed(outcome)), last=True)


def _billed(outcome: Outcome) -> MappedUsage | None:
    """The counts a client is told: those its request is billed by; none when its row bills
    nothing (an answer without a final status, a stream a shutdown cut before its estimate)."""
    usage = outcome.billed_usage()
    return usage if usage.billable else None


async def _translate(
    exchange: Exchange,
    answer: Answer,
    scanner: StreamScanner,
    splitter: EventSplitter,
    translator: ChatStreamTranslator,
    deadline: float,
) -> None:
    async for chunk in chunks_of(answer, deadline):
        scanner.feed(chunk)
        blocks = splitter.feed(chunk)
        if not exchange.disconnected:
            await _write(exchange, translator, blocks)


async def _write(exchange: Exchange, translator: ChatStreamTranslator, blocks: list[bytes]) -> None:
    lines = [line for block in blocks for line in translator.feed(_event(block))]
    await _write_lines(exchange, lines, last=False)


def _gateway_error(
    translator: ChatStreamTranslator, kind: str, code: str, message: str
) -> list[bytes]:
    """The chat lines of an error the gateway ends a stream with, shaped as the upstream's
    own `error` event would be translated."""
    return translator.feed(
        {"type": "error", "error": {"type": kind, "code": code, "message": message}}
    )


async def _write_lines(exchange: Exchange, lines: list[bytes], last: bool) -> None:
    if lines or last:
        await exchange.write(b"".join(lines), more=not last)


def _event(block: bytes) -> dict[str, object]:
    data = event_data(block)
    return data if isinstance(data, dict) else {}


async def _whole(
    gateway: Gateway,
    exchange: Exchange,
    answer: Answer,
    chat: ChatRequest,
    outcome: Outcome,
    scanner: StreamScanner,
    deadline: float,
) -> None:
    """Collect the stream within the total time limit (`deadline`), bill it, and answer with
    one chat.completion."""
    if answer.rest is None:
        # An upstream that ignored `stream` and sent the response object itself.
        document = read_json_answer(answer.first, outcome, answer.secrets)
        await estimate_unbilled_answer(gateway, outcome, chat.responses, document)
    else:
        document = await collect_stream(gateway, answer, outcome, scanner, chat.responses, deadline)
        await estimate_unbilled(gateway, outcome, chat.responses, scanner)
    completion = chat_completion(document, chat.model, _billed(outcome), answer.secrets)
    await exchange.send_json(200, completion)


async def _stream_whole(
    gateway: Gateway,
    exchange: Exchange,
    answer: Answer,
    chat: ChatRequest,
    outcome: Outcome,
    translator: ChatStreamTranslator,
) -> None:
    """An upstream that ignored `stream` and sent the response object itself: the chunks of
    its events, in one write. One without a final status (queued, in progress) ends in the
    error chunk of a stream that never finished, and costs what its usage says, nothing when
    it has none: the answer's work had not been done. A client that left while the upstream
    worked is handled as on a stream relayed as it comes, and billed the answer's usage."""
    document = read_json_answer(answer.first, outcome, answer.secrets)
    lines = [line for event in response_events(document) for line in translator.feed(event)]
    if translator.awaits_usage:
        await estimate_unbilled_answer(gateway, outcome, chat.responses, document)
        lines.extend(translator.finish(_billed(outcome)))
    await exchange.start(200, list(_STREAM_HEADERS))
    whole = translator.finished
    if not whole:
        outcome.status = "no_terminal_event"
        outcome.error = MISSING_TERMINAL_MESSAGE
        outcome.flag("no_terminal_event")
        lines.extend(translator.finish())
    if exchange.client_gone():
        client_left(outcome, whole)
    else:
        try:
            await _write_lines(exchange, lines, last=True)
        except asyncio.CancelledError:  # by a shutdown: what was not sent yet, briefly
            await _last_words(exchange.write(exchange.unsent, more=False))
            return
    await estimate_unbilled_answer(gateway, outcome, chat.responses, document)
