"""Failover: try the pool's accounts in turn until one answers, before the client sees a byte.

An attempt fails on a connection error, a timeout, 401/403 (the account is marked as needing
re-login), 429 (the account rests until the reset time the upstream gives) or 5xx, and also
on a stream that ends or sends something other than SSE before its first event. A failed
attempt moves the request to the next account, up to `upstream_max_attempts`. Other 4xx
answers are the client's to see and are not retried. Once the first chunk is handed back,
nothing is retried: the caller relays it and owns whatever happens next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from codex_gateway.config import Settings
from codex_gateway.errors import (
    NoAccountAvailable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.client import UpstreamClient, UpstreamResponse
from codex_gateway.upstream.pool import AccountPool, Lease, quota_reset
from codex_gateway.upstream.stickiness import Stickiness

log = logging.getLogger(__name__)

# What an SSE stream may start with: a field name or a comment.
_SSE_STARTS = (b"event:", b"data:", b":", b"id:", b"retry:")


@dataclass
class Attempt:
    """One try at one account, as the usage row lists it."""

    account: str
    outcome: str
    error: str | None
    ms: float
    account_id: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "outcome": self.outcome,
            "error": self.error,
            "ms": round(self.ms, 1),
        }


@dataclass
class Answer:
    """The upstream answer to relay: a stream's first chunk and the rest, or a whole body."""

    lease: Lease
    response: UpstreamResponse
    first: bytes
    rest: AsyncIterator[bytes] | None

    @property
    def account(self) -> AccountRecord:
        return self.lease.account

    def close(self) -> None:
        self.lease.release()
        self.response.release()


class RefusedByUpstream(UpstreamStatusError):
    """An HTTP status that says the account, not the request, is the problem."""

    def __init__(self, message: str, status: int, headers: Mapping[str, str], body: bytes):
        code = "upstream_rate_limited" if status == 429 else None
        super().__init__(message, code=code, kind=f"http_{status}")
        self.upstream_status = status
        self.headers = headers
        self.upstream_body = body


class AttemptObserver(Protocol):
    """Told about every attempt: what each upstream answer announced, and each failure."""

    def upstream_answered(self, account: str, headers: Mapping[str, str]) -> None: ...

    def upstream_failed(self, account: str, kind: str) -> None: ...


