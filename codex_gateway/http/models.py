"""GET /v1/models: the models a key may use, in OpenAI's list shape.

A model is listed when it has a price and some account can serve it; with no usable
account the list is empty, since every request would fail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codex_gateway.http.exchange import Exchange
from codex_gateway.http.responses import authenticate

if TYPE_CHECKING:
    from codex_gateway.app import Gateway


async def list_models(gateway: Gateway, exchange: Exchange) -> None:
    await authenticate(gateway, exchange)
    await exchange.send_json(200, {"object": "list", "data": models(gateway)})


def models(gateway: Gateway) -> list[dict[str, Any]]:
    if not gateway.catalog.usable_accounts():
        return []
    names = sorted(price.model for price in gateway.catalog.prices)
    return [{"id": name, "object": "model", "created": 0, "owned_by": "openai"} for name in names]
