"""A stream that ends without its final event is billed on the gateway's own count, which
may first wait for the vocabulary to load (a process's first such stream). Meanwhile the
request holds only what that count can come to, not its largest output, so the requests
after it are not refused while the balance covers them."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest

from codex_gateway.billing.admission import estimate_hold
from codex_gateway.billing.pricing import LIST_PRICES, Price
from codex_gateway.config import Settings
from tests.conftest import Gateway, Sandbox
from tests.upstream.pool_helpers import (
    FAULT_TIMEOUTS,
    fresh_accounts,
    pool_gateway,
    set_fault,
    stream_events,
)

MODEL = "gpt-5.1-codex"
BODY = {"model": MODEL, "input": "Write a Python function for Fibonacci numbers"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of its own, whose first stream that ends early loads the vocabulary."""
    yield from pool_gateway("sqlite", tmp_path_factory, FAULT_TIMEOUTS)


def test_a_stream_cut_short_holds_what_it_sent_while_its_tokens_are_counted(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    price = Price(MODEL, *(Decimal(amount) for amount in LIST_PRICES[MODEL]))
    largest = estimate_hold(price, 200, None, Settings().hold_output_tokens)
    # Room for one request's largest cost, not for two.
    balance = largest * Decimal("1.5")
    (cut,) = fresh_accounts(gateway, sandbox, [{}])
    set_fault(sandbox, cut, "cut-after:3")
    user, key = gateway.new_user(str(balance))

    # The second request comes while the first is still being counted.
    first, first_events = stream_events(gateway, key, BODY)
    second, second_events = stream_events(gateway, key, BODY)

    assert (first.status_code, second.status_code) == (200, 200)
    assert first_events[-1]["type"] == second_events[-1]["type"] == "error"
    rows = [gateway.usage_row(r.headers["x-request-id"]) for r in (first, second)]
    assert all("estimated" in row["flags"] for row in rows)
    assert all(0 < Decimal(row["cost_usd"]) < largest / 10 for row in rows)
    spent = sum(Decimal(row["cost_usd"]) for row in rows)
    assert Decimal(gateway.balance(user)) == balance - spent
