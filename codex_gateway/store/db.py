"""The database engine, and migrations run on every start.

`CODEX_GATEWAY_DATABASE_URL` takes `sqlite:///PATH` or `postgresql://USER@HOST:PORT/DB`; the
async driver is chosen here. SQLite runs in WAL mode; write transactions take the write
lock at BEGIN, so a read-modify-write of a balance cannot interleave with another process's,
while reads (connections with the READ_ONLY options) take none.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from codex_gateway.store.same_thread import SameThreadConnection, connector

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 7_220_130_411
# PostgreSQL's SQLSTATE for a connection naming a database the server does not have.
_NO_SUCH_DATABASE = "3D000"
# How long a SQLite connection waits for another's write lock.
SQLITE_TIMEOUT_SECONDS = 30
# Execution options for a connection that only reads.
READ_ONLY = {"read_only": True}
# A URL within a message, up to the next space or quote.
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]+""")


def driver_url(url: str) -> str:
    """Map the public URL forms to the async drivers the gateway uses."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url[len("postgres://") :]
    raise ValueError(f"unsupported database URL {redact_url(url)!r}")


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    credentials, _, host = tail.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in credentials else url


def failure(url: str, error: BaseException) -> str:
    """One line on what the driver or the network answered for the database at `url`,
    naming it with its password hidden."""
    cause = getattr(error, "orig", None) or error
    return f"database {redact_url(url)}: {_first_line(cause) or type(cause).__name__}"


def error_line(error: BaseException) -> str:
    """The type of `error` and the first line of its message, any URL's password hidden:
    a database error may quote the URL it was connecting to."""
    said = _URL.sub(lambda found: redact_url(found.group()), _first_line(error))
    return f"{type(error).__name__}: {said}" if said else type(error).__name__


def _first_line(error: BaseException) -> str:
    """The first line of `error`'s message; empty when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def missing_database(error: BaseException) -> bool:
    """Whether `error` is a PostgreSQL server's refusal of a database it has none by."""
    return getattr(getattr(error, "orig", None), "sqlstate", None) == _NO_SUCH_DATABASE


def create_engine(
    url: str, pool_size: int = 10, max_overflow: int = 20, same_thread: bool = False
) -> AsyncEngine:
    """An engine for `url`; the pool sizes apply to server databases (SQLite opens a
    connection per checkout). `same_thread`: SQLite's calls block the calling thread
    (`store/same_thread.py`), for an event loop that waits for nothing else."""
    if url.startswith("sqlite:///"):
        return _sqlite_engine(url, same_thread)
    return create_async_engine(
        driver_url(url), pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True
    )


def in_memory(url: str) -> bool:
    """Whether the database lives in one connection's memory, unseen by any other engine."""
    return is_sqlite(url) and ":memory:" in url


def is_sqlite(url: str) -> bool:
    """Whether the database is a SQLite file (or memory), which this process writes itself."""
    return url.startswith("sqlite")


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite database URL names; None for one in memory or a server database."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :]
    return Path(path) if path and path != ":memory:" else None


