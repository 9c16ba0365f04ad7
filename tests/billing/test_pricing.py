"""Prices and the cost formula reproduce every billing case exactly, in decimals."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from codex_gateway.billing.pricing import (
    BASE_MODEL_CACHE,
    LIST_PRICES,
    Price,
    PriceTable,
    base_model,
    compute_cost,
    parse_amount,
    per_million,
    plain,
)
from codex_gateway.relay.usage import FLAG_INVALID, NO_USAGE, MappedUsage, map_usage
from tests.billing.cases import CASES, COUNTS, LIST_TABLE, case_id, case_price

CODEX = LIST_TABLE.resolve("gpt-5.1-codex")


def test_cases_file_holds_the_seven_known_cases() -> None:
    assert [case["name"] for case in CASES] == [
        "seed-guide-example",
        "cached-is-a-subset-of-input",
        "reasoning-is-a-subset-of-output",
        "markup-applies-to-the-whole-sum",
        "chat-usage-field-names",
        "incomplete-is-still-billed",
        "dated-model-name-uses-base-price",
    ]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_billing_case_gives_exactly_the_expected_counts(case: dict[str, Any]) -> None:
    expect = case["expect"]

    usage = map_usage(case["upstream_usage"])

    assert usage.flags == ()
    for name in (*COUNTS, "reasoning_tokens"):
        assert getattr(usage, name) == expect[name], name


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_billing_case_gives_exactly_the_expected_cost(case: dict[str, Any]) -> None:
    expect = case["expect"]

    cost = compute_cost(map_usage(case["upstream_usage"]), case_price(case))

    for value, text in (
        (cost.before_markup, expect["cost_before_markup_usd"]),
        (cost.total, expect["cost_usd"]),
    ):
        assert isinstance(value, Decimal)
        assert value == Decimal(text)
        assert plain(value) == text
        assert "E" not in str(value)
        assert Decimal(str(value)) == Decimal(text)
    assert cost.uncached_input + cost.cached_input + cost.output == cost.before_markup


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_list_prices_agree_with_every_billing_case(case: dict[str, Any]) -> None:
    listed = LIST_TABLE.resolve(case["model"])
    expected = case_price(case)

    assert listed is not None
    assert (listed.input, listed.cached_input, listed.output) == (
        expected.input,
        expected.cached_input,
        expected.output,
    )


def test_dated_upstream_model_of_the_case_resolves_to_the_case_price_only() -> None:
    case = next(case for case in CASES if "upstream_model" in case["expect"])
    decoy = Price("gpt-5.1-codex-max", Decimal(99), Decimal(99), Decimal(99))
    table = PriceTable([decoy, case_price(case)])

    assert table.resolve(case["expect"]["upstream_model"]) == case_price(case)


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        # exact names
        ("gpt-5.1-codex", "gpt-5.1-codex"),
        ("gpt-5.1-codex-mini", "gpt-5.1-codex-mini"),
        ("gpt-5.2-codex", "gpt-5.2-codex"),
        ("gpt-5", "gpt-5"),
        # dated snapshot names resolve to their base model
        ("gpt-5.1-codex-2025-11-13", "gpt-5.1-codex"),
        ("gpt-5.1-codex-mini-2025-11-13", "gpt-5.1-codex-mini"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        # unknown names get no price, never a neighbour's
        ("gpt-5.1-codex-ultra", None),
        ("gpt-5.1-codex-latest", None),
        ("gpt-5.3-codex", None),
        ("gpt-5.3-codex-2026-01-01", None),
        ("GPT-5.1-CODEX", None),
        ("gpt-5.1-codex-2025-11", None),
        ("gpt-5.1-codex-20251113", None),
        ("gpt-5.1-codex-2025-11-13-preview", None),
        # a snapshot date no calendar has is no snapshot
        ("gpt-5-codex-2025-13-45", None),
        ("gpt-5.1-codex-2025-02-30", None),
        ("gpt-5.1-codex-2025-00-10", None),
        ("gpt-5.1-codex-٢٠٢٥-11-13", None),
        ("codex", None),
        ("gpt", None),
        ("", None),
    ],
)
def test_resolve_finds_a_price_only_for_the_model_or_its_snapshot(
    model: str, priced_as: str | None
) -> None:
    price = LIST_TABLE.resolve(model)

    assert (price.model if price else None) == priced_as


def test_resolve_prefers_an_exact_dated_price_over_the_base() -> None:
    dated = Price("gpt-5.1-codex-2025-11-13", Decimal(2), Decimal("0.2"), Decimal(20))
    table = PriceTable([*LIST_TABLE, dated])

    assert table.resolve("gpt-5.1-codex-2025-11-13") == dated
    assert table.resolve("gpt-5.1-codex") == CODEX


def test_price_table_has_one_price_per_model() -> None:
    newer = Price("gpt-5", Decimal(3), Decimal("0.3"), Decimal(30))
    table = PriceTable([*LIST_TABLE, newer])

    assert len(table) == len(LIST_PRICES)
    assert table.resolve("gpt-5") == newer
    assert {price.model for price in table} == set(LIST_PRICES)


@pytest.mark.parametrize(
    ("name", "base"),
    [
        # a trailing date is removed
        ("gpt-5.1-codex-2025-11-13", "gpt-5.1-codex"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        # anything else is kept as it is
        ("gpt-5.1-codex", "gpt-5.1-codex"),
        ("gpt-5.1-codex-2025-11", "gpt-5.1-codex-2025-11"),
        ("gpt-5.1-codex-2025-11-13-preview", "gpt-5.1-codex-2025-11-13-preview"),
        ("2025-11-13", "2025-11-13"),
        ("gpt-5-codex-2025-13-45", "gpt-5-codex-2025-13-45"),
        ("gpt-5.1-codex-2024-02-29", "gpt-5.1-codex"),
        ("gpt-5.1-codex-2025-02-29", "gpt-5.1-codex-2025-02-29"),
    ],
)
def test_base_model(name: str, base: str) -> None:
    assert base_model(name) == base
    # A price table gives the same, asked once or twice.
    table = PriceTable()
    assert table.base(name) == table.base(name) == base


def test_a_price_table_remembers_a_bounded_number_of_bases() -> None:
    table = PriceTable()
    names = [f"client-model-{number}-2025-11-13" for number in range(3 * BASE_MODEL_CACHE)]
    for name in names:
        assert table.base(name) == name.removesuffix("-2025-11-13")
    assert 0 < len(table._bases) <= BASE_MODEL_CACHE


@pytest.mark.parametrize(
    ("value", "per", "usd_per_million"),
    [
        # per 1M tokens is kept
        ("1.25", "1m", "1.25"),
        ("0.000000000000000001", "1m", "0.000000000000000001"),
        # per 1k tokens is multiplied by 1000
        ("0.00125", "1k", "1.25"),
        ("0.000125", "1k", "0.125"),
        ("0.01", "1k", "10"),
        ("0.0000000000000001", "1k", "0.0000000000001"),
    ],
)
def test_per_million(value: str, per: str, usd_per_million: str) -> None:
    result = per_million(Decimal(value), per)

    assert result == Decimal(usd_per_million)
    assert plain(result) == usd_per_million


@pytest.mark.parametrize("per", ["1M", "1K", "k", "m", "1000", ""])
def test_per_million_refuses_other_units(per: str) -> None:
    with pytest.raises(ValueError, match="--per must be 1m or 1k"):
        per_million(Decimal(1), per)


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        # decimal strings, kept exact
        ("0.1", "0.1"),
        ("10.500", "10.500"),
        ("0.000000000000000001", "0.000000000000000001"),
        ("  2.5\n", "2.5"),
        ("0", "0"),
        # ints and Decimals
        (3, "3"),
        (Decimal("1.25"), "1.25"),
    ],
)
def test_parse_amount_accepts_finite_non_negative_decimals(
    text: str | int | Decimal, amount: str
) -> None:
    value = parse_amount(text, "balance")

    assert isinstance(value, Decimal)
    assert value == Decimal(amount)


@pytest.mark.parametrize(
    "text",
    [
        # not a number
        "NaN",
        "nan",
        "sNaN",
        "-NaN",
        # not finite
        "Infinity",
        "-Infinity",
        "inf",
        Decimal("Infinity"),
        # negative
        "-1",
        "-0.000000000000000001",
        -5,
        # garbage
        "",
        "   ",
        "abc",
        "1,5",
        "$1",
        "0x10",
        "1.2.3",
        "1 000",
        # forms that would not store what the operator typed
        "1e-6",
        "1_000",
        "\u0663",
        ".5",
        # beyond the bounds: more than 18 decimals, more than 1e12
        "0.0000000000000000001",
        "1000000000001",
        "1e400",
    ],
)
def test_parse_amount_refuses_nan_infinity_negatives_and_garbage(text: str | int) -> None:
    with pytest.raises(ValueError, match=r"^balance must be") as caught:
        parse_amount(text, "balance")

    assert repr(text) in str(caught.value)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        # zero in any form
        (Decimal("0"), "0"),
        (Decimal("0.000"), "0"),
        (Decimal("0E-9"), "0"),
        (Decimal("-0"), "0"),
        # no trailing zeros, no exponent
        (Decimal("0.00572880"), "0.0057288"),
        (Decimal("100.00"), "100"),
        (Decimal("100"), "100"),
        (Decimal("1E+1"), "10"),
        (Decimal("2.5E-8"), "0.000000025"),
        (Decimal("1E-18"), "0.000000000000000001"),
        (Decimal("1234567.890"), "1234567.89"),
        # negative amounts, as in ledger charges
        (Decimal("-0.114295"), "-0.114295"),
    ],
)
def test_plain(value: Decimal, text: str) -> None:
    assert plain(value) == text


@pytest.mark.parametrize(
    ("usage", "uncached", "cached", "output"),
    [
        # one cached token costs a fraction of a microdollar, exactly
        (MappedUsage(1, 1, 0, 0, 1), "0", "0.000000125", "0"),
        # a trillion tokens, no rounding
        (MappedUsage(10**12, 0, 10**12, 0, 0), "1250000", "0", "10000000"),
        # cached over input is billed as all-cached input
        (MappedUsage(100, 150, 10, 0, 100), "0", "0.0000125", "0.0001"),
    ],
)
def test_compute_cost_terms_are_exact(
    usage: MappedUsage, uncached: str, cached: str, output: str
) -> None:
    cost = compute_cost(usage, CODEX)

    assert (plain(cost.uncached_input), plain(cost.cached_input), plain(cost.output)) == (
        uncached,
        cached,
        output,
    )


@pytest.mark.parametrize(
    "usage",
    [
        # no usage reported
        NO_USAGE,
        # usage with counts that cannot be trusted
        MappedUsage(1000, 0, 1000, 0, 0, (FLAG_INVALID,)),
    ],
)
def test_compute_cost_of_unbillable_usage_is_zero(usage: MappedUsage) -> None:
    cost = compute_cost(usage, CODEX)

    assert (
        cost.uncached_input,
        cost.cached_input,
        cost.output,
        cost.before_markup,
        cost.total,
    ) == (0, 0, 0, 0, 0)


def test_markup_multiplies_the_whole_sum_exactly() -> None:
    price = Price("m", Decimal("1.25"), Decimal("0.125"), Decimal("10"), Decimal("1.1"))

    cost = compute_cost(MappedUsage(3, 1, 7, 0, 1), price)

    assert cost.before_markup == Decimal("0.000072625")
    assert cost.total == Decimal("0.0000798875")
