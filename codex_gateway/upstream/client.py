"""The one long-lived HTTP client every upstream call goes through.

The relay sees only `UpstreamClient.post` and `UpstreamResponse`, so the implementation
underneath can be swapped when the benchmark says so. Client library exceptions are turned
into the gateway's own upstream errors here and nowhere else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp

from codex_gateway.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout


class UpstreamResponse:
    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, without waiting to fill a buffer."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout(
                "The upstream stopped sending before the response ended."
            ) from None
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamProtocolError(
                "The upstream response was cut off before it ended.", detail=_describe(exc)
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(
                "The connection to the upstream failed.", detail=_describe(exc)
            ) from None

    async def read(self, limit: int) -> bytes:
        """The whole body, refusing one larger than `limit` bytes."""
        parts = bytearray()
        async for chunk in self.chunks():
            parts += chunk
            if len(parts) > limit:
                raise UpstreamProtocolError(
                    "The upstream response body is larger than the gateway accepts.",
                    detail=f"more than {limit} bytes",
                )
        return bytes(parts)

    def release(self) -> None:
        self._response.release()


class UpstreamClient:
    def __init__(self, *, connect_timeout: float, read_timeout: float, pool_size: int):
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._connect_timeout,
                    sock_read=self._read_timeout,
                ),
                skip_auto_headers=("User-Agent",),
                trust_env=False,
            )
        return self._session

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        try:
            response = await self._get_session().post(
                url, data=body, headers=headers, allow_redirects=False
            )
        except TimeoutError:
            raise UpstreamTimeout("The upstream did not answer in time.") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(
                "Could not connect to the upstream.", detail=str(exc.os_error)
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(
                "The request to the upstream failed.", detail=_describe(exc)
            ) from None
        return UpstreamResponse(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(error: aiohttp.ClientError) -> str:
    """The error's class and message only: its repr carries the request's headers, and so the
    upstream credentials."""
    return f"{type(error).__name__}: {error}"
