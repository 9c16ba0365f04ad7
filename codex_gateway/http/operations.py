"""Routes for operators: liveness, readiness and Prometheus metrics.

`/healthz` and `/readyz` are open, as load balancers and orchestrators probe them without
credentials; they show the version and what is wrong, never a secret. `/metrics` needs the
admin token (`CODEX_GATEWAY_ADMIN_TOKEN`) as a bearer token and is off without one.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from codex_gateway.errors import AuthenticationError, NotFound
from codex_gateway.http.exchange import Exchange
from codex_gateway.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from codex_gateway.app import Gateway


async def healthz(gateway: Gateway, exchange: Exchange) -> None:
    build = gateway.build
    await exchange.send_json(
        200, {"status": "ok", "version": build.version, "commit": build.commit}
    )


async def readyz(gateway: Gateway, exchange: Exchange) -> None:
    problems = await gateway.readiness.problems()
    build = gateway.build
    body = {
        "status": "not ready" if problems else "ready",
        "version": build.version,
        "commit": build.commit,
        "problems": problems,
    }
    await exchange.send_json(503 if problems else 200, body)


async def metrics(gateway: Gateway, exchange: Exchange) -> None:
    require_admin(gateway, exchange)
    body = gateway.metrics.render()
    await exchange.start(
        200,
        [
            (b"content-type", CONTENT_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    )
    await exchange.write(body, more=False)


def require_admin(gateway: Gateway, exchange: Exchange) -> None:
    token = gateway.settings.admin_token
    if token is None:
        raise NotFound(f"{exchange.path} is off: set CODEX_GATEWAY_ADMIN_TOKEN to turn it on.")
    scheme, _, given = exchange.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise AuthenticationError(
            f"{exchange.path} needs the admin token in the Authorization header as 'Bearer TOKEN'."
        )
