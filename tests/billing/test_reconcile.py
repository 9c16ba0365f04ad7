"""Reconciliation, as transcripts: our record and theirs in, the verdict out."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from codex_gateway.billing.reconcile import (
    CACHED_TWICE,
    OTHER_PRICES,
    REASONING_ADDED,
    SWAPPED,
    normalise,
    reconcile,
)

OURS: dict[str, Any] = {
    "request_id": "req_1",
    "response_id": "resp_1",
    "started_at": "2026-12-04T10:00:00+00:00",
    "input_tokens": "11771",
    "cached_tokens": "11465",
    "output_tokens": "306",
    "reasoning_tokens": "192",
    "price_input": "1.25",
    "price_cached_input": "0.125",
    "price_output": "10",
    "markup": "1",
    "cost_usd": "0.004875625",
}


def theirs(**changes: Any) -> dict[str, Any]:
    return {**OURS, **changes}


# their row, the mistakes named
CASES = [
    # the classic mistakes, each on its own
    (theirs(input_tokens="306", output_tokens="11771", cost_usd="0.13154"), [SWAPPED]),
    (theirs(input_tokens="23236", cost_usd="0.019207"), [CACHED_TWICE]),
    (theirs(output_tokens="498", cost_usd="0.006795625"), [REASONING_ADDED]),
    # the same tokens, a cost that is the cached tokens billed again at the input price
    (theirs(cost_usd="0.019206875"), [CACHED_TWICE]),
    # the same tokens, a cost that adds reasoning again at the output price
    (theirs(cost_usd="0.006795625"), [REASONING_ADDED]),
    # the same tokens, just another price
    (theirs(cost_usd="0.01"), [OTHER_PRICES]),
]


@pytest.mark.parametrize(("row", "named"), CASES)
def test_a_classic_mistake_is_named(row: dict[str, Any], named: list[str]) -> None:
    report = reconcile([normalise(OURS)], [normalise(row)])
    (mismatch,) = report.mismatched
    assert mismatch.diagnosis == named
    assert not report.clean


def test_an_identical_export_is_clean() -> None:
    report = reconcile([normalise(OURS)], [normalise(theirs())])
    assert (report.matched, report.clean) == (1, True)
    assert report.days["2026-12-04"]["ours_cost"] == Decimal("0.004875625")


def test_missing_and_extra_requests_are_listed() -> None:
    other = {**OURS, "request_id": "req_2", "response_id": "resp_2"}
    report = reconcile(
        [normalise(OURS), normalise(other)], [normalise(theirs(request_id="x", response_id="y"))]
    )
    assert report.missing == ["req_1", "req_2"]
    assert report.extra == ["x"]


def test_rows_match_by_response_id_under_other_column_names() -> None:
    upstream = {
        "id": "resp_1",
        "prompt_tokens": "11771",
        "cached_input_tokens": "11465",
        "completion_tokens": "306",
        "date": "2026-12-04",
    }
    report = reconcile([normalise(OURS)], [normalise(upstream)])
    assert report.matched == 1


def test_columns_can_be_mapped_by_the_operator() -> None:
    row = {"rid": "req_1", "tokens_in": "11771", "tokens_out": "306"}
    mapping = {"rid": "request_id", "tokens_in": "input_tokens", "tokens_out": "output_tokens"}
    assert reconcile([normalise(OURS)], [normalise(row, mapping)]).clean


def test_a_request_listed_twice_is_not_clean() -> None:
    their_rows = [normalise(theirs(), line=2), normalise(theirs(), line=3)]
    report = reconcile([normalise(OURS)], their_rows)
    assert report.duplicates == ["req_1 at line 3 (first at line 2)"]
    assert not report.clean


# a value in their row that is not a plain number, as the report names it
UNREADABLE = [
    (theirs(input_tokens="abc"), "input_tokens='abc'"),
    (theirs(input_tokens="1e3"), "input_tokens='1e3'"),
    (theirs(output_tokens=""), "output_tokens=''"),
    (theirs(cost_usd=""), "cost_usd=''"),
    (theirs(cost_usd="free"), "cost_usd='free'"),
    (theirs(cost_usd="NaN"), "cost_usd='NaN'"),
    (theirs(reasoning_tokens="-3"), "reasoning_tokens='-3'"),
]


@pytest.mark.parametrize(("row", "named"), UNREADABLE)
def test_an_unreadable_value_is_reported_with_its_line(row: dict[str, Any], named: str) -> None:
    report = reconcile([normalise(OURS)], [normalise(row, line=7)])
    assert report.unreadable == [f"line 7 (req_1): {named}"]
    assert not report.clean


def test_json_numbers_are_read_as_numbers() -> None:
    row = theirs(input_tokens=11771, cost_usd=0.004875625)
    assert reconcile([normalise(OURS)], [normalise(row)]).clean


def test_a_row_moved_to_another_day_is_a_day_that_differs() -> None:
    other = {**OURS, "request_id": "req_2", "response_id": "resp_2"}
    moved = {**other, "started_at": "2026-12-05T01:00:00+00:00"}
    report = reconcile([normalise(OURS), normalise(other)], [normalise(OURS), normalise(moved)])
    assert report.matched == 2
    assert report.day_mismatches == [
        "2026-12-04: 2 rows $0.00975125 ours, 1 rows $0.004875625 theirs",
        "2026-12-05: 0 rows $0 ours, 1 rows $0.004875625 theirs",
    ]
    assert not report.clean
