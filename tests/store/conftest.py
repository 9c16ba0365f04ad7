"""Fresh databases on SQLite and PostgreSQL for the storage tests.

Each test module gets its own database per backend; each test gets its own engine (on the
test's event loop) and migrates it, which also exercises migrating an up-to-date database.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from codex_gateway.store.db import create_engine, migrate
from codex_gateway.store.queries import Store

PG_SERVER = os.environ.get("CODEX_GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", f"{PG_SERVER}/postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _database(backend: str, folder: Path) -> Iterator[str]:
    """A new, empty database; PostgreSQL ones are dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{folder}/gateway.db"
        return
    name = "cg_unit_" + uuid.uuid4().hex[:12]
    _psql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def database_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One database per test module and backend."""
    yield from _database(backend, tmp_path_factory.mktemp(f"store-{backend}"))


@pytest.fixture
def empty_database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database of its own for one test, never migrated."""
    yield from _database(backend, tmp_path)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> Store:
    return Store(engine)
