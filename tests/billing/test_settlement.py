"""bill() turns one request's outcome into its usage row; explain() reads that row back."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from codex_gateway.billing.journal import interrupted_row
from codex_gateway.billing.pricing import PriceTable, plain
from codex_gateway.billing.settlement import (
    FLAG_MODEL_MISMATCH,
    FLAG_NEEDS_REVIEW,
    Outcome,
    bill,
    explain,
)
from codex_gateway.relay.usage import (
    FLAG_CACHED_OVER_INPUT,
    FLAG_INVALID,
    FLAG_MISSING,
    FLAG_REASONING_OVER_OUTPUT,
)
from tests.billing.cases import CASES, COUNTS, case_id, case_named, case_price
from tests.billing.cases import LIST_TABLE as PRICES

SEED_CASE = case_named("seed-guide-example")
MONEY_FIELDS = (
    "cost_uncached_input",
    "cost_cached_input",
    "cost_output",
    "cost_before_markup",
    "cost_usd",
)
TERM = re.compile(r"^\s+[a-z ]+?\s+(\d+) x ([\d.]+) / 1,000,000 = ([\d.]+)$", re.MULTILINE)
INVALID_REASONING = {
    "input_tokens": 100,
    "output_tokens": 50,
    "output_tokens_details": {"reasoning_tokens": "x"},
}
CACHED_OVER_INPUT = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 150},
    "output_tokens": 10,
}


def outcome(model: str = "gpt-5.1-codex", usage: Any = None, **fields: Any) -> Outcome:
    """An outcome as the relay leaves it, at list price; usage is reported when given."""
    price = PRICES.resolve(model)
    assert price is not None
    defaults: dict[str, Any] = {
        "request_id": "req_test",
        "started_at": datetime(2026, 12, 4, 16, 0, 0, tzinfo=UTC),
        "started": 0.0,
        "endpoint": "responses",
        "stream": True,
    }
    return Outcome(
        model=model,
        price=price,
        usage=usage,
        usage_reported=usage is not None,
        **(defaults | fields),
    )


def flags(row: dict[str, Any]) -> list[str]:
    return list(orjson.loads(row["flags"]))


def test_bill_of_the_guide_example_holds_prices_counts_and_each_term() -> None:
    row = bill(
        outcome(
            usage=SEED_CASE["upstream_usage"],
            upstream_model="gpt-5.1-codex-2025-11-13",
            response_id="resp_fx_text",
            user_id=1,
            key_id=2,
            account_id=3,
        ),
        PRICES,
    )

    assert row == {
        "request_id": "req_test",
        "started_at": datetime(2026, 12, 4, 16, 0, 0, tzinfo=UTC),
        "user_id": 1,
        "key_id": 2,
        "account_id": 3,
        "endpoint": "responses",
        "model": "gpt-5.1-codex",
        "upstream_model": "gpt-5.1-codex-2025-11-13",
        "stream": True,
        "status": "completed",
        "http_status": 200,
        "error": None,
        "response_id": "resp_fx_text",
        "raw_usage": orjson.dumps(SEED_CASE["upstream_usage"]).decode(),
        "input_tokens": 1252,
        "cached_tokens": 0,
        "uncached_input_tokens": 1252,
        "output_tokens": 11273,
        "reasoning_tokens": 10944,
        "price_model": "gpt-5.1-codex",
        "price_input": Decimal("1.25"),
        "price_cached_input": Decimal("0.125"),
        "price_output": Decimal("10"),
        "markup": Decimal("1"),
        "cost_uncached_input": Decimal("0.001565"),
        "cost_cached_input": Decimal("0"),
        "cost_output": Decimal("0.11273"),
        "cost_before_markup": Decimal("0.114295"),
        "cost_usd": Decimal("0.114295"),
        "flags": "[]",
        "duration_ms": 0.0,
        "ttfb_ms": None,
        "client_bytes": 0,
        "attempts": None,
    }


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bill_reproduces_every_billing_case(case: dict[str, Any]) -> None:
    admitted = case_price(case)
    expect = case["expect"]
    state = outcome(
        case["model"],
        case["upstream_usage"],
        endpoint=case["endpoint"],
        upstream_model=expect.get("upstream_model"),
    )

    row = bill(replace(state, price=admitted), PriceTable([admitted]))

    for name in (*COUNTS, "reasoning_tokens"):
        assert row[name] == expect[name], name
    assert row["cost_before_markup"] == Decimal(expect["cost_before_markup_usd"])
    assert row["cost_usd"] == Decimal(expect["cost_usd"])
    assert row["price_model"] == case["model"]
    assert row["markup"] == Decimal(case["markup_multiplier"])
    assert flags(row) == []


@pytest.mark.parametrize(
    ("admitted", "reported", "priced_as", "flagged"),
    [
        # the upstream ran the admitted model, or a dated snapshot of it
        ("gpt-5.1-codex", None, "gpt-5.1-codex", False),
        ("gpt-5.1-codex", "gpt-5.1-codex", "gpt-5.1-codex", False),
        ("gpt-5.1-codex", "gpt-5.1-codex-2025-11-13", "gpt-5.1-codex", False),
        ("gpt-5.1-codex-2025-11-13", "gpt-5.1-codex", "gpt-5.1-codex", False),
        # the upstream ran another model that has a price: bill that one
        ("gpt-5.1-codex", "gpt-5.2-codex", "gpt-5.2-codex", True),
        ("gpt-5.1-codex-mini", "gpt-5.1-codex-2025-11-13", "gpt-5.1-codex", True),
        ("gpt-5.2-codex", "gpt-5-mini-2025-08-07", "gpt-5-mini", True),
        # the upstream ran a model with no price: bill as admitted, and say so
        ("gpt-5.1-codex", "gpt-9-codex", "gpt-5.1-codex", True),
        ("gpt-5.1-codex", "gpt-5.1-codex-ultra-2025-11-13", "gpt-5.1-codex", True),
    ],
)
def test_bill_prices_by_the_upstream_model_when_it_is_priced_and_differs(
    admitted: str, reported: str | None, priced_as: str, flagged: bool
) -> None:
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000}

    row = bill(outcome(admitted, usage, upstream_model=reported), PRICES)

    price = PRICES.resolve(priced_as)
    assert price is not None
    assert row["model"] == admitted
    assert row["price_model"] == priced_as
    assert (row["price_input"], row["price_output"]) == (price.input, price.output)
    assert row["cost_usd"] == price.input + price.output
    assert (FLAG_MODEL_MISMATCH in flags(row)) is flagged


def test_bill_without_usage_costs_nothing_and_says_usage_is_missing() -> None:
    row = bill(outcome(status="no_terminal_event"), PRICES)

    assert row["raw_usage"] is None
    assert all(row[name] == 0 for name in MONEY_FIELDS)
    assert row["input_tokens"] == row["output_tokens"] == 0
    assert flags(row) == [FLAG_MISSING]
    assert row["price_model"] == "gpt-5.1-codex"


@pytest.mark.parametrize(
    "usage",
    [
        # counts that are not non-negative integers
        {"input_tokens": -5, "output_tokens": 10},
        {"input_tokens": "100", "output_tokens": 10},
        {"input_tokens": 100, "output_tokens": 1.5},
        {"input_tokens": 100, "output_tokens": True},
        INVALID_REASONING,
        # no counts at all
        {},
    ],
)
def test_bill_of_invalid_usage_costs_nothing_and_needs_review(usage: dict[str, Any]) -> None:
    row = bill(outcome(usage=usage), PRICES)

    assert row["raw_usage"] == orjson.dumps(usage).decode()
    assert all(row[name] == 0 for name in MONEY_FIELDS)
    assert flags(row) == [FLAG_INVALID, FLAG_NEEDS_REVIEW]


@pytest.mark.parametrize(
    ("usage", "row_flags", "cost"),
    [
        # cached over input: all input billed at the cached price
        (
            CACHED_OVER_INPUT,
            [FLAG_CACHED_OVER_INPUT, FLAG_NEEDS_REVIEW],
            "0.0001125",
        ),
        # reasoning over output: output billed as reported, reasoning not added
        (
            {
                "input_tokens": 100,
                "output_tokens": 10,
                "output_tokens_details": {"reasoning_tokens": 40},
            },
            [FLAG_REASONING_OVER_OUTPUT, FLAG_NEEDS_REVIEW],
            "0.000225",
        ),
    ],
)
def test_bill_of_inconsistent_usage_is_clamped_and_needs_review(
    usage: dict[str, Any], row_flags: list[str], cost: str
) -> None:
    row = bill(outcome(usage=usage), PRICES)

    assert flags(row) == row_flags
    assert row["cost_usd"] == Decimal(cost)


def test_bill_keeps_the_relay_flags_first_and_once() -> None:
    state = outcome(usage={"input_tokens": 1, "output_tokens": 1}, upstream_model="gpt-5.2")
    state.flag("messages_converted")
    state.flag("messages_converted")

    row = bill(state, PRICES)

    assert flags(row) == ["messages_converted", FLAG_MODEL_MISMATCH]


def test_explain_shows_each_term_with_the_real_numbers() -> None:
    row = bill(
        outcome(
            usage=SEED_CASE["upstream_usage"],
            upstream_model="gpt-5.1-codex-2025-11-13",
            duration_ms=1234.5,
            ttfb_ms=80.5,
            client_bytes=6839,
        ),
        PRICES,
    )

    text = explain(row)

    assert text.splitlines()[:6] == [
        "request   req_test",
        "started   2026-12-04 16:00:00 UTC   duration 1234.5 ms   first byte 80.5 ms",
        "user      -   key -   account -",
        "model     gpt-5.1-codex (upstream reported gpt-5.1-codex-2025-11-13)"
        "   endpoint responses   stream yes",
        "status    completed (HTTP 200)   client bytes 6839",
        "flags     none",
    ]
    assert "   " + row["raw_usage"] in text
    assert "   input 1252 = uncached 1252 + cached 0   (cached reported: 0)" in text
    assert "   output 11273 (of which reasoning 10944)" in text
    assert "   input 1.25   cached input 0.125   output 10   markup x1" in text
    assert text.split("4. cost\n")[1] == (
        "   uncached input       1252 x 1.25 / 1,000,000 = 0.001565\n"
        "   cached input            0 x 0.125 / 1,000,000 = 0\n"
        "   output              11273 x 10 / 1,000,000 = 0.11273\n"
        "   sum             0.114295\n"
        "   x markup        0.114295 x 1 = 0.114295\n"
        "\n"
        "   total charged: $0.114295\n"
        "   formula: ((input - cached) x P_in + cached x P_cached + output x P_out)"
        " / 1e6 x markup"
    )


def test_explain_shows_what_a_client_that_left_was_sent_before_the_error() -> None:
    left = "The client disconnected before the response ended."
    state = outcome(status="client_disconnected", error=left, client_bytes=2048)

    status = explain(bill(state, PRICES)).splitlines()[4]

    assert status == f"status    client_disconnected (HTTP 200)   client bytes 2048   error: {left}"


def test_explain_shows_markup_and_the_names_of_user_key_and_account() -> None:
    case = case_named("markup-applies-to-the-whole-sum")
    state = replace(outcome(case["model"], case["upstream_usage"]), price=case_price(case))
    row = bill(state, PRICES) | {"user": "alice", "key": "sk-cg-abcd…wxyz", "account": "main"}

    text = explain(row)

    assert "user      alice   key sk-cg-abcd…wxyz   account main" in text
    assert "256 x 1.75 / 1,000,000 = 0.000448" in text
    assert "4864 x 0.175 / 1,000,000 = 0.0008512" in text
    assert "180 x 14 / 1,000,000 = 0.00252" in text
    assert "0.0038192 x 1.5 = 0.0057288" in text
    assert "total charged: $0.0057288" in text


@pytest.mark.parametrize(
    "state",
    [
        # billable usage from each case
        *(
            pytest.param(outcome(case["model"], case["upstream_usage"]), id=case_id(case))
            for case in CASES
        ),
        # cached over input, billed clamped
        pytest.param(outcome(usage=CACHED_OVER_INPUT), id="cached-over-input"),
    ],
)
def test_every_equation_explain_prints_holds(state: Outcome) -> None:
    text = explain(bill(state, PRICES))

    terms = TERM.findall(text)

    assert len(terms) == 3
    for tokens, price, cost in terms:
        assert Decimal(tokens) * Decimal(price) / 1_000_000 == Decimal(cost), (tokens, price, cost)


@pytest.mark.parametrize(
    ("state", "flag"),
    [
        # no usage, billed nothing
        pytest.param(outcome(), "usage_missing", id="usage-missing"),
        # a count that cannot be trusted, billed nothing
        pytest.param(outcome(usage=INVALID_REASONING), "usage_invalid", id="usage-invalid"),
    ],
)
def test_explain_says_why_nothing_was_billed_without_false_equations(
    state: Outcome, flag: str
) -> None:
    text = explain(bill(state, PRICES))

    assert TERM.findall(text) == []
    assert f"not billed: {flag}" in text
    assert "total charged: $0" in text


# The gateway's own count (its details, zero, left out)
ESTIMATE = {"input_tokens": 40, "output_tokens": 300}


@pytest.mark.parametrize(
    ("state", "unbilled"),
    [
        # usage the bill can use
        pytest.param(outcome(usage=SEED_CASE["upstream_usage"]), False, id="counted"),
        # an answer served with no usage, or with counts that are not counts
        pytest.param(outcome(), True, id="completed-without-usage"),
        pytest.param(outcome(usage=INVALID_REASONING), True, id="completed-with-invalid-usage"),
        pytest.param(outcome(status="incomplete", usage={}), True, id="incomplete-no-counts"),
        # an upstream that failed did not serve the answer: nothing to estimate
        pytest.param(outcome(status="failed"), False, id="failed"),
        pytest.param(outcome(status="no_terminal_event"), False, id="no-final-event"),
    ],
)
def test_an_answer_served_without_usable_usage_is_told_apart(
    state: Outcome, unbilled: bool
) -> None:
    assert state.served_without_usage() is unbilled


@pytest.mark.parametrize(
    ("usage", "why", "counts"),
    [
        # one side's counts are not counts: that side is the estimate's, the other as reported,
        # and the row needs review
        pytest.param(
            INVALID_REASONING,
            [FLAG_INVALID, "estimated", FLAG_NEEDS_REVIEW],
            (100, 0, 300, 0),
            id="invalid-output",
        ),
        pytest.param(
            INVALID_REASONING | {"input_tokens_details": {"cached_tokens": 60}},
            [FLAG_INVALID, "estimated", FLAG_NEEDS_REVIEW],
            (100, 60, 300, 0),
            id="invalid-output-cached-input",
        ),
        pytest.param(
            {
                "input_tokens": "100",
                "output_tokens": 50,
                "output_tokens_details": {"reasoning_tokens": 20},
            },
            [FLAG_INVALID, "estimated", FLAG_NEEDS_REVIEW],
            (40, 0, 50, 20),
            id="invalid-input",
        ),
        # no count at all, or no usage
        pytest.param(
            {}, [FLAG_INVALID, "estimated", FLAG_NEEDS_REVIEW], (40, 0, 300, 0), id="empty"
        ),
        pytest.param(None, [FLAG_MISSING, "estimated"], (40, 0, 300, 0), id="missing"),
    ],
)
def test_an_answer_served_without_usable_usage_is_billed_the_estimate(
    usage: dict[str, Any] | None, why: list[str], counts: tuple[int, int, int, int]
) -> None:
    """The upstream did the work: the row bills the gateway's count where the upstream's
    cannot be read, instead of nothing, and keeps what the upstream sent with the flags that
    say why."""
    state = outcome(usage=usage, estimate=ESTIMATE)

    row = bill(state, PRICES)

    assert flags(row) == why
    assert row["raw_usage"] == (None if usage is None else orjson.dumps(usage).decode())
    read = (
        row["input_tokens"],
        row["cached_tokens"],
        row["output_tokens"],
        row["reasoning_tokens"],
    )
    assert read == counts
    price = state.price
    input_tokens, cached, output_tokens, _ = counts
    expected = (
        (input_tokens - cached) * price.input
        + cached * price.cached_input
        + output_tokens * price.output
    ) / Decimal(1_000_000)
    assert row["cost_usd"] == expected
    text = explain(row)
    assert "counts below that this usage does not give are the gateway's estimate" in text
    assert "not billed" not in text
    assert len(TERM.findall(text)) == 3
    assert f"total charged: ${plain(row['cost_usd'])}" in text


def test_usage_reported_in_full_is_billed_even_when_an_estimate_is_there() -> None:
    state = outcome(usage=SEED_CASE["upstream_usage"], estimate=ESTIMATE)

    row = bill(state, PRICES)

    assert row["input_tokens"] == SEED_CASE["upstream_usage"]["input_tokens"]
    assert "estimated" not in flags(row)


def test_bill_logs_four_debug_stages_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="codex_gateway.billing")

    bill(
        outcome(
            usage=SEED_CASE["upstream_usage"],
            request_id="req_stages",
            upstream_model="gpt-5.1-codex-2025-11-13",
        ),
        PRICES,
    )

    records = [record for record in caplog.records if record.name == "codex_gateway.billing"]
    assert [record.levelno for record in records] == [logging.DEBUG] * 4
    assert [getattr(record, "request_id", None) for record in records] == ["req_stages"] * 4
    raw, mapped, billed, cost = (record.getMessage() for record in records)
    assert raw == (
        "stage=raw status=completed upstream_model=gpt-5.1-codex-2025-11-13 usage="
        + orjson.dumps(SEED_CASE["upstream_usage"]).decode()
    )
    assert mapped == (
        "stage=mapped input=1252 cached=0 uncached=1252 output=11273 reasoning=10944 flags=-"
    )
    assert billed == (
        "stage=billed model=gpt-5.1-codex price_model=gpt-5.1-codex uncached=1252 cached=0"
        " output=11273 usd_per_1m input=1.25 cached_input=0.125 output=10 markup=1"
    )
    assert cost == (
        "stage=cost uncached=0.001565 cached=0 output=0.11273 before_markup=0.114295"
        " total=$0.114295"
    )


def test_bill_logs_no_stages_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="codex_gateway.billing")

    bill(outcome(usage=SEED_CASE["upstream_usage"]), PRICES)

    assert [record for record in caplog.records if record.name == "codex_gateway.billing"] == []


def test_a_traced_bill_logs_its_four_stages_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="codex_gateway.billing")

    bill(outcome(usage=SEED_CASE["upstream_usage"]), PRICES, trace=True)

    records = [record for record in caplog.records if record.name == "codex_gateway.billing"]
    assert [record.levelno for record in records] == [logging.INFO] * 4
    assert [record.getMessage().split()[0] for record in records] == [
        "stage=raw",
        "stage=mapped",
        "stage=billed",
        "stage=cost",
    ]
    assert {getattr(record, "request_id", None) for record in records} == {"req_test"}


def test_outcome_flag_adds_each_flag_once() -> None:
    state = outcome()

    for name in ("a", "b", "a"):
        state.flag(name)

    assert state.flags == ["a", "b"]


@pytest.mark.parametrize(
    ("hold", "flagged"),
    [
        # held less than the seed example costs (0.114295): billed in full, and flagged
        (Decimal("0.1"), True),
        # held enough, or nothing held at all (a row written outside admission)
        (Decimal("0.114295"), False),
        (Decimal("0"), False),
    ],
)
def test_a_cost_above_its_hold_is_billed_in_full_and_flagged(hold: Decimal, flagged: bool) -> None:
    state = outcome("gpt-5.1-codex", SEED_CASE["upstream_usage"])
    state.hold = hold
    row = bill(state, PRICES)
    assert row["cost_usd"] == Decimal("0.114295")
    assert ("exceeded_hold" in flags(row)) is flagged


def interrupted() -> dict[str, Any]:
    """The row recovery writes for a hold whose usage never reached the journal."""
    known = {
        "request_id": "req_cut",
        "started_at": "2026-12-04T16:00:00+00:00",
        "user_id": 1,
        "endpoint": "responses",
        "model": "gpt-5.1-codex",
        "stream": True,
    }
    return interrupted_row(known)


ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize(
    ("row", "said"),
    [
        # released by recovery: no prices, no usage
        pytest.param(
            interrupted(), "not billed: interrupted (no prices recorded)", id="interrupted"
        ),
        # priced, but the upstream used nothing
        pytest.param(bill(outcome(usage=ZERO_USAGE), PRICES), "0 x 10 / 1,000,000 = 0", id="zero"),
    ],
)
def test_explain_reads_rows_without_prices_or_usage(row: dict[str, Any], said: str) -> None:
    text = explain(row)

    assert said in text
    assert "total charged: $0" in text