class Router:
    def __init__(
        self,
        client: UpstreamClient,
        pool: AccountPool,
        stickiness: Stickiness,
        settings: Settings,
        observer: AttemptObserver,
    ):
        self._client = client
        self.pool = pool
        self.stickiness = stickiness
        self._settings = settings
        self._observer = observer

    async def send(
        self,
        path: str,
        body: bytes,
        headers_for: Callable[[AccountRecord], dict[str, str]],
        conversation: str | None,
        attempts: list[Attempt],
        deadline: float,
    ) -> Answer:
        """The first good answer; raises one clear UpstreamError when every attempt failed."""
        preferred = await self.stickiness.get(conversation) if conversation else None
        tried: set[int] = set()
        last: UpstreamError | None = None
        for _ in range(self._settings.upstream_max_attempts):
            lease = self.pool.choose(tried, preferred)
            if lease is None:
                break
            account = lease.account
            tried.add(account.id)
            started = time.perf_counter()
            try:
                answer = await self._attempt(lease, path, body, headers_for(account), deadline)
            except UpstreamError as exc:
                lease.release()
                attempts.append(Attempt(account.name, "failed", exc.kind, _ms(started), account.id))
                if isinstance(exc, RefusedByUpstream):
                    self._observer.upstream_answered(account.name, exc.headers)
                self._observer.upstream_failed(account.name, exc.kind)
                self._judge(account, exc)
                last = exc
                continue
            attempts.append(Attempt(account.name, "ok", None, _ms(started), account.id))
            self._observer.upstream_answered(account.name, answer.response.headers)
            self.pool.succeeded(account)
            if conversation is not None and account.id != preferred:
                await self.stickiness.put(conversation, account.id)
            return answer
        raise self._give_up(last, len(attempts))

    async def _attempt(
        self, lease: Lease, path: str, body: bytes, headers: dict[str, str], deadline: float
    ) -> Answer:
        """One try: the first-byte timeout covers the answer's head and a stream's first
        chunk; a whole JSON body, written only once the work is done, has until the deadline."""
        first_byte = self._settings.upstream_first_byte_timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise total_timeout()
        url = lease.account.base_url + path
        waiting_for_first_byte = remaining > first_byte
        try:
            async with asyncio.timeout(min(first_byte, remaining)) as limit:
                response = await self._client.post(url, headers, body)
                try:
                    if response.status == 200 and response.content_type == "text/event-stream":
                        return await _first_of_stream(lease, response)
                    waiting_for_first_byte = False
                    if not response.complete:  # a body that came with its head needs no time
                        loop = asyncio.get_running_loop()
                        limit.reschedule(loop.time() + deadline - time.monotonic())
                    return await _whole(lease, response)
                except BaseException:
                    response.close()
                    raise
        except TimeoutError:
            if not waiting_for_first_byte:
                raise total_timeout() from None
            raise UpstreamTimeout(
                f"The upstream sent nothing within the first-byte timeout ({first_byte:g} s).",
                kind="timeout_first_byte",
            ) from None

    def _judge(self, account: AccountRecord, error: UpstreamError) -> None:
        log.warning(
            "attempt at account %s failed: %s",
            account.name,
            error.kind,
            extra={"account": account.name},
        )
        settings = self._settings
        if not isinstance(error, RefusedByUpstream):
            self.pool.failed(account, error.message, settings.upstream_failure_cooldown_seconds)
            return
        status = error.upstream_status
        if status in (401, 403):
            self.pool.needs_relogin(
                account, f"the upstream refused its credentials (HTTP {status})"
            )
        elif status == 429:
            until = quota_reset(
                error.headers,
                _json(error.upstream_body),
                time.time(),
                settings.upstream_cooldown_seconds,
            )
            self.pool.quota_limited(
                account, "the upstream answered 429 (rate or quota limit)", until
            )
        else:
            self.pool.failed(
                account,
                f"the upstream answered HTTP {status}",
                settings.upstream_failure_cooldown_seconds,
            )

    def _give_up(self, last: UpstreamError | None, tried: int) -> UpstreamError:
        if last is None:
            return NoAccountAvailable(self.pool.why_none(set()))
        message = (
            f"No upstream account could serve this request ({tried} tried); "
            f"the last one failed: {last.message}"
        )
        if isinstance(last, RefusedByUpstream):
            return UpstreamStatusError(message, code=last.code, kind=last.kind)
        return type(last)(message, code=last.code, kind=last.kind, detail=last.detail)


async def _first_of_stream(lease: Lease, response: UpstreamResponse) -> Answer:
    rest = response.chunks()
    first = await _first_chunk(rest)
    return Answer(lease, response, first, rest)


async def _whole(lease: Lease, response: UpstreamResponse) -> Answer:
    """A whole body; statuses that are about the account raise so the next one is tried."""
    status = response.status
    body = await response.read()
    if status in (401, 403, 429) or status >= 500:
        response.release()
        raise RefusedByUpstream(_status_message(status), status, response.headers, body)
    return Answer(lease, response, body, None)


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        raise UpstreamProtocolError(
            "The upstream ended its stream before sending any event.", kind="empty_stream"
        ) from None
    if not first.lstrip(b"\xef\xbb\xbf\r\n ").startswith(_SSE_STARTS):
        raise UpstreamProtocolError(
            "The upstream answered with bytes that are not a server-sent event stream.",
            kind="garbage",
        )
    return first


def _status_message(status: int) -> str:
    if status in (401, 403):
        return "The upstream refused the account's credentials; the operator has to fix it."
    if status == 429:
        return "The upstream account is rate limited or out of quota; retry later."
    return f"The upstream failed with HTTP {status}; retry later."


def total_timeout() -> UpstreamTimeout:
    return UpstreamTimeout(
        "The request took longer than the gateway's total time limit.", kind="timeout_total"
    )


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
