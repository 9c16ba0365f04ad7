"""POST /v1/responses and /v1/responses/compact: admit, relay to an account, settle the bill.

The router picks the account and fails over until the first byte; from then on the
upstream's stream is forwarded chunk by chunk as it arrives, and the scanner watches it for
the terminal event. An event that may report a failure, which may quote a credential, is
held back until whole (`StreamScanner.release`): any event a chunk ends inside, since a
client names an event after its last `event:` line. Once whole, those named `error` or
`response.failed`, those with no name and those with a line ended by a CR alone are redacted
(every line of them, a secret cut across data lines too); the others go as they came. A
stream that fails or ends early gets an `error` event of its own (after a blank line when it
stopped inside an event), never a silent end. A client that did not ask for a stream, served
by a backend that always streams (ChatGPT), gets the final response assembled from it.
Exactly one usage row is written per request, after the client has the last byte (or has
gone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from codex_gateway.billing.admission import Hold, cost_at_most, largest_cost
from codex_gateway.billing.pricing import Price
from codex_gateway.billing.settlement import (
    FLAG_ESTIMATE_FAILED,
    SERVED_STATUSES,
    Outcome,
    billed_price,
    cut_by_shutdown,
)
from codex_gateway.errors import (
    AuthenticationError,
    ModelNotAllowed,
    ModelNotFound,
    ShuttingDown,
    UpstreamError,
    UpstreamProtocolError,
)
from codex_gateway.http.exchange import Exchange
from codex_gateway.relay.chatgpt import assemble_response, quota_from_event
from codex_gateway.relay.redaction import redact_body, redact_event, redact_text
from codex_gateway.relay.shaping import (
    ResponsesRequest,
    parse_compact_request,
    parse_responses_request,
)
from codex_gateway.relay.sse import TERMINAL_STATUS, StreamScanner, error_event, upstream_json
from codex_gateway.relay.usage import response_id_of, upstream_model_of, usage_from_terminal
from codex_gateway.store.queries import KeyRecord, hash_key
from codex_gateway.upstream.kinds import COMPACT, RESPONSES, Call
from codex_gateway.upstream.router import TOTAL_TIMEOUT_KIND, Answer, Attempt, total_timeout
from codex_gateway.upstream.stickiness import conversation_key

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

log = logging.getLogger(__name__)

_JSON_STATUS = {"completed": "completed", "incomplete": "incomplete", "failed": "failed"}
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
MISSING_TERMINAL_MESSAGE = (
    "The upstream stream ended before its final event, so this response is incomplete."
)
SHUTDOWN_CODE = "gateway_shutting_down"
SHUTDOWN_MESSAGE = (
    "The gateway is shutting down and ended this stream before the upstream finished it; "
    "send the request again."
)
SHUTDOWN_REFUSAL = (
    "The gateway is shutting down and stopped this request before its answer began; "
    "send the request again."
)
# The request waited for the usage writer, which was far behind, before it was relayed.
FLAG_WAITED_FOR_WRITER = "waited_for_writer"
# The client left before the last byte of its answer was handed to the server.
FLAG_CLIENT_DISCONNECTED = "client_disconnected"
# How long a stream cut by a shutdown may spend handing its closing event to a slow client.
CUT_WRITE_SECONDS = 1.0
# The headers a key may come in, as read off the wire and as an error names them.
CREDENTIAL_HEADERS = (
    (b"authorization", "Authorization"),
    (b"api-key", "api-key"),
    (b"x-api-key", "x-api-key"),
)


async def authenticate(gateway: Gateway, exchange: Exchange) -> KeyRecord:
    raw = _bearer(exchange)
    record = await gateway.catalog.key(hash_key(raw))
    if record is None:
        raise AuthenticationError(
            "Incorrect API key provided. Check the key, or ask the gateway operator for a new one."
        )
    exchange.key_display = record.display
    if record.expires_at is not None and record.expires_at <= datetime.now(UTC):
        raise AuthenticationError(
            f"This API key expired at {record.expires_at:%Y-%m-%d %H:%M} UTC. Ask the gateway "
            "operator for a new key or a later expiry date.",
            code="api_key_expired",
        )
    return record


def _bearer(exchange: Exchange) -> str:
    headers = exchange.headers
    if len(headers) < len(exchange.scope["headers"]):
        # Some header came more than once, and the map kept its last copy.
        _refuse_repeated_credentials(exchange.scope["headers"])
    scheme, _, token = headers.get("authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    api_key = headers.get("api-key", "").strip()
    x_api_key = headers.get("x-api-key", "").strip()
    key = bearer or api_key or x_api_key
    if not key:
        raise AuthenticationError(
            "You didn't provide an API key. Send it in the Authorization header as "
            "'Bearer KEY', or in an api-key or x-api-key header."
        )
    if (api_key and api_key != key) or (x_api_key and x_api_key != key):
        _refuse_different_keys((bearer, api_key, x_api_key))
    return key


def _refuse_different_keys(keys: tuple[str, str, str]) -> None:
    """Credential headers that carry different keys are refused, whichever holds a good one:
    a proxy in front that reads another header than the gateway does would admit one key
    while the gateway bills another. The same key in two headers is no conflict."""
    names = [shown for (_, shown), key in zip(CREDENTIAL_HEADERS, keys, strict=True) if key]
    raise AuthenticationError(
        f"The request carries different API keys in its {', '.join(names[:-1])} and "
        f"{names[-1]} headers; send one key, in one header."
    )


def _refuse_repeated_credentials(raw: list[tuple[bytes, bytes]]) -> None:
    """A credential header sent twice is refused, whichever copy holds a good key: a proxy
    in front that reads the first copy would admit one key while the gateway bills another."""
    names = [name.lower() for name, _ in raw]
    for name, shown in CREDENTIAL_HEADERS:
        copies = names.count(name)
        if copies > 1:
            raise AuthenticationError(
                f"The request carries the {shown} header {copies} times; send the API key "
                "in one header, once."
            )


def price_of(gateway: Gateway, key: KeyRecord, request: ResponsesRequest) -> Price:
    """The model's price, once the key may use the model at all (a dated snapshot of an
    allowed model is allowed, as it is priced as that model)."""
    prices = gateway.catalog.prices
    if key.models is not None and not {request.model, prices.base(request.model)} & key.models:
        allowed = ", ".join(f"`{model}`" for model in sorted(key.models)) or "none"
        raise ModelNotAllowed(
            f"This API key may not use the model `{request.model}`; it may use: {allowed}.",
            param="model",
        )
    price = prices.resolve(request.model)
    if price is None:
        raise ModelNotFound(
            f"The model `{request.model}` does not exist or has no price on this gateway.",
            param="model",
        )
    return price


async def admit(
    gateway: Gateway,
    exchange: Exchange,
    key: KeyRecord,
    request: ResponsesRequest,
    endpoint: str,
    stream: bool,
) -> Outcome:
    """The request's outcome, priced and holding its largest cost; `stream` is what the client
    asked for (a chat client's answer may be collected from an upstream stream). A request
    first waits for the usage writer if that is far behind (`Settler.keep_up`)."""
    outcome = Outcome(
        request_id=exchange.request_id,
        started_at=datetime.now(UTC),
        started=exchange.started,
        endpoint=endpoint,
        model=request.model,
        stream=stream,
        price=price_of(gateway, key, request),
        user_id=key.user_id,
        key_id=key.id,
    )
    if await gateway.settler.keep_up():
        gateway.metrics.writer_waits.inc()
        outcome.flag(FLAG_WAITED_FOR_WRITER)
    await _hold(gateway, key, request, outcome)
    return outcome


async def _hold(
    gateway: Gateway, key: KeyRecord, request: ResponsesRequest, outcome: Outcome
) -> None:
    """Hold the request's largest possible cost against the user's balance (and the key's
    cap), and journal the hold so that a crash cannot leave it open.

    A request that makes the upstream read input it does not carry holds for the context
    window, since its body's size says nothing of that input.
    """
    settings = gateway.settings
    estimate, outcome.held_input_tokens = largest_cost(
        outcome.price,
        request.document,
        request.body,
        settings.hold_output_tokens,
        settings.hold_context_tokens,
    )
    held = await gateway.admission.admit(key.user_id, estimate, key)
    outcome.hold, outcome.key_hold = held.user, held.key
    gateway.journal.opened(outcome.request_id, held, outcome.known())


async def relay_responses(gateway: Gateway, exchange: Exchange) -> None:
    # The key first: a caller without one learns nothing of the body, and costs no parse.
    key = await authenticate(gateway, exchange)
    request = parse_responses_request(await exchange.body(gateway.settings.max_body_bytes))
    await _admit_and_relay(gateway, exchange, key, request, RESPONSES)


async def relay_compact(gateway: Gateway, exchange: Exchange) -> None:
    """POST /v1/responses/compact: one JSON answer, billed from its `usage` like any other."""
    key = await authenticate(gateway, exchange)
    request = parse_compact_request(await exchange.body(gateway.settings.max_body_bytes))
    await _admit_and_relay(gateway, exchange, key, request, COMPACT)


async def _admit_and_relay(
    gateway: Gateway,
    exchange: Exchange,
    key: KeyRecord,
    request: ResponsesRequest,
    endpoint: str,
) -> None:
    exchange.model = request.model
    outcome = await admit(gateway, exchange, key, request, endpoint, request.stream)
    if request.converted_messages:
        outcome.flag("messages_converted")
    relay = _relay(gateway, exchange, key, request, outcome, endpoint)
    await settle_after(gateway, exchange, outcome, relay)


async def settle_after(
    gateway: Gateway, exchange: Exchange, outcome: Outcome, relay: Awaitable[None]
) -> None:
    """Run a relay and, whatever happens to it, hand its one usage row to settlement.

    A client that leaves before its answer's last byte, whether it waited for a stream or
    for one JSON answer, has its row flagged so, and is billed what the upstream did all the
    same. A stream's client is watched from here on; an answer sent whole asks the server
    when it is sent (`Exchange.send_json`, `send_body`), which costs no task per request.
    """
    if outcome.stream:
        exchange.watch_disconnect()
    try:
        await relay
    except UpstreamError:
        raise
    except asyncio.CancelledError:
        # A shutdown cut the request: a 503 if its answer had not begun; settled either way.
        if exchange.response_started:
            log.warning(
                "request cut by the shutdown while its answer was being sent",
                extra={"request_id": outcome.request_id, "account_id": outcome.account_id},
            )
        else:
            await refuse_cut(exchange, outcome)
    except BaseException:
        outcome.status = "gateway_error"
        outcome.http_status = 500
        outcome.flag("gateway_error")
        raise
    finally:
        exchange.stop_watching()
        if exchange.disconnected:
            outcome.flag(FLAG_CLIENT_DISCONNECTED)
        outcome.client_bytes = exchange.bytes_sent
        outcome.http_status = exchange.status or outcome.http_status
        outcome.duration_ms = (time.perf_counter() - outcome.started) * 1000
        gateway.settle(outcome)


async def _relay(
    gateway: Gateway,
    exchange: Exchange,
    key: KeyRecord,
    request: ResponsesRequest,
    outcome: Outcome,
    endpoint: str,
) -> None:
    deadline = time.monotonic() + gateway.settings.upstream_total_timeout
    answer = await send_upstream(gateway, exchange, key, request, outcome, deadline, endpoint)
    try:
        if answer.rest is not None and request.stream:
            await _relay_stream(gateway, exchange, answer, request, outcome, deadline)
        elif answer.rest is not None:
            # A backend that always streams (ChatGPT) answering a client that did not ask to.
            scanner = StreamScanner()
            final = await collect_stream(
                gateway, answer, outcome, scanner, request.document, deadline
            )
            await exchange.send_json(200, final)
            await estimate_unbilled(gateway, outcome, request.document, scanner)
        elif answer.response.status == 200:
            document = await _relay_json(exchange, answer, outcome)
            await estimate_unbilled_answer(gateway, outcome, request.document, document)
        else:
            await _relay_client_error(exchange, answer, outcome)
    except UpstreamError as exc:
        _record_failure(outcome, exc)
        raise
    finally:
        answer.close()


async def send_upstream(
    gateway: Gateway,
    exchange: Exchange,
    key: KeyRecord,
    request: ResponsesRequest,
    outcome: Outcome,
    deadline: float,
    endpoint: str = RESPONSES,
) -> Answer:
    """The router's first good answer, with every attempt and the timings on the outcome."""
    attempts: list[Attempt] = []
    outcome.overhead_ms = (time.perf_counter() - outcome.started) * 1000
    call = Call(
        endpoint, request.body, request.document, exchange.headers, key.id, exchange.request_id
    )
    try:
        answer = await gateway.router.send(
            call,
            conversation_key(key.id, request.document, exchange.headers),
            attempts,
            deadline,
        )
    except UpstreamError as exc:
        _record_failure(outcome, exc)
        raise
    finally:
        outcome.attempts = [attempt.as_dict() for attempt in attempts]
        outcome.account_id = attempts[-1].account_id if attempts else None
    outcome.ttfb_ms = (time.perf_counter() - outcome.started) * 1000
    return answer


async def chunks_of(answer: Answer, deadline: float) -> AsyncIterator[bytes]:
    """The answer's body as it comes; a read after `deadline` (the request's total time
    limit) raises `total_timeout`, as a stream relayed as it comes does (`_pump`)."""
    yield answer.first
    if answer.rest is not None:
        async for chunk in answer.rest:
            yield chunk
            if time.monotonic() > deadline:
                raise total_timeout()


async def collect_stream(
    gateway: Gateway,
    answer: Answer,
    outcome: Outcome,
    scanner: StreamScanner,
    request: dict[str, Any],
    deadline: float,
) -> dict[str, Any]:
    """Read a whole upstream stream, within the request's total time limit (`deadline`), bill
    it, and give the final response object it built.

    A stream that breaks, or ends, before its final event leaves no response to give, and
    the client gets an error; the upstream did the work all the same, so the row is billed
    the gateway's estimate of what it sent, flagged as that stream relayed as it came would
    be. One that breaks after its final event is whole.
    """
    chunks: list[bytes] = []
    failure: UpstreamError | None = None
    try:
        async for chunk in chunks_of(answer, deadline):
            chunks.append(chunk)
    except UpstreamError as exc:
        failure = exc
    body = b"".join(chunks)
    scanner.feed(body)
    scanner.finish()
    take_terminal(gateway, answer, scanner, outcome)
    if scanner.terminal is None:
        outcome.flag("no_terminal_event" if failure is None else "stream_interrupted")
        await estimate_unbilled(gateway, outcome, request, scanner)
    if failure is not None:
        if scanner.terminal is None:
            raise failure
        outcome.flag(failure.kind)
    return assemble_response(body, answer.secrets)


def _record_failure(outcome: Outcome, error: UpstreamError) -> None:
    outcome.status = "upstream_error"
    outcome.http_status = error.status
    outcome.error = outcome.error or error.detail or error.message
    outcome.flag(error.kind)
    log.warning(
        "upstream failed: %s (%s)",
        error.message,
        error.detail or error.kind,
        extra={"request_id": outcome.request_id, "account_id": outcome.account_id},
    )


async def _relay_stream(
    gateway: Gateway,
    exchange: Exchange,
    answer: Answer,
    request: ResponsesRequest,
    outcome: Outcome,
    deadline: float,
) -> None:
    """Relay chunk by chunk; never retry once bytes left, and never end a stream silently."""
    scanner = StreamScanner()
    rewrite = partial(redact_event, known=answer.secrets)
    await exchange.start(200, list(_STREAM_HEADERS))
    stop_later: list[asyncio.TimerHandle] = []
    exchange.watch_disconnect(lambda: _on_disconnect(gateway, answer, stop_later))
    failure: UpstreamError | None = None
    cut = False
    try:
        await _pump(exchange, answer, scanner, rewrite, deadline)
    except UpstreamError as exc:
        failure = exc
    except asyncio.CancelledError:
        cut = True  # by a shutdown; the task stays cancelling, which settlement reads
    finally:
        for handle in stop_later:
            handle.cancel()
    # What came but was not relayed yet still counts: its final event may carry the usage.
    # The chunk whose send was cut was scanned already; what is still buffered was not.
    tail = b""
    if cut:
        buffered = answer.response.buffered()
        scanner.feed(buffered)
        if scanner.rewriting:
            buffered = scanner.release(buffered, rewrite)
        tail = exchange.unsent + buffered
    # An event that may report a failure, held back and never finished: redacted all the same.
    tail += scanner.release_rest(rewrite)
    take_terminal(gateway, answer, scanner, outcome)
    if failure is not None and scanner.terminal is not None:
        # The final event arrived before the connection broke: the response is whole.
        outcome.flag(failure.kind)
        failure = None
    # The event the stream stopped inside, if it did, ends before the gateway's own.
    closing = scanner.closing()
    if cut:
        shutdown = closing + error_event(SHUTDOWN_CODE, SHUTDOWN_MESSAGE)
        await end_cut_stream(exchange, outcome, scanner, shutdown, tail)
    elif exchange.disconnected:
        client_left(outcome, whole=scanner.terminal is not None, failure=failure)
    elif failure is not None:
        _record_failure(outcome, failure)
        outcome.flag("stream_interrupted")
        last = error_event(failure.code or "upstream_error", failure.message)
        await exchange.write(tail + closing + last, False)
    elif scanner.terminal is None:
        outcome.status = "no_terminal_event"
        outcome.error = MISSING_TERMINAL_MESSAGE
        outcome.flag("no_terminal_event")
        last = error_event("stream_incomplete", MISSING_TERMINAL_MESSAGE)
        await exchange.write(tail + closing + last, False)
    else:
        await exchange.write(tail, more=False)
    await estimate_unbilled(gateway, outcome, request.document, scanner)


async def estimate_unbilled(
    gateway: Gateway, outcome: Outcome, request: dict[str, Any], scanner: StreamScanner
) -> None:
    """The gateway's own count of a stream that ended without its final event, or whose
    final event served the answer without usage it can bill; none for a request a shutdown
    cut, which costs what the upstream reported. Made once: a chat answer that tells its
    client the billed counts has it made before its last lines are sent."""
    if outcome.estimate is not None:
        return
    if scanner.terminal is not None and not outcome.served_without_usage():
        return  # billed on the upstream's usage
    if cut_by_shutdown():
        return
    if scanner.terminal is None:
        _hold_what_it_sent(gateway, outcome, scanner)
    if scanner.terminal is None or outcome.served_without_usage():
        await _estimate(outcome, lambda: gateway.tokens.estimate(request, scanner.deltas))


def _hold_what_it_sent(gateway: Gateway, outcome: Outcome, scanner: StreamScanner) -> None:
    """Lower the holds of a stream that ended without its final event, billed wholly on the
    gateway's own count, to what that count can come to: the input the hold was made for, and
    a token for each byte of the delta events the stream sent (a token is at least a byte).
    Counting may first wait for the vocabulary to load, seconds in a process's first such
    stream; meanwhile the request does not keep its largest output set aside, which a run of
    such streams would pile up until requests the balance covers were refused."""
    sent = sum(len(delta) for delta in scanner.deltas)
    price = billed_price(outcome, gateway.catalog.prices)
    most = cost_at_most(price, outcome.held_input_tokens, sent)
    held = gateway.admission.hold_at_most(
        outcome.user_id, outcome.key_id, Hold(outcome.hold, outcome.key_hold), most
    )
    outcome.hold, outcome.key_hold = held.user, held.key


async def estimate_unbilled_answer(
    gateway: Gateway, outcome: Outcome, request: dict[str, Any], answer: dict[str, Any]
) -> None:
    """The gateway's own count of a JSON answer that says it was served (its own `status`
    completed or incomplete) without usage it can bill; made once, as above."""
    if outcome.estimate is not None:
        return
    if answer.get("status") in SERVED_STATUSES and outcome.served_without_usage():
        await _estimate(outcome, lambda: gateway.tokens.estimate_answer(request, answer))


async def _estimate(outcome: Outcome, count: Callable[[], dict[str, Any]]) -> None:
    """Make the gateway's own count off the event loop. One that raises is a gateway bug the
    client does not pay for with its answer: logged, the row flagged `estimate_failed` and
    billed what the upstream reported, and not tried again for the same request."""
    if FLAG_ESTIMATE_FAILED in outcome.flags:
        return
    try:
        outcome.estimate = await asyncio.to_thread(count)
    except Exception:
        outcome.flag(FLAG_ESTIMATE_FAILED)
        log.exception(
            "the gateway's estimate of the request's usage failed",
            extra={"request_id": outcome.request_id, "account_id": outcome.account_id},
        )


async def refuse_cut(exchange: Exchange, outcome: Outcome) -> None:
    """Answer a request that a shutdown cancelled before its answer began (still waiting for
    the upstream, or gathering a stream into one JSON answer): a 503 saying so, and one log
    line instead of the server's traceback."""
    outcome.error = "The gateway shut down before the request's answer began."
    await refuse_unanswered(exchange, outcome.account_id)


async def refuse_unanswered(exchange: Exchange, account_id: int | None = None) -> None:
    """The 503 for a request a shutdown cut before its answer began, and its log line."""
    error = ShuttingDown(SHUTDOWN_REFUSAL)
    log.warning(
        "request cut by the shutdown before its answer began",
        extra={"request_id": exchange.request_id, "account_id": account_id},
    )
    await _last_words(exchange.send_json(error.status, error.body()))


async def end_cut_stream(
    exchange: Exchange, outcome: Outcome, scanner: StreamScanner, last: bytes, tail: bytes
) -> None:
    """Close a stream that a shutdown cancelled, saying so to the client, in one log line.

    The cancellation is handled here rather than left to the server, which would log a
    traceback per stream and close the connection mid-chunk. `tail` (what came from the
    upstream but was not relayed yet) goes first; a stream whose final event had come is
    whole and ends there. A cut stream is billed at the usage the upstream reported, so no
    estimate is made for it.
    """
    whole = scanner.terminal is not None
    if not whole:
        outcome.error = "The gateway shut down before the upstream finished the stream."
        log.warning(
            "stream cut by the shutdown before the upstream finished it",
            extra={"request_id": outcome.request_id, "account_id": outcome.account_id},
        )
    if exchange.disconnected:
        client_left(outcome, whole)
        return
    await _last_words(exchange.write(tail if whole else tail + last, more=False))


async def _last_words(sending: Awaitable[None]) -> None:
    """What a request cut by the shutdown still sends, within CUT_WRITE_SECONDS."""
    try:
        async with asyncio.timeout(CUT_WRITE_SECONDS):
            await sending
    except TimeoutError:
        pass  # a client that reads nothing more loses the connection with the process


async def _pump(
    exchange: Exchange,
    answer: Answer,
    scanner: StreamScanner,
    rewrite: Callable[[bytes], bytes],
    deadline: float,
) -> None:
    """Relay each chunk as it came, unless the scanner says it holds (or has begun) an event
    that reports a failure: then what it releases, that event passed through `rewrite` once
    it is whole. What it still holds when the stream ends is the caller's (`release_rest`)."""
    assert answer.rest is not None
    first = answer.first
    scanner.feed(first)
    if scanner.rewriting:
        first = scanner.release(first, rewrite)
    if not exchange.disconnected:
        await exchange.write(first)
    async for chunk in answer.rest:
        scanner.feed(chunk)
        if scanner.rewriting:
            chunk = scanner.release(chunk, rewrite)
        if not exchange.disconnected:
            await exchange.write(chunk)
        if time.monotonic() > deadline:
            raise total_timeout()
    scanner.finish()


def _on_disconnect(gateway: Gateway, answer: Answer, stop_later: list[asyncio.TimerHandle]) -> None:
    """`cancel` drops the upstream now; `finish` lets it run to its end, within a limit."""
    settings = gateway.settings
    if settings.disconnect_policy == "cancel":
        answer.response.close()
        return
    loop = asyncio.get_running_loop()
    stop_later.append(loop.call_later(settings.disconnect_finish_seconds, answer.response.close))


def client_left(outcome: Outcome, whole: bool, failure: UpstreamError | None = None) -> None:
    """Mark a request whose client left mid-stream; `whole` says whether the upstream's
    answer had reached its final event, which leaves the answer's own status standing.
    The upstream is read on after the client left, to bill what it did; when the request's
    total time limit ended that reading (`failure`), the row says so, as it does for a client
    still there. Other failures after the client left may be the gateway's own closing of
    the upstream (the disconnect policy), which says nothing about the upstream."""
    outcome.flag(FLAG_CLIENT_DISCONNECTED)
    if whole:
        return
    outcome.status = "client_disconnected"
    outcome.error = "The client disconnected before the response ended."
    if failure is not None and failure.kind == TOTAL_TIMEOUT_KIND:
        outcome.flag(TOTAL_TIMEOUT_KIND)
        outcome.error += " The upstream was then read until the total time limit ended it."


def take_terminal(
    gateway: Gateway, answer: Answer, scanner: StreamScanner, outcome: Outcome
) -> None:
    """What the stream's terminal event says: status, usage, model, id. The ChatGPT backend's
    `codex.rate_limits` event updates the account's windows, and a usage wall inside the
    stream (its `error` event) rests the account until its reset."""
    windows = quota_from_event(scanner.rate_limits)
    gateway.quotas.reported(answer.account, windows, served=scanner.terminal_type != "error")
    if scanner.terminal_type == "error":
        gateway.quotas.limit_reached(answer.account, scanner.terminal)
    _read_terminal(scanner, outcome, answer.secrets)


def _read_terminal(scanner: StreamScanner, outcome: Outcome, known: Sequence[str]) -> None:
    outcome.upstream_model = upstream_model_of(scanner.created)
    outcome.response_id = response_id_of(scanner.created)
    terminal = scanner.terminal
    if terminal is None:
        return
    if outcome.status != "upstream_error":
        outcome.status = TERMINAL_STATUS.get(scanner.terminal_type or "", "completed")
    if scanner.terminal_type in ("response.failed", "error"):
        outcome.error = _error_message(terminal, known)
    usage = usage_from_terminal(terminal)
    outcome.usage = usage
    outcome.usage_reported = usage is not None
    outcome.upstream_model = upstream_model_of(terminal) or outcome.upstream_model
    outcome.response_id = response_id_of(terminal) or outcome.response_id


def _error_message(terminal: dict[str, object], known: Sequence[str]) -> str:
    response = terminal.get("response")
    error = response.get("error") if isinstance(response, dict) else terminal.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return _reason(code, error.get("message"), known)
    return _reason(terminal.get("code"), terminal.get("message"), known)


def _reason(code: object, message: object, known: Sequence[str]) -> str:
    """`code: message`, less what the upstream left out, less its secrets."""
    said = ": ".join(str(part) for part in (code, message) if part is not None)
    return redact_text(said or "The upstream gave no reason for the failure.", known)


async def _relay_json(exchange: Exchange, answer: Answer, outcome: Outcome) -> dict[str, Any]:
    """Send a JSON answer as it came, less any credential a failed one quotes, with what it
    says read onto the outcome; the answer parsed."""
    document = read_json_answer(answer.first, outcome, answer.secrets)
    body = answer.first
    if outcome.status == "failed":
        body = redact_body(body, answer.secrets)
    await _send_body(exchange, 200, answer, body)
    return document


def read_json_answer(body: bytes, outcome: Outcome, known: Sequence[str]) -> dict[str, Any]:
    """A response object the upstream sent whole, with its usage, model, id, status and, when
    it failed, its error read onto the outcome (less the `known` secrets and any other)."""
    document = upstream_json(body)
    if not isinstance(document, dict):
        outcome.flag("upstream_body_not_json")
        text = body[:200].decode("utf-8", "replace")
        raise UpstreamProtocolError(
            "The upstream answered with a body that is not a JSON response.",
            detail=f"HTTP 200 body: {redact_text(text, known)}",
        )
    usage = document.get("usage")
    outcome.usage = usage
    outcome.usage_reported = usage is not None
    outcome.upstream_model = upstream_model_of(document)
    outcome.response_id = response_id_of(document)
    outcome.status = _JSON_STATUS.get(str(document.get("status")), "completed")
    if outcome.status == "failed":
        outcome.error = _error_message(document, known)
    return document


async def _relay_client_error(exchange: Exchange, answer: Answer, outcome: Outcome) -> None:
    """An upstream 4xx about the request itself: the client sees it as it came, less any
    credential it quotes (`redact_body`), and so does the usage row."""
    status = answer.response.status
    body = redact_body(answer.first, answer.secrets)
    outcome.status = "upstream_error"
    outcome.error = f"HTTP {status}: {body[:500].decode('utf-8', 'replace')}"
    outcome.flag(f"upstream_http_{status}")
    await _send_body(exchange, status, answer, body)


async def _send_body(exchange: Exchange, status: int, answer: Answer, body: bytes) -> None:
    content_type = answer.response.headers.get("content-type", "application/json")
    await exchange.send_body(status, body, content_type.encode("latin-1"))
