"""POST /v1/responses: admit, relay to an upstream account, and settle the bill.

The upstream's stream is forwarded chunk by chunk as it arrives; the scanner only watches it
for the terminal event. The usage row is written after the client has the last byte.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

import orjson

from codex_gateway.billing.admission import estimate_hold
from codex_gateway.billing.pricing import Price
from codex_gateway.billing.settlement import Outcome
from codex_gateway.errors import (
    AuthenticationError,
    ModelNotFound,
    NoAccountAvailable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
)
from codex_gateway.http.exchange import Exchange
from codex_gateway.relay.shaping import ResponsesRequest, parse_responses_request
from codex_gateway.relay.sse import StreamScanner, error_event
from codex_gateway.relay.usage import response_id_of, upstream_model_of, usage_from_terminal
from codex_gateway.store.queries import AccountRecord, KeyRecord, hash_key
from codex_gateway.upstream.client import UpstreamResponse

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

log = logging.getLogger(__name__)

# Client headers that describe the client's own connection or credentials, never forwarded.
_DROPPED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "authorization",
        "api-key",
        "x-api-key",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "accept-encoding",
        "cookie",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "proxy-authorization",
        "cf-connecting-ip",
        "true-client-ip",
        "x-client-ip",
        "via",
        "origin",
        "referer",
        "openai-organization",
        "openai-project",
    }
)
_TERMINAL_STATUS = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
    "error": "error",
}
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_STATUS = {"completed": "completed", "incomplete": "incomplete", "failed": "failed"}
MAX_UPSTREAM_BODY = 64 * 1024 * 1024
MISSING_TERMINAL_MESSAGE = (
    "The upstream stream ended before its final event, so this response is incomplete."
)


async def authenticate(gateway: Gateway, exchange: Exchange) -> KeyRecord:
    raw = _bearer(exchange)
    record = await gateway.catalog.key(hash_key(raw))
    if record is None:
        raise AuthenticationError(
            "Incorrect API key provided. Check the key, or ask the gateway operator for a new one."
        )
    exchange.key_display = record.display
    return record


def _bearer(exchange: Exchange) -> str:
    header = exchange.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = exchange.headers.get("api-key") or exchange.headers.get("x-api-key")
    if api_key:
        return api_key.strip()
    raise AuthenticationError(
        "You didn't provide an API key. Send it in the Authorization header as 'Bearer KEY'."
    )


def price_of(gateway: Gateway, request: ResponsesRequest) -> Price:
    price = gateway.catalog.prices.resolve(request.model)
    if price is None:
        raise ModelNotFound(
            f"The model `{request.model}` does not exist or has no price on this gateway.",
            param="model",
        )
    return price


async def hold(
    gateway: Gateway, key: KeyRecord, request: ResponsesRequest, price: Price
) -> Decimal:
    """Hold the request's largest possible cost against the user's balance."""
    estimate = estimate_hold(
        price,
        len(request.body),
        request.document.get("max_output_tokens"),
        gateway.settings.hold_output_tokens,
    )
    await gateway.admission.admit(key.user_id, estimate)
    return estimate


def choose_account(gateway: Gateway) -> AccountRecord:
    accounts = gateway.catalog.usable_accounts()
    if not accounts:
        raise NoAccountAvailable("No upstream account is available to serve this request.")
    return accounts[0]


def upstream_headers(exchange: Exchange, account: AccountRecord) -> dict[str, str]:
    headers = {
        name: value for name, value in exchange.headers.items() if name not in _DROPPED_HEADERS
    }
    headers["authorization"] = "Bearer " + account.api_key
    headers["content-type"] = "application/json"
    return headers


async def relay_responses(gateway: Gateway, exchange: Exchange) -> None:
    key = await authenticate(gateway, exchange)
    request = parse_responses_request(await exchange.body(gateway.settings.max_body_bytes))
    exchange.model = request.model
    price = price_of(gateway, request)
    account = choose_account(gateway)
    held = await hold(gateway, key, request, price)
    outcome = Outcome(
        request_id=exchange.request_id,
        started_at=datetime.now(UTC),
        started=exchange.started,
        endpoint="responses",
        model=request.model,
        stream=request.stream,
        price=price,
        user_id=key.user_id,
        key_id=key.id,
        account_id=account.id,
        hold=held,
    )
    if request.converted_messages:
        outcome.flag("messages_converted")
    try:
        await _relay(gateway, exchange, account, request, outcome)
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


async def _relay(
    gateway: Gateway,
    exchange: Exchange,
    account: AccountRecord,
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
        elif upstream.content_type == "text/event-stream":
            await _relay_stream(exchange, upstream, outcome)
        else:
            await _relay_json(exchange, upstream, outcome)
    except UpstreamError as exc:
        _record_failure(outcome, exc)
        raise
    finally:
        upstream.release()


def _record_failure(outcome: Outcome, error: UpstreamError) -> None:
    outcome.status = "upstream_error"
    outcome.http_status = error.status
    outcome.error = outcome.error or error.detail or error.message
    outcome.flag(error.code or "upstream_error")
    log.warning(
        "upstream failed: %s (%s)",
        error.message,
        error.detail or error.code,
        extra={"request_id": outcome.request_id, "account_id": outcome.account_id},
    )


async def _relay_stream(exchange: Exchange, upstream: UpstreamResponse, outcome: Outcome) -> None:
    scanner = StreamScanner()
    await exchange.start(200, list(_STREAM_HEADERS))
    try:
        async for chunk in upstream.chunks():
            scanner.feed(chunk)
            await exchange.write(chunk)
    except UpstreamError as exc:
        if scanner.terminal is not None:
            # The response was already complete: the client has all of it, and so does the bill.
            outcome.flag("upstream_closed_uncleanly")
            _take_terminal(scanner, outcome)
            await exchange.write(b"", more=False)
            return
        _record_failure(outcome, exc)
        outcome.flag("stream_interrupted")
        await exchange.write(error_event(exc.code or "upstream_error", exc.message), more=False)
        _take_terminal(scanner, outcome)
        return
    scanner.finish()
    _take_terminal(scanner, outcome)
    if scanner.terminal is None:
        outcome.status = "no_terminal_event"
        outcome.error = MISSING_TERMINAL_MESSAGE
        outcome.flag("no_terminal_event")
        await exchange.write(error_event("stream_incomplete", MISSING_TERMINAL_MESSAGE), more=False)
        return
    await exchange.write(b"", more=False)


def _take_terminal(scanner: StreamScanner, outcome: Outcome) -> None:
    outcome.upstream_model = upstream_model_of(scanner.created)
    outcome.response_id = response_id_of(scanner.created)
    terminal = scanner.terminal
    if terminal is None:
        return
    if outcome.status != "upstream_error":
        outcome.status = _TERMINAL_STATUS.get(scanner.terminal_type or "", "completed")
    if scanner.terminal_type in ("response.failed", "error"):
        outcome.error = _error_message(terminal)
    usage = usage_from_terminal(terminal)
    outcome.usage = usage
    outcome.usage_reported = usage is not None
    outcome.upstream_model = upstream_model_of(terminal) or outcome.upstream_model
    outcome.response_id = response_id_of(terminal) or outcome.response_id


def _error_message(terminal: dict[str, object]) -> str:
    response = terminal.get("response")
    error = response.get("error") if isinstance(response, dict) else terminal.get("error")
    if isinstance(error, dict):
        return f"{error.get('code') or error.get('type')}: {error.get('message')}"
    return f"{terminal.get('code')}: {terminal.get('message')}"


async def _relay_json(exchange: Exchange, upstream: UpstreamResponse, outcome: Outcome) -> None:
    body = await upstream.read(MAX_UPSTREAM_BODY)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        outcome.flag("upstream_body_not_json")
        raise UpstreamProtocolError(
            "The upstream answered with a body that is not a JSON response.",
            detail=f"HTTP 200 body: {body[:200].decode('utf-8', 'replace')}",
        )
    usage = document.get("usage")
    outcome.usage = usage
    outcome.usage_reported = usage is not None
    outcome.upstream_model = upstream_model_of(document)
    outcome.response_id = response_id_of(document)
    outcome.status = _JSON_STATUS.get(str(document.get("status")), "completed")
    content_type = upstream.headers.get("content-type", "application/json").encode("latin-1")
    await exchange.start(
        200, [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    )
    await exchange.write(body, more=False)


async def _relay_error(exchange: Exchange, upstream: UpstreamResponse, outcome: Outcome) -> None:
    """Relay the upstream's client errors; hide the ones about the gateway's own account."""
    body = await upstream.read(MAX_UPSTREAM_BODY)
    outcome.status = "upstream_error"
    outcome.error = f"HTTP {upstream.status}: {body[:500].decode('utf-8', 'replace')}"
    outcome.flag(f"upstream_http_{upstream.status}")
    if upstream.status in (401, 403):
        raise UpstreamStatusError(
            "The upstream account was refused by the upstream; the operator has to fix it."
        )
    if upstream.status == 429:
        raise UpstreamStatusError(
            "The upstream account is rate limited or out of quota; retry later.",
            code="upstream_rate_limited",
        )
    if upstream.status >= 500:
        raise UpstreamStatusError(f"The upstream failed with HTTP {upstream.status}; retry later.")
    content_type = upstream.headers.get("content-type", "application/json").encode("latin-1")
    await exchange.start(
        upstream.status,
        [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
    )
    await exchange.write(body, more=False)
