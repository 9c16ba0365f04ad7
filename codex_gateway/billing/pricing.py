"""Per-model prices and the cost formula, in exact decimals.

cost = (uncached × input + cached × cached_input + output × output) / 1,000,000 × markup

Reasoning tokens are part of output tokens and cached tokens part of input tokens, so neither
is added again. Nothing is rounded: every term is exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow
from typing import NamedTuple

from codex_gateway.relay.usage import MappedUsage

# Exact arithmetic: any result that would need rounding raises instead of being rounded.
MONEY = Context(prec=200, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])
MILLION = Decimal(1_000_000)
THOUSAND_PER_MILLION = Decimal(1_000)
ZERO = Decimal(0)
_DATED_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2})\Z", re.ASCII)
# Model names whose base a price table remembers (clients choose the names, so not all).
BASE_MODEL_CACHE = 1024
_AMOUNT = re.compile(r"[0-9]{1,13}(\.[0-9]{1,18})?", re.ASCII)
MAX_AMOUNT = Decimal(10**12)

# List prices, USD per 1M tokens (standard tier): input, cached input, output.
LIST_PRICES: dict[str, tuple[str, str, str]] = {
    "gpt-5.1-codex": ("1.25", "0.125", "10"),
    "gpt-5.1-codex-mini": ("0.25", "0.025", "2"),
    "gpt-5.1-codex-max": ("1.25", "0.125", "10"),
    "gpt-5-codex": ("1.25", "0.125", "10"),
    "gpt-5.1": ("1.25", "0.125", "10"),
    "gpt-5": ("1.25", "0.125", "10"),
    "gpt-5-mini": ("0.25", "0.025", "2"),
    "gpt-5.2": ("1.75", "0.175", "14"),
    "gpt-5.2-codex": ("1.75", "0.175", "14"),
}


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens, and a multiplier on the whole sum."""

    model: str
    input: Decimal
    cached_input: Decimal
    output: Decimal
    markup: Decimal = Decimal(1)


class Cost(NamedTuple):
    uncached_input: Decimal
    cached_input: Decimal
    output: Decimal
    before_markup: Decimal
    total: Decimal


def parse_amount(text: str | int | Decimal, what: str) -> Decimal:
    """A plain decimal from operator input, 0 to 1e12 with at most 18 decimals.

    Raises ValueError naming `what`. Exponents, underscores and non-ASCII digits are refused
    so that what an operator typed is exactly what is stored.
    """
    raw = str(text).strip()
    if not _AMOUNT.fullmatch(raw):
        raise ValueError(
            f"{what} must be a plain decimal number such as 12.5, with at most 18 decimals "
            f"and at most {MAX_AMOUNT:,}, not {text!r}"
        )
    value = Decimal(raw)
    if value > MAX_AMOUNT:
        raise ValueError(f"{what} must be at most {MAX_AMOUNT:,}, not {text!r}")
    return value


def per_million(value: Decimal, per: str) -> Decimal:
    """Convert a price quoted per `1k` or `1m` tokens to USD per 1M tokens."""
    if per == "1m":
        return value
    if per == "1k":
        return MONEY.multiply(value, THOUSAND_PER_MILLION)
    raise ValueError(f"--per must be 1m or 1k, not {per!r}")


def compute_cost(usage: MappedUsage, price: Price) -> Cost:
    if not usage.billable:
        return Cost(ZERO, ZERO, ZERO, ZERO, ZERO)
    uncached = _term(usage.uncached_input_tokens, price.input)
    cached = _term(usage.billable_cached_tokens, price.cached_input)
    output = _term(usage.output_tokens, price.output)
    before = MONEY.add(MONEY.add(uncached, cached), output)
    return Cost(uncached, cached, output, before, MONEY.multiply(before, price.markup))


def _term(tokens: int, usd_per_million: Decimal) -> Decimal:
    return MONEY.divide(MONEY.multiply(Decimal(tokens), usd_per_million), MILLION)


def base_model(name: str) -> str:
    """`gpt-5.1-codex-2025-11-13` -> `gpt-5.1-codex`; other names are returned as they are,
    among them one whose date no calendar has (`-2025-13-45`), which is no snapshot."""
    dated = _DATED_SUFFIX.search(name)
    if dated is None:
        return name
    try:
        date.fromisoformat(dated.group(1))
    except ValueError:
        return name
    return name[: dated.start()]


class PriceTable:
    """Prices by model name; a dated snapshot name resolves to its base model, nothing else."""

    def __init__(self, prices: Iterable[Price] = ()):
        self._prices: Mapping[str, Price] = {price.model: price for price in prices}
        self._bases: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._prices)

    def __iter__(self) -> Iterator[Price]:
        return iter(self._prices.values())

    def resolve(self, model: str) -> Price | None:
        price = self._prices.get(model)
        if price is not None:
            return price
        return self._prices.get(self.base(model))

    def base(self, model: str) -> str:
        """`base_model(model)`, remembered: a request asks for it up to five times (the key's
        allowlist, the price, the bill, the metrics)."""
        known = self._bases.get(model)
        if known is None:
            if len(self._bases) >= BASE_MODEL_CACHE:
                self._bases.clear()
            known = self._bases[model] = base_model(model)
        return known


def plain(value: Decimal) -> str:
    """A decimal as a plain string with no exponent and no trailing zeros: 0.000285, 10, 0."""
    if value == 0:
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
