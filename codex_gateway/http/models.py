"""GET /v1/models: the models a key may use, in OpenAI's list shape, or Codex's catalog.

A model is listed when it has a price and some account can serve it; with no usable
account the list is empty, since every request would fail.

Codex CLI asks `GET /models?client_version=X` for its own catalog (`{"models": [...]}`, each
entry the full metadata of one model, base prompt included) when its provider authenticates
with a command or a ChatGPT sign-in, and logs an error for an answer it cannot parse. The
gateway has no such metadata to give, so it answers with an empty catalog: Codex then keeps
the metadata it ships with, exactly as it does when it never asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codex_gateway.http.exchange import Exchange
from codex_gateway.http.responses import authenticate

if TYPE_CHECKING:
    from codex_gateway.app import Gateway


async def list_models(gateway: Gateway, exchange: Exchange) -> None:
    await authenticate(gateway, exchange)
    if exchange.query("client_version") is not None:
        await exchange.send_json(200, {"models": []})
        return
    await exchange.send_json(200, {"object": "list", "data": models(gateway)})


def models(gateway: Gateway) -> list[dict[str, Any]]:
    if not gateway.catalog.usable_accounts():
        return []
    names = sorted(price.model for price in gateway.catalog.prices)
    return [{"id": name, "object": "model", "created": 0, "owned_by": "openai"} for name in names]
