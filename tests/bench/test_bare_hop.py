"""The bare hop keeps upstream connections as the gateway does."""

from __future__ import annotations

from bench.bare_hop import KEEPALIVE_SECONDS
from codex_gateway.config import Settings


def test_the_bare_hop_keeps_idle_upstream_connections_as_long_as_the_gateway() -> None:
    assert Settings().upstream_keepalive_seconds == KEEPALIVE_SECONDS
