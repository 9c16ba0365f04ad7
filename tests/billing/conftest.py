"""The billing tests that write use the storage tests' fresh databases."""

from tests.store.conftest import backend, database_url, engine, store

__all__ = ["backend", "database_url", "engine", "store"]
