"""GET /v1/models: the models a key may use, in OpenAI's list shape, or Codex's catalog;
GET /v1/models/{model}: one of them.

A model is listed when it has a price, the key's allowlist (if it has one) names it, and
some account can serve it; with no usable account the list is empty, since every request
would fail.

Codex CLI asks `GET /models?client_version=X` for its own catalog (`{"models": [...]}`, each
entry the full metadata of one model, base prompt included) when its provider authenticates
with a command or a ChatGPT sign-in, and logs an error for an answer it cannot parse. The
gateway has no such metadata to give, so it answers with an empty catalog: Codex then keeps
the metadata it ships with, exactly as it does when it never asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codex_gateway.errors import ModelNotFound
from codex_gateway.http.exchange import Exchange
from codex_gateway.http.responses import authenticate
from codex_gateway.relay.shaping import MAX_MODEL_LENGTH
from codex_gateway.store.queries import KeyRecord

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

# One model is asked for by its name after this path.
MODEL_PATH = "/v1/models/"


async def list_models(gateway: Gateway, exchange: Exchange) -> None:
    key = await authenticate(gateway, exchange)
    if exchange.query("client_version") is not None:
        await exchange.send_json(200, {"models": []})
        return
    await exchange.send_json(200, {"object": "list", "data": models(gateway, key)})


async def retrieve_model(gateway: Gateway, exchange: Exchange) -> None:
    key = await authenticate(gateway, exchange)
    name = exchange.path.rstrip("/").removeprefix(MODEL_PATH)
    # A dated snapshot is served as the model it is priced as.
    price = gateway.catalog.prices.resolve(name)
    listed = {model["id"]: model for model in models(gateway, key)}
    found = listed.get(price.model) if price is not None else None
    if found is None:
        shown = name if len(name) <= MAX_MODEL_LENGTH else name[:MAX_MODEL_LENGTH] + "…"
        raise ModelNotFound(
            f"The model `{shown}` does not exist or this API key may not use it.", param="model"
        )
    await exchange.send_json(200, {**found, "id": name})


def models(gateway: Gateway, key: KeyRecord) -> list[dict[str, Any]]:
    if not gateway.catalog.usable_accounts():
        return []
    names = sorted(price.model for price in gateway.catalog.prices)
    if key.models is not None:
        names = [name for name in names if name in key.models]
    return [{"id": name, "object": "model", "created": 0, "owned_by": "openai"} for name in names]
