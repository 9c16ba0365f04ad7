"""`codex-gateway`: serve the gateway, run the sandbox upstream, administer the database."""

from __future__ import annotations

import contextlib
import math
import resource
import socket
import sys
from decimal import Decimal

import click

from codex_gateway import __version__, logs
from codex_gateway.cli import admin, operations, reconcile
from codex_gateway.cli.context import settings_or_exit, with_store
from codex_gateway.config import Settings
from codex_gateway.errors import CredentialError
from codex_gateway.sandbox import ACCOUNT_KEY as SANDBOX_KEY
from codex_gateway.sandbox import ACCOUNT_NAME as SANDBOX_ACCOUNT
from codex_gateway.store.queries import Store, StoreError

DEMO_USER = "demo"
DEMO_BALANCE = Decimal("5")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="codex-gateway")
def cli() -> None:
    """A self-hosted API gateway for OpenAI's Codex models, with exact per-request billing."""


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8787, show_default=True)
@click.option(
    "--sandbox",
    is_flag=True,
    help="Serve the built-in mock upstream at /sandbox and relay to it, so the gateway answers "
    "with no OpenAI account.",
)
@click.option("--log-level", default=None, help="DEBUG shows each request's bill in four stages.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Gateway processes sharing the port; one per core serves the most.",
)
def serve(host: str, port: int, sandbox: bool, log_level: str | None, workers: int) -> None:
    """Run the gateway."""
    # Files and folders first: a gateway that would fail at start must not have listened,
    # pointed the sandbox account at itself or created the quick start's demo user.
    settings = settings_or_exit(local=True)
    logs.configure(
        (log_level or settings.log_level).upper(), settings.log_format, settings.log_levels
    )
    from codex_gateway.http.workers import (
        listening_socket,
        serve_workers,
        shared_socket_of_a_free_port,
    )

    # The port first: a gateway that cannot listen must change nothing, not even where the
    # sandbox account points, which a gateway already running on the database relays to.
    try:
        held = (
            shared_socket_of_a_free_port(host, port)
            if workers > 1
            else listening_socket(host, port)
        )
    except OSError as exc:
        click.echo(f"error: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        sys.exit(1)
    bound = held.getsockname()[1]
    address = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    listening = f"serving on http://{address}:{bound}"
    if sandbox:
        _prepare_sandbox(host, bound)
    _raise_open_file_limit()
    if workers == 1:
        sys.exit(_serve_one(settings, host, port, sandbox, held, alone=True, listening=listening))
    sys.exit(
        serve_workers(
            workers,
            held,
            lambda sock, index: _serve_one(
                settings,
                host,
                port,
                sandbox,
                sock,
                alone=False,
                advises=index == 0,
                listening=listening if index == 0 else None,
            ),
        )
    )


def _raise_open_file_limit() -> None:
    """Every stream takes two sockets (client and upstream): allow as many as the system lets
    this process have, not the usual soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65_536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _serve_one(
    settings: Settings,
    host: str,
    port: int,
    sandbox: bool,
    sock: socket.socket,
    alone: bool,
    advises: bool = True,
    listening: str | None = None,
) -> int:
    """One gateway process on `sock` (bound to HOST:PORT), `alone` when it is the only
    worker, `advises` unless another worker warns about what they share; its exit status.
    `listening` is printed once the server listens: after the database checks, never
    before a start that fails."""
    import uvicorn  # the server stack is imported only by the commands that serve

    from codex_gateway.app import Gateway
    from codex_gateway.http.asgi import GatewayApp
    from codex_gateway.http.protocol import CoalescingProtocol
    from codex_gateway.http.server import GracefulServer
    from codex_gateway.sandbox.app import SandboxApp

    try:
        gateway = Gateway(
            settings, sandbox=SandboxApp() if sandbox else None, alone=alone, advises=advises
        )
    except CredentialError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    config = uvicorn.Config(
        GatewayApp(gateway),
        host=host,
        port=port,
        http=CoalescingProtocol.through(gateway.coalescer),
        loop="uvloop",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=False,
        # The gateway never reads the client's address, so uvicorn need not rewrite it from
        # X-Forwarded-* headers: one layer fewer on every request.
        proxy_headers=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds),
    )
    server = GracefulServer(
        config, gateway, on_started=(lambda: click.echo(listening)) if listening else None
    )
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn's own code 3 for a failed startup
        if exc.code:
            return 1  # the reason is already logged, one line
        raise
    return server.exit_status()


def _prepare_sandbox(host: str, port: int) -> None:
    """Point a `sandbox` account at this process; on a fresh database add a demo user and key.
    A PostgreSQL database not created yet is created here, as the start would."""
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base_url = f"http://{local}:{port}/sandbox/v1"

    async def prepare(store: Store) -> str | None:
        existing = {account.name: account for account in await store.accounts()}
        account = existing.get(SANDBOX_ACCOUNT)
        if account is None:
            await store.add_account(SANDBOX_ACCOUNT, "openai", base_url, SANDBOX_KEY, priority=1000)
        elif account.api_key_sealed is not None:  # sealed by an earlier `accounts seal`
            await store.replace_api_key(
                SANDBOX_ACCOUNT, "openai", base_url, SANDBOX_KEY, sealed=False
            )
        elif account.base_url != base_url:
            await store.set_account_base_url(SANDBOX_ACCOUNT, base_url)
        if await store.list_users():
            return None
        try:
            await store.create_user(DEMO_USER, DEMO_BALANCE)
        except StoreError:
            return None
        raw, _ = await store.create_key(DEMO_USER, "quick start")
        return raw

    key = with_store(prepare, create=True)
    click.echo(f"sandbox upstream at {base_url}")
    if key:
        click.echo(f"created user {DEMO_USER} with ${DEMO_BALANCE}; API key (shown once):")
        click.echo(key)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8799, show_default=True)
def sandbox(host: str, port: int) -> None:
    """Run only the mock upstream; its base URL is http://HOST:PORT/v1."""
    import uvicorn

    from codex_gateway.sandbox.app import SandboxApp

    logs.configure("INFO")
    uvicorn.run(
        SandboxApp(record=True),
        host=host,
        port=port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        access_log=False,
        log_config=None,
    )


@cli.command()
def version() -> None:
    """Print the version and the git commit it was built from."""
    from codex_gateway.version import build_info

    click.echo(build_info().line())


for command in (
    admin.users,
    admin.keys,
    admin.accounts,
    admin.pricing,
    admin.usage,
    admin.explain,
    admin.ledger,
    reconcile.reconcile_command,
    operations.migrate,
    operations.recover,
    operations.config,
    operations.health,
    operations.trace,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="codex-gateway")
