"""Operations commands: migrate, config check, health probes, run-time billing traces and
recovery of dead processes' hold journals."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import click

from codex_gateway.billing.journal import Recovered
from codex_gateway.billing.journal import recover as recover_journals
from codex_gateway.cli.context import dump_json, settings_or_exit, table, with_engine, with_store
from codex_gateway.config import describe, load_settings
from codex_gateway.errors import ConfigError
from codex_gateway.store.db import Migration, migrate_unless_newer, redact_url
from codex_gateway.store.queries import Store

PROBE_TIMEOUT = 5.0


@click.command()
@click.option(
    "--journal-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Hold journals to recover (default: the configured folder); it must exist.",
)
def recover(journal_dir: Path | None) -> None:
    """Settle or release the holds that stopped gateway processes left in their journals.

    A gateway does this at start and every few seconds for its own folder; run it for
    journals copied from a machine whose gateway will not start again. Journals of
    processes still running are left alone.
    """
    directory = journal_dir or settings_or_exit().journal_path

    async def recover_ours(store: Store) -> Recovered:
        return await recover_journals(directory, store, await store.database_id())

    done = with_store(recover_ours)
    click.echo(
        f"recovered {done.journals} journal(s) in {directory}: {len(done.settled)} request(s) "
        f"settled from their journaled usage, {len(done.released)} released as interrupted"
        + (f"; {len(done.foreign)} of other databases left alone" if done.foreign else "")
    )


@click.command()
def migrate() -> None:
    """Bring the database schema to the newest migration, say from which revision to which,
    then exit."""
    settings = settings_or_exit()
    done = with_engine(settings, migrate_unless_newer)
    if done is None:
        click.echo("database schema is newer than this version; left as it is")
    else:
        click.echo(f"{_migrated(done)} ({redact_url(settings.database_url)})")


def _migrated(done: Migration) -> str:
    if done.before is None:
        return f"created the database schema at revision {done.after} on a new database"
    if done.before != done.after:
        return f"upgraded the database schema from revision {done.before} to {done.after}"
    return f"database schema is current at revision {done.after}"


@click.group()
def config() -> None:
    """Settings from the TOML file and CODEX_GATEWAY_* variables."""


@config.command("check")
@click.option(
    "--file",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="The TOML file to check (default: the one CODEX_GATEWAY_CONFIG names, if any).",
)
def config_check(config_file: Path | None) -> None:
    """Report every problem in the settings at once, with the files and folders `serve`
    needs of this machine; exit 1 if there is any."""
    try:
        settings = load_settings(config_file=config_file, local=True)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        click.echo(f"{len(exc.problems)} problem(s) found", err=True)
        sys.exit(1)
    for name, value in describe(settings).items():
        click.echo(f"{name} = {value!r}")
    click.echo("configuration OK")


@click.command()
@click.option("--url", default="http://127.0.0.1:8787", show_default=True)
@click.option("--ready", is_flag=True, help="Probe /readyz instead of /healthz.")
def health(url: str, ready: bool) -> None:
    """Probe a running gateway; exit 0 when it answers 200 (for container health checks)."""
    target = url.rstrip("/") + ("/readyz" if ready else "/healthz")
    try:
        with urllib.request.urlopen(target, timeout=PROBE_TIMEOUT) as response:
            click.echo(response.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        click.echo(f"{target}: HTTP {exc.code} {exc.read().decode('utf-8', 'replace')}", err=True)
        sys.exit(1)
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"{target}: {exc}", err=True)
        sys.exit(1)


@click.group()
def trace() -> None:
    """Log one key's bills in four stages at INFO in every process, without a restart."""


@trace.command("on")
@click.argument("key_id", type=int)
def trace_on(key_id: int) -> None:
    """Trace the bills of key KEY_ID (see `keys list`)."""
    with_store(lambda store: store.set_trace(key_id, True))
    click.echo(f"billing trace on for key {key_id}; running gateways pick it up within a poll")


@trace.command("off")
@click.argument("key_id", type=int)
def trace_off(key_id: int) -> None:
    """Stop tracing the bills of key KEY_ID."""
    with_store(lambda store: store.set_trace(key_id, False))
    click.echo(f"billing trace off for key {key_id}")


@trace.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def trace_list(as_json: bool) -> None:
    """The keys whose bills are traced, shown as prefix and last four characters."""

    async def traced(store: Store) -> list[dict[str, object]]:
        ids = await store.traced_keys()
        return [key for key in await store.list_keys() if key["id"] in ids]

    rows = with_store(traced)
    click.echo(dump_json(rows) if as_json else table(rows, ["id", "user", "display", "name"]))
