"""The shared billing cases, the price each one states, and the list prices as a table."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from codex_gateway.billing.pricing import LIST_PRICES, Price, PriceTable
from tests.conftest import FIXTURES

CASES_FILE = FIXTURES / "billing" / "cases.json"
CASES: list[dict[str, Any]] = json.loads(CASES_FILE.read_text(encoding="utf-8"))["cases"]
LIST_TABLE = PriceTable(
    Price(model, Decimal(input_), Decimal(cached), Decimal(output))
    for model, (input_, cached, output) in LIST_PRICES.items()
)
COUNTS = ("input_tokens", "cached_tokens", "uncached_input_tokens", "output_tokens")


def case_named(name: str) -> dict[str, Any]:
    return next(case for case in CASES if case["name"] == name)


def case_id(case: dict[str, Any]) -> str:
    return str(case["name"])


def case_price(case: dict[str, Any]) -> Price:
    """The price a case states, markup included."""
    prices = case["prices_per_million_usd"]
    return Price(
        case["model"],
        Decimal(prices["input"]),
        Decimal(prices["cached_input"]),
        Decimal(prices["output"]),
        Decimal(case["markup_multiplier"]),
    )