def _sqlite_engine(url: str, same_thread: bool) -> AsyncEngine:
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if same_thread:
        engine = create_async_engine(driver_url(url), async_creator=_same_thread(url))
    else:
        timeout = {"timeout": SQLITE_TIMEOUT_SECONDS}
        engine = create_async_engine(driver_url(url), connect_args=timeout)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        read_only = connection.get_execution_options().get("read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def _same_thread(url: str) -> Callable[[], Awaitable[SameThreadConnection]]:
    """The connections of a same-thread engine, opened with the arguments SQLAlchemy's own
    SQLite dialect takes from `url` (the file, and options in its query string)."""
    address = make_url(driver_url(url))
    arguments, options = address.get_dialect()().create_connect_args(address)
    return connector(*arguments, **{"timeout": SQLITE_TIMEOUT_SECONDS, **options})


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@dataclass(frozen=True)
class Migration:
    """The schema's revision before a migration (None for a database never migrated) and
    after it."""

    before: str | None
    after: str | None


async def migrate_unless_newer(engine: AsyncEngine) -> Migration | None:
    """What `migrate` and a gateway's start do: create the PostgreSQL database should the
    server have none by that name, then migrate it, unless a newer version did (None): this
    one serves that schema as it is, because migrations only add."""
    if engine.dialect.name == "postgresql":
        await _create_database_if_missing(engine)
    if await schema_state(engine) == "ahead":
        return None
    return await migrate(engine, create=False)


async def migrate(engine: AsyncEngine, create: bool = True) -> Migration:
    """Bring the schema to the newest revision; concurrent starts on PostgreSQL take turns,
    each reading the revision it starts from and ends at within its turn. `create`: first
    create the PostgreSQL database should the server have none by that name."""
    if create and engine.dialect.name == "postgresql":
        await _create_database_if_missing(engine)
    async with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(text(f"SELECT pg_advisory_lock({_PG_MIGRATION_LOCK})"))
            await connection.commit()
        try:
            before = await _revision(connection)
            await connection.run_sync(_upgrade)
            await connection.commit()
            return Migration(before, await _revision(connection))
        finally:
            if engine.dialect.name == "sqlite":
                await _foreign_keys_back_on(connection)
            if engine.dialect.name == "postgresql":
                await connection.execute(text(f"SELECT pg_advisory_unlock({_PG_MIGRATION_LOCK})"))
                await connection.commit()


async def _create_database_if_missing(engine: AsyncEngine) -> None:
    """Create the PostgreSQL database itself when the server has none by that name."""
    try:
        async with engine.connect():
            return
    except DBAPIError as exc:
        if not missing_database(exc) or engine.url.database is None:
            raise
    name = engine.url.database
    server = create_async_engine(engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with server.connect() as connection:
            quoted = connection.dialect.identifier_preparer.quote(name)
            await connection.execute(text(f"CREATE DATABASE {quoted}"))
    except Exception as exc:
        if "already exists" not in str(exc):
            raise
    finally:
        await server.dispose()


async def _revision(connection: AsyncConnection) -> str | None:
    """The schema's revision, read in a transaction of its own so that the migrations run
    in theirs, as Alembic begins them."""
    revision = await connection.run_sync(
        lambda sync: MigrationContext.configure(sync).get_current_revision()
    )
    await connection.rollback()
    return revision


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    if connection.dialect.name != "sqlite":
        command.upgrade(config, "head")
        return
    # SQLite changes a table by building it anew and dropping the old one, which the rows
    # that refer to it would refuse; the pragma holds only outside a transaction, so it is
    # set on the driver's connection before the migrations begin theirs, and set back once
    # they have ended (`migrate`). A migration that builds a table anew checks the
    # references itself before it commits.
    _foreign_keys(connection, on=False)
    command.upgrade(config, "head")


async def _foreign_keys_back_on(connection: AsyncConnection) -> None:
    """Foreign keys on again after the migrations (`_upgrade`); a connection that could not
    have them back, however that failed, is closed and serves nothing more."""
    try:
        await connection.rollback()
        if await connection.run_sync(_foreign_keys, True):
            return
    except BaseException:
        await connection.invalidate()
        raise
    await connection.invalidate()


def _foreign_keys(connection: Connection, on: bool) -> bool:
    """Turn a SQLite connection's foreign keys on or off, outside SQLAlchemy's transactions;
    whether they are on now."""
    driver = connection.connection.dbapi_connection
    if driver is None:
        raise RuntimeError("the migration's connection is closed")
    cursor = driver.cursor()
    try:
        cursor.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
        cursor.execute("PRAGMA foreign_keys")
        return cursor.fetchone() == (1,)
    finally:
        cursor.close()


async def is_current(engine: AsyncEngine) -> bool:
    """True when the schema is at the newest migration."""
    async with engine.connect() as connection:
        current = await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_heads()
        )
    head = ScriptDirectory.from_config(alembic_config()).get_heads()
    return set(current) == set(head)


async def schema_state(engine: AsyncEngine) -> str:
    """`current`, `behind` (migrations to run) or `ahead` (migrated by a newer version).

    A newer schema is one this version can still serve, because migrations only add: that is
    what lets a deploy roll back to the previous image after the new one migrated.
    """
    async with engine.connect() as connection:
        current = await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_heads()
        )
    scripts = ScriptDirectory.from_config(alembic_config())
    known = {script.revision for script in scripts.walk_revisions()}
    if any(revision not in known for revision in current):
        return "ahead"
    return "current" if set(current) == set(scripts.get_heads()) else "behind"
