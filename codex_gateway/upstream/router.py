"""Failover: try the pool's accounts in turn until one answers, before the client sees a byte.

An attempt fails on a connection error, a timeout, 401/403 (the account is marked as needing
re-login, unless its kind can renew the credential: a ChatGPT account refreshes its token and
is tried once more), 429 (the account rests until the reset time the upstream gives) or 5xx,
a credential that cannot be had (a refused token refresh needs re-login), and also
on a stream that ends or sends something other than SSE before its first event. A failed
attempt moves the request to the next account, up to `upstream_max_attempts`. Other 4xx
answers are the client's to see and are not retried. Once the first chunk is handed back,
nothing is retried: the caller relays it and owns whatever happens next. When every account
able to serve is behind a usage wall, the client gets a 429 `usage_limit_reached` naming the
earliest reset, as the ChatGPT backend words it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from codex_gateway.config import Settings
from codex_gateway.errors import (
    DeadlinePassed,
    NoAccountAvailable,
    TokenRefreshError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    UsageLimitReached,
)
from codex_gateway.store.queries import AccountRecord
from codex_gateway.upstream.client import UpstreamClient, UpstreamResponse
from codex_gateway.upstream.kinds import AccountKind, Call, Outgoing
from codex_gateway.upstream.pool import AccountPool, Lease, quota_reset
from codex_gateway.upstream.quota import QuotaBook
from codex_gateway.upstream.stickiness import Stickiness

log = logging.getLogger(__name__)
# The kind of the error of a request that ran past `upstream_total_timeout`.
TOTAL_TIMEOUT_KIND = "timeout_total"

# What an SSE stream may start with: a field name or a comment.
_SSE_STARTS = (b"event:", b"data:", b":", b"id:", b"retry:")
# How many bytes of blank lines and byte-order marks a stream may open with before its first
# field: beyond, it is no stream.
FIRST_BYTES_TO_TELL = 4096


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
    # What authenticated the request (`Outgoing.credential`).
    credential: str = field(default="", repr=False)

    @property
    def account(self) -> AccountRecord:
        return self.lease.account

    @property
    def secrets(self) -> tuple[str, str]:
        """What the upstream's error text may quote and no one is shown: the account's key
        and the credential the request was sent with."""
        return self.lease.account.api_key, self.credential

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
        kinds: Mapping[str, AccountKind],
        quotas: QuotaBook,
    ):
        self._client = client
        self.pool = pool
        self.stickiness = stickiness
        self._settings = settings
        self._observer = observer
        self._kinds = kinds
        self._quotas = quotas

    async def send(
        self,
        call: Call,
        conversation: str | None,
        attempts: list[Attempt],
        deadline: float,
    ) -> Answer:
        """The first good answer; raises one clear UpstreamError when every attempt failed."""
        preferred = await self.stickiness.get(conversation) if conversation else None
        tried: set[int] = set()
        last: UpstreamError | None = None
        for _ in range(self._settings.upstream_max_attempts):
            if last is not None and time.monotonic() >= deadline:
                break  # no time left to try another account, nor to hold it against one
            lease = self.pool.choose(tried, preferred)
            if lease is None:
                break
            account = lease.account
            tried.add(account.id)
            try:
                answer = await self._try_account(lease, call, attempts, deadline)
            except UpstreamError as exc:
                lease.release()
                self._judge(account, exc)
                last = exc
                continue
            self.pool.succeeded(account)
            if conversation is not None and account.id != preferred:
                await self.stickiness.put(conversation, account.id)
            return answer
        raise self._give_up(last, len(tried))

    async def _try_account(
        self, lease: Lease, call: Call, attempts: list[Attempt], deadline: float
    ) -> Answer:
        """Try one account; a 401 that its kind answers by renewing the credential (a ChatGPT
        account's token refresh) earns the same account one more try."""
        account = lease.account
        kind = self._kinds[account.kind]
        for renewed in (False, True):
            started = time.perf_counter()
            try:
                outgoing = await kind.prepare(account, call)
                answer = await self._attempt(lease, outgoing, deadline)
            except UpstreamError as exc:
                attempts.append(Attempt(account.name, "failed", exc.kind, _ms(started), account.id))
                self._refused(account, exc)
                if renewed or not _unauthorized(exc) or not await kind.renew(account, outgoing):
                    raise
                continue
            except asyncio.CancelledError:
                # Cut by a shutdown: the row still names the account the request waited for.
                attempts.append(Attempt(account.name, "cancelled", None, _ms(started), account.id))
                raise
            attempts.append(Attempt(account.name, "ok", None, _ms(started), account.id))
            headers = answer.response.headers
            self._observer.upstream_answered(account.name, headers)
            self._quotas.answered(account, answer.response.status, headers)
            return answer
        raise AssertionError("unreachable: the second try returns or raises")

    def _refused(self, account: AccountRecord, error: UpstreamError) -> None:
        if isinstance(error, RefusedByUpstream):
            self._observer.upstream_answered(account.name, error.headers)
            self._quotas.answered(account, error.upstream_status, error.headers)
        self._observer.upstream_failed(account.name, error.kind)

    async def _attempt(self, lease: Lease, outgoing: Outgoing, deadline: float) -> Answer:
        """One try: the first-byte timeout covers the answer's head and a stream's first
        chunk; a whole JSON body, written only once the work is done, has until the deadline.
        The upstream client keeps both limits on the connection's read timer and reports one
        that passed as `DeadlinePassed`, worded here as the limit it was."""
        first_byte = self._settings.upstream_first_byte_timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise total_timeout()
        waiting_for_first_byte = remaining > first_byte
        try:
            response = await self._client.post(
                outgoing.url, outgoing.headers, outgoing.body, min(first_byte, remaining)
            )
            try:
                if response.status == 200 and response.content_type == "text/event-stream":
                    answer = await _first_of_stream(lease, response, outgoing.credential)
                    # The rest of a stream is timed by the relay (`upstream_total_timeout`)
                    # and the read timeout.
                    response.limit(math.inf)
                    return answer
                if not response.complete:  # a body that came with its head needs no time
                    response.limit(deadline - time.monotonic())
                waiting_for_first_byte = False
                return await _whole(lease, response, outgoing.credential)
            except BaseException:
                response.close()
                raise
        except DeadlinePassed:
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
        if error.kind == TOTAL_TIMEOUT_KIND:
            return  # the request ran out of its own time: that says nothing of the account
        settings = self._settings
        if isinstance(error, TokenRefreshError) and error.permanent:
            self.pool.needs_relogin(account, error.reason or error.message)
            return
        if not isinstance(error, RefusedByUpstream):
            self.pool.failed(account, error.message, settings.upstream_failure_cooldown_seconds)
            return
        status = error.upstream_status
        if status in (401, 403):
            self.pool.needs_relogin(
                account, f"the upstream refused its credentials (HTTP {status})"
            )
        elif status == 429 and self._quotas.limit_reached(account, _json(error.upstream_body)):
            return  # a usage wall: the quota book has marked the account until its reset
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
        resets = self.pool.usage_limit_reset()
        if resets is not None:
            return usage_limit_reached(resets, time.time())
        if last is None:
            return NoAccountAvailable(self.pool.why_none(set()))
        message = (
            f"No upstream account could serve this request ({tried} tried); "
            f"the last one failed: {last.message}"
        )
        if isinstance(last, RefusedByUpstream | TokenRefreshError):
            return UpstreamStatusError(message, code=last.code, kind=last.kind)
        return type(last)(message, code=last.code, kind=last.kind, detail=last.detail)


async def _first_of_stream(lease: Lease, response: UpstreamResponse, credential: str) -> Answer:
    rest = response.chunks()
    first = await _first_chunk(rest)
    return Answer(lease, response, first, rest, credential)


async def _whole(lease: Lease, response: UpstreamResponse, credential: str) -> Answer:
    """A whole body; statuses that are about the account raise so the next one is tried."""
    status = response.status
    body = await response.read()
    if status in (401, 403, 429) or status >= 500:
        response.release()
        raise RefusedByUpstream(_status_message(status), status, response.headers, body)
    return Answer(lease, response, body, None, credential)


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    """The stream's first bytes, once they show it is one: a read too short to tell (`ev`, a
    byte-order mark, a blank line) is joined by the next ones until they do, up to
    FIRST_BYTES_TO_TELL."""
    first = b""
    async for chunk in chunks:
        first += chunk
        start = first.lstrip(b"\xef\xbb\xbf\r\n ")
        if start.startswith(_SSE_STARTS):
            return first
        if len(first) > FIRST_BYTES_TO_TELL or not any(
            field.startswith(start) for field in _SSE_STARTS
        ):
            raise UpstreamProtocolError(
                "The upstream answered with bytes that are not a server-sent event stream.",
                kind="garbage",
            )
    raise UpstreamProtocolError(
        "The upstream ended its stream before sending any event.", kind="empty_stream"
    )


def _unauthorized(error: UpstreamError) -> bool:
    return isinstance(error, RefusedByUpstream) and error.upstream_status == 401


def _status_message(status: int) -> str:
    if status in (401, 403):
        return "The upstream refused the account's credentials; the operator has to fix it."
    if status == 429:
        return "The upstream account is rate limited or out of quota; retry later."
    return f"The upstream failed with HTTP {status}; retry later."


def usage_limit_reached(resets: float, now: float) -> UsageLimitReached:
    """The answer when every account is at its usage limit, naming the earliest reset."""
    seconds = max(math.ceil(resets - now), 1)
    moment = datetime.fromtimestamp(resets, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return UsageLimitReached(
        "Every upstream account that can serve this request has reached its usage limit; "
        f"the first one resets at {moment} (in {_duration(seconds)}). Try again then.",
        resets_at=math.ceil(resets),
        resets_in_seconds=seconds,
    )


def _duration(seconds: int) -> str:
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    if hours == 0:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def total_timeout() -> UpstreamTimeout:
    return UpstreamTimeout(
        "The request took longer than the gateway's total time limit.", kind=TOTAL_TIMEOUT_KIND
    )


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
