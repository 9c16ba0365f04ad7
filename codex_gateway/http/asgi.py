"""The ASGI application: lifespan, routing, OpenAI-shaped errors and one access line each."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from codex_gateway.errors import GatewayError, MethodNotAllowed, NotFound
from codex_gateway.http.chat import relay_chat
from codex_gateway.http.exchange import Exchange, Receive, RequestIds, Scope, Send
from codex_gateway.http.models import MODEL_PATH, list_models, retrieve_model
from codex_gateway.http.operations import healthz, metrics, readyz
from codex_gateway.http.responses import refuse_unanswered, relay_compact, relay_responses
from codex_gateway.http.sandbox import FAULTS_PATH, set_sandbox_fault
from codex_gateway.metrics import UNKNOWN_MODEL, UNMATCHED_ROUTE

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

log = logging.getLogger("codex_gateway.http")
access = logging.getLogger("codex_gateway.access")

Handler = Callable[["Gateway", Exchange], Awaitable[None]]


ROUTES: dict[str, dict[str, Handler]] = {
    "/v1/responses": {"POST": relay_responses},
    "/v1/responses/compact": {"POST": relay_compact},
    "/v1/chat/completions": {"POST": relay_chat},
    "/v1/models": {"GET": list_models},
    "/healthz": {"GET": healthz},
    "/readyz": {"GET": readyz},
    "/metrics": {"GET": metrics},
}
# GET /v1/models/{model}, the one route with a name in its path.
MODEL_ROUTE: dict[str, Handler] = {"GET": retrieve_model}
# Routes whose requests are billed: counted in flight until their bill is settled.
RELAY_ROUTES = frozenset({"/v1/responses", "/v1/responses/compact", "/v1/chat/completions"})


class GatewayApp:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.request_ids = RequestIds()
        self.routes = ROUTES
        if gateway.sandbox is not None:
            # The one sandbox path that takes a gateway key (`http/sandbox.py`).
            self.routes = {**ROUTES, FAULTS_PATH: {"PUT": set_sandbox_fault}}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        try:
            await self._lifespan_messages(receive, send)
        except asyncio.CancelledError:
            # A second signal ends the process before the shutdown message: the bills went to
            # the spool (`Gateway.force`), and nothing is left to wait for.
            log.info("exiting without the orderly shutdown")

    async def _lifespan_messages(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.start()
                except Exception as exc:
                    log.error("startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        sandbox = self.gateway.sandbox
        if sandbox is not None and path.startswith("/sandbox/") and path != FAULTS_PATH:
            await sandbox(scope, receive, send)
            return
        exchange = Exchange(scope, receive, send, self.request_ids())
        try:
            await self._route(exchange)
        except asyncio.CancelledError:
            # A shutdown cut the request before a relay took charge of it (its body was being
            # read, it waited for the usage writer, or its hold was being placed); a relay
            # answers its own cut requests.
            if not exchange.response_started:
                await refuse_unanswered(exchange)
        except GatewayError as exc:
            await self._fail(exchange, exc)
        except Exception:
            log.exception("unhandled error", extra={"request_id": exchange.request_id})
            await self._fail(exchange, GatewayError("The gateway hit an internal error."))
        finally:
            self._access_line(exchange)
            self._count(exchange)

    async def _route(self, exchange: Exchange) -> None:
        route = exchange.path.rstrip("/") or "/"
        methods = self.routes.get(route)
        if methods is None and route.startswith(MODEL_PATH):
            methods = MODEL_ROUTE
        if methods is None:
            raise NotFound(f"There is no route {exchange.method} {exchange.path} on this gateway.")
        handler = methods.get(exchange.method)
        if handler is None and exchange.method == "HEAD":
            # The GET answer's head alone: the server sends no body for a HEAD request.
            handler = methods.get("GET")
        if handler is None:
            allowed = list(methods)
            if "GET" in allowed and "HEAD" not in allowed:
                allowed.append("HEAD")
            raise MethodNotAllowed(
                f"{exchange.path} accepts {' or '.join(allowed)}, not {exchange.method}.",
                allowed=allowed,
            )
        if route not in RELAY_ROUTES:
            await handler(self.gateway, exchange)
            return
        self.gateway.in_flight += 1
        try:
            await handler(self.gateway, exchange)
        finally:
            self.gateway.in_flight -= 1

    @staticmethod
    async def _fail(exchange: Exchange, error: GatewayError) -> None:
        if exchange.response_started:
            return
        await exchange.send_json(error.status, error.body(), error.response_headers())

    def _count(self, exchange: Exchange) -> None:
        """Requests by route, status and model; unknown paths and models share one label, and
        a dated snapshot counts under the priced model it resolves to, so clients cannot add
        series by inventing names."""
        route = exchange.path.rstrip("/") or "/"
        if route.startswith(MODEL_PATH):
            route = MODEL_PATH + "{model}"
        elif route not in self.routes:
            route = UNMATCHED_ROUTE
        price = self.gateway.catalog.prices.resolve(exchange.model) if exchange.model else None
        model = UNKNOWN_MODEL if price is None else price.model
        self.gateway.metrics.request_done(
            route,
            exchange.status,
            model,
            (exchange.finished or time.perf_counter()) - exchange.started,
        )

    @staticmethod
    def _access_line(exchange: Exchange) -> None:
        if not access.isEnabledFor(logging.INFO):
            return
        access.info(
            "%s %s %d %.1fms model=%s key=%s bytes=%d",
            exchange.method,
            exchange.path,
            exchange.status,
            (time.perf_counter() - exchange.started) * 1000,
            exchange.model or "-",
            exchange.key_display or "-",
            # The server sends a HEAD answer's head alone, whatever the handler wrote.
            0 if exchange.method == "HEAD" else exchange.bytes_sent,
            extra={"request_id": exchange.request_id},
        )
