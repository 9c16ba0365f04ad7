"""What `ledger verify` finds, as arithmetic over rows: each discrepancy named in a sentence."""

from __future__ import annotations

from decimal import Decimal

import pytest

from codex_gateway.store.audit import Snapshot, ledger_problems

D = Decimal
# A user who topped up 1, had a lease of 0.5 granted and settled one request of 0.1 from it.
USERS = [(1, "alice", D("0.9"), D("0.4"))]
ENTRIES = [
    (1, "topup", D("1"), D("0"), None),
    (1, "hold", D("0"), D("0.5"), None),
    (1, "settle", D("-0.1"), D("-0.1"), "req_1"),
]
LEASES = [(1, D("0.4"))]
USAGE = [("req_1", 1, 7, D("0.1"))]
KEYS = [(7, D("0.1"), D("0"))]


def snapshot(**changes: object) -> Snapshot:
    base: dict[str, object] = {
        "users": USERS,
        "entries": ENTRIES,
        "leases": LEASES,
        "usage": USAGE,
        "keys": KEYS,
        "key_leases": [],
    }
    return Snapshot(**{**base, **changes})  # type: ignore[arg-type]


def test_books_that_balance_have_no_problem() -> None:
    assert ledger_problems(snapshot()) == []


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        # a balance or reservation changed without a ledger entry
        ({"users": [(1, "alice", D("0.8"), D("0.4"))]}, "balance 0.8 but its ledger"),
        (
            {"users": [(1, "alice", D("0.9"), D("0.5"))], "leases": [(1, D("0.5"))]},
            "reserved 0.5 but its ledger's holds and releases add up to 0.4",
        ),
        # a lease that vanished without its release
        ({"leases": []}, "reserved 0.4 but its open leases add up to 0"),
        # a request settled twice, or never, or for another amount
        (
            {"entries": [*ENTRIES, (1, "release", D("0"), D("0"), "req_1")]},
            "req_1: needs exactly one settlement, has 2",
        ),
        ({"usage": [*USAGE, ("req_2", 1, None, D("0"))]}, "req_2: needs exactly one settlement"),
        ({"usage": [("req_1", 1, 7, D("0.2"))]}, "costs 0.2 but was settled for 0.1"),
        ({"usage": []}, "settlement of request req_1 has no usage row"),
        # a key whose spending or reservation drifted from its rows and leases
        ({"keys": [(7, D("0.3"), D("0"))]}, "key 7: spent 0.3 but its usage rows add up to 0.1"),
        ({"keys": [(7, D("0.1"), D("0.2"))]}, "key 7: reserved 0.2 but its leases add up to 0"),
    ],
)
def test_each_discrepancy_is_named(changes: dict[str, object], problem: str) -> None:
    problems = ledger_problems(snapshot(**changes))

    assert any(problem in found for found in problems), problems
