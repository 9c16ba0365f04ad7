"""What the HTTP tests share: two gateway processes on one database, and a gateway that
reaches its database through a proxy a test can cut."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import (
    Gateway,
    Proc,
    Sandbox,
    add_sandbox_account,
    free_port,
    make_gateway,
    spawn,
    wait_http,
)
from tests.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def two_gateways(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, str]]:
    """Two gateway processes on one PostgreSQL database; yields it and the second URL."""
    gateway = make_gateway("postgresql", tmp_path_factory)
    add_sandbox_account(gateway, sandbox)
    gateway.start()
    port = free_port()
    second = spawn(
        ["serve", "--port", str(port), "--log-level", "INFO"],
        gateway.env,
        gateway.workdir / "second.log",
    )
    gateway.extra_procs.append(second)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz")
        yield gateway, url
    finally:
        gateway.stop()
        gateway.drop_database()


PG_PORT = 5432


@pytest.fixture
def proxied(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, TcpProxy]]:
    """A PostgreSQL gateway (not started) whose served process will reach the database through
    a proxy; the CLI goes to the database directly."""
    proxy = TcpProxy(PG_PORT)
    proxy.start()
    gateway = make_gateway("postgresql", tmp_path_factory)
    add_sandbox_account(gateway, sandbox)
    try:
        yield gateway, proxy
    finally:
        gateway.stop()
        proxy.cut()
        gateway.drop_database()


def serve(gateway: Gateway, proxy: TcpProxy | None, name: str) -> Proc:
    """Start a gateway process (through the proxy if given) and make it the gateway's own."""
    env = dict(gateway.env, CODEX_GATEWAY_LEASE_RENEW_SECONDS="0.5")
    if proxy is not None:
        database = gateway.database_url.rsplit("/", 1)[1]
        env["CODEX_GATEWAY_DATABASE_URL"] = (
            f"postgresql://postgres@127.0.0.1:{proxy.port}/{database}"
        )
    port = free_port()
    proc = spawn(["serve", "--port", str(port), "--log-level", "INFO"], env, gateway.workdir / name)
    gateway.proc, gateway.url = proc, f"http://127.0.0.1:{port}"
    wait_http(gateway.url + "/healthz")
    return proc


def rows_by_id(gateway: Gateway, user: str) -> dict[str, dict[str, Any]]:
    return {row["request_id"]: row for row in gateway.cli_json("usage", "list", "--user", user)}
