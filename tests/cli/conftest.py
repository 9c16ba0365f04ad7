"""A database of each backend for the administration commands, run with no gateway process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Gateway, make_gateway


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A database with no gateway process: the CLI alone."""
    gateway = make_gateway(request.param, tmp_path_factory)
    yield gateway
    gateway.drop_database()
