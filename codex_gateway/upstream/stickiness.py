"""Keep a conversation on one upstream account so the upstream's prompt cache keeps hitting.

A conversation is the `prompt_cache_key` of the body (or the `session-id` header) under one
gateway key. Its binding to an account lives for a TTL that each use renews. Bindings are held
in this process's memory, or in Redis when `CODEX_GATEWAY_REDIS_URL` is set so that every
gateway process agrees. A Redis that cannot be reached costs stickiness, never the request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger(__name__)

SESSION_HEADERS = ("session-id", "session_id")


def conversation_key(
    key_id: int, document: Mapping[str, Any], headers: Mapping[str, str]
) -> str | None:
    """The binding's name for this request, or None when the request names no conversation."""
    cache_key = document.get("prompt_cache_key")
    if not isinstance(cache_key, str) or not cache_key:
        cache_key = next((headers[name] for name in SESSION_HEADERS if headers.get(name)), None)
    if cache_key is None:
        return None
    digest = hashlib.sha256(cache_key.encode("utf-8")).hexdigest()[:32]
    return f"{key_id}:{digest}"


class Stickiness(Protocol):
    async def get(self, conversation: str) -> int | None: ...

    async def put(self, conversation: str, account_id: int) -> None: ...

    async def close(self) -> None: ...


class MemoryStickiness:
    """Bindings in this process, oldest dropped first beyond `max_entries`."""

    def __init__(self, ttl: float, max_entries: int = 100_000):
        self._ttl = ttl
        self._max = max_entries
        self._bindings: OrderedDict[str, tuple[int, float]] = OrderedDict()

    async def get(self, conversation: str) -> int | None:
        found = self._bindings.get(conversation)
        if found is None:
            return None
        account_id, expires = found
        now = time.monotonic()
        if expires <= now:
            del self._bindings[conversation]
            return None
        self._bindings[conversation] = (account_id, now + self._ttl)
        self._bindings.move_to_end(conversation)
        return account_id

    async def put(self, conversation: str, account_id: int) -> None:
        self._bindings[conversation] = (account_id, time.monotonic() + self._ttl)
        self._bindings.move_to_end(conversation)
        while len(self._bindings) > self._max:
            self._bindings.popitem(last=False)

    async def close(self) -> None:
        self._bindings.clear()


class RedisStickiness:
    """Bindings shared by every process that uses the same Redis and prefix."""

    def __init__(self, url: str, prefix: str, ttl: float):
        # Imported here: a gateway without Redis never loads the client (about 6 MB).
        import redis.asyncio
        from redis.exceptions import RedisError

        self._redis: redis.asyncio.Redis = redis.asyncio.Redis.from_url(url, socket_timeout=1.0)
        self._errors = (RedisError, OSError)
        self._prefix = prefix + ":sticky:"
        self._ttl = max(int(ttl), 1)

    async def get(self, conversation: str) -> int | None:
        try:
            value = await self._redis.getex(self._prefix + conversation, ex=self._ttl)
        except self._errors as exc:
            log.warning("stickiness lookup failed, choosing freely: %s", exc)
            return None
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            return None

    async def put(self, conversation: str, account_id: int) -> None:
        try:
            await self._redis.set(self._prefix + conversation, account_id, ex=self._ttl)
        except self._errors as exc:
            log.warning("could not store a stickiness binding: %s", exc)

    async def close(self) -> None:
        await self._redis.aclose()


def build_stickiness(redis_url: str, prefix: str, ttl: float) -> Stickiness:
    if redis_url:
        return RedisStickiness(redis_url, prefix, ttl)
    return MemoryStickiness(ttl)
