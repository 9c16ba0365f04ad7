"""What every command needs: settings, a migrated database, and one-line errors."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import click
import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from codex_gateway.billing.pricing import plain
from codex_gateway.config import Settings, load_settings
from codex_gateway.errors import ConfigError
from codex_gateway.logs import escape_controls
from codex_gateway.store.db import create_engine, failure, migrate, missing_database, redact_url
from codex_gateway.store.queries import Store, StoreError

T = TypeVar("T")


def settings_or_exit(*, local: bool = False) -> Settings:
    """The settings, or an `error:` line for each problem and exit 1. `local`: also what a serving
    gateway needs of this machine (`config.local_problems`)."""
    try:
        return load_settings(local=local)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)


def with_store(action: Callable[[Store], Awaitable[T]], create: bool = False) -> T:
    """Open the database (migrating it if needed), run `action`, close it. A PostgreSQL
    database the server does not have is created with `create`, as a start does, and refused
    otherwise, so that a mistyped name never becomes a new, empty database. A SQLite file is
    created in either case."""

    async def migrated(engine: AsyncEngine) -> T:
        await migrate(engine, create=create)
        return await action(Store(engine))

    return with_engine(settings_or_exit(), migrated)


def with_engine(settings: Settings, action: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run `action` on an engine of the configured database, then close it; an error of the
    data, the driver or the network ends the command with one line."""

    async def run() -> T:
        engine = create_engine(settings.database_url)
        try:
            return await action(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except (StoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except BrokenPipeError:
        # The reader of the output went away (`... | head`), not the database: click ends
        # the command quietly, as it does for output written after this returns.
        raise
    except (OSError, SQLAlchemyError) as exc:
        if missing_database(exc):
            raise click.ClickException(
                f"database {redact_url(settings.database_url)} does not exist; run "
                "`codex-gateway migrate` (or start the gateway) to create it"
            ) from None
        raise click.ClickException(failure(settings.database_url, exc)) from None


def dump_json(value: Any) -> str:
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_INDENT_2).decode()


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return plain(value)
    raise TypeError


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    """A value as a table shows it; text on one line, with any character that is not
    printable escaped (a note stored before such notes were refused, an upstream's words in
    an account's state), so that no cell moves or colours the terminal's output."""
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return plain(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    return escape_controls(str(value))
