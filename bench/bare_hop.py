"""The floor of a Python hop: uvicorn and the gateway's upstream client, nothing else.

    python bench/bare_hop.py --port 8802 --upstream http://127.0.0.1:8801/v1

Every request is passed to the upstream as it came and its answer back as it comes, with the
same server settings `codex-gateway serve` uses (httptools, uvloop, no access log) and the
gateway's own keep-alive client. No key, no price, no hold, no bill: what is left of the
gateway's added latency once this row's is taken away is the gateway's own work.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from codex_gateway.upstream.client import UpstreamClient

JSON = {"content-type": "application/json"}
# The gateway's default upstream_keepalive_seconds, written out: reading it from the settings
# would load the gateway's database modules too, and this hop's memory is measured.
KEEPALIVE_SECONDS = 90.0


class BareHop:
    def __init__(self, upstream: str):
        self.url = upstream.rstrip("/") + "/responses"
        self.client: UpstreamClient | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        assert self.client is not None
        answer = await self.client.post(self.url, JSON, body)
        try:
            content_type = answer.headers.get("content-type", "application/json").encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status,
                    "headers": [(b"content-type", content_type)],
                }
            )
            async for chunk in answer.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            answer.release()

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = UpstreamClient(
                    connect_timeout=5,
                    read_timeout=60,
                    pool_size=4096,
                    keepalive=KEEPALIVE_SECONDS,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the mock's /v1 address")
    args = parser.parse_args()
    uvicorn.run(
        BareHop(args.upstream),
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="warning",
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
