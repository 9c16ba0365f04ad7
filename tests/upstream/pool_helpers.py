"""Gateways with several upstream accounts, each pointed at the sandbox under its own key."""

from __future__ import annotations

import json
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import (
    Gateway,
    Sandbox,
    _drop_pg_database,
    free_port,
    make_gateway,
    spawn,
    wait_http,
)

# Tight limits so every fault shows within a second or two.
FAULT_TIMEOUTS = {
    "CODEX_GATEWAY_UPSTREAM_CONNECT_TIMEOUT": "1",
    "CODEX_GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT": "1",
    "CODEX_GATEWAY_UPSTREAM_READ_TIMEOUT": "1",
    "CODEX_GATEWAY_UPSTREAM_TOTAL_TIMEOUT": "4",
}
# Catalog refresh is 0.2 s in tests; this leaves room for a slow poll.
CATALOG_SETTLE_SECONDS = 0.8
PROMPT = "Write a Python function that computes the Fibonacci sequence"
CHAT = {"model": "gpt-5.1-codex", "messages": [{"role": "user", "content": PROMPT}]}


@dataclass
class Account:
    name: str
    key: str


def pool_gateway(
    backend: str, tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> Iterator[Gateway]:
    """A running gateway with no accounts yet, on a fresh database of `backend`."""
    gw = make_gateway(backend, tmp_path_factory)
    gw.env.update(env)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()
        if gw.backend == "postgresql":
            _drop_pg_database(gw.database_url.rsplit("/", 1)[1])


def fresh_accounts(
    gateway: Gateway, sandbox: Sandbox, specs: list[dict[str, Any]]
) -> list[Account]:
    """Disable every account the gateway has, then add these; each gets its own upstream key.

    A spec may name `priority`, `weight`, `max_concurrency`, `refused` for an account
    whose base URL is a closed port, `base_url` for one served by another upstream, and
    `api_key` for a key of its own choosing.
    """
    for existing in gateway.cli_json("accounts", "list"):
        if existing["enabled"]:
            gateway.cli("accounts", "disable", existing["name"])
    accounts = []
    for spec in specs:
        tag = uuid.uuid4().hex[:8]
        account = Account(f"{spec.get('name', 'acct')}-{tag}", spec.get("api_key", f"sk-up-{tag}"))
        base_url = spec.get("base_url", sandbox.base_url)
        if spec.get("refused"):
            base_url = f"http://127.0.0.1:{free_port()}/v1"
        args = ["accounts", "add", "--name", account.name, "--base-url", base_url]
        args += ["--api-key", account.key, "--priority", str(spec.get("priority", 100))]
        if "weight" in spec:
            args += ["--weight", str(spec["weight"])]
        if "max_concurrency" in spec:
            args += ["--max-concurrency", str(spec["max_concurrency"])]
        gateway.cli(*args)
        accounts.append(account)
    time.sleep(CATALOG_SETTLE_SECONDS)
    return accounts


def set_fault(sandbox: Sandbox, account: Account, fault: str | None) -> None:
    httpx.put(sandbox.url + "/sandbox/faults", json={"key": account.key, "fault": fault})


def failing_first(gateway: Gateway, sandbox: Sandbox, fault: str) -> tuple[Account, Account]:
    """Two fresh accounts, the preferred one with `fault`; what the sandbox saw is cleared."""
    failing, spare = fresh_accounts(gateway, sandbox, [{"priority": 1}, {"priority": 2}])
    set_fault(sandbox, failing, fault)
    sandbox.clear()
    return failing, spare


def account_state(gateway: Gateway, account: Account) -> dict[str, Any]:
    return next(a for a in gateway.cli_json("accounts", "list") if a["name"] == account.name)


def served_by(sandbox: Sandbox, accounts: list[Account]) -> list[str]:
    """Names of the accounts whose keys reached the sandbox since it was last cleared."""
    names = {"Bearer " + account.key: account.name for account in accounts}
    return [names.get(r["headers"].get("authorization", ""), "?") for r in sandbox.requests()]


def stream_events(
    gateway: Gateway, key: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """POST a streaming request; the response and every event it carried, parsed."""
    response = httpx.post(
        gateway.url + "/v1/responses",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
        timeout=30,
    )
    events = []
    for block in response.text.split("\n\n"):
        data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return response, events


def start_second_process(gateway: Gateway) -> str:
    """Another gateway process on the same database and settings; its URL."""
    port = free_port()
    proc = spawn(["serve", "--port", str(port)], gateway.env, gateway.workdir / f"gw-{port}.log")
    gateway.extra_procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    return url


class LoopbackUpstream(socketserver.ThreadingTCPServer):
    """An upstream on loopback that answers every request alike: `body` as JSON with
    `status` when there is one, else the server-sent `events`, one every `pace` seconds, the
    stream ended `linger` seconds after the last, as upstreams close a connection a little
    after their final event. `{token}` in what it sends becomes the bearer token it was sent,
    as an upstream quoting the credential it refused would."""

    daemon_threads = True

    def __init__(
        self,
        *,
        status: int = 200,
        body: dict[str, Any] | None = None,
        events: Sequence[bytes] = (),
        pace: float = 0.0,
        linger: float = 0.0,
    ):
        super().__init__(("127.0.0.1", 0), _LoopbackHandler)
        self.status = status
        self.body = None if body is None else json.dumps(body).encode()
        self.events = list(events)
        self.pace, self.linger = pace, linger

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _LoopbackHandler(socketserver.StreamRequestHandler):
    server: LoopbackUpstream

    def handle(self) -> None:
        headers: dict[bytes, bytes] = {}
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        self.rfile.read(int(headers.get(b"content-length", b"0")))
        token = headers.get(b"authorization", b"").removeprefix(b"Bearer ")
        server = self.server
        if server.body is not None:
            body = server.body.replace(b"{token}", token)
            self.wfile.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (server.status, HTTPStatus(server.status).phrase.encode(), len(body), body)
            )
            return
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        for event in server.events:
            event = event.replace(b"{token}", token)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(server.pace)
        time.sleep(server.linger)
        self.wfile.write(b"0\r\n\r\n")


Upstream = TypeVar("Upstream", bound=socketserver.BaseServer)


@contextmanager
def serving(server: Upstream) -> Iterator[Upstream]:
    """`server` answering on its own thread until the block ends, then closed."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
