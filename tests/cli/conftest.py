"""A database of each backend for the administration commands, run with no gateway process,
and PostgreSQL databases that do not exist yet."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from codex_gateway.store.db import create_engine, schema_state
from tests.conftest import PG_ADMIN_URL, Gateway, _drop_pg_database, make_gateway


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A database with no gateway process: the CLI alone."""
    gateway = make_gateway(request.param, tmp_path_factory)
    yield gateway
    gateway.drop_database()


@pytest.fixture
def missing_database() -> Iterator[str]:
    """The URL of a database the PostgreSQL server does not have, dropped after the test
    should a command have created it."""
    name = "cg_test_" + uuid.uuid4().hex[:12]
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        _drop_pg_database(name)


def pg_database_exists(url: str) -> bool:
    """Whether the PostgreSQL server has the database at `url`, asked of it directly."""
    name = url.rsplit("/", 1)[1]
    query = f"SELECT count(*) FROM pg_database WHERE datname = '{name}'"
    found = subprocess.run(
        ["psql", PG_ADMIN_URL, "-Atc", query], check=True, capture_output=True, text=True
    )
    return found.stdout.strip() == "1"


def schema_at(url: str) -> str:
    """The state of the schema of the database at `url`, as `store.db.schema_state` tells it."""

    async def read() -> str:
        engine = create_engine(url)
        try:
            return await schema_state(engine)
        finally:
            await engine.dispose()

    return asyncio.run(read())
