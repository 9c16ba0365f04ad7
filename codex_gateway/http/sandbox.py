"""PUT /sandbox/faults on a gateway serving the sandbox: the fault switch takes a gateway key.

Every user of a quick start shares one `sandbox` account, whose upstream key is the fixed
word `sandbox`; a fault set for it fails everyone's requests and rests the account. So the
switch is open to callers with a gateway key, as the fault headers are, and to no one else.
The standalone `codex-gateway sandbox` has no keys to check and keeps it open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from codex_gateway.http.exchange import Exchange, Message
from codex_gateway.http.responses import authenticate

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

FAULTS_PATH = "/sandbox/faults"


async def set_sandbox_fault(gateway: Gateway, exchange: Exchange) -> None:
    """Pass PUT /sandbox/faults to the sandbox once the caller shows a gateway key."""
    sandbox = gateway.sandbox
    assert sandbox is not None  # the route exists only on a gateway serving the sandbox
    await authenticate(gateway, exchange)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            await exchange.start(message["status"], list(message.get("headers", [])))
        else:
            await exchange.write(message.get("body", b""), message.get("more_body", False))

    await sandbox(exchange.scope, exchange.receive, send)
